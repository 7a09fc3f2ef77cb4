"""The bounds of a run (MIN's hit rate and loads, the perfect-foresight stalls) depend on the replayed steps,
the cache's partitions and capacity and the hardware models, not on the policy under test, so the runs of a
sweep share them: they are cached under ``paths.bounds_dir`` (default ``.cache/bounds``), one JSON file per
digest of those inputs *and of the source code of the core (``replay``) and of the policies*, so editing either recomputes them.
A cached file gives the very numbers a fresh computation gives (JSON round-trips floats exactly). A file is
checked before it is trusted (:func:`entry_problem`): one that is not JSON, lacks a bound or holds anything but
a number in range is named in a warning, recomputed and replaced."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from traces.io import atomic_path

log = logging.getLogger(__name__)
_ROOT = Path(__file__).resolve().parent.parent


def code_digest(packages: tuple[str, ...] = ("replay", "policies")) -> str:
    """Digest of every source file of ``packages`` (by default what the bounds can depend on)."""
    h = hashlib.sha256()
    for pkg in packages:
        for f in sorted((_ROOT / pkg).rglob("*.py")):
            h.update(str(f.relative_to(_ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _feed(h, obj) -> None:
    """Add ``obj`` to the digest unambiguously (type tags, lengths, array dtypes and shapes)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        h.update(f"<{type(obj).__name__}>".encode())
        for f in dataclasses.fields(obj):
            h.update(f.name.encode())
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"<nd {a.dtype.str} {a.shape}>".encode())
        h.update(a.tobytes())
    elif isinstance(obj, (list, tuple)):
        h.update(f"<seq {len(obj)}>".encode())
        for x in obj:
            _feed(h, x)
    elif obj is None or isinstance(obj, (bool, int, float, str, np.integer, np.floating)):
        h.update(f"<{type(obj).__name__} {obj!r}>".encode())
    else:
        raise TypeError(f"bounds cache: cannot digest a {type(obj).__name__}")


def bounds_digest(p) -> str:
    """Digest of everything :func:`replay.bounds.bounds` reads from a prepared run, and of the code."""
    h = hashlib.sha256(code_digest().encode())
    _feed(h, p.test.experts)
    _feed(h, [np.asarray(st.tokens, dtype=np.int64) for st in p.steps])
    _feed(h, [np.asarray(p.partition_of), list(p.capacity), p.copy_model, p.compute, int(p.copy_bytes),
              int(p.meta.num_layers), list(p.rcfg.num_experts), int(p.rcfg.expert_bytes), int(p.warmup_steps)])
    return h.hexdigest()


# what a cache entry holds (replay.bounds.compute_bounds): name -> (integer?, largest value)
BOUND_KEYS = {
    "belady_hit_rate": (False, 1.0),
    "belady_misses_unique": (True, math.inf),
    "oracle_stall_s": (False, math.inf),
    "oracle_aggressive_stall_s": (False, math.inf),
    "oracle_conservative_stall_s": (False, math.inf),
    "oracle_preloaded_stall_s": (False, math.inf),
}
WHOLE_RUN = "whole_run"  # the same bounds over the whole replay (the top level is the measured window's)


def entry_problem(obj, where: str = "") -> str | None:
    """Why ``obj`` (a parsed cache file) is not a usable set of bounds, or None: :data:`BOUND_KEYS` at the top
    level and again under ``whole_run``."""
    if not isinstance(obj, dict):
        return f"expected a JSON object of bounds{where}, got {type(obj).__name__}"
    want = set(BOUND_KEYS) if where else {*BOUND_KEYS, WHOLE_RUN}
    if set(obj) != want:
        return f"expected the keys {sorted(want)}{where}, got {sorted(obj)}"
    for k, (integer, top) in BOUND_KEYS.items():
        v = obj[k]
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not math.isfinite(v) or not 0 <= v <= top:
            return f"'{k}'{where} is {v!r}, expected {'an integer' if integer else 'a number'} in [0, {top}]"
    return None if where else entry_problem(obj[WHOLE_RUN], f" under '{WHOLE_RUN}'")


def cached_bounds(p, compute: Callable[[], dict], cache_dir: str | Path | None) -> dict:
    """``compute()``'s result for this prepared run, read from ``cache_dir`` if an earlier run stored it (None:
    always compute). An unreadable or invalid cache file is recomputed and replaced; an unwritable cache
    directory only logs a warning."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir) / f"{bounds_digest(p)[:32]}.json"
    if path.exists():
        try:
            obj = json.loads(path.read_text())
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8
            obj, problem = None, f"unreadable: {exc}"
        else:
            problem = entry_problem(obj)
        if problem is None:
            return obj
        log.warning("bounds cache: ignoring %s (%s); recomputing", path, problem)
    out = compute()
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(out))
    except OSError as exc:  # a cache that cannot be written must not fail the run
        log.warning("bounds cache: cannot write %s (%s); the bounds were computed, not cached", path, exc)
    return out
