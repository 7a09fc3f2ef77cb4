"""ExpertFlow 2024's predictive cache engine (He et al., arXiv 2410.17954), as eviction hooks.

The paper's engine assigns slots across layers from the predicted routes, prefetches the next stage's
experts, reuses a slot as soon as its expert has finished, and corrects mispredictions at run time: a missed
expert loads at once at high priority, an unwanted one drops to a low-priority queue. In this framework the
runtime already does the loading part (demand misses go first on the copy channels, prefetches are queued at
low priority and cancelled when their target passes); this policy supplies the *slot* part:

- every expert the predictor names for a future layer-step (``on_predict(key, target)``, called by the
  runtime for each expert it decides to prefetch or keep) holds a live prediction until that layer-step;
- the victim is, first, a *finished* expert: one with no live prediction (used and not predicted again, a
  misprediction whose target has passed, or never predicted), the least recently touched first; only when
  every candidate is still predicted does it drop the one predicted furthest ahead (Belady on the predicted
  future), so with a global scope the slots flow to the layers the routes say come next.

It counts what the paper calls mispredictions: ``predicted_unused`` (a prediction whose layer-step passed
without the expert being used) and ``unpredicted_uses`` (an expert used with no live prediction for that
layer-step), next to ``predicted_used``. ``policy_stats()`` returns them for ``results.json``.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from ..base import CacheContext, EvictionPolicy


class ExpertFlowCache(EvictionPolicy):
    wants_predictions = True  # the runtime calls on_predict for every expert it prefetches or keeps

    def __init__(self) -> None:
        self._pred: dict[int, int] = {}  # key -> layer-step it is predicted to be used at (live predictions)
        self._expiry: list[tuple[int, int]] = []  # heap of (target, key) to find predictions that passed
        self._seq: dict[int, int] = {}  # order of the last touch (hit or insert), for ties among predicted keys
        self._clock = 0
        # Resident keys per partition, least recently touched first. Finished keys are found by walking it from
        # the old end and skipping the few with live predictions (at most horizon x prefetch limit of them).
        self._order: list[OrderedDict[int, None]] = []
        self._part = None
        self.predicted_used = 0
        self.predicted_unused = 0
        self.unpredicted_uses = 0

    def reset(self, ctx: CacheContext) -> None:
        self.__init__()
        self._part = ctx.partition_of
        self._order = [OrderedDict() for _ in ctx.capacity]

    # ------------------------------------------------------------------------------------------ hooks
    def on_predict(self, key: int, target: int) -> None:
        """The runtime predicts ``key`` to be used at layer-step ``target`` (a later prediction replaces it)."""
        self._pred[key] = target
        heapq.heappush(self._expiry, (target, key))

    def _expire(self, now: int) -> None:
        exp = self._expiry
        while exp and exp[0][0] < now:
            target, key = heapq.heappop(exp)
            if self._pred.get(key) == target:  # still live and never used: the prediction was wrong
                del self._pred[key]
                self.predicted_unused += 1

    def _used(self, key: int, now: int) -> None:
        self._expire(now)
        if self._pred.get(key) == now:
            del self._pred[key]
            self.predicted_used += 1
        else:
            self.unpredicted_uses += 1
        self._touch(key)

    def _touch(self, key: int) -> None:
        self._clock += 1
        self._seq[key] = self._clock
        od = self._order[self._part[key]]
        od[key] = None
        od.move_to_end(key)

    def on_hit(self, key: int, now: int) -> None:
        self._used(key, now)

    def on_insert(self, key: int, now: int) -> None:
        # A prefetch is inserted when it is decided (its prediction lies ahead); a demand load is inserted at
        # the layer-step that uses it, and that is a use the cache could not avoid loading.
        target = self._pred.get(key)
        if target is not None and target > now:
            self._touch(key)
        else:
            self._used(key, now)

    def on_remove(self, key: int) -> None:
        self._seq.pop(key, None)
        self._order[self._part[key]].pop(key, None)

    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        if not candidates:
            return None
        self._expire(now)
        pred, seq = self._pred, self._seq
        for k in self._order[partition]:  # the least recently touched finished candidate
            if k not in pred and k in candidates:
                return k
        finished = [k for k in candidates if k not in pred]  # candidates the policy never saw inserted
        if finished:
            return min(finished)
        return max(candidates, key=lambda k: (pred[k], -seq.get(k, 0), -k))

    def policy_stats(self) -> dict[str, int]:
        """Prediction bookkeeping for ``results.json`` (counts of expert uses / predictions)."""
        return {
            "predicted_used": self.predicted_used,
            "predicted_unused": self.predicted_unused,
            "unpredicted_uses": self.unpredicted_uses,
            "mispredictions": self.predicted_unused + self.unpredicted_uses,
        }
