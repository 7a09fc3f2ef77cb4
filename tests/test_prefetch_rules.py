"""The prefetch rules of the shared runtime, by hand-computed examples: the admission scales, the link-time
budget and its priorities, the review of queued prefetches, the clairvoyant load plan, the measured window."""

from __future__ import annotations

import numpy as np
import pytest

from policies.admission import ExactAdmission, ScoreAdmission
from policies.base import FutureIndex, Step
from policies.clairvoyant import ClairvoyantLoads
from policies.link_budget import (
    DEMAND,
    SPECULATIVE,
    is_speculative,
    lands_in_time,
    late_allowance,
    prefetch_priority,
    prefetch_target,
)
from policies.prefetch_queue import NEVER, PendingPrefetches
from replay.errors import RunConfigError
from replay.window import warmup_steps


class Link:
    """LinkFacts with fixed answers: ``queued`` maps priority -> copies queued at it; ``in_flight_s`` remains."""

    def __init__(self, copy_s=1.0, layer_s=0.5, queued=None, in_flight_s=0.0, channels=1, busy=0.0):
        self._copy_s, self._layer_s, self.queued, self.in_flight_s = copy_s, layer_s, dict(queued or {}), in_flight_s
        self.channels, self._busy, self.cancelled = channels, busy, []

    def copy_s(self):
        return self._copy_s

    def layer_s(self, tokens, experts):
        return self._layer_s

    def backlog_s(self, priority):
        return self.in_flight_s + self._copy_s * sum(n for p, n in self.queued.items() if p <= priority)

    def busy_share(self):
        return self._busy

    def cancel(self, key):
        self.cancelled.append(key)
        return True


def test_priorities_order_demand_then_nearest_target_then_speculative():
    assert DEMAND == 0 < prefetch_priority(5, False) < prefetch_priority(6, False) < prefetch_priority(0, True)
    assert prefetch_target(prefetch_priority(7, False)) == 7 and prefetch_target(prefetch_priority(7, True)) == 7
    assert is_speculative(SPECULATIVE + 3) and not is_speculative(prefetch_priority(10**6, False))


def test_late_allowance_hand_values():
    assert late_allowance(1.0) == 1.0 and late_allowance(0.5) == 0.0 and late_allowance(0.2) == 0.0
    assert late_allowance(0.75) == pytest.approx((1.5 - 1) / 0.75)


def test_budget_lands_in_time_by_hand():
    # copy 1 s, layer 0.5 s: a target 2 layer-steps on starts in 1 s; an idle link lands a copy exactly then
    link = Link()
    assert lands_in_time(link, prefetch_priority(12, False), 10, 12, 0, 0, 1, 2)
    assert not lands_in_time(link, prefetch_priority(11, False), 10, 11, 0, 0, 1, 2)  # 1 s > 0.5 s
    # ... unless certain: the oracle may be one copy late (it only has to start before its target)
    assert lands_in_time(link, prefetch_priority(11, False), 10, 11, 0, 0, 1, 2, p=1.0)
    # a queued copy of a nearer target and 0.5 s left of the one in flight are ahead of it: 2.5 s > 2 x 0.5 + 0
    busy = Link(queued={prefetch_priority(11, False): 1}, in_flight_s=0.5)
    assert not lands_in_time(busy, prefetch_priority(12, False), 10, 12, 0, 0, 1, 2)
    # a farther target's queued copy is not ahead of it
    later = Link(queued={prefetch_priority(20, False): 5})
    assert lands_in_time(later, prefetch_priority(12, False), 10, 12, 0, 0, 1, 2)
    # the current layer-step's own demand copies (3 of them, 3 s) make the target start later: 3 + 0.5 >= 4 - 1
    assert lands_in_time(Link(), prefetch_priority(12, False), 10, 12, 3, 0, 1, 2, p=1.0)
    assert not lands_in_time(Link(), prefetch_priority(12, False), 10, 12, 3, 0, 1, 2, p=0.5)
    # two channels drain the backlog twice as fast: 2 s / 2 + 1 <= 1 + 1 (certain), where one channel needs 3 s
    two = Link(queued={prefetch_priority(11, False): 2}, channels=2)
    assert lands_in_time(two, prefetch_priority(12, False), 10, 12, 0, 0, 1, 2, p=1.0) and not lands_in_time(
        Link(queued={prefetch_priority(11, False): 2}), prefetch_priority(12, False), 10, 12, 0, 0, 1, 2, p=1.0)
    # nothing measured yet: no limit
    assert lands_in_time(Link(copy_s=None), prefetch_priority(11, False), 10, 11, 50, 50, 1, 2)


