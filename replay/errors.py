"""The errors a run reports to the user as one ``error: ...`` line (exit code 2): bad configuration or input,
raised before any replay work, and outputs that cannot be written."""

from __future__ import annotations


class RunConfigError(ValueError):
    """A configuration value a run (simulator or executor) cannot use."""


class OutputWriteError(RuntimeError):
    """A run's outputs could not be written (a full disk, a read-only folder, a file where a folder should be)."""


def known_errors() -> tuple[type[Exception], ...]:
    """Every configuration or input error of a run: what a command line turns into ``error: ...`` and exit 2."""
    from policies.base import PolicyConfigError
    from traces import TraceError

    from .hardware import HardwareConfigError

    return (PolicyConfigError, TraceError, HardwareConfigError, RunConfigError, OutputWriteError)
