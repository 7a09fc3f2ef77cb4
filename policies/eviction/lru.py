"""Least recently used, one recency list per partition.

Recency is the order of hook calls (``on_hit`` / ``on_insert``), a total order: two experts touched at the
same layer-step are ordered by which the cache touched first, so no further tie-break is needed.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..base import CacheContext, EvictionPolicy


class LRU(EvictionPolicy):
    """Evict the candidate touched longest ago. ``victim`` walks each partition's list from the old end and
    stops at the first candidate, so it is O(1) unless many old entries are protected or in flight.
    ``victim_skipping`` is the same walk for a cache that has not built the candidate set."""

    has_victim_skipping = True

    def __init__(self) -> None:
        self._order: list[OrderedDict[int, None]] = []
        self._part: list[int] = []

    def reset(self, ctx: CacheContext) -> None:
        self._part = np.asarray(ctx.partition_of).tolist()  # a list: indexing it with an int is much faster than numpy
        self._order = [OrderedDict() for _ in ctx.capacity]

    def _touch(self, key: int) -> None:
        od = self._order[self._part[key]]
        od[key] = None
        od.move_to_end(key)

    def on_hit(self, key: int, now: int) -> None:
        od = self._order[self._part[key]]
        if key in od:  # pinned or foreign keys are not ours to order
            od.move_to_end(key)

    def on_hits(self, keys: list[int], now: int) -> None:
        """``on_hit`` for each key in order (one call per layer-step instead of one per key). The keys of a
        layer-step usually share one partition and are all ours: then it is one ``move_to_end`` per key, and
        at the first key that is not in that list (KeyError) the general loop takes over from that key."""
        if not keys:
            return
        order, part = self._order, self._part
        od = order[part[keys[0]]]
        move = od.move_to_end
        try:
            for key in keys:
                move(key)
            return
        except KeyError:
            pass
        # ``key`` raised and the keys before it were moved; its first occurrence is where it first raised
        for k in keys[keys.index(key):]:
            od = order[part[k]]
            if k in od:
                od.move_to_end(k)

    def on_insert(self, key: int, now: int) -> None:
        od = self._order[self._part[key]]  # _touch, inlined (once per copy)
        od[key] = None
        od.move_to_end(key)

    def on_remove(self, key: int) -> None:
        self._order[self._part[key]].pop(key, None)

    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        for key in self._order[partition]:
            if key in candidates:
                return key
        # a candidate the policy never saw inserted (should not happen): fall back deterministically
        return min(candidates) if candidates else None

    def victim_skipping(self, partition: int, protected: set[int], inflight: set[int], now: int) -> int | None:
        """``victim`` with candidates = this partition's keys not in ``protected`` nor ``inflight`` (our lists
        hold exactly the resident, unpinned keys), without building that set. None: no such key."""
        for key in self._order[partition]:
            if key not in protected and key not in inflight:
                return key
        return None
