"""``python -m executor [OVERRIDE ...]`` and its subcommands: the real executor (see :data:`USAGE`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from replay.run_dirs import register_resolvers

log = logging.getLogger("executor")
USAGE = """\
usage: python -m executor [OVERRIDE ...]
       python -m executor {profile,profile loop,model,router-bias,check} [-h] ...

Run a routing trace for real with the simulator's configs: the trace's model shape scaled down by
executor.scale, experts packed in a file on disk (or pinned host memory with executor.backend=cuda), the
cache's slots in RAM (or on the GPU), copies on I/O threads, real compute. Writes results.json with the
simulator's keys (run.driver = "executor"), measured, to outputs/<time>_<trace>_<cache>_<predictor>/.

subcommands (each has its own -h):
  profile       measure this machine's tier and compute for a model shape: the profile hardware=profiled reads
  profile loop  the per-layer host cost of one policy's decision loop (hardware.compute.layer_overhead_s)
  model         generate with a transformers MoE model whose experts are offloaded (model mode)
  router-bias   what biasing the router toward cached experts does to the model's output
  check         whether a backend (cpu, cuda) can run on this machine

common overrides (as python -m sim; python -m sim --help lists them all):
  trace=NAME | trace.path=FILE.parquet strategy=NAME cache=NAME cache.fraction=F predictor=NAME horizon=NAME
  batch_size=B seed=S max_tokens=N hardware=profiled hardware.profile_path=PROFILE.json
  executor=default|cuda executor.scale=N executor.io_threads=N executor.compute_threads=N
  executor.odirect=auto|on|off executor.backend=cpu|cuda paths.tier_dir=DIR

examples:
  python -m executor trace=deepseek-synth trace.synth.tokens=100 executor.scale=16
  python -m executor profile --model-preset deepseek-v2-lite --scale 8 -o profile.json
  python -m executor model --help

The config groups and every key follow.
"""
SUBCOMMANDS = {"profile": ".profile", "model": ".model_cli", "router-bias": ".router_bias", "check": ".check"}

register_resolvers()  # before hydra composes the run and sweep folder names


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> float | None:
    from replay.errors import known_errors
    from replay.outputs import run_line

    from .run import execute_config
    from .tier import TierError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        res = execute_config(cfg, out_dir)
    except (*known_errors(), TierError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info("%s (executor, %s) -> %s", run_line(res), res["tier"], out_dir / "results.json")
    return res["stall_s"]


def main() -> None:
    import importlib

    sub = sys.argv[1] if len(sys.argv) > 1 else ""
    if sub in ("-h", "--help"):
        print(USAGE)  # then hydra's own help: the config groups and the composed config
    if sub in SUBCOMMANDS:  # argparse tools; anything else is hydra overrides for a replay
        sys.exit(importlib.import_module(SUBCOMMANDS[sub], __package__).main(sys.argv[2:]))
    from replay.config_keys import rewrite_overrides

    sys.argv[1:] = rewrite_overrides(sys.argv[1:])  # old key names, with a warning naming the new ones
    run()


if __name__ == "__main__":
    main()
