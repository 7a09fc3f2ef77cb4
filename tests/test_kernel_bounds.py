"""The compiled bounds against the Python ones (replay.bounds.min_replay / compute_bounds, replay.oracle.oracle_stall):
MIN's hit rates (measured window and whole replay), loads, load log and compute orders, and the three
perfect-foresight schedules' stalls (aggressive, conservative, aggressive from a preloaded cache; window and
whole replay), equal, on random traces x cache scopes x batch sizes x links x warm-ups, with the aggressive
scan's window and resume variants."""

from __future__ import annotations

import pytest
from conftest import ROOT, random_trace
from hydra import compose, initialize_config_dir

import replay_kernels
from replay.bounds import compute_bounds, min_replay
from replay.oracle import oracle_stall
from replay.prepare import prepare
from replay_kernels.decide import min_loads
from replay_kernels.keys import pack_stream
from replay_kernels.oracle import oracle_stall as kernel_oracle_stall
from sim import kernel_bridge as kb
from sim.backends import expert_times_s
from traces import write_trace

pytestmark = pytest.mark.skipif(not replay_kernels.available(), reason="numba is not installed: no compiled kernels")


def prepared(tmp_path, hw: str, batch: int, slots: int, scope: str = "per_layer", seed: int = 5, experts: int = 8,
             warmup: str = "null"):
    path = tmp_path / f"t{seed}-{experts}.parquet"
    if not path.exists():
        write_trace(random_trace(tokens=80, layers=4, experts=experts, top_k=2, sequences=4, seed=seed), path)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"trace.path={path}", "trace.name=t", f"hardware={hw}", f"cache.slots={slots}",
                                           "cache.fraction=null", f"batch_size={batch}", f"cache.scope={scope}",
                                           f"warmup_tokens={warmup}"])
    return prepare(cfg)


CASES = [  # (batch, slots per layer, scope, experts): a partition smaller than a layer-step's experts (MIN
    # defers), one just big enough, a roomy one, global caches
    (1, 1, "per_layer", 4), (1, 2, "per_layer", 4), (3, 2, "per_layer", 4), (4, 3, "per_layer", 8),
    (1, 6, "per_layer", 16), (1, 2, "global", 8), (4, 3, "global", 8), (16, 5, "per_layer", 8),
]


@pytest.mark.parametrize("hw", ["t4", "cpu-nvme", "h100-pcie5"])
@pytest.mark.parametrize("batch,slots,scope,experts", CASES)
def test_kernel_bounds_equal_python(tmp_path, hw, batch, slots, scope, experts):
    p = prepared(tmp_path, hw, batch, slots, scope, experts=experts)
    assert p.warmup_steps > 0
    rates, cache, orders = min_replay(p)
    k_rates, k_cache, k_orders = kb.min_replay_kernel(p)
    assert k_rates == rates  # (measured window, whole replay)
    assert k_cache.stats == {f: getattr(cache.stats, f) for f in k_cache.stats}
    assert min_loads(k_cache) == cache.load_log  # MIN's loads and victims, in order
    assert k_orders.tolist() == [k for o in orders for k in o]  # every layer-step's compute order
    want = compute_bounds(p)
    assert kb.compute_bounds_kernel(p) == want
    for block in (want, want["whole_run"]):
        assert block["oracle_aggressive_stall_s"] > 0 and block["oracle_conservative_stall_s"] > 0
        assert block["oracle_stall_s"] == min(block[f"oracle_{s}_stall_s"] for s in ("aggressive", "conservative",
                                                                                       "preloaded"))
    # the cold start's stall is not in the window
    assert want["oracle_aggressive_stall_s"] < want["whole_run"]["oracle_aggressive_stall_s"]


@pytest.mark.parametrize("warmup", ["0", "20", "33"])
@pytest.mark.parametrize("batch,slots,scope,experts", [(1, 2, "per_layer", 4), (4, 3, "global", 8), (1, 6, "per_layer", 16)])
def test_kernel_bounds_equal_python_at_any_warmup(tmp_path, warmup, batch, slots, scope, experts):
    """No warm-up (the window is the whole replay), half the replay, all but the last few tokens (39 replayed)."""
    p = prepared(tmp_path, "cpu-nvme", batch, slots, scope, experts=experts, warmup=warmup)
    want = compute_bounds(p)
    assert kb.compute_bounds_kernel(p) == want
    if warmup == "0":
        assert {k: v for k, v in want.items() if k != "whole_run"} == want["whole_run"]


@pytest.mark.parametrize("seed", [5, 9])
@pytest.mark.parametrize("batch,slots,experts", [(1, 2, 4), (3, 2, 4), (1, 6, 16), (1, 15, 16)])
def test_kernel_aggressive_window_and_rescan_equal_python(tmp_path, seed, batch, slots, experts):
    """The aggressive schedule with other look-ahead windows, resumed or rescanned each time."""
    p = prepared(tmp_path, "cpu-nvme", batch, slots, seed=seed, experts=experts)
    ptr, keys, counts = kb.stream(p.steps, p.runtime)
    s = pack_stream(ptr, keys, len(p.partition_of))
    args = (p.steps, p.future, p.uses, p.partition_of, p.capacity, p.copy_model, p.compute, p.copy_bytes,
            p.meta.num_layers)
    kargs = (s, counts, p.partition_of, p.capacity, kb.dense_times_s(p.compute, p.steps),
             expert_times_s(p.compute, p.steps), p.meta.num_layers, p.copy_model.seconds(p.copy_bytes))
    for window in (None, 3, 5):
        for resume in (True, False):
            want = oracle_stall(*args, schedule="aggressive", window=window, resume_scan=resume)
            assert kernel_oracle_stall(*kargs, "aggressive", window=window, resume_scan=resume) == want > 0
            for start in (0, 7, 40):  # the stall from this layer-step on, and the preloaded schedule
                for preload in (False, True):
                    kw = dict(schedule="aggressive", window=window, resume_scan=resume, window_from=start,
                              preload=preload)
                    want = oracle_stall(*args, **kw)
                    kw.pop("schedule")
                    assert kernel_oracle_stall(*kargs, "aggressive", **kw) == want
                    assert want[0] >= want[1]


def test_what_the_bounds_kernels_do_not_cover_is_said(tmp_path):
    p = prepared(tmp_path, "t4", 1, 2)
    assert kb.bounds_unsupported(p) is None
    p.copy_model.kind = "shared_link"
    assert "serial channel" in kb.bounds_unsupported(p)
    with pytest.raises(ValueError, match="serial channel"):
        kb.compute_bounds_kernel(p)
    s = pack_stream([0, 1], [0])
    with pytest.raises(ValueError, match="future"):
        kernel_oracle_stall(s, [1], [0, 0], [1], [1e-4], [0.0, 1e-4], 1, 1e-3)
