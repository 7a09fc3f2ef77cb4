"""Least recently used, one recency list per partition.

Recency is the order of hook calls (``on_hit`` / ``on_insert``), a total order: two experts touched at the
same layer-step are ordered by which the cache touched first, so no further tie-break is needed.
"""

from __future__ import annotations

from collections import OrderedDict

from ..base import CacheContext


class LRU:
    """Evict the candidate touched longest ago. ``victim`` walks each partition's list from the old end and
    stops at the first candidate, so it is O(1) unless many old entries are protected or in flight."""

    def __init__(self) -> None:
        self._order: list[OrderedDict[int, None]] = []
        self._part = None

    def reset(self, ctx: CacheContext) -> None:
        self._part = ctx.partition_of
        self._order = [OrderedDict() for _ in ctx.capacity]

    def _touch(self, key: int) -> None:
        od = self._order[self._part[key]]
        od[key] = None
        od.move_to_end(key)

    def on_hit(self, key: int, now: int) -> None:
        od = self._order[self._part[key]]
        if key in od:  # pinned or foreign keys are not ours to order
            od.move_to_end(key)

    def on_insert(self, key: int, now: int) -> None:
        self._touch(key)

    def on_remove(self, key: int) -> None:
        self._order[self._part[key]].pop(key, None)

    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        for key in self._order[partition]:
            if key in candidates:
                return key
        # a candidate the policy never saw inserted (should not happen): fall back deterministically
        return min(candidates) if candidates else None

    def pinned(self) -> set[int]:
        return set()
