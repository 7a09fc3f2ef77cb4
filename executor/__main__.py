"""``python -m executor [hydra overrides]``: run a trace for real with the same config groups as ``python -m sim``.
``python -m executor profile ...``: measure this machine's tier and compute for ``hardware=profiled``.
``python -m executor model ...``: generate with a transformers MoE model whose experts are offloaded.
``python -m executor router-bias ...``: measure what biasing the router toward cached experts does to the output."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from replay.run_dirs import register_resolvers

log = logging.getLogger("executor")
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
    if sub in SUBCOMMANDS:  # argparse tools; anything else is hydra overrides for a replay
        sys.exit(importlib.import_module(SUBCOMMANDS[sub], __package__).main(sys.argv[2:]))
    run()


if __name__ == "__main__":
    main()
