"""The ExpertFlow 2024 cache against a brute-force reference, hit for hit and count for count, and its slot
rules on a hand example."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_trace

from policies.base import CacheContext
from policies.cache import ExpertCache, capacities_for, partitions_for
from policies.eviction.expertflow import ExpertFlowCache


def noisy_predictions(trace, seed, ahead: int = 3):
    """Per layer-step: (key, target) predictions for the next ``ahead`` layer-steps: each true key kept with
    p=0.7, plus up to two wrong keys (so both kinds of misprediction happen, and several keys share a target)."""
    rng = np.random.default_rng(seed)
    T, L, _ = trace.experts.shape
    E = trace.meta.num_experts[0]
    out = []
    for now in range(T * L):
        preds = []
        for a in range(1, ahead + 1):
            nt, nl = divmod(now + a, L)
            if nt >= T:
                break
            true = list(dict.fromkeys(nl * E + int(e) for e in trace.experts[nt, nl]))
            keys = [k for k in true if rng.random() < 0.7]
            for _ in range(2):
                wrong = nl * E + int(rng.integers(E))
                if rng.random() < 0.5 and wrong not in keys:
                    keys.append(wrong)
            preds += [(k, now + a) for k in keys]
        out.append(preds)
    return out


def drive(trace, scope, slots, preds):
    """Batch 1, copies land at once: uses, demand loads, then the next layer-step's prefetches."""
    T, L, _ = trace.experts.shape
    E = trace.meta.num_experts
    policy = ExpertFlowCache()
    cache = ExpertCache(policy, CacheContext(E, partitions_for(E, scope), capacities_for(E, scope, slots, None)))
    out = []
    for t in range(T):
        for layer in range(L):
            now = t * L + layer
            keys = list(dict.fromkeys(int(trace.meta.layer_offsets[layer] + e) for e in trace.experts[t, layer]))
            prot = set(keys)
            outcomes = [cache.use(k, now) for k in keys]
            out += outcomes
            for k, o in zip(keys, outcomes):
                if o == "miss":
                    assert cache.reserve(k, now, prot)[0]
                    cache.complete(k)
            keep = prot | {k for k, _ in preds[now]}
            for k, target in preds[now]:
                policy.on_predict(k, target)
            for k, _ in preds[now]:
                if not cache.is_resident(k):
                    ok, _ = cache.reserve(k, now, keep, prefetch=True)
                    if ok:
                        cache.complete(k)
    return out, policy.policy_stats()


