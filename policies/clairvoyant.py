"""Perfect-foresight prefetching for any eviction policy P: P's own loads, each started as early as doing no
harm allows (the prefetching a clairvoyant predictor, the oracle, drives in :class:`~policies.runtime.PolicyRuntime`).

Cao, Felten, Karlin and Li's *conservative* rule, generalised from MIN to P. First P is replayed on demand,
without time (:func:`policies.ondemand.ondemand_loads`, on a second instance of the policy): its loads, in
order, as (layer-step of use, key, victim). The run then makes exactly these loads into exactly these victims' slots, in
this order; a load for a later layer-step may start early, as a prefetch, when

- its use lies within the horizon (``use <= now + distance``),
- every earlier load of the list has started (the order is P's: the cache then holds what P held),
- its victim is not needed before the use: neither protected for the current layer-step nor used in
  ``(now, use]`` (the do-no-harm rule; :class:`~policies.admission.ExactAdmission`), nor in flight,
- and the link-time budget lets it land in time (:mod:`policies.link_budget`).

A load that did not start early is the demand load it was in P's replay, into the same victim's slot. So the
run loads what P on demand loads, no more (its misses are at most P's), every copy starts no later than on
demand, and hits stay hits: a victim evicted early is not used before P would have evicted it. Only the order
of copies on the link can differ where a prefetch already running delays a demand by at most that one copy.
"""

from __future__ import annotations

from .admission import ExactAdmission
from .base import FutureIndex


class ClairvoyantLoads:
    """P's on-demand loads (``loads``: :func:`policies.ondemand.ondemand_loads`) and which of them have started."""

    def __init__(self, loads: list[tuple[int, int, int | None]], future: FutureIndex):
        self.loads = loads  # (layer-step of use, key, victim or None), in P's order
        self._rule = ExactAdmission(future)
        self._index = {(u, k): i for i, (u, k, _) in enumerate(loads)}
        self._done = bytearray(len(loads))
        self.pos = 0  # every load before this one has started

    def demand(self, now: int, key: int) -> tuple[int, int | None] | None:
        """(index, victim) of the load of ``key`` for layer-step ``now``, if it has not started (None: P did not
        load it then; the caller falls back to the policy's own choice)."""
        i = self._index.get((now, key))
        return None if i is None or self._done[i] else (i, self.loads[i][2])

    def started(self, i: int) -> None:
        self._done[i] = 1
        while self.pos < len(self.loads) and self._done[self.pos]:
            self.pos += 1

    def upcoming(self, now: int, distance: int):
        """The loads not yet started, in order, whose use lies in ``(now, now + distance]``; stops at the first one
        used later, or at one used at ``now`` or before (a demand waiting for its slot: nothing overtakes it)."""
        loads, done = self.loads, self._done
        for i in range(self.pos, len(loads)):
            if done[i]:
                continue
            use = loads[i][0]
            if use <= now or use > now + distance:
                return
            yield i, use, loads[i][1], loads[i][2]

    def harmless(self, victim: int | None, now: int, use: int) -> bool:
        """The do-no-harm rule: ``victim`` is not used between now and ``use`` (None: a free slot)."""
        return victim is None or self._rule.admits(victim, -1, use, now, None)
