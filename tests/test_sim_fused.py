"""The fused replay loop (sim/fused.py) against the general one (sim/engine.py): the same results, float for
float, on every configuration it accepts; and it is not used where it does not apply."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import ROOT, random_trace
from hydra import compose, initialize_config_dir

import sim.engine as engine
from replay.prepare import prepare
from traces import write_trace

ACCEPTED = {
    "lru": ["cache=lru", "predictor=none"],
    "lfu": ["cache=lfu", "predictor=none"],
    "lfru": ["cache=lfru", "predictor=none"],
    "static": ["cache=static", "predictor=none"],
    "belady": ["cache=belady", "predictor=none"],
    "two_level": ["cache=two_level", "predictor=none"],
    "lru-transition-d1": ["cache=lru", "predictor=transition", "horizon=fixed", "horizon.distance=1"],
    "lfru-transition-d2": ["cache=lfru", "predictor=transition", "horizon=fixed", "horizon.distance=2"],
    "belady-transition-d3": ["cache=belady", "predictor=transition", "horizon=fixed", "horizon.distance=3"],
    "lru-transition-d0": ["cache=lru", "predictor=transition", "horizon=fixed", "horizon.distance=0"],
}
NOT_ACCEPTED = {
    "adaptive": ["cache=lru", "predictor=transition", "horizon=adaptive"],
    "frequency": ["cache=lru", "predictor=frequency"],  # no predict_steps (it may learn online)
    "last_token": ["cache=lru", "predictor=last_token"],  # stateful
    "expertflow": ["cache=expertflow", "predictor=transition"],  # on_predict hook
    # the oracle prefetches the eviction policy's planned loads (policies/clairvoyant.py), not the table's choices
    "belady-oracle-d2": ["cache=belady", "predictor=oracle", "horizon=fixed", "horizon.distance=2"],
}


def _cfg(tmp_path, policy, hw="cpu-nvme", slots=3, batch=1, gbps=None, extra=()):
    """A random trace with a model shape (so experts take time to compute: with a fast enough link,
    prefetches land before their layer) on preset ``hw``, its link bandwidth optionally set to ``gbps``."""
    path = tmp_path / "t.parquet"
    if not path.exists():
        tr = random_trace(tokens=240, layers=4, experts=8, top_k=2, sequences=4, seed=5)
        tr.meta = dataclasses.replace(tr.meta, hidden_size=1024, intermediate_size=512, expert_bytes=3 * 1024 * 512 * 2)
        write_trace(tr, path)
    bw = [] if gbps is None else [f"hardware.bandwidth.bandwidth_GBps={gbps}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"trace.path={path}", "trace.name=t", f"hardware={hw}",
                                            f"cache.slots={slots}", "cache.fraction=null", f"batch_size={batch}",
                                            *bw, *policy, *extra])


def _both(cfg, monkeypatch):
    """Replay with the fused loop allowed and forced off; returns both results, both runtimes and whether the
    fused loop ran."""
    calls = []
    real = engine.replay_fused

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(engine, "replay_fused", spy)
    out = []
    for fused in (True, False):
        p = prepare(cfg)
        r = engine.replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers,
                          uses=p.uses, fused=fused)
        out.append((r, p.runtime))
    return out, bool(calls)


def _assert_same(a, b, rta, rtb):
    assert (a.total_s, a.stall_s, a.compute_s, a.step_s, a.bytes_moved, a.copies, a.demand_loads) == \
           (b.total_s, b.stall_s, b.compute_s, b.step_s, b.bytes_moved, b.copies, b.demand_loads)
    for f in ("requests", "hits", "late_hits", "misses", "stall_s"):
        assert np.array_equal(getattr(a.layers, f), getattr(b.layers, f)), f
    assert rta.cache.stats == rtb.cache.stats
    assert rta.prefetch_issued == rtb.prefetch_issued
    assert rta.cache.present == rtb.cache.present and rta.cache.slot_of == rtb.cache.slot_of


@pytest.mark.parametrize("policy", ACCEPTED.values(), ids=ACCEPTED.keys())
@pytest.mark.parametrize("hw,slots,batch,gbps", [("t4", 3, 1, None), ("t4", 3, 2, 2000.0), ("t4", 3, 2, 160.0),
                                                  ("cpu-nvme", 5, 3, None), ("h100-pcie5", 2, 4, None)],
                         ids=["t4-b1", "fast-link-b2", "budget-bound-b2", "nvme-b3", "h100-b4-deferred"])
def test_fused_loop_equals_general_loop(tmp_path, monkeypatch, policy, hw, slots, batch, gbps):
    """On t4's own link no prefetch can land in time (the link budget queues none); at 160 GB/s some just fit
    (late hits, queued prefetches cancelled); on a fast one prefetches land before their layer; at batch 4 with 2
    slots a layer needs more experts than its partition holds, so demands wait for slots (the deferred path)."""
    if "cache=static" in policy and slots < 3:
        slots = 3
    ((a, rta), (b, rtb)), ran = _both(_cfg(tmp_path, policy, hw, slots, batch, gbps), monkeypatch)
    assert ran, "the fused loop did not take this configuration"
    _assert_same(a, b, rta, rtb)
    assert a.copies > 0 and a.layers.hits.sum() > 0


def test_fused_loop_exercises_its_branches(tmp_path, monkeypatch):
    """The equality above is only worth something if the fused loop's rarer branches ran in those cases:
    late hits, queued prefetches cancelled, prefetches used after landing, demands deferred for a slot. (On t4's
    own link no prefetch can land before its target, so the link budget queues none: a faster link, where some
    just fit and a demand burst makes them late, exercises the late and cancel paths; admission is off there, as
    it lets few of these mediocre predictions evict anything.)"""
    cancels = []
    cfg = _cfg(tmp_path, ACCEPTED["lfru-transition-d2"], "t4", 3, 2, 160.0, ["prefetch.admission=false"])
    p = prepare(cfg)
    real_cancel = p.runtime.cancel
    p.runtime.cancel = lambda k: (cancels.append(k), real_cancel(k))
    a = engine.replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers, uses=p.uses)
    assert p.runtime.prefetch_issued > 0 and a.layers.late_hits.sum() > 0 and cancels
    (a, rta), _ = _both(_cfg(tmp_path, ACCEPTED["lfru-transition-d2"], "t4", 3, 2, 2000.0), monkeypatch)[0]
    assert rta.cache.stats.prefetch_used > 0 and a.layers.late_hits.sum() < a.layers.hits.sum() / 10
    calls = []
    p = prepare(_cfg(tmp_path, ACCEPTED["lru"], "h100-pcie5", 2, 4))
    real = p.runtime.retry_deferred

    def spy():
        started = real()
        calls.append(len(started))
        return started

    p.runtime.retry_deferred = spy
    engine.replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers, uses=p.uses)
    assert sum(calls) > 0


@pytest.mark.parametrize("policy", [p for name, p in ACCEPTED.items() if "transition" in name],
                         ids=[name for name in ACCEPTED if "transition" in name])
def test_fused_loop_equals_general_loop_with_every_prefetch_admitted(tmp_path, monkeypatch, policy):
    """With admission off many more prefetches reach the link budget, the queue and its reviews."""
    ((a, rta), (b, rtb)), ran = _both(_cfg(tmp_path, policy, "t4", 3, 2, 160.0, ["prefetch.admission=false"]),
                                      monkeypatch)
    assert ran
    _assert_same(a, b, rta, rtb)


@pytest.mark.parametrize("policy", NOT_ACCEPTED.values(), ids=NOT_ACCEPTED.keys())
def test_fused_loop_declines_what_it_does_not_handle(tmp_path, monkeypatch, policy):
    ((a, rta), (b, rtb)), ran = _both(_cfg(tmp_path, policy), monkeypatch)
    assert not ran
    _assert_same(a, b, rta, rtb)


def test_fused_loop_declines_logged_and_simpy_runs(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(engine, "replay_fused", lambda *a, **k: called.append(1))
    for kw in ({"log": True}, {"simpy_channels": True}):
        p = prepare(_cfg(tmp_path, ACCEPTED["lru"]))
        engine.replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers, uses=p.uses,
                      **kw)
    assert not called
