"""A replay's access stream and perfect knowledge of its future: the distinct keys every layer-step needs
(:func:`step_keys`), which layer-steps use each key (:class:`FutureIndex`, for clairvoyant policies: Belady,
the oracle predictor, the bounds), and the resident keys of a partition ordered by next use
(:class:`FarthestNextUse`)."""

from __future__ import annotations

import bisect
import gc
import heapq
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from itertools import repeat

import numpy as np


class FutureIndex:
    """Perfect knowledge of the replay's future: for each key, the sorted layer-steps that use it.
    Belady and the oracle predictor read it; nothing else may. The index is built at the first question (a
    run whose clairvoyant parts all run compiled never asks)."""

    def __init__(self, needed, flat: tuple[np.ndarray, np.ndarray] | None = None):
        """``needed[t]``: the distinct keys of layer-step t (a list of arrays, or :class:`StepStream.needed`);
        ``flat``: (keys per layer-step, every layer-step's keys concatenated), if at hand."""
        self.needed = needed  # needed[t] = unique keys used at layer-step t
        self.horizon = len(needed)
        self._flat = flat
        self._uses: dict[int, list[int]] | None = None

    def _index(self) -> dict[int, list[int]]:
        # every (key, layer-step) pair, grouped by key in layer-step order (a stable sort: no loop per use)
        if self._flat is not None:
            lens, keys = self._flat
        else:
            needed = self.needed
            lens = np.fromiter(map(len, needed), dtype=np.int64, count=len(needed))
            keys = np.concatenate(needed) if lens.sum() else np.zeros(0, np.int64)
        keys = np.asarray(keys).astype(np.int64, copy=False)
        steps = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        small = keys.astype(np.int16) if len(keys) and keys.max() < 2**15 else keys  # numpy radix-sorts 16 bits
        order = np.argsort(small, kind="stable")
        keys, steps = keys[order], steps[order]
        cut = np.flatnonzero(keys[1:] != keys[:-1]) + 1
        starts, ends = np.r_[0, cut].tolist(), np.r_[cut, len(keys)].tolist()
        self._uses = {int(keys[a]): steps[a:b].tolist() for a, b in zip(starts, ends) if b > a}
        self._flat = None
        return self._uses

    def next_use(self, key: int, now: int) -> int:
        """First layer-step >= now that uses ``key`` (``horizon`` if none)."""
        u = (self._index() if self._uses is None else self._uses).get(key)
        if not u:
            return self.horizon
        i = bisect.bisect_left(u, now)
        return u[i] if i < len(u) else self.horizon

    def uses_of(self, key: int) -> list[int]:
        """The sorted layer-steps that use ``key`` (empty if none)."""
        return (self._index() if self._uses is None else self._uses).get(key, [])


class StepStream:
    """The replay's access stream as three arrays (compressed rows, the layout of :mod:`replay_kernels.keys`):
    layer-step ``i`` uses the distinct keys ``keys[ptr[i]:ptr[i + 1]]`` (first-seen order), ``counts[...]``
    (token, expert) uses each. :attr:`needed` and :attr:`uses` read it as :func:`step_keys`' two lists do,
    building a layer-step's array view or dict at its first access, so a run whose replay and bounds run
    compiled (on these arrays) never builds the half a million small dicts of a long trace."""

    def __init__(self, ptr: np.ndarray, keys: np.ndarray, counts: np.ndarray):
        self.ptr = np.asarray(ptr, dtype=np.int64)  # int64 [layer-steps + 1]
        self.keys = np.asarray(keys, dtype=np.int64)  # int64: the keys of every layer-step, concatenated
        self.counts = np.asarray(counts, dtype=np.int64)  # int64, like keys: each key's uses in its layer-step
        self.keys.flags.writeable = False  # handed out as views
        bounds = self.ptr.tolist()
        keys, counts = self.keys, self.counts
        self.needed: Sequence[np.ndarray] = _Rows(len(bounds) - 1, lambda i: keys[bounds[i]:bounds[i + 1]])
        self.uses: Sequence[dict[int, int]] = _Rows(
            len(bounds) - 1, lambda i: dict(zip(keys[bounds[i]:bounds[i + 1]].tolist(),
                                                counts[bounds[i]:bounds[i + 1]].tolist())))

    @classmethod
    def from_lists(cls, needed: list[np.ndarray], uses: list[dict[int, int]]) -> StepStream:
        """The stream of :func:`step_keys`' lists (which it then hands out as they are)."""
        lens = np.fromiter(map(len, needed), dtype=np.int64, count=len(needed))
        ptr = np.zeros(len(needed) + 1, dtype=np.int64)
        np.cumsum(lens, out=ptr[1:])
        keys = np.concatenate(needed).astype(np.int64, copy=False) if len(needed) else np.zeros(0, np.int64)
        counts = np.fromiter((c for u in uses for c in u.values()), dtype=np.int64, count=int(ptr[-1]))
        out = cls(ptr, keys, counts)
        out.needed, out.uses = needed, uses
        return out

    def distinct(self) -> np.ndarray:
        """The number of distinct keys of every layer-step, int64 [layer-steps]."""
        return np.diff(self.ptr)

    def future(self) -> FutureIndex:
        """The :class:`FutureIndex` of this stream (built at its first question)."""
        return FutureIndex(self.needed, (self.distinct(), self.keys))


