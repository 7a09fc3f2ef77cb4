"""Horizon policies: the adaptive rule (ExpertFlow 2025) by hand-computed examples, its bounds and variants,
and the fixed horizon."""

from __future__ import annotations

import pytest

from policies.base import HorizonContext, HorizonFeedback, PolicyConfigError
from policies.horizons.adaptive import AdaptiveHorizon
from policies.horizons.fixed import FixedHorizon


def fb(stall_s=0.0, issued=0, wasted=0, late=0, compute_s=1e-3, bw=0.0, needed=2, misses=None, predicted=0, used=0):
    """A feedback; by default every needed expert was a demand miss (``misses`` = ``needed``)."""
    misses = needed if misses is None else misses
    return HorizonFeedback(compute_s, stall_s, bw, needed, 0, issued, wasted, late, misses, predicted, used)


def test_adaptive_formula_hand_example():
    h = AdaptiveHorizon(min_distance=0, max_distance=10, prior_bandwidth_bytes_per_s=1e10,
                        prior_layer_compute_s=1e-3, prior_precision=1.0)
    # N_e = min(top_k * batch, mean E) = min(2 * 1, 8) = 2; S = ceil(2 * 10 MB / (10 GB/s * 1 ms)) = 2
    h.reset(HorizonContext(num_layers=4, top_k=2, expert_bytes=10_000_000, batch_size=1, num_experts=[8] * 4))
    assert h.base_distance() == 2 and h.distance() == 2
    # a first measurement replaces the priors: 5 GB/s, 0.5 ms -> 2 * 1e7 / (5e9 * 5e-4) = 8
    h.feedback(fb(compute_s=5e-4, bw=5e9, needed=2))
    assert h.bandwidth_bytes_per_s == 5e9 and h.layer_compute_s == 5e-4
    assert h.distance() == 8
    # EWMA (alpha 0.2) of needed experts: 0.8 * 2 + 0.2 * 7 = 3 -> 3 * 1e7 / 2.5e6 = 12 -> clamped to 10
    h.feedback(fb(compute_s=5e-4, bw=5e9, needed=7))
    assert h.experts_per_layer == pytest.approx(3.0)
    assert h.base_distance() == 12 and h.distance() == 10


def small_adaptive(min_distance=1, prior_precision=1.0, **kw):
    """S = 1 from the priors; the predictor trusted until feedback says otherwise (``prior_precision``)."""
    h = AdaptiveHorizon(min_distance=min_distance, max_distance=4, prior_bandwidth_bytes_per_s=2e10,
                        prior_layer_compute_s=1e-3, prior_precision=prior_precision, **kw)
    h.reset(HorizonContext(num_layers=8, top_k=2, expert_bytes=10_000_000, batch_size=1, num_experts=[8] * 8))
    return h  # S = ceil(2e7 / 2e7) = 1


def test_adaptive_widens_on_stalls_and_stays_bounded():
    h = small_adaptive()
    assert h.distance() == 1
    seen = []
    for _ in range(10):
        h.feedback(fb(stall_s=1e-3, issued=2))
        seen.append(h.distance())
    assert seen[0] == 2 and seen[1] == 3 and max(seen) == 4 and seen[-1] == 4
    h2 = small_adaptive()
    h2.feedback(fb(late=1, misses=0))
    assert h2.distance() == 2
    h3 = small_adaptive()  # late hits that do not dominate the misses (and no stall): no reason to widen
    h3.feedback(fb(late=1, misses=2))
    assert h3.distance() == 1


def test_adaptive_widen_on_late_ignores_demand_stalls():
    """widen_on='late': a stall with no late hit (demand misses only) leaves the distance; a late hit widens."""
    h = small_adaptive(widen_on="late")
    for _ in range(5):
        h.feedback(fb(stall_s=1e-3, issued=2))
    assert h.distance() == 1
    h.feedback(fb(stall_s=1e-3, issued=2, late=2, misses=1))
    assert h.distance() == 2
    with pytest.raises(PolicyConfigError, match="widen_on"):
        AdaptiveHorizon(widen_on="sometimes")


