"""The prefetches the runtime has queued and not yet seen used, so that it can take back the ones that can no
longer help (one implementation for every driver; the driver only cancels the copy on its link):

- a prefetch whose target layer-step has come without the key being used there, while its copy is still
  queued (a misprediction, or a copy that could not start in time);
- a *speculative* prefetch (:mod:`policies.link_budget`) that can no longer land before its target, checked at
  every layer-step while it is queued (ExpertFlow 2024's correction of low-confidence prefetches).
"""

from __future__ import annotations

import heapq

from .link_budget import LinkFacts, lands_in_time

NEVER = 1 << 62  # review_at() when nothing is pending


class PendingPrefetches:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int]] = []  # (target layer-step, key); stale entries skipped
        self._info: dict[int, tuple[int, int]] = {}  # key -> (target, priority) of its live prefetch
        self._spec: dict[int, tuple[int, int]] = {}  # the speculative ones among them, until landed or dropped

    def add(self, key: int, target: int, priority: int, speculative: bool) -> None:
        heapq.heappush(self._heap, (target, key))
        self._info[key] = (target, priority)
        if speculative:
            self._spec[key] = (target, priority)

    def forget(self, key: int) -> None:
        """``key``'s prefetch was cancelled."""
        self._info.pop(key, None)
        self._spec.pop(key, None)

    def review_at(self) -> int:
        """The first layer-step at which :meth:`due` may return something: now, while a speculative prefetch
        is queued; else the nearest target (``NEVER`` if none)."""
        if self._spec:
            return 0
        return self._heap[0][0] if self._heap else NEVER

    def due(self, now: int, uses, inflight: set[int], link: LinkFacts, tokens: int, experts: int) -> list[int]:
        """Keys whose queued prefetch should be cancelled at layer-step ``now`` (``uses``: the keys ``now``
        uses; ``inflight``: keys whose copy has not landed; ``tokens``, ``experts``: the current layer-step, for
        the compute estimate). Each is returned once; the caller cancels it on its link if it is still queued."""
        out = []
        heap, info, spec = self._heap, self._info, self._spec
        while heap and heap[0][0] <= now:
            target, k = heapq.heappop(heap)
            if info.get(k, (None,))[0] != target:
                continue  # stale: cancelled, or prefetched again since
            del info[k]
            spec.pop(k, None)
            if k not in uses and k in inflight:
                out.append(k)
        for k, (target, prio) in list(spec.items()):
            if k not in inflight:  # landed
                del spec[k]
            elif not lands_in_time(link, prio, now, target, 0, 0, tokens, experts, queued=True):
                del spec[k]
                out.append(k)
        return out
