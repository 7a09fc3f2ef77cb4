"""Least frequently used, ties to the least recently used.

Each ``on_insert`` and ``on_hit`` counts one use. With ``keep_counts=True`` (default) a key's count survives
its eviction ("perfect" LFU, as in ``traces.cachesim``): a popular expert that was pushed out comes back with
its history. With ``keep_counts=False`` counts live only while resident (in-cache LFU, as libCacheSim's LFU):
a re-inserted key starts again at 1. Ties on count go to the key touched longest ago (hook-call order).

``victim`` is a min over the candidates: O(partition size), a few hundred keys at most.
"""

from __future__ import annotations

from ..base import CacheContext, EvictionPolicy


class LFU(EvictionPolicy):
    def __init__(self, keep_counts: bool = True) -> None:
        self.keep_counts = bool(keep_counts)
        self._count: dict[int, int] = {}
        self._seq: dict[int, int] = {}  # last touch, as a hook-call counter
        self._clock = 0

    def reset(self, ctx: CacheContext) -> None:
        self._count = {}
        self._seq = {}
        self._clock = 0

    def _touch(self, key: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._clock += 1
        self._seq[key] = self._clock

    def on_hit(self, key: int, now: int) -> None:
        self._touch(key)

    def on_insert(self, key: int, now: int) -> None:
        self._touch(key)

    def on_remove(self, key: int) -> None:
        if not self.keep_counts:
            self._count.pop(key, None)

    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        if not candidates:
            return None
        count, seq = self._count, self._seq
        return min(candidates, key=lambda k: (count.get(k, 0), seq.get(k, 0), k))