def test_adaptive_narrows_on_waste_and_stays_bounded():
    h = small_adaptive()
    for _ in range(10):
        h.feedback(fb(stall_s=1e-3, issued=2))
    assert h.distance() == 4
    seen = []
    for _ in range(12):
        h.feedback(fb(issued=2, wasted=2))
        seen.append(h.distance())
    assert seen[0] <= 4 and seen[-1] == 1 and min(seen) == 1
    assert all(a >= b for a, b in zip(seen, seen[1:]))  # monotone narrowing
    # no stall, no waste: the distance holds
    d = h.distance()
    h.feedback(fb(issued=0, wasted=0))
    h.feedback(fb(issued=4, wasted=0))
    assert h.distance() == d


def test_fixed_horizon():
    assert FixedHorizon(3).distance() == 3
    assert FixedHorizon(0).distance() == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(PolicyConfigError):
            FixedHorizon(bad)


def test_adaptive_counts_only_experts_that_needed_a_copy():
    """S uses the experts a layer-step had to copy, not all it used: 2 copies of 10 MB at 20 GB/s over 1 ms of
    compute is S = 1; the layer's 40 resident experts do not push it to the maximum."""
    h = small_adaptive(min_distance=0)
    h.feedback(fb(needed=2, compute_s=1e-3, bw=2e10))
    assert h.base_distance() == 1
    h.feedback(fb(needed=8, compute_s=1e-3, bw=2e10))  # EWMA 0.8 * 2 + 0.2 * 8 = 3.2 -> ceil(3.2 / 2) = 2
    assert h.experts_per_layer == pytest.approx(3.2) and h.base_distance() == 2


def test_adaptive_backs_off_to_on_demand_and_comes_back():
    """Named experts that go unused (precision below min_precision) take the horizon down to 0; while it is 0
    the runtime still reports what distance 1 would have named, and once that is used again it widens."""
    h = small_adaptive(min_distance=0)
    seen = []
    for _ in range(8):
        h.feedback(fb(stall_s=1e-3, predicted=4, used=1))  # 25% of what it names is used
        seen.append(h.distance())
    assert seen[-3:] == [0, 0, 0] and max(seen) > 0  # trusted at first (prior 1), off once the evidence is in
    for _ in range(3):
        h.feedback(fb(stall_s=1e-3, predicted=0))  # nothing named: no evidence either way, stays put
    assert h.distance() == 0
    back = []
    for _ in range(12):
        h.feedback(fb(stall_s=1e-3, predicted=4, used=4))  # now all of it would be used, and misses stall
        back.append(h.distance())
    assert back[-1] > 0 and h.precision > 0.5
    with pytest.raises(PolicyConfigError, match="min_precision"):
        AdaptiveHorizon(min_precision=1.5)


def test_adaptive_waste_backs_off_to_zero_when_allowed():
    h = small_adaptive(min_distance=0)
    for _ in range(12):
        h.feedback(fb(issued=2, wasted=2, misses=0))
    assert h.distance() == 0


def test_adaptive_starts_off_until_the_precision_is_known():
    """By default (prior_precision 0) nothing is prefetched until what the predictor names has been seen used."""
    h = small_adaptive(min_distance=0, prior_precision=0.0)
    assert h.distance() == 0
    on = []
    for _ in range(6):
        h.feedback(fb(stall_s=0.0, misses=0, compute_s=1e-3, predicted=2, used=2))
        on.append(h.distance() > 0)
    assert on[0] is False and on[-1] is True  # EWMA 0.2, 0.36, 0.49, 0.59, ...: on after the fourth
    assert on.index(True) == 3


def test_adaptive_narrows_when_the_stall_grows_with_prefetching():
    """The stall per layer-step while prefetching (EWMA) above the stall while not (by stall_tolerance) narrows."""
    h = small_adaptive(min_distance=0, prior_precision=0.0)
    for _ in range(5):
        h.feedback(fb(stall_s=1e-3, predicted=0))  # off (no evidence yet): the on-demand stall is 1 ms
    for _ in range(6):
        h.feedback(fb(stall_s=1e-3, predicted=2, used=2, misses=0))  # the precision comes in: on
    assert h.distance() > 0 and h.stall_off == pytest.approx(1e-3)
    seen = []
    for _ in range(10):
        h.feedback(fb(stall_s=3e-3, predicted=2, used=2, misses=0, late=0))  # prefetching, and stalling more
        seen.append(h.distance())
    assert seen[-1] == 0 and h.stall_on > 1.05 * h.stall_off
