"""``python -m executor [hydra overrides]``: run a trace for real with the same config groups as ``python -m sim``.
``python -m executor profile ...``: measure this machine's tier and compute for ``hardware=profiled``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger("executor")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def run(cfg: DictConfig) -> float | None:
    from sim.__main__ import known_errors

    from .run import execute_config
    from .tier import TierError

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        res = execute_config(cfg, out_dir)
    except (*known_errors(), TierError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    log.info(
        "%s | %s (executor, %s): hit %.3f stall %.4fs total %.4fs -> %s", res["run"]["trace_name"],
        res["run"]["policy"], res["tier"], res["hit_rate"], res["stall_s"], res["total_s"], out_dir / "results.json",
    )
    return res["stall_s"]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "profile":
        from .profile import main as profile_main

        sys.exit(profile_main(sys.argv[2:]))
    run()


if __name__ == "__main__":
    main()
