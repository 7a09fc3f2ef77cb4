"""The compiled on-demand replay (replay_kernels/replay.py through sim/kernel_bridge.py) against the simulator's Python
replay (sim.engine.replay, the specification): every covered eviction policy x cache scope x batch size x link,
every output field equal (floats bit for bit), the same final residency and slots."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from kernel_cases import COMPUTE, LINKS, POLICIES, model_trace, on_demand_run

import replay_kernels
from replay.hardware import CopyModel
from sim import kernel_bridge as kb
from sim.engine import replay

pytestmark = pytest.mark.skipif(not replay_kernels.available(), reason="numba is not installed: no compiled kernels")


def both(trace, policy, scope, slots, batch, copy_model):
    """The Python replay's and the kernel's results, runtimes, and the kernel's cache."""
    steps, uses, rt_py = on_demand_run(trace, policy, scope, slots, batch)
    warmup = len(steps) // 3  # the measured window's first step: the mark is taken there
    py = replay(steps, rt_py, copy_model, COMPUTE, trace.meta.expert_bytes, trace.meta.num_layers, uses=uses,
                warmup_steps=warmup)
    steps, _, rt_k = on_demand_run(trace, policy, scope, slots, batch)
    assert kb.ondemand_unsupported(rt_k, copy_model) is None
    k, cache = kb.replay_kernel_state(steps, rt_k, copy_model, COMPUTE, trace.meta.expert_bytes,
                                      trace.meta.num_layers, warmup)
    return py, rt_py, k, rt_k, cache


def assert_same(py, rt_py, k, rt_k, cache):
    for f in ("total_s", "stall_s", "compute_s", "step_s", "step_phase", "step_tokens", "bytes_moved", "copies",
              "preload_copies", "demand_loads"):
        assert getattr(k, f) == getattr(py, f), f
    for f in ("requests", "hits", "late_hits", "misses", "stall_s"):
        assert np.array_equal(getattr(k.layers, f), getattr(py.layers, f)), f"layers.{f}"
    assert rt_k.cache.stats == rt_py.cache.stats
    assert cache.resident_slots() == rt_py.cache.slot_of  # the same experts resident, in the same slots
    assert_same_mark(k.mark, py.mark)


def assert_same_mark(k, py):
    """The window marks (replay.window.WindowMark): every total equal, floats bit for bit."""
    assert py is not None and py.step > 0 and k is not None
    for f in dataclasses.fields(py):
        a, b = getattr(k, f.name), getattr(py, f.name)
        if isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b), f"mark.{f.name}"
        else:
            assert a == b, f"mark.{f.name}"


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("batch", [1, 4, 16])
@pytest.mark.parametrize("scope", ["per_layer", "global"])
@pytest.mark.parametrize("policy", POLICIES)
def test_kernel_replay_equals_python(policy, scope, batch, link):
    copy_model, slots = LINKS[link]
    if policy.startswith("static") and slots < 2:
        slots = 2  # with one slot per layer nothing is pinned: the same run as lru
    py, rt_py, k, rt_k, cache = both(model_trace(), policy, scope, slots, batch, copy_model)
    assert_same(py, rt_py, k, rt_k, cache)
    assert rt_py.cache.stats.evictions > 0 and py.stall_s > 0  # not a trivial run


def test_the_cases_reach_the_rare_branches():
    """The equality above is only worth something if the kernel's rarer branches ran: stalls on a slow link,
    demands deferred for a slot with a tiny cache (counted through the Python runtime's retry), pinned
    preloads, Belady's deferral, several tokens sharing an expert (use counts above one)."""
    trace = model_trace()
    py, *_ = both(trace, "lru", "per_layer", 3, 1, LINKS["slow"][0])
    fast, *_ = both(trace, "lru", "per_layer", 3, 1, LINKS["fast"][0])
    assert py.stall_s > 10 * fast.stall_s > 0
    steps, uses, rt = on_demand_run(trace, "lru", "per_layer", 1, 4)
    retried = []
    real = rt.retry_deferred
    rt.retry_deferred = lambda: (lambda started: retried.append(len(started)) or started)(real())
    replay(steps, rt, LINKS["tiny"][0], COMPUTE, trace.meta.expert_bytes, trace.meta.num_layers, uses=uses)
    assert sum(retried) > 0
    py, *_ = both(trace, "static", "per_layer", 3, 1, LINKS["fast"][0])
    assert py.preload_copies == 2 * trace.meta.num_layers
    assert max(max(u.values()) for u in on_demand_run(trace, "lru", "per_layer", 3, 16)[1]) > 1
    on = both(trace, "belady", "per_layer", 2, 4, LINKS["tiny"][0])[0]
    off = both(trace, "belady-no-defer", "per_layer", 2, 4, LINKS["tiny"][0])[0]
    assert on.layers.misses.sum() < off.layers.misses.sum()  # deferring a miss lets MIN keep a better key


