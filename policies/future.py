"""Perfect knowledge of a replay's future, for clairvoyant policies (Belady, the oracle predictor) and the bounds:
which layer-steps use each key (:class:`FutureIndex`), and the resident keys of a partition ordered by next use
(:class:`FarthestNextUse`)."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable

import numpy as np


class FutureIndex:
    """Perfect knowledge of the replay's future: for each key, the sorted layer-steps that use it.
    Belady and the oracle predictor read it; nothing else may."""

    def __init__(self, needed: list[np.ndarray]):
        # every (key, layer-step) pair, grouped by key in layer-step order (a stable sort: no loop per use)
        lens = np.fromiter(map(len, needed), dtype=np.int64, count=len(needed))
        keys = np.concatenate(needed).astype(np.int64, copy=False) if lens.sum() else np.zeros(0, np.int64)
        steps = np.repeat(np.arange(len(needed), dtype=np.int64), lens)
        small = keys.astype(np.int16) if len(keys) and keys.max() < 2**15 else keys  # numpy radix-sorts 16 bits
        order = np.argsort(small, kind="stable")
        keys, steps = keys[order], steps[order]
        cut = np.flatnonzero(keys[1:] != keys[:-1]) + 1
        starts, ends = np.r_[0, cut].tolist(), np.r_[cut, len(keys)].tolist()
        self._uses: dict[int, list[int]] = {int(keys[a]): steps[a:b].tolist() for a, b in zip(starts, ends) if b > a}
        self.needed = needed  # needed[t] = unique keys used at layer-step t
        self.horizon = len(needed)

    def next_use(self, key: int, now: int) -> int:
        """First layer-step >= now that uses ``key`` (``horizon`` if none)."""
        u = self._uses.get(key)
        if not u:
            return self.horizon
        i = bisect.bisect_left(u, now)
        return u[i] if i < len(u) else self.horizon


class FarthestNextUse:
    """The keys of one cache partition by next use, farthest first: the victim order of MIN-style rules
    (Belady, the perfect-foresight bounds) without scanning every resident key per eviction.

    ``touch(key, now)`` records that ``key`` is resident and was used (or loaded) at ``now``: its next use is
    the first one strictly after ``now``. Every use of a resident key must be touched, so a key's recorded next
    use is still ``next_use(key, now + 1)`` when a victim is chosen later. A lazy max-heap: a touch pushes an
    entry, ``remove`` forgets the key, and stale entries are dropped when they reach the top. Ties of next use
    go to the lowest key, or the highest with ``high_key_first``."""

    def __init__(self, future: FutureIndex, high_key_first: bool = False):
        self._future = future
        self._sign = -1 if high_key_first else 1
        self._next: dict[int, int] = {}  # resident key -> its next use
        self._heap: list[tuple[int, int, int]] = []  # (-next use, sign * key, key)

    def touch(self, key: int, now: int) -> None:
        nu = self._future.next_use(key, now + 1)
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
