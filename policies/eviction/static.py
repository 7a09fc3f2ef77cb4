"""Static pinning of the most popular experts, LRU over the remaining slots.

At ``reset`` each partition pins its ``n_pin`` most used keys of the training split (``ctx.popularity``;
ties to the lower key), where ``n_pin = capacity - 1`` by default (``pin_share=None``: every slot but one, the
smallest dynamic region that still lets any expert be loaded) or ``floor(pin_share * capacity)`` capped at
``capacity - 1``. Pinned keys are resident before the run and never evicted; the free slots are managed LRU.
"""

from __future__ import annotations

import math

import numpy as np

from ..base import CacheContext, EvictionPolicy, PolicyConfigError
from .lru import LRU


class Static(EvictionPolicy):
    has_victim_skipping = True

    def __init__(self, pin_share: float | None = None) -> None:
        if pin_share is not None and not 0.0 <= float(pin_share) <= 1.0:
            raise PolicyConfigError(f"static.pin_share: expected null or a value in [0, 1], got {pin_share}")
        self.pin_share = None if pin_share is None else float(pin_share)
        self._pinned: set[int] = set()
        self._lru = LRU()

    def pins_for(self, capacity: int) -> int:
        """How many of a partition's ``capacity`` slots are pinned."""
        if self.pin_share is None:
            return max(0, capacity - 1)
        return max(0, min(capacity - 1, math.floor(self.pin_share * capacity)))

    def reset(self, ctx: CacheContext) -> None:
        if ctx.popularity is None:
            raise PolicyConfigError("static cache: needs ctx.popularity (expert use counts of the training split)")
        pop = np.asarray(ctx.popularity, dtype=float)
        part = np.asarray(ctx.partition_of)
        if pop.shape != part.shape:
            raise PolicyConfigError(f"static cache: popularity has shape {pop.shape}, expected {part.shape}")
        pinned: set[int] = set()
        for p, cap in enumerate(ctx.capacity):
            keys = np.flatnonzero(part == p)
            order = keys[np.lexsort((keys, -pop[keys]))]  # most popular first, ties to the lower key
            pinned.update(order[: self.pins_for(int(cap))].tolist())
        self._pinned = pinned
        self._lru.reset(ctx)

    def on_hit(self, key: int, now: int) -> None:
        self._lru.on_hit(key, now)

    def on_insert(self, key: int, now: int) -> None:
        if key not in self._pinned:
            self._lru.on_insert(key, now)

    def on_remove(self, key: int) -> None:
        self._lru.on_remove(key)

    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        return self._lru.victim(partition, candidates - self._pinned, now)

    def victim_skipping(self, partition: int, protected: set[int], inflight: set[int], now: int) -> int | None:
        # pinned keys never enter the LRU lists (see on_insert), so the LRU walk already skips them
        return self._lru.victim_skipping(partition, protected, inflight, now)

    def pinned(self) -> set[int]:
        return self._pinned
