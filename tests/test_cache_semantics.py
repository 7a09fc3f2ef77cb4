"""One cache semantics: ``traces stats`` (traces.cachesim.hit_counts) gives the simulator's hits exactly, the
policy objects equal a plain one-request-at-a-time reference on the flattened stream, and the batching rule
(a token's experts looked up together, hits touched before misses) holds on a hand example."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, random_trace
from hydra import compose, initialize_config_dir

import replay_kernels
from sim.run import simulate
from traces import Trace, TraceMeta, write_trace
from traces.cachesim import SEMANTICS, hit_counts, simulate_hits


def trace_of(experts: np.ndarray, seq_id: np.ndarray, num_experts: int, phase: np.ndarray | None = None) -> Trace:
    experts = np.asarray(experts, dtype=np.int16)
    T, L, K = experts.shape
    pos = np.zeros(T, np.int32)
    for s in np.unique(seq_id):
        pos[seq_id == s] = np.arange((seq_id == s).sum())
    meta = TraceMeta(model="test", num_layers=L, num_experts=[num_experts] * L, top_k=K, expert_bytes=1 << 20,
                     hidden_size=0, source="tests")
    return Trace(meta, experts, np.full(experts.shape, 1.0 / K, np.float32), np.asarray(seq_id, np.int32), pos,
                 np.ones(T, np.int8) if phase is None else np.asarray(phase, np.int8), np.full(T, -1, np.int32))


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
def test_stats_hits_are_the_simulators(tmp_path, policy):
    """Per layer, the hits ``traces stats`` counts are those of ``python -m sim`` on the whole trace at batch 1
    (prefill tokens included: a sequence's prefill is one step), for the caches it reports; 2 slots per layer
    for 3 experts a token is the deferred path (a miss waits for a computed expert's slot)."""
    tr = random_trace(tokens=150, layers=3, experts=8, top_k=3, sequences=4, seed=11)
    tr.phase[tr.position < 3] = 0  # each sequence starts with a 3-token prefill
    path = write_trace(tr, tmp_path / "t.parquet")
    caps = [2, 3, 5]
    got = hit_counts(tr, caps, (policy,), compiled=False)[policy]
    if replay_kernels.available():  # the compiled cache curves, the default path when numba is there
        np.testing.assert_array_equal(hit_counts(tr, caps, (policy,), compiled=True)[policy], got)
    for i, c in enumerate(caps):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"trace.path={path}", "trace.name=t", "split.test_fraction=null",
                                               "batch_size=1", "scheduler=fifo", f"cache={policy}", "cache.scope=per_layer",
                                               f"cache.slots={c}", "cache.fraction=null", "predictor=none",
                                               "paths.bounds_dir=null", "warmup_tokens=0"])
        out = tmp_path / f"{policy}-{c}"
        res = simulate(cfg, out)
        sim_hits = pd.read_parquet(out / "per_layer.parquet")["hits"].to_numpy()
        np.testing.assert_array_equal(got[i], sim_hits)
        assert res["hit_rate"] == got[i].sum() / res["expert_requests"]
        if policy == "belady":  # and MIN's hit rate of every run is the same replay
            assert res["belady_hit_rate"] == res["hit_rate"]
    assert got.sum() > 0


def plain_hits(stream: list[int], cap: int, policy: str) -> int:
    """One request at a time, textbook rules: a request for a resident expert is a hit (LRU: it becomes the most
    recently used; LFU: its count grows); a miss evicts, if the cache is full, the least recently used (LRU),
    the least requested so far with ties to the least recently used (LFU, counts kept after eviction) or the
    one requested again farthest in the future, never-again ones first, ties to the lowest id (Belady), and
    takes its place."""
    resident, last, count, hits = set(), {}, {}, 0
    for t, e in enumerate(stream):
        if e in resident:
            hits += 1
        elif len(resident) < cap:
            resident.add(e)
        else:
            def next_use(v, t=t):
                return next((u for u in range(t + 1, len(stream)) if stream[u] == v), len(stream))

            rank = {"lru": lambda v: (last[v],), "lfu": lambda v: (count[v], last[v]),
                    "belady": lambda v: (-next_use(v), v)}[policy]
            resident.remove(min(resident, key=rank))
            resident.add(e)
        last[e], count[e] = t, count.get(e, 0) + 1
    return hits


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_flattened_stream_matches_a_plain_one_request_at_a_time_reference(policy, seed):
    """Flattened: each token's k experts become k consecutive tokens of one expert each (same order, same
    sequence), so every layer-step asks for a single expert. Then the batching rule has nothing to batch: the
    expert looked up is the only one protected, and it is the one missing, never a candidate; Belady's wait for
    a current expert cannot apply (the only current expert is not resident); with one touch per step there
    are no ties of recency. So the policy objects must be the textbook rules, hit for hit, on every layer."""
    tr = random_trace(tokens=120, layers=3, experts=7, top_k=2, sequences=3, seed=seed)
    T, L, K = tr.experts.shape
    flat = trace_of(tr.experts.transpose(0, 2, 1).reshape(T * K, L)[:, :, None], np.repeat(tr.seq_id, K), 7)
    for cap in (1, 2, 3, 5):
        want = [plain_hits(flat.experts[:, layer, 0].tolist(), cap, policy) for layer in range(L)]
        for compiled in (False, True) if replay_kernels.available() else (False,):
            got = hit_counts(flat, [cap], (policy,), compiled=compiled)[policy][0]
            assert got.tolist() == want, f"{policy} at {cap} slots, compiled={compiled}"


def test_the_batching_rule_on_a_hand_example():
    """One layer, 3 slots, tokens [5, 6], [3, 5], [8, 9], [3, 1]. At token 1, 5 hits and is touched, then 3
    is inserted, so 5 is the older of the two; token 2 evicts 6, then 5 (LRU): 3 hits at token 3. Hits
    touched in rank order with the misses (3 then 5) or ties broken by expert id (the published rule, 3 < 5)
    would evict 3 instead."""
    ex = np.array([[5, 6], [3, 5], [8, 9], [3, 1]])[:, None, :]
    tr = trace_of(ex, np.zeros(4, np.int32), 10)
    assert hit_counts(tr, [3], ("lru",), compiled=False)["lru"][0, 0] == 2  # 5 at token 1, 3 at token 3
    assert simulate_hits(tr.experts, [3], "lru")[0, 0] == 1  # the published rule: only 5 at token 1


def test_stats_help_states_the_semantics(capsys):
    from traces.__main__ import main

    with pytest.raises(SystemExit):
        main(["stats", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert " ".join(SEMANTICS.split()[:12]) in out and "batching rule" in out
