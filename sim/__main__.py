"""``python -m sim [-m] [OVERRIDE ...]``: the discrete-event simulator (hydra; see :data:`USAGE`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from replay.run_dirs import register_resolvers

log = logging.getLogger("sim")

register_resolvers()  # before hydra composes the run and sweep folder names

USAGE = """\
usage: python -m sim [-m] [OVERRIDE ...]

Replay a routing trace against expert cache / prefetch / horizon / scheduling policies on a model of the
hardware (discrete-event simulator), and bound it by Belady's MIN and a perfect-foresight prefetcher. Writes
results.json and per_layer.parquet (chrome_trace.json with output.chrome_trace=true) to
outputs/<time>_<trace>_<cache>_<predictor>/, or for a sweep (-m) to multirun/<time>/<job>_<overrides>/
(paths.outputs_dir, paths.multirun_dir).

common overrides (group=option, key=value):
  trace=NAME | trace.path=FILE.parquet  the routing trace (default mixtral-synth; conf/trace)
  strategy=NAME                        a cache + predictor + horizon bundle (conf/strategy)
  cache=NAME cache.fraction=F          eviction policy and its size (or cache.slots=N, cache.scope=global)
  predictor=NAME horizon=fixed|adaptive horizon.distance=D   prefetching (prefetch.min_score=S)
  scheduler=fifo|route_grouping batch_size=B                 batching
  hardware=NAME                        copy and compute models (conf/hardware; profiled: a measured profile)
  hardware.bandwidth.bandwidth_GBps=G  the link's bandwidth (GB/s); hardware.bandwidth.sharing=shared: one link
  seed=S max_tokens=N split.test_fraction=F output.chrome_trace=true paths.bounds_dir=null
  -m KEY=A,B ...                       a sweep over every combination (multirun)
  +experiment=smoke|demo               ready-made sweeps
  --cfg job                            print the composed config and exit

examples:
  python -m sim trace=deepseek-synth strategy=transition-adaptive hardware=t4 cache.fraction=0.25
  python -m sim -m strategy=ondemand-lru,transition-fixed cache.fraction=0.25,0.5
  python -m sim -m +experiment=smoke

The real executor runs the same configs: python -m executor --help. The config groups and every key follow.
"""


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from replay.errors import known_errors
    from replay.outputs import run_line

    from .run import simulate

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        res = simulate(cfg, out_dir)
    except known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info("%s -> %s", run_line(res), out_dir / "results.json")
    return res["stall_s"]


def cli() -> None:
    from replay.config_keys import rewrite_overrides

    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(USAGE)  # then hydra's own help: the config groups and the composed config
    sys.argv[1:] = rewrite_overrides(sys.argv[1:])  # old key names, with a warning naming the new ones
    main()


if __name__ == "__main__":
    cli()
