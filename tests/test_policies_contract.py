"""Every policy YAML in conf/cache, conf/predictor, conf/horizon and conf/scheduler instantiates to a subclass of
its base class (policies/base.py) whose declared capabilities agree with its methods, and survives a short
replay with the invariants a driver relies on. New YAML files are picked up by the glob, so a new policy is
checked without editing this file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import random_trace
from hydra.utils import instantiate

from policies.base import (
    CacheContext,
    EvictionPolicy,
    Horizon,
    HorizonContext,
    HorizonFeedback,
    Observation,
    PolicyConfigError,
    Predictor,
    PredictorContext,
    Scheduler,
    top_scores,
)
from policies.cache import ExpertCache, capacities_for, partitions_for
from policies.eviction.lru import LRU
from policies.future import FutureIndex
from replay.config_keys import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
CACHES = sorted(CONF.glob("cache/*.yaml"))
PREDICTORS = sorted(CONF.glob("predictor/*.yaml"))
HORIZONS = sorted(CONF.glob("horizon/*.yaml"))
L, E, K = 4, 8, 2


def test_every_group_has_files():
    assert {p.stem for p in CACHES} >= {"lru", "lfu", "lfru", "static", "belady"}
    assert {p.stem for p in PREDICTORS} >= {"none", "oracle", "last_token", "frequency", "transition"}
    assert {p.stem for p in HORIZONS} >= {"fixed", "adaptive"}


def load(path: Path):
    """The option's node as a run composes it (the shared nodes it includes too), and its policy."""
    group = path.parent.name
    cfg = compose_config([f"{group}={path.stem}"])[group]
    assert cfg.name == path.stem, f"{path}: name should match the file name"
    return cfg, instantiate(cfg.policy)


def replay_setup(seed: int = 0, batch: int = 2):
    test = random_trace(tokens=24, layers=L, experts=E, top_k=K, sequences=4, seed=seed)
    train = random_trace(tokens=60, layers=L, experts=E, top_k=K, sequences=3, seed=seed + 1)
    steps = [np.arange(i, min(i + batch, test.num_tokens)) for i in range(0, test.num_tokens, batch)]
    off = test.meta.layer_offsets
    needed = []
    for toks in steps:
        for layer in range(L):
            keys = (test.experts[toks, layer].astype(np.int64) + off[layer]).ravel().tolist()
            needed.append(np.array(list(dict.fromkeys(keys)), dtype=np.int64))
    return test, train, steps, FutureIndex(needed)


class CheckedPolicy(EvictionPolicy):
    """Wraps an eviction policy and checks every victim it returns is one of the candidates (so it declares no
    ``victim_skipping``: the cache then always builds the candidate set)."""

    def __init__(self, inner):
        self.inner = inner
        self.victims = 0

    def reset(self, ctx):
        self.inner.reset(ctx)

    def on_hit(self, key, now):
        self.inner.on_hit(key, now)

    def on_hits(self, keys, now):
        self.inner.on_hits(keys, now)

    def on_insert(self, key, now):
        self.inner.on_insert(key, now)

    def on_remove(self, key):
        self.inner.on_remove(key)

    def pinned(self):
        return self.inner.pinned()

    def victim(self, partition, candidates, now):
        v = self.inner.victim(partition, set(candidates), now)
        assert v is None or v in candidates, f"victim {v} not among candidates {sorted(candidates)}"
        if type(self.inner).has_victim_skipping:  # the declared fast pick agrees: the rest of the partition skipped
            others = self.cache.resident[partition] - candidates
            fast = self.inner.victim_skipping(partition, others, set(), now)
            assert fast == v or (fast is None and not candidates), f"victim_skipping {fast} != victim {v}"
        self.victims += v is not None
        return v


H = 16  # hidden width handed to predictors that read hidden states


