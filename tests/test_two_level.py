"""The two-level cache against a brute-force reference, hit for hit, and its tier semantics."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_trace

from policies.base import CacheContext
from policies.cache import ExpertCache, capacities_for, partitions_for
from policies.eviction.two_level import TwoLevel


def drive(trace, scope, slots, window):
    """On-demand, batch 1: the simulator's driver semantics (all needed keys protected during the layer)."""
    L, E = trace.meta.num_layers, trace.meta.num_experts
    part = partitions_for(E, scope)
    cap = capacities_for(E, scope, slots, None)
    cache = ExpertCache(TwoLevel(window), CacheContext(E, part, cap))
    out = []
    for t in range(trace.num_tokens):
        for layer in range(L):
            now = t * L + layer
            keys = [int(trace.meta.layer_offsets[layer] + e) for e in trace.experts[t, layer]]
            prot = set(keys)
            for k in keys:
                o = cache.use(k, now)
                out.append(o)
                if o == "miss":
                    ok, _ = cache.reserve(k, now, prot)
                    assert ok
                    cache.complete(k)
    return out


def reference(trace, scope, slots, window):
    L, E = trace.meta.num_layers, trace.meta.num_experts[0]
    W = window * L
    res = {}  # partition -> list of keys
    count, last, seq = {}, {}, {}
    clock = [0]
    out = []

    def touch(k, now):
        count[k] = count.get(k, 0) + 1
        last[k] = now
        clock[0] += 1
        seq[k] = clock[0]

    for t in range(trace.num_tokens):
        for layer in range(L):
            now = t * L + layer
            keys = [layer * E + int(e) for e in trace.experts[t, layer]]
            p = layer if scope == "per_layer" else 0
            r = res.setdefault(p, [])
            for k in keys:
                if k in r:
                    out.append("hit")
                    touch(k, now)
                    continue
                out.append("miss")
                if len(r) >= slots:
                    cands = [c for c in r if c not in keys]
                    low = [c for c in cands if now - last[c] >= W]
                    if low:
                        v = sorted(low, key=lambda c: (count[c], seq[c], c))[0]
                    else:
                        v = sorted(cands, key=lambda c: (seq[c], c))[0]
                    r.remove(v)
                r.append(k)
                touch(k, now)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scope, slots", [("per_layer", 3), ("per_layer", 5), ("global", 9)])
@pytest.mark.parametrize("window", [0.0, 1.0, 3.0])
def test_two_level_matches_reference(seed, scope, slots, window):
    tr = random_trace(tokens=80, layers=3, experts=8, top_k=2, seed=seed)
    assert drive(tr, scope, slots, window) == reference(tr, scope, slots, window)


def test_low_tier_goes_first():
    p = TwoLevel(window_steps=1.0)
    p.reset(CacheContext([4, 4], np.zeros(8, dtype=int), [3]))
    for k, now in [(1, 0), (1, 1), (1, 2), (2, 5), (3, 9)]:
        p.on_hit(k, now)
    # at now=10 with a window of 2 layer-steps: only 3 is high priority; 1 is used more than 2, so 2 goes
    assert p.victim(0, {1, 2, 3}, 10) == 2
    # if every candidate is recent, the least recently touched goes: 6 (last touched before 5 and 4), although
    # it is the most used, not the lowest key, and touched at the same layer-step as 3
    for k, now in [(6, 9), (6, 9), (6, 9), (5, 10), (4, 10)]:
        p.on_hit(k, now)
    assert p.victim(0, {4, 5, 6}, 10) == 6
    assert p.victim(0, {3, 4, 5, 6}, 10) == 3  # touched at 9 before 6's touches
