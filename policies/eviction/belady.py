"""Belady's MIN: evict the candidate whose next use is farthest in the future.

Next use is read from ``ctx.future`` strictly after the current layer-step (``next_use(key, now + 1)``): a
key used at ``now`` whose computation is over (released by the driver, so no longer protected) is done with
for this layer-step and must not look "needed now". Keys never used again are farthest of all. Ties (same
next use, e.g. several never-again keys) go to the lowest key.

Deferral (``defer=True``, default). A layer-step's keys are computed one after another, resident ones first,
then misses in the order their slots were claimed. Sequential MIN would, when a miss needs a slot, evict the
farthest-used key even if it is one of this layer-step's keys still waiting to be computed (protected). Then
``victim`` returns None: the miss waits, and the driver's retry after that key has been computed evicts it.
Only this layer-step's keys that are already resident (hits, and misses that claimed a slot earlier, so they
come earlier in the compute order) are waited for, so the wait always ends within the layer. Without it a
policy that frees slots late (``static`` at capacity == top_k) can beat this "lower bound". With prefetching
a None also refuses a prefetch slot (the driver does not retry it). Clairvoyant: a bound, not deployable.
"""

from __future__ import annotations

import numpy as np

from ..base import CacheContext, EvictionPolicy, PolicyConfigError
from ..future import FarthestNextUse, FutureIndex


class Belady(EvictionPolicy):
    def __init__(self, defer: bool = True) -> None:
        self.defer = bool(defer)
        self._future: FutureIndex | None = None
        self._part: list[int] = []
        self._order: list[FarthestNextUse] = []  # per partition: resident keys by next use, farthest first

    def reset(self, ctx: CacheContext) -> None:
        if ctx.future is None:
            raise PolicyConfigError("belady cache: needs ctx.future (the replay's FutureIndex); none was given")
        self._future = ctx.future
        self._part = np.asarray(ctx.partition_of).tolist()
        self._order = [FarthestNextUse(ctx.future) for _ in ctx.capacity]

    def on_hit(self, key: int, now: int) -> None:
        self._order[self._part[key]].touch(key, now)

    def on_insert(self, key: int, now: int) -> None:
        self._order[self._part[key]].touch(key, now)

    def on_remove(self, key: int) -> None:
        self._order[self._part[key]].remove(key)

    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        if self._future is None:
            raise PolicyConfigError("belady cache: victim() called before reset() with a future index")
        if not candidates:
            return None
        order = self._order[partition]
        best = order.farthest(candidates.__contains__)
        if best is None:  # a candidate this policy never saw inserted (should not happen): the plain rule
            nxt = self._future.next_use
            return max(candidates, key=lambda k: (nxt(k, now + 1), -k))
        if self.defer and now < self._future.horizon:
            far = order.next_of(best)
            for k in self._future.needed[now].tolist():
                nk = order.next_of(k)
                if nk is not None and k not in candidates and nk > far:
                    return None  # a key of this layer-step, not yet computed, is the better victim: wait for it
        return best
