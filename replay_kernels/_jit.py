"""The compiler, if it can be had: numba's ``njit`` with an on-disk cache, else plain Python.

Importing numba may fail in more ways than ImportError (a numba built for another numpy raises at import, a
broken llvmlite raises OSError), and on some machines it is simply not installed (the GPU check machine: its
llvmlite wheel alone is 57 MB). Every failure is caught here, once, and recorded: ``NUMBA`` is then None,
``jit`` leaves functions as plain Python (so the kernels still run, slowly, e.g. under a debugger) and
:func:`replay_kernels.available` says False with the reason, so a driver takes its Python path instead.

The compiled code is cached on disk so a run does not pay the compile again (seconds per kernel). numba keys
each cached function on the source of its own file only, not on the helpers it calls from other files, so an
edit to a helper would leave its callers' cached machine code stale; the cache directory is therefore named
after a digest of every source file of this package (``.cache/numba/<digest>`` beside the package, or under
``NUMBA_CACHE_DIR`` when that is set): an edit anywhere starts a fresh cache.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _import_numba():
    try:
        import numba
    except Exception as exc:  # not only ImportError: see the module docstring
        return None, f"numba could not be imported ({type(exc).__name__}: {exc})"
    return numba, ""


NUMBA, UNAVAILABLE_REASON = _import_numba()


def source_digest(package: Path = _PACKAGE) -> str:
    """A digest of this package's sources (and the numba version): the name of its compiled-code cache."""
    h = hashlib.sha256(getattr(NUMBA, "__version__", "none").encode())
    for path in sorted(Path(package).glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    base = os.environ.get("NUMBA_CACHE_DIR") or str(_PACKAGE.parent / ".cache" / "numba")
    return Path(base) / source_digest()


_CACHE_DIR = str(cache_dir()) if NUMBA is not None else ""


def jit(fn=None, *, nrt: bool = True):
    """``numba.njit(cache=True)`` into this package's cache directory, or ``fn`` itself without numba: for the
    kernels' entry points, which Python calls. ``nrt=False`` (``@jit(nrt=False)``) compiles without numba's
    reference counting, so no call passes the state's arrays through atomic increments: for a kernel that
    allocates nothing (its caller passes every array).

    numba reads its cache directory when a function is decorated; it is set for that moment only and put back,
    so other numba users in the process keep theirs. If caching cannot be set up (an unwritable directory
    makes numba fall back to its other locations; anything else raising here), the function compiles uncached."""
    if fn is None:
        return lambda f: _njit(f, {} if nrt else {"_nrt": False})
    return _njit(fn, {} if nrt else {"_nrt": False})


def helper(fn):
    """:func:`jit` for a function only compiled code calls: without the CPython wrapper numba would otherwise
    build for each (about a fifth of the compile time). Without numba it is ``fn``, callable as usual."""
    return _njit(fn, {"no_cpython_wrapper": True, "_nrt": False})


def inline(fn):
    """:func:`helper` inlined into its callers by numba (a tiny function called per key in the hot loops: a call
    would copy the state's array descriptors for each)."""
    return _njit(fn, {"no_cpython_wrapper": True, "_nrt": False, "inline": "always"})


def _njit(fn, options: dict):
    if NUMBA is None:
        return fn
    config = NUMBA.config
    previous = config.CACHE_DIR
    config.CACHE_DIR = _CACHE_DIR
    try:
        return NUMBA.njit(cache=True, **options)(fn)
    except Exception:
        return NUMBA.njit(**options)(fn)
    finally:
        config.CACHE_DIR = previous