class _Rows(Sequence):
    """A read-only sequence whose item ``i`` is ``make(i)``, made at its first access and kept."""

    def __init__(self, n: int, make: Callable):
        self._made: list = [None] * n
        self._make = make

    def __len__(self) -> int:
        return len(self._made)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self._made)))]
        row = self._made[i]
        if row is None:
            row = self._made[i] = self._make(i if i >= 0 else i + len(self._made))
        return row


class FarthestNextUse:
    """The keys of one cache partition by next use, farthest first: the victim order of MIN-style rules
    (Belady, the perfect-foresight bounds) without scanning every resident key per eviction.

    ``touch(key, now)`` records that ``key`` is resident and was used (or loaded) at ``now``: its next use is
    the first one strictly after ``now``. Every use of a resident key must be touched, so a key's recorded next
    use is still ``next_use(key, now + 1)`` when a victim is chosen later. A lazy max-heap: a touch pushes an
    entry, ``remove`` forgets the key, and stale entries are dropped when they reach the top. Ties of next use
    go to the lowest key, or the highest with ``high_key_first``. A key's touches come at non-decreasing
    layer-steps in any replay, so its next use is found by moving a cursor along its uses (each use is passed
    once over the replay) rather than by a search per touch."""

    def __init__(self, future: FutureIndex, high_key_first: bool = False):
        self._future = future
        self._sign = -1 if high_key_first else 1
        self._next: dict[int, int] = {}  # resident key -> its next use
        self._heap: list[tuple[int, int, int]] = []  # (-next use, sign * key, key)
        self._pos: dict[int, int] = {}  # key -> index of its first use after its last touch

    def touch(self, key: int, now: int) -> None:
        u = self._future.uses_of(key)
        i = self._pos.get(key, 0)
        if i and u[i - 1] > now:  # touched at an earlier layer-step than before: search instead
            i = bisect.bisect_right(u, now)
        else:
            n = len(u)
            while i < n and u[i] <= now:
                i += 1
        self._pos[key] = i
        nu = u[i] if i < len(u) else self._future.horizon
        if self._next.get(key) != nu:
            self._next[key] = nu
            heapq.heappush(self._heap, (-nu, self._sign * key, key))
            if len(self._heap) > 4 * len(self._next) + 64:  # mostly stale entries: rebuild
                self._heap = [(-n, self._sign * k, k) for k, n in self._next.items()]
                heapq.heapify(self._heap)

    def remove(self, key: int) -> None:
        self._next.pop(key, None)

    def next_of(self, key: int) -> int | None:
        """The recorded next use of a resident key (None if not resident)."""
        return self._next.get(key)

    def farthest(self, allowed: Callable[[int], bool]) -> int | None:
        """The resident key with the farthest next use among those ``allowed`` (None if none is)."""
        heap, nxt, skipped, found = self._heap, self._next, [], None
        while heap:
            neg, _, key = heap[0]
            if nxt.get(key) != -neg:  # stale: removed, or touched again since
                heapq.heappop(heap)
                continue
            if allowed(key):
                found = key
                break
            skipped.append(heapq.heappop(heap))  # resident but not a candidate now (protected, in flight)
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found