def test_score_admission_by_hand():
    adm = ScoreAdmission([4, 4, 4])  # 3 layers of 4 experts: keys 0-3, 4-7, 8-11
    scores = {(1, 5): 0.9, (1, 6): 0.2, (1, 7): 0.85}

    def score(ahead, key):
        return scores.get((ahead, key), 0.0)
    # now = 3 (layer 0 of step 1); target layer 1 at 4; a victim of layer 1 is judged on the same vector
    assert adm.admits(6, 5, 4, 3, score, busy=0.0)  # 0.9 - 0.2 = 0.7 > 0.1
    assert not adm.admits(7, 5, 4, 3, score, busy=0.0)  # 0.05 is within the margin
    assert adm.admits(6, 5, 4, 3, score, busy=1.0)  # 0.7 > 1 / 2 on a saturated link
    scores[(1, 6)] = 0.5
    assert adm.admits(6, 5, 4, 3, score, busy=0.0) and not adm.admits(6, 5, 4, 3, score, busy=1.0)  # 0.4 < 0.5
    # a victim of layer 1 for a target of layer 2 (at 5): its layer runs first, so it is never taken
    assert not adm.admits(6, 9, 5, 3, lambda a, k: 1.0 if k == 9 else 0.0, busy=0.0)
    # a victim of layer 2 for a target of layer 1: judged on its own layer's scores, 2 layer-steps on
    assert adm.admits(9, 5, 4, 3, lambda a, k: {(1, 5): 0.9, (2, 9): 0.3}.get((a, k), 0.0), busy=0.0)
    assert not adm.admits(9, 5, 4, 3, lambda a, k: {(1, 5): 0.9, (2, 9): 0.85}.get((a, k), 0.0), busy=0.0)


def test_exact_admission_is_cao_felten_karlin_li():
    fut = FutureIndex([np.array([0]), np.array([1]), np.array([2]), np.array([0, 1])])
    adm = ExactAdmission(fut)
    assert adm.admits(2, 9, 1, 0, None)  # key 2 next used at 2, after the target 1
    assert not adm.admits(2, 9, 2, 0, None)  # used at the target itself: not strictly later
    assert adm.admits(2, 9, 2, 2, None)  # from now = 2 on, key 2 is never used again


def test_pending_prefetches_review():
    pend = PendingPrefetches()
    assert pend.review_at() == NEVER
    pend.add(3, target=5, priority=prefetch_priority(5, False), speculative=False)
    pend.add(4, target=6, priority=prefetch_priority(6, True), speculative=True)
    assert pend.review_at() == 0  # a speculative one is reviewed at every layer-step
    link = Link(copy_s=1.0, layer_s=0.5, queued={prefetch_priority(5, False): 1, prefetch_priority(6, True): 1})
    # at 4: key 3 is not due; key 4 would finish at 2 s but its target starts in 1 s: cancelled
    assert pend.due(4, {}, {3, 4}, link, 1, 2) == [4]
    assert pend.review_at() == 5
    assert pend.due(5, {3: 1}, {3}, link, 1, 2) == []  # its target came and uses it: kept
    pend.add(7, target=6, priority=prefetch_priority(6, False), speculative=False)
    assert pend.due(6, {}, {7}, link, 1, 2) == [7]  # its target came without using it, still in flight
    pend.add(8, target=9, priority=prefetch_priority(9, False), speculative=False)
    pend.forget(8)
    assert pend.due(9, {}, {8}, link, 1, 2) == []  # cancelled before: a stale entry


def test_clairvoyant_loads_in_order_and_without_harm():
    fut = FutureIndex([np.array([0]), np.array([1]), np.array([0]), np.array([2])])
    plan = ClairvoyantLoads([(0, 0, None), (1, 1, None), (3, 2, 1)], fut)
    assert plan.demand(0, 0) == (0, None) and plan.demand(2, 0) is None  # no load of 0 for layer-step 2
    plan.started(0)
    assert [x[:3] for x in plan.upcoming(0, 4)] == [(1, 1, 1), (2, 3, 2)] and plan.pos == 1
    assert [x[:3] for x in plan.upcoming(0, 1)] == [(1, 1, 1)]  # the horizon
    assert plan.harmless(None, 0, 1) and plan.harmless(1, 1, 3) and not plan.harmless(0, 1, 3)  # 0 is used at 2
    plan.started(2)
    assert plan.pos == 1 and plan.demand(3, 2) is None  # started: no longer a demand
    plan.started(1)
    assert plan.pos == 3 and list(plan.upcoming(1, 4)) == []


def test_warmup_steps():
    steps = [Step(np.arange(n), 1, np.array([0])) for n in (4, 4, 4, 4, 4)]  # 20 tokens
    assert warmup_steps(steps, None) == (2, 1)  # 10% of 20 tokens: the first step covers them
    assert warmup_steps(steps, 0) == (0, 0) and warmup_steps(steps, 5) == (5, 2) and warmup_steps(steps, 16) == (16, 4)
    for bad in (-1, 2.5, True, "x"):
        with pytest.raises(RunConfigError, match="warmup_tokens: expected null or an integer >= 0"):
            warmup_steps(steps, bad)
    with pytest.raises(RunConfigError, match="warmup_tokens: 17 leaves no step to measure"):
        warmup_steps(steps, 17)
