"""The errors a run reports to the user as one ``error: ...`` line (exit code 2), raised before any replay work."""

from __future__ import annotations


class RunConfigError(ValueError):
    """A configuration value a run (simulator or executor) cannot use."""


def known_errors() -> tuple[type[Exception], ...]:
    """Every configuration or input error of a run: what a command line turns into ``error: ...`` and exit 2."""
    from policies.base import PolicyConfigError
    from traces import TraceError

    from .hardware import HardwareConfigError

    return (PolicyConfigError, TraceError, HardwareConfigError, RunConfigError)
