"""The folders a run or sweep writes to. Names in the hydra configs that become folder names (the run and
sweep folders) pass through the ``safe_name`` resolver (:func:`traces.io.safe_name`), so a trace or run name
with ``/``, ``..`` or a NUL byte names a folder inside ``outputs/`` or the sweep folder instead of one
elsewhere; and :class:`RunDirCheck` (a hydra callback) turns a folder that cannot be made (a file in the way,
a read-only disk) into ``error: ...`` and exit code 2 before any work, instead of hydra's traceback."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback


def register_resolvers() -> None:
    """Make ``${safe_name:...}`` available to the configs; every entry point that composes them calls this
    (registering again is harmless)."""
    from omegaconf import OmegaConf

    from traces.io import safe_name

    OmegaConf.register_new_resolver("safe_name", safe_name, replace=True)


class RunDirCheck(Callback):
    """Makes the run's (or the sweep's) folder before hydra does, stopping with one ``error:`` line if it cannot."""

    def on_run_start(self, config, **kwargs) -> None:
        make_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        make_dir(config.hydra.sweep.dir, "hydra.sweep.dir")


def make_dir(path: str, key: str) -> None:
    try:
        Path(str(path)).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: {key}: cannot create the folder {path} ({exc.strerror or exc})", file=sys.stderr)
        sys.exit(2)
