"""The cache curves kernel (replay_kernels.decide.hit_curves, for ``traces stats``) against the simulator's own
decisions: per-layer caches, one token per step in trace order, hits per layer and capacity equal to those of
sim.engine.replay with no prefetch; and golden hit counts on one small trace."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_trace
from kernel_cases import COMPUTE, LINKS, on_demand_run

import replay_kernels
from policies.base import Step
from replay_kernels.decide import hit_curves
from sim.engine import replay

pytestmark = pytest.mark.skipif(not replay_kernels.available(), reason="numba is not installed: no compiled kernels")


def python_hits(trace, policy: str, capacity: int) -> np.ndarray:
    """Hits per layer of the Python simulator replaying ``trace`` token by token in trace order."""
    steps = [Step(np.array([t]), int(ph), np.array([s]))
             for t, (s, ph) in enumerate(zip(trace.seq_id.tolist(), trace.phase.tolist()))]
    steps, uses, rt = on_demand_run(trace, policy, "per_layer", capacity, 1, steps)
    res = replay(steps, rt, LINKS["fast"][0], COMPUTE, trace.meta.expert_bytes, trace.meta.num_layers, uses=uses)
    return res.layers.hits


@pytest.mark.parametrize("seed,experts,top_k", [(0, 8, 2), (1, 8, 3), (2, 6, 2)])
def test_hit_curves_equal_the_simulators_decisions(seed, experts, top_k):
    trace = random_trace(tokens=120, layers=3, experts=experts, top_k=top_k, sequences=3, seed=seed)
    caps = list(range(1, experts))
    policies = ("lru", "lfu", "belady", "lfru", "two_level")
    curves = hit_curves(trace.experts, trace.meta.num_experts, caps, policies)
    for policy in policies:
        for i, cap in enumerate(caps):
            assert np.array_equal(curves[policy][i], python_hits(trace, policy, cap)), (policy, cap)
    assert (np.diff(curves["belady"].sum(axis=1)) > 0).all()  # more slots, more hits


def test_hit_curves_on_a_synthetic_preset_trace():
    from replay.trace_source import synth_from_settings

    trace = synth_from_settings({"preset": "deepseek-v2-lite", "tokens": 60, "sequences": 2, "seed": 1})
    caps = [1, 4, 6, 16, 32]
    curves = hit_curves(trace.experts, trace.meta.num_experts, caps)
    for policy, hits in curves.items():
        for i, cap in enumerate(caps):
            assert np.array_equal(hits[i], python_hits(trace, policy, cap)), (policy, cap)


# Hit counts on random_trace(tokens=100, layers=4, experts=8, top_k=2, seed=123), 800 requests, capacities 1..7
# per layer (a libCacheSim-style table of the simulator's semantics; at 4 slots, 800 minus these are the
# GOLDEN_MISSES of tests/test_policies_reference.py, which its plain reference policies reproduce).
GOLDEN_HITS = {
    "lru": [86, 171, 276, 377, 476, 569, 675],
    "lfu": [86, 171, 269, 378, 467, 580, 674],
    "belady": [86, 311, 446, 537, 617, 680, 730],
}


def test_golden_hit_counts():
    from test_policies_reference import GOLDEN_MISSES

    trace = random_trace(tokens=100, layers=4, experts=8, top_k=2, seed=123)
    curves = hit_curves(trace.experts, trace.meta.num_experts, range(1, 8))
    for policy, want in GOLDEN_HITS.items():
        assert curves[policy].sum(axis=1).tolist() == want, policy
        assert 800 - want[3] == GOLDEN_MISSES[policy]


def test_hit_curves_refuse_static():
    trace = random_trace(tokens=10, layers=2, experts=4, top_k=2, seed=0)
    with pytest.raises(ValueError, match="popularity"):
        hit_curves(trace.experts, trace.meta.num_experts, [2], ("static",))