def tiny_router_checkpoint(path):
    """Router weights of a Mixtral-style checkpoint with L layers of E experts, for weight-reading predictors."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    path.mkdir(parents=True, exist_ok=True)
    save_file({f"model.layers.{i}.mlp.gate.weight": rng.standard_normal((E, H)).astype(np.float32) for i in range(L)},
              str(path / "model.safetensors"))
    return str(path)


def run_replay(policy, scope, capacity, partition_of, test, steps, future, train, predictor=None, ahead=0):
    """Prefetch ``ahead`` layers with ``predictor`` (none: on-demand), completing copies at once."""
    ctx = CacheContext(test.meta.num_experts, partition_of, capacity, future=future,
                       popularity=np.bincount(train.flat_ids().ravel(), minlength=L * E).astype(float))
    checked = CheckedPolicy(policy)
    cache = checked.cache = ExpertCache(checked, ctx)
    off = test.meta.layer_offsets
    for si, toks in enumerate(steps):
        for layer in range(L):
            now = si * L + layer
            keys = future.needed[now].tolist()
            protected = set(keys)
            outs = {k: cache.use(k, now) for k in keys}
            waiting = []
            for k in keys:
                if outs[k] == "miss":
                    ok, _ = cache.reserve(k, now, protected)
                    (cache.complete(k) if ok else waiting.append(k))
            for k in keys:
                protected.discard(k)
                while waiting and cache.reserve(waiting[0], now, protected)[0]:
                    cache.complete(waiting.pop(0))
            assert not waiting
            if predictor is not None:
                hidden = None
                if predictor.needs_hidden:
                    hidden = np.random.default_rng(now).standard_normal((len(toks), H)).astype(np.float32)
                obs = Observation(now, si, layer, toks, test.experts[toks, layer], test.token_id[toks], hidden)
                predictor.observe(obs)
                for a in range(1, ahead + 1):
                    tl = (layer + a) % L
                    scores = predictor.predict(obs, a)
                    assert scores.shape == (E,) and np.all(np.isfinite(scores))
                    assert not predictor.never_predicts or not scores.any(), "never_predicts, yet it scored"
                    assert scores.min() >= 0.0 and scores.max() <= 1.0
                    for e in top_scores(scores, 3, 0.05):
                        if not cache.reserve(int(off[tl] + e), now, set(), prefetch=True)[0]:
                            break
                        cache.complete(int(off[tl] + e))
            for p, cap in enumerate(capacity):
                assert cache.used(p) <= cap, f"partition {p} holds {cache.used(p)} > {cap}"
            assert cache.policy.pinned() <= set().union(*cache.resident)
    st = cache.stats
    assert st.hits + st.misses + st.late_hits == sum(len(n) for n in future.needed)
    return cache, checked


@pytest.mark.parametrize("path", CACHES, ids=lambda p: p.stem)
@pytest.mark.parametrize("scope", ["per_layer", "global"])
def test_cache_contract(path, scope):
    cfg, policy = load(path)
    assert isinstance(policy, EvictionPolicy)
    assert cfg.scope in ("per_layer", "global")
    capacity = capacities_for([E] * L, scope, cfg.slots, cfg.fraction)
    test, train, steps, future = replay_setup()
    cache, checked = run_replay(policy, scope, capacity, partitions_for([E] * L, scope), test, steps, future, train)
    assert checked.victims > 0  # the replay was long enough to need evictions
    # the same config replays identically (deterministic victims)
    cache2, _ = run_replay(instantiate(cfg.policy), scope, capacity, partitions_for([E] * L, scope), test, steps,
                           future, train)
    assert cache2.stats == cache.stats and cache2.resident == cache.resident


@pytest.mark.parametrize("path", PREDICTORS, ids=lambda p: p.stem)
def test_predictor_contract(path, tmp_path):
    cfg, pred = load(path)
    assert isinstance(pred, Predictor)
    # what the runtime prefetches of the scores is the shared prefetch node's (tests/test_configs.py), not a predictor's
    assert "min_score" not in cfg and "max_per_layer" not in cfg
    test, train, steps, future = replay_setup(seed=3)
    if pred.needs_token_ids:  # learned from token ids: give both splits some
        rng = np.random.default_rng(2)
        train.token_id[:] = rng.integers(0, 64, train.num_tokens)
        test.token_id[:] = rng.integers(0, 64, test.num_tokens)
    if pred.needs_hidden:  # learned from hidden states: give the train split a sidecar
        from traces import read_trace, write_trace
        from traces.sidecar import write_hidden

        path = write_trace(train, tmp_path / "train.parquet")
        write_hidden(path, np.random.default_rng(1).standard_normal((train.num_tokens, L, H)))
        train = read_trace(path)
    pred.reset(PredictorContext([E] * L, K, train=train, future=future, layer_offsets=test.meta.layer_offsets,
                                model_path=tiny_router_checkpoint(tmp_path / "model")))
    part = partitions_for([E] * L, "per_layer")
    run_replay(LRU(), "per_layer", [4] * L, part, test, steps, future, train, predictor=pred, ahead=L + 1)
    if pred.stateless:  # predict_steps is predict, row for row (it may read only layer, layer-step and experts)
        for layer in range(L):
            for ahead in (1, 2, L + 1):
                ls = np.arange(len(steps)) * L + layer
                ex = np.stack([test.experts[toks, layer] for toks in steps])  # every step has 2 tokens
                rows = pred.predict_steps(layer, ahead, ex, ls)
                for n, toks in enumerate(steps):
                    obs = Observation(int(ls[n]), n, layer, toks, ex[n], test.token_id[toks])
                    np.testing.assert_array_equal(rows[n], pred.predict(obs, ahead))


@pytest.mark.parametrize("path", HORIZONS, ids=lambda p: p.stem)
def test_horizon_contract(path):
    cfg, hz = load(path)
    assert isinstance(hz, Horizon)
    lo, hi = int(hz.min_distance), int(hz.max_distance)
    assert 0 <= lo <= hi
    hz.reset(HorizonContext(num_layers=L, top_k=K, expert_bytes=1 << 24, batch_size=2, num_experts=[E] * L))
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = hz.distance()
        assert isinstance(d, int) and lo <= d <= hi
        issued = int(rng.integers(0, 5))
        before = dict(vars(hz))
        hz.feedback(HorizonFeedback(
            layer_compute_s=float(rng.uniform(1e-4, 1e-2)), stall_s=float(rng.choice([0.0, rng.uniform(0, 1e-2)])),
            bandwidth_bytes_per_s=float(rng.choice([0.0, rng.uniform(1e9, 5e10)])),
            experts_needed=int(rng.integers(1, E + 1)), prefetch_hits=int(rng.integers(0, 3)),
            prefetch_issued=issued, prefetch_wasted=int(rng.integers(0, issued + 1)), late_hits=int(rng.integers(0, 2)),
        ))
        assert not hz.ignores_feedback or vars(hz) == before, "ignores_feedback, yet feedback changed it"
    assert isinstance(hz.distance(), int)


BASES = {"cache": EvictionPolicy, "predictor": Predictor, "horizon": Horizon, "scheduler": Scheduler}
# a capability flag -> the method it enables: overridden exactly where the flag is set
FLAG_METHODS = {EvictionPolicy: {"has_victim_skipping": "victim_skipping", "wants_predictions": "on_predict"},
                Predictor: {"stateless": "predict_steps"}}
EVERY_POLICY = [(group, p) for group in sorted(BASES) for p in sorted(CONF.glob(f"{group}/*.yaml"))]


@pytest.mark.parametrize("group,path", EVERY_POLICY, ids=[f"{g}/{p.stem}" for g, p in EVERY_POLICY])
def test_every_policy_subclasses_its_base_and_declares_what_it_implements(group, path):
    _, obj = load(path)
    base, cls = BASES[group], type(obj)
    assert isinstance(obj, base), f"{path}: {cls.__name__} does not subclass policies.base.{base.__name__}"
    for flag, method in FLAG_METHODS.get(base, {}).items():
        implemented = getattr(cls, method) is not getattr(base, method)
        assert getattr(cls, flag) is implemented, (f"{cls.__name__}.{flag} is {getattr(cls, flag)} but {method} is "
                                                  f"{'' if implemented else 'not '}implemented")
    flags = [k for k, v in vars(base).items() if isinstance(v, bool)]
    assert all(isinstance(getattr(cls, f), bool) for f in flags)


def test_the_flag_check_catches_a_method_without_its_flag():
    class Sneaky(LRU):
        has_victim_skipping = False  # but victim_skipping is LRU's, not the base's

    assert (Sneaky.victim_skipping is not EvictionPolicy.victim_skipping) != Sneaky.has_victim_skipping


@pytest.mark.parametrize("path", sorted(CONF.glob("scheduler/*.yaml")), ids=lambda p: p.stem)
def test_scheduler_contract(path):
    """Every token planned exactly once; ``needs_routes`` exactly when planning without routes is refused."""
    _, sched = load(path)
    test = random_trace(tokens=40, layers=L, experts=E, top_k=K, sequences=5, seed=4)
    steps = sched.plan(test.seq_id, test.phase, 2, test.experts.astype(np.int64))
    assert sorted(np.concatenate([st.tokens for st in steps]).tolist()) == list(range(test.num_tokens))
    assert all(1 <= len(st.tokens) <= 2 for st in steps if st.phase == 1)
    if sched.needs_routes:
        with pytest.raises(PolicyConfigError, match="routes"):
            sched.plan(test.seq_id, test.phase, 2, None)
    else:
        assert [st.tokens.tolist() for st in sched.plan(test.seq_id, test.phase, 2, None)] == \
               [st.tokens.tolist() for st in steps]
