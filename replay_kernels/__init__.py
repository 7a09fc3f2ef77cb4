"""Compiled kernels of the replay's hot loops: the on-demand timed replay, the timing-free decision replay
(MIN and the cache curves of ``traces stats``) and the perfect-foresight bounds.

Every kernel reproduces a Python implementation that stays the specification (``policies/``, ``sim/``):
same decisions, same floats; ``tests/test_kernel_*.py`` run both. This package depends on numpy and,
optionally, numba: nothing else of the project, so ``traces``, ``policies`` and the drivers can all use it.
Without numba (not installed, or failing to import) :func:`available` is False and says why; the kernels then
still run as plain Python (slowly), and a driver should take its own Python path instead. See
``docs/kernel.md``.
"""

from __future__ import annotations

from ._jit import NUMBA, UNAVAILABLE_REASON


def available() -> bool:
    """Whether the kernels are compiled (numba imported); else a driver should use its Python path."""
    return NUMBA is not None


def unavailable_reason() -> str:
    """Why :func:`available` is False ('' when it is True)."""
    return UNAVAILABLE_REASON
