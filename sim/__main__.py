"""``python -m sim [overrides]``: replay a trace against policies (hydra; ``-m`` sweeps, ``--help`` lists groups).

Examples::

    python -m sim trace.path=TRACE.parquet cache=lru predictor=transition horizon=adaptive \
        hardware=a100-pcie4 cache.fraction=0.5
    python -m sim -m strategy=ondemand-lru,transition-fixed cache.fraction=0.25,0.5
"""

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


if __name__ == "__main__":
    main()