def reference(trace, scope, slots, preds):
    T, L, _ = trace.experts.shape
    E = trace.meta.num_experts[0]
    res: dict[int, list[int]] = {}
    pred: dict[int, int] = {}
    last: dict[int, int] = {}
    clock = [0]
    n = {"predicted_used": 0, "predicted_unused": 0, "unpredicted_uses": 0}
    out = []

    def touch(k):
        clock[0] += 1
        last[k] = clock[0]

    def use(k, now):
        if pred.get(k) == now:
            del pred[k]
            n["predicted_used"] += 1
        else:
            n["unpredicted_uses"] += 1
        touch(k)

    def insert(k, now, protected):
        r = res.setdefault(k // E if scope == "per_layer" else 0, [])
        if len(r) >= slots:
            cands = [c for c in r if c not in protected]
            if not cands:
                return False
            finished = [c for c in cands if c not in pred]
            if finished:
                v = sorted(finished, key=lambda c: (last[c], c))[0]
            else:
                v = sorted(cands, key=lambda c: (-pred[c], last[c], c))[0]  # furthest, then least recent
            r.remove(v)
            del last[v]
        r.append(k)
        return True

    for t in range(T):
        for layer in range(L):
            now = t * L + layer
            for k in [k for k, tg in pred.items() if tg < now]:
                del pred[k]
                n["predicted_unused"] += 1
            keys = list(dict.fromkeys(layer * E + int(e) for e in trace.experts[t, layer]))
            misses = []
            for k in keys:
                r = res.get(k // E if scope == "per_layer" else 0, [])
                if k in r:
                    out.append("hit")
                    use(k, now)
                else:
                    out.append("miss")
                    misses.append(k)
            for k in misses:
                assert insert(k, now, set(keys))
                use(k, now)
            for k, target in preds[now]:
                pred[k] = target
            for k, _ in preds[now]:
                r = res.get(k // E if scope == "per_layer" else 0, [])
                if k not in r and insert(k, now, set(keys) | {q for q, _ in preds[now]}):
                    touch(k)
    n["mispredictions"] = n["predicted_unused"] + n["unpredicted_uses"]
    return out, n


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scope, slots", [("per_layer", 3), ("per_layer", 5), ("global", 8), ("global", 14)])
def test_expertflow_matches_reference(seed, scope, slots, monkeypatch):
    tr = random_trace(tokens=60, layers=3, experts=8, top_k=2, seed=seed)
    preds = noisy_predictions(tr, seed)
    branch = []
    orig = ExpertFlowCache.victim

    def victim(self, partition, candidates, now):  # note when every candidate is still predicted
        self._expire(now)
        branch.append(len(candidates) > 1 and all(k in self._pred for k in candidates))
        return orig(self, partition, candidates, now)

    monkeypatch.setattr(ExpertFlowCache, "victim", victim)
    got, stats = drive(tr, scope, slots, preds)
    want, ref_stats = reference(tr, scope, slots, preds)
    assert got == want
    assert stats == ref_stats
    assert stats["predicted_used"] > 0 and stats["predicted_unused"] > 0 and stats["unpredicted_uses"] > 0
    assert any(branch), "the furthest-prediction rule was never exercised"


def test_finished_experts_go_first_then_furthest_prediction():
    p = ExpertFlowCache()
    p.reset(CacheContext([4, 4], np.zeros(8, dtype=int), [3]))
    p.on_insert(1, 0)  # demand load, used at 0: finished
    p.on_predict(5, 3)
    p.on_insert(5, 0)  # prefetch for layer-step 3: not finished
    p.on_predict(6, 2)
    p.on_insert(6, 0)
    assert p.victim(0, {1, 5, 6}, 1) == 1  # a finished expert frees its slot first
    assert p.victim(0, {5, 6}, 1) == 5  # all predicted: the one needed furthest ahead goes
    assert p.victim(0, {5, 6}, 3) == 6  # at 3, the prediction of 6 (for 2) has passed: 6 is finished
    assert p.policy_stats()["predicted_unused"] == 1
    p.on_hit(5, 3)
    assert p.policy_stats()["predicted_used"] == 1


def test_predicted_slots_beat_lru_with_the_same_prefetch(tmp_path):
    """On the reference model, the same transition prefetches two layers ahead, queued whatever they evict and
    however late (``prefetch.admission`` and ``prefetch.link_budget`` off), thrash a global LRU (a prefetch evicts
    what the next token needs) but not the expertflow cache; its misprediction counts reach results. With
    admission on, a prefetch takes no slot from an expert predicted at least as likely, and LRU stops thrashing."""
    from test_sim import run_sim

    common = ["trace=reference-moe", "cache.scope=global", "predictor=transition", "horizon=fixed", "horizon.distance=2",
              "prefetch.link_budget=false"]
    raw = [*common, "prefetch.admission=false"]
    lru, _ = run_sim(tmp_path, ["cache=lru", *raw], name="lru")
    ef, _ = run_sim(tmp_path, ["cache=expertflow", *raw], name="ef")
    assert ef["hit_rate"] > lru["hit_rate"] + 0.1
    assert ef["stall_s"] < lru["stall_s"]
    st = ef["policy_stats"]
    assert st["predicted_used"] > 0 and st["mispredictions"] == st["predicted_unused"] + st["unpredicted_uses"] > 0
    assert lru["policy_stats"] == {}
    admitted, _ = run_sim(tmp_path, ["cache=lru", *common], name="lru-admitted")
    assert admitted["hit_rate"] > lru["hit_rate"] + 0.1 and admitted["stall_s"] < lru["stall_s"]
