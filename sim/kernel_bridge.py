"""From the simulator's objects (runtime, hardware models, steps) to the compiled kernels' flat inputs, and
their outputs back to the simulator's results: what a driver's dispatch calls.

Phase 1 of the compiled fast path: nothing calls this module yet but the tests and the benchmark. The
dispatch (take the kernel where :func:`ondemand_unsupported` returns None, else the Python loop, and say
which in ``results.json``) comes with the one driver loop.
"""

from __future__ import annotations

import time

import numpy as np

import kernels
from kernels import cache as kc
from kernels.keys import layer_step_keys, pack_future, steps_csr
from kernels.replay import replay_ondemand
from policies.cache import CacheStats, ExpertCache
from policies.eviction.belady import Belady
from policies.eviction.lfru import LFRU
from policies.eviction.lfu import LFU
from policies.eviction.lru import LRU
from policies.eviction.static import Static
from policies.eviction.two_level import TwoLevel
from policies.horizons.fixed import FixedHorizon
from policies.runtime import PolicyRuntime

from .engine import LayerStats, ReplayResult
from .fused import expert_times_s
from .hardware import CopyModel


def eviction_spec(policy) -> dict | None:
    """The kernel's name and parameters of an eviction policy object (as :func:`kernels.cache.new_cache` takes
    them), or None for a policy the kernels do not implement. Exact types: a subclass may change anything."""
    kind = type(policy)
    if kind is LRU:
        return {"policy": "lru"}
    if kind is LFU:
        return {"policy": "lfu", "keep_counts": policy.keep_counts}
    if kind is LFRU:
        return {"policy": "lfru", "half_life_steps": policy.half_life_steps}
    if kind is Static:
        return {"policy": "static", "pinned": sorted(policy.pinned())}
    if kind is Belady:
        return {"policy": "belady", "defer": policy.defer}
    if kind is TwoLevel:
        return {"policy": "two_level", "window_steps": policy.window_steps}
    return None


def serial_channel_applies(copy_model: CopyModel) -> bool:
    """``sim.channels.make_channels`` picks the serial channel (what the kernels implement)."""
    return copy_model.kind not in ("shared_link", "partial_link") and copy_model.channels == 1


def ondemand_unsupported(runtime: PolicyRuntime, copy_model: CopyModel, log: bool = False) -> str | None:
    """Why the on-demand replay kernel cannot replay this run exactly, or None if it can."""
    if not kernels.available():
        return kernels.unavailable_reason()
    if log:
        return "a Chrome trace is logged (the kernel keeps no event log)"
    if not serial_channel_applies(copy_model):
        return f"copy model {copy_model.kind!r} with {copy_model.channels} channel(s) is not one serial channel"
    if eviction_spec(runtime.cache.policy) is None:
        return f"eviction policy {type(runtime.cache.policy).__name__} has no kernel"
    horizon = runtime.horizon
    if not runtime.silent and not (type(horizon) is FixedHorizon and horizon.distance() == 0):
        return "the run prefetches (only on-demand runs have a kernel so far)"
    if runtime.cache.load_log is not None or runtime.cache.stats != CacheStats():
        return "the runtime's cache is not fresh"
    return None


def kernel_cache(cache: ExpertCache, num_layers: int, ptr, keys, log_loads: bool = False) -> kc.CacheState:
    """A kernel cache equal to a fresh :class:`ExpertCache` (same partitions, slots, policy, pinned keys)."""
    spec = dict(eviction_spec(cache.policy))
    policy = spec.pop("policy")
    fut = pack_future(ptr, keys, len(cache.partition_of)) if policy == "belady" else None
    return kc.new_cache(policy, cache.partition_of, cache.capacity, ptr, keys, fut, num_layers=num_layers,
                        log_loads=log_loads, **spec)


def stream(steps, runtime: PolicyRuntime) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The replay's (ptr, keys, counts) (see :mod:`kernels.keys`)."""
    step_ptr, step_tokens = steps_csr(steps)
    return layer_step_keys(runtime.experts, runtime.offsets, step_ptr, step_tokens, len(runtime.cache.partition_of))


