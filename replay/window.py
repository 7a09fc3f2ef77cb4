"""The measured window of a replay: its first steps (the warm-up, ``warmup_tokens``) are replayed, so the cache
and the policies' state are warm, but not counted, so that an empty cache's compulsory misses do not dominate a
short replay. The drivers take a :class:`WindowMark` (their running totals) when the first measured step
starts; :func:`windowed` subtracts it from the run's totals. ``results.json`` reports the window at its top level
and the whole run under ``whole_run``; the bounds use the same window (``replay/bounds.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from policies.cache import CacheStats

from .errors import RunConfigError

DEFAULT_WARMUP_SHARE = 0.1  # warmup_tokens: null -> the first 10% of the replay's tokens


def warmup_steps(steps: list, warmup_tokens) -> tuple[int, int]:
    """(warm-up tokens, warm-up steps): the first steps of ``steps`` (in replay order) until at least
    ``warmup_tokens`` tokens have been replayed; ``None`` takes the first 10% of the replay's tokens."""
    total = sum(len(s.tokens) for s in steps)
    if warmup_tokens is None:
        w = int(DEFAULT_WARMUP_SHARE * total)
    elif isinstance(warmup_tokens, bool) or not isinstance(warmup_tokens, (int, np.integer)) or warmup_tokens < 0:
        raise RunConfigError(f"warmup_tokens: expected null or an integer >= 0, got {warmup_tokens!r}")
    else:
        w = int(warmup_tokens)
    n = done = 0
    while done < w and n < len(steps):
        done += len(steps[n].tokens)
        n += 1
    if n >= len(steps) and len(steps) > 0 and w > 0:
        raise RunConfigError(f"warmup_tokens: {w} leaves no step to measure (the replay has {total} tokens in "
                          f"{len(steps)} steps)")
    return w, n


@dataclass
class WindowMark:
    """A driver's running totals when the measured window began."""

    step: int  # the first measured step
    t: float  # total time so far
    stall_s: float
    compute_s: float
    demand_loads: int
    copies: int  # copies so far, counted as ReplayResult.copies counts them (a preload included)
    bytes_moved: int  # likewise ReplayResult.bytes_moved
    stats: CacheStats  # a copy of the cache's counters
    requests: np.ndarray  # per layer, as in LayerStats
    hits: np.ndarray
    late_hits: np.ndarray
    misses: np.ndarray
    layer_stall_s: np.ndarray


def take_mark(step: int, t: float, stall_s: float, compute_s: float, demand_loads: int, copies: int,
              bytes_moved: int, stats: CacheStats, requests, hits, late_hits, misses, layer_stall_s) -> WindowMark:
    """A mark from a driver's totals (per-layer sequences are copied)."""
    def arr(x, dtype=np.int64):
        return np.array(x, dtype=dtype)

    return WindowMark(step, t, stall_s, compute_s, demand_loads, copies, bytes_moved, dataclasses.replace(stats),
                      arr(requests), arr(hits), arr(late_hits), arr(misses), arr(layer_stall_s, float))


def windowed(res, stats: CacheStats, mark: WindowMark | None):
    """``res`` (a :class:`~replay.results.ReplayResult`) and the cache's ``stats`` restricted to the measured
    window (returned unchanged without a mark)."""
    if mark is None:
        return res, stats
    layers = window_layers(res)
    k = mark.step
    win = dataclasses.replace(
        res, total_s=res.total_s - mark.t, stall_s=res.stall_s - mark.stall_s, compute_s=res.compute_s - mark.compute_s,
        step_s=res.step_s[k:], step_phase=res.step_phase[k:], step_tokens=res.step_tokens[k:],
        bytes_moved=res.bytes_moved - mark.bytes_moved,
        copies=res.copies - mark.copies, demand_loads=res.demand_loads - mark.demand_loads,
        layers=layers, preload_copies=0,
    )
    fields = {f.name: getattr(stats, f.name) - getattr(mark.stats, f.name) for f in dataclasses.fields(CacheStats)}
    return win, CacheStats(**fields)


def window_layers(res):
    """The per-layer counters (:class:`~replay.results.LayerStats`) of ``res``'s measured window."""
    ls, mark = res.layers, res.mark
    if mark is None:
        return ls
    return dataclasses.replace(ls, requests=ls.requests - mark.requests, hits=ls.hits - mark.hits,
                               late_hits=ls.late_hits - mark.late_hits, misses=ls.misses - mark.misses,
                               stall_s=ls.stall_s - mark.layer_stall_s)