def steps_by_size(steps: list) -> list[tuple[int, list[int], np.ndarray]]:
    """The steps grouped by how many tokens they compute, for one numpy call per group: (tokens per step,
    the steps' indices in ``steps``, their token indices as an int [steps, tokens] array)."""
    by_size: dict[int, list[int]] = {}
    for i, st in enumerate(steps):
        by_size.setdefault(len(st.tokens), []).append(i)
    return [(ntok, idx, np.stack([np.asarray(steps[i].tokens, dtype=np.int64) for i in idx]).reshape(len(idx), ntok))
            for ntok, idx in by_size.items()]


@contextmanager
def gc_paused():
    """Pause the cyclic GC for a block that allocates containers by the hundred thousand (the replay loop,
    the per-layer-step keys), none of them in reference cycles, so refcounting frees them. With the GC on,
    its collections run every few hundred allocations and keep re-traversing the long-lived ones: 15% or more
    of a replay, and most of building the keys. Resumed after (gc.freeze/unfreeze instead would leave the
    next collections miscalibrated)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def step_keys(trace, steps, offsets: np.ndarray) -> tuple[list[np.ndarray], list[dict[int, int]]]:
    """Per layer-step of the replay: the distinct keys (first-seen order) and their use counts. ``trace``: a
    ``traces.Trace`` (its ``experts`` [T, L, K] and ``meta.num_layers`` are read); ``steps``: the scheduler's.

    Steps with the same number of tokens are keyed in one numpy call. When each row's keys are distinct
    (one token per step: a token's top-k experts are distinct), the use counts are ``dict.fromkeys(row, 1)``
    and the distinct keys are the row itself (a view), so nothing runs per key in Python; other rows count
    their keys one by one."""
    with gc_paused():  # hundreds of thousands of small lists and dicts
        return _step_keys(trace, steps, offsets)


def _step_keys(trace, steps, offsets: np.ndarray) -> tuple[list[np.ndarray], list[dict[int, int]]]:
    L = trace.meta.num_layers
    K = trace.experts.shape[2]
    needed: list = [None] * (len(steps) * L)
    uses: list = [None] * (len(steps) * L)
    off = np.asarray(offsets, dtype=np.int64)[:L]
    for ntok, idx, tokens in steps_by_size(steps):
        # [steps, L, ntok * K]: per layer, token by token, each token's experts in trace order
        keys = trace.experts[tokens].astype(np.int64).transpose(0, 2, 1, 3).reshape(len(idx), L, ntok * K)
        rows = (keys + off[None, :, None]).reshape(len(idx) * L, ntok * K)
        rows.flags.writeable = False  # its rows are handed out as views
        srt = np.sort(rows, axis=1)
        distinct = (srt[:, 1:] != srt[:, :-1]).all(axis=1) if rows.shape[1] > 1 else np.ones(len(rows), bool)
        pos = (np.asarray(idx, dtype=np.int64)[:, None] * L + np.arange(L)).ravel().tolist()
        lists = rows.tolist()
        if distinct.all():  # the common case, in C: one dict and one view per row
            for p, u, view in zip(pos, map(dict.fromkeys, lists, repeat(1)), rows):
                uses[p] = u
                needed[p] = view
            continue
        for p, row, once, view in zip(pos, lists, distinct.tolist(), rows):
            if once:
                uses[p] = dict.fromkeys(row, 1)
                needed[p] = view
            else:
                u: dict[int, int] = {}
                for k in row:
                    u[k] = u.get(k, 0) + 1
                uses[p] = u
                needed[p] = np.fromiter(u.keys(), dtype=np.int64, count=len(u))
    return needed, uses