@pytest.mark.parametrize("policy", ["lru", "lfru", "belady", "static"])
@pytest.mark.parametrize("batch", [1, 4])
def test_kernel_replay_on_a_synthetic_preset_trace(policy, batch):
    """A DeepSeek-V2-Lite-shaped synthetic trace (26 layers x 64 experts x top-6), 16 slots per layer."""
    from replay.trace_source import synth_from_settings

    trace = synth_from_settings({"preset": "deepseek-v2-lite", "tokens": 240, "sequences": 4, "seed": 3})
    copy = CopyModel("alpha_beta", 25e9, 1e-5)
    py, rt_py, k, rt_k, cache = both(trace, policy, "per_layer", 16, batch, copy)
    assert_same(py, rt_py, k, rt_k, cache)


def test_what_the_kernel_does_not_cover_is_said():
    """A prefetching run, a copy model that is not one serial channel, a logged run, a policy without a kernel
    (and a subclass of one with a kernel: it may change anything) each get a reason; the replay refuses them."""
    from policies.eviction.expertflow import ExpertFlowCache
    from policies.eviction.lru import LRU

    trace = model_trace()
    copy = LINKS["fast"][0]
    steps, _, rt = on_demand_run(trace, "lru", "per_layer", 3, 1)
    assert kb.ondemand_unsupported(rt, copy) is None
    assert "Chrome trace" in kb.ondemand_unsupported(rt, copy, log=True)
    shared = CopyModel("shared_link", 25e9, 1e-5, channels=2)
    assert "serial channel" in kb.ondemand_unsupported(rt, shared)
    with pytest.raises(ValueError, match="serial channel"):
        kb.replay_kernel(steps, rt, shared, COMPUTE, trace.meta.expert_bytes, trace.meta.num_layers)
    rt.loads = object()  # a clairvoyant load plan: the oracle's demand loads take planned victims
    assert "clairvoyant load plan" in kb.ondemand_unsupported(rt, copy)
    rt.loads = None
    rt.horizon = type(rt.horizon)(1)
    rt.silent = False
    assert "prefetches" in kb.ondemand_unsupported(rt, copy)

    class MyLRU(LRU):
        pass

    for policy in (ExpertFlowCache(), MyLRU()):
        _, _, rt = on_demand_run(trace, "lru", "per_layer", 3, 1)
        rt.cache.policy = policy
        assert "has no kernel" in kb.ondemand_unsupported(rt, copy)


def cpython312_sum(values: list[float]) -> float:
    """CPython 3.12's ``sum()`` of floats from 0 (Python/bltinmodule.c): the first item plus the int 0, then
    Neumaier's compensated additions, the compensation added at the end if nonzero and finite."""
    total, comp = 0 + values[0], 0.0
    for x in values[1:]:
        t = total + x
        comp += (total - t) + x if abs(total) >= abs(x) else (x - t) + total
        total = t
    return total + comp if comp and np.isfinite(comp) else total


def test_py_sum_adds_as_this_python_sum_does():
    """A layer's experts computing back to back take Python's ``sum()`` of their times: plain additions up to
    Python 3.11, Neumaier's from 3.12 on; the kernel reproduces both bit for bit (``py_func``: the same code as
    plain Python, the arithmetic numba compiles)."""
    import sys

    from replay_kernels.replay import NEUMAIER_SUM, py_sum

    py_sum = getattr(py_sum, "py_func", py_sum)
    rng = np.random.default_rng(0)
    differ = 0
    for n in range(1, 40):
        values = (rng.random(n) * 10.0 ** rng.integers(-9, 2, n)).tolist()  # times of very different sizes
        assert py_sum(values, n, False) == float(np.cumsum(values)[-1])  # left to right, plainly
        assert py_sum(values, n, True) == cpython312_sum(values)
        assert py_sum(values, n, NEUMAIER_SUM) == sum(values)
        differ += py_sum(values, n, True) != py_sum(values, n, False)
    assert differ > 5 and NEUMAIER_SUM == (sys.version_info >= (3, 12))