def replay_kernel(steps, runtime: PolicyRuntime, copy_model: CopyModel, compute, expert_bytes: int,
                  num_layers: int) -> ReplayResult:
    """``sim.engine.replay`` of an on-demand run (see :func:`ondemand_unsupported`) by the compiled kernel. The
    runtime's cache stats are set to the replay's, as the Python loop leaves them; its residency is not."""
    wall0 = time.perf_counter()
    reason = ondemand_unsupported(runtime, copy_model)
    if reason is not None:
        raise ValueError(f"replay_kernel: {reason}")
    ptr, keys, counts = stream(steps, runtime)
    cache = kernel_cache(runtime.cache, num_layers, ptr, keys)
    ntok = np.fromiter((len(s.tokens) for s in steps), dtype=np.int64, count=len(steps))
    dense_memo: dict[int, float] = {}
    dense = [dense_memo.setdefault(n, compute.dense_time_s(n)) for n in ntok.tolist()]
    res = replay_ondemand(ptr, keys, counts, ntok, dense, expert_times_s(compute, steps), num_layers,
                          runtime.experts.shape[2], cache, copy_model.seconds(expert_bytes))
    stats = runtime.cache.stats
    for name, value in cache.stats.items():
        setattr(stats, name, value)
    pinned = int(cache.kf[kc.PINNED].sum())
    layers = LayerStats(res.requests, res.hits, res.late_hits, res.misses, res.layer_stall_s)
    return ReplayResult(
        total_s=res.total_s, stall_s=res.stall_s, compute_s=res.compute_s, step_s=res.step_s.tolist(),
        step_phase=[s.phase for s in steps], step_tokens=ntok.tolist(),
        bytes_moved=(res.copies + pinned) * expert_bytes, copies=res.copies + pinned, preload_copies=pinned,
        demand_loads=res.demand_loads, layers=layers, wall_s=time.perf_counter() - wall0,
    )


# ---------------------------------------------------------------------------------------------- the bounds
def bounds_unsupported(p) -> str | None:
    """Why :func:`compute_bounds_kernel` cannot compute this prepared run's bounds exactly, or None."""
    if not kernels.available():
        return kernels.unavailable_reason()
    if not serial_channel_applies(p.copy_model):
        return f"copy model {p.copy_model.kind!r} with {p.copy_model.channels} channel(s) is not one serial channel"
    return None


def min_replay_kernel(p, ptr=None, keys=None, counts=None):
    """``sim.run.min_replay`` compiled: MIN's hit rate, its kernel cache (stats in ``ctr``, the load log in
    ``log``) and every layer-step's compute order over the stream's layout."""
    from kernels.decide import decide

    if ptr is None:
        ptr, keys, counts = stream(p.steps, p.runtime)
    num_keys = len(p.partition_of)
    cache = kc.new_cache("belady", p.partition_of, p.capacity, ptr, keys, pack_future(ptr, keys, num_keys),
                         num_layers=p.meta.num_layers,
                         log_loads=True)
    _, orders = decide(ptr, keys, counts, p.meta.num_layers, cache, record_orders=True)
    c = cache.ctr
    return c[kc.HITS] / (c[kc.HITS] + c[kc.MISSES] + c[kc.LATE]), cache, orders


def compute_bounds_kernel(p) -> dict:
    """``sim.run.compute_bounds`` compiled (see :func:`bounds_unsupported`)."""
    from kernels.oracle import oracle_stall

    reason = bounds_unsupported(p)
    if reason is not None:
        raise ValueError(f"compute_bounds_kernel: {reason}")
    ptr, keys, counts = stream(p.steps, p.runtime)
    rate, cache, orders = min_replay_kernel(p, ptr, keys, counts)
    fut = pack_future(ptr, keys, len(p.partition_of))
    dense_memo: dict[int, float] = {}
    dense = [dense_memo.setdefault(len(s.tokens), p.compute.dense_time_s(len(s.tokens))) for s in p.steps]
    args = (ptr, keys, counts, fut, p.partition_of, p.capacity, dense, expert_times_s(p.compute, p.steps),
            p.meta.num_layers, p.copy_model.seconds(p.copy_bytes))
    aggr = oracle_stall(*args, schedule="aggressive")
    cons = oracle_stall(*args, schedule="conservative", loads=cache.log[:cache.ctr[kc.NLOG]], orders=orders)
    return {
        "belady_hit_rate": float(rate),
        "belady_misses_unique": int(cache.ctr[kc.INSERTS]),
        "oracle_stall_s": min(aggr, cons),
        "oracle_aggressive_stall_s": aggr,
        "oracle_conservative_stall_s": cons,
    }
