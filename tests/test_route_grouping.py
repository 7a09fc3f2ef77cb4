"""Route-grouping scheduler: a correct schedule, a better split than FIFO, and its effect in the simulator."""

from __future__ import annotations

import numpy as np
from conftest import random_trace
from test_sim import run_sim

from policies.schedulers.fifo import FIFOScheduler
from policies.schedulers.route_grouping import RouteGroupingScheduler, route_bits, split_two


def test_split_two_finds_the_obvious_clusters():
    rng = np.random.default_rng(0)
    a = np.zeros(64, dtype=bool)
    a[:8] = True
    b = np.zeros(64, dtype=bool)
    b[32:40] = True
    rows = np.array([a, b, a, b, a, b, a, b])
    rows[rng.integers(0, 8, 3), 50] = True  # a little noise
    g1, g2 = split_two(rows, 4)
    assert sorted(g1 + g2) == list(range(8)) and len(g1) == len(g2) == 4
    assert {tuple(sorted(g1)), tuple(sorted(g2))} == {(0, 2, 4, 6), (1, 3, 5, 7)}


def brute_force(rows, cap):
    import itertools

    n = len(rows)
    best = None
    for a in itertools.combinations(range(n), cap):
        b = [i for i in range(n) if i not in a]
        c = rows[list(a)].any(0).sum() + rows[b].any(0).sum()
        best = c if best is None else min(best, c)
    return best


def test_split_two_is_near_optimal_on_random_routes():
    rng = np.random.default_rng(1)
    for _ in range(10):
        routes = np.argsort(rng.random((8, 3, 8)), axis=2)[:, :, :2]
        rows = route_bits(routes, 8)
        g1, g2 = split_two(rows, 4)
        got = rows[g1].any(0).sum() + rows[g2].any(0).sum()
        assert got <= brute_force(rows, 4) + 1


def test_every_token_scheduled_once_in_sequence_order():
    tr = random_trace(tokens=300, layers=3, experts=8, sequences=9, seed=3)
    steps = RouteGroupingScheduler().plan(tr.seq_id, tr.phase, 2, tr.experts.astype(np.int64))
    toks = np.concatenate([s.tokens for s in steps])
    assert sorted(toks.tolist()) == list(range(tr.num_tokens))
    for s in np.unique(tr.seq_id):
        mine = [t for t in toks.tolist() if tr.seq_id[t] == s]
        assert mine == sorted(mine)
    assert max(len(s.tokens) for s in steps) <= 2
    fifo = FIFOScheduler().plan(tr.seq_id, tr.phase, 2)
    assert len(steps) <= len(fifo) + 2  # same tokens per step, up to the tail


def test_oracle_grouping_touches_fewer_experts_than_fifo(tmp_path):
    tr = random_trace(tokens=400, layers=3, experts=16, top_k=2, sequences=16, seed=5)
    fifo, _ = run_sim(tmp_path, ["batch_size=4", "split.test_fraction=null"], tr, name="f")
    grp, _ = run_sim(tmp_path, ["batch_size=4", "split.test_fraction=null", "scheduler=route_grouping",
                               "scheduler.policy.route_source=oracle"], tr, name="g")
    assert grp["distinct_experts_per_layer_step"] < 0.95 * fifo["distinct_experts_per_layer_step"]
    assert grp["tokens"] == fifo["tokens"]
    assert grp["scheduler_wall_s"] > 0 and grp["request_tpot_s"] > 0
