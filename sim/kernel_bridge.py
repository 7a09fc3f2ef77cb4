"""From the simulator's objects (runtime, hardware models, steps) to the compiled kernels' flat inputs, and
their outputs back to the simulator's results: what the simulator's dispatch (``sim/run.py``) calls. It takes
the kernels where :func:`ondemand_unsupported` / :func:`bounds_unsupported` return None, else the Python
loops, and says which in ``results.json`` (``run.replay_path``, ``run.bounds_path`` and the reasons); see
``docs/kernel.md``.
"""

from __future__ import annotations

import time

import numpy as np

import replay_kernels
from policies.cache import CacheStats, ExpertCache
from policies.eviction.belady import Belady
from policies.eviction.lfru import LFRU
from policies.eviction.lfu import LFU
from policies.eviction.lru import LRU
from policies.eviction.static import Static
from policies.eviction.two_level import TwoLevel
from policies.future import StepStream
from policies.horizons.fixed import FixedHorizon
from policies.runtime import PolicyRuntime
from replay.hardware import CopyModel
from replay.results import LayerStats, ReplayResult
from replay.window import WindowMark, take_mark
from replay_kernels import cache as kc
from replay_kernels.keys import layer_step_keys, pack_stream, steps_csr
from replay_kernels.replay import replay_ondemand

from .backends import expert_times_s


def eviction_spec(policy) -> dict | None:
    """The kernel's name and parameters of an eviction policy object (as :func:`replay_kernels.cache.new_cache` takes
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
    if not replay_kernels.available():
        return replay_kernels.unavailable_reason()
    if log:
        return "a Chrome trace is logged (the kernel keeps no event log)"
    if not serial_channel_applies(copy_model):
        return f"copy model {copy_model.kind!r} with {copy_model.channels} channel(s) is not one serial channel"
    if eviction_spec(runtime.cache.policy) is None:
        return f"eviction policy {type(runtime.cache.policy).__name__} has no kernel"
    horizon = runtime.horizon
    if not runtime.silent and not (type(horizon) is FixedHorizon and horizon.distance() == 0):
        return "the run prefetches (only on-demand runs have a kernel so far)"
    if runtime.loads is not None:
        return "a clairvoyant load plan (the oracle's, policies/clairvoyant.py) picks the victims"
    if runtime.cache.load_log is not None or runtime.cache.stats != CacheStats():
        return "the runtime's cache is not fresh"
    return None


def kernel_cache(cache: ExpertCache, num_layers: int, ptr, keys) -> kc.CacheState:
    """A kernel cache over the stream (ptr, keys) equal to a fresh :class:`ExpertCache` (same partitions, slots,
    policy and pinned keys)."""
    spec = dict(eviction_spec(cache.policy))
    policy = spec.pop("policy")
    stream_s = pack_stream(ptr, keys, len(cache.partition_of) if policy == "belady" else None)
    return kc.new_cache(policy, cache.partition_of, cache.capacity, stream_s, num_layers=num_layers, **spec)


def stream(steps, runtime: PolicyRuntime) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The replay's (ptr, keys, counts) (see :mod:`replay_kernels.keys`)."""
    step_ptr, step_tokens = steps_csr(steps)
    return layer_step_keys(runtime.experts, runtime.offsets, step_ptr, step_tokens, len(runtime.cache.partition_of))


def prepared_stream(p) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A prepared run's (ptr, keys, counts): the arrays it holds (``p.stream``), else built."""
    s = p.stream
    return stream(p.steps, p.runtime) if s is None else (s.ptr, s.keys, s.counts)


def dense_times_s(compute, steps) -> list[float]:
    """The dense time of each step (its token count's, computed once per count as the Python loops do)."""
    memo: dict[int, float] = {}
    return [memo.setdefault(len(s.tokens), compute.dense_time_s(len(s.tokens))) for s in steps]


def replay_kernel(steps, runtime: PolicyRuntime, copy_model: CopyModel, compute, expert_bytes: int,
                  num_layers: int, warmup_steps: int = 0, keys: StepStream | None = None) -> ReplayResult:
    """``sim.engine.replay`` of an on-demand run (see :func:`ondemand_unsupported`) by the compiled kernel, the
    window mark taken when step ``warmup_steps`` begins; ``keys``: the steps' stream, if already built. The
    runtime's cache stats are set to the replay's, as the Python loop leaves them; its residency is not."""
    return replay_kernel_state(steps, runtime, copy_model, compute, expert_bytes, num_layers, warmup_steps, keys)[0]


def replay_kernel_state(steps, runtime: PolicyRuntime, copy_model: CopyModel, compute, expert_bytes: int,
                        num_layers: int, warmup_steps: int = 0,
                        keys: StepStream | None = None) -> tuple[ReplayResult, kc.CacheState]:
    """:func:`replay_kernel`, and the kernel cache it replayed through (its final residency and slots)."""
    wall0 = time.perf_counter()
    reason = ondemand_unsupported(runtime, copy_model)
    if reason is not None:
        raise ValueError(f"replay_kernel: {reason}")
    ptr, keys, counts = stream(steps, runtime) if keys is None else (keys.ptr, keys.keys, keys.counts)
    cache = kernel_cache(runtime.cache, num_layers, ptr, keys)
    ntok = np.fromiter((len(s.tokens) for s in steps), dtype=np.int64, count=len(steps))
    res = replay_ondemand(cache, counts, ntok, dense_times_s(compute, steps), expert_times_s(compute, steps),
                          num_layers, runtime.experts.shape[2], copy_model.seconds(expert_bytes),
                          mark_step=warmup_steps)
    stats = runtime.cache.stats
    for name, value in cache.stats.items():
        setattr(stats, name, value)
    if not runtime.silent:  # a predictor at distance 0: the runtime would note the distance at the first layer
        runtime.note_distance(0, 0)
    pinned = int(cache.m[kc.PINNED].sum())
    layers = LayerStats(res.requests, res.hits, res.late_hits, res.misses, res.layer_stall_s)
    return ReplayResult(
        total_s=res.total_s, stall_s=res.stall_s, compute_s=res.compute_s, step_s=res.step_s.tolist(),
        step_phase=[s.phase for s in steps], step_tokens=ntok.tolist(),
        bytes_moved=(res.copies + pinned) * expert_bytes, copies=res.copies + pinned, preload_copies=pinned,
        demand_loads=res.demand_loads, layers=layers, wall_s=time.perf_counter() - wall0,
        mark=window_mark(res.mark, pinned, expert_bytes),
    ), cache


def window_mark(mark, pinned: int, expert_bytes: int) -> WindowMark | None:
    """The kernel's mark (:class:`replay_kernels.replay.OndemandMark`) as the drivers take it, the pinned
    experts' preload counted in the copies and bytes as they count it."""
    if mark is None:
        return None
    L = len(mark.misses)
    copies = mark.copies + pinned
    return take_mark(mark.step, mark.t, mark.stall_s, mark.compute_s, mark.demand_loads, copies,
                     copies * expert_bytes, CacheStats(**mark.stats), [mark.uses] * L,
                     mark.uses - mark.late_hits - mark.misses, mark.late_hits, mark.misses, mark.layer_stall_s)


# ---------------------------------------------------------------------------------------------- the bounds
def bounds_unsupported(p) -> str | None:
    """Why :func:`compute_bounds_kernel` cannot compute this prepared run's bounds exactly, or None."""
    if not replay_kernels.available():
        return replay_kernels.unavailable_reason()
    if not serial_channel_applies(p.copy_model):
        return f"copy model {p.copy_model.kind!r} with {p.copy_model.channels} channel(s) is not one serial channel"
    return None


def min_replay_kernel(p, stream_s: np.ndarray | None = None, counts: np.ndarray | None = None):
    """``replay.bounds.min_replay`` compiled: MIN's hit rate (over the measured window, and over the whole
    replay), its kernel cache (stats, the load log in ``loads``) and every layer-step's compute order over the
    stream's layout. ``stream_s``: the packed stream with its future, and ``counts``, if already built."""
    from replay_kernels.decide import decide

    if stream_s is None:
        ptr, keys, counts = prepared_stream(p)
        stream_s = pack_stream(ptr, keys, len(p.partition_of))
    L = p.meta.num_layers
    cache = kc.new_cache("belady", p.partition_of, p.capacity, stream_s, num_layers=L, log_loads=True)
    _, orders, mark = decide(cache, counts, L, record_orders=True, mark_at=p.warmup_steps * L)
    st = cache.stats

    def requests(s: dict) -> int:
        return s["hits"] + s["misses"] + s["late_hits"]

    base = mark or dict.fromkeys(st, 0)  # no mark: the window is the whole replay (ondemand_replay's count_from)
    window = (st["hits"] - base["hits"]) / (requests(st) - requests(base))
    return (window, st["hits"] / requests(st)), cache, orders


def compute_bounds_kernel(p) -> dict:
    """``replay.bounds.compute_bounds`` compiled (see :func:`bounds_unsupported`): the same dict, the same
    numbers."""
    from replay.bounds import add_oracle, belady_dict
    from replay_kernels.oracle import oracle_stall

    reason = bounds_unsupported(p)
    if reason is not None:
        raise ValueError(f"compute_bounds_kernel: {reason}")
    ptr, keys, counts = prepared_stream(p)
    stream_s = pack_stream(ptr, keys, len(p.partition_of))
    rates, cache, orders = min_replay_kernel(p, stream_s, counts)
    first = p.warmup_steps * p.meta.num_layers
    args = (stream_s, counts, p.partition_of, p.capacity, dense_times_s(p.compute, p.steps),
            expert_times_s(p.compute, p.steps), p.meta.num_layers, p.copy_model.seconds(p.copy_bytes))
    aggr = oracle_stall(*args, schedule="aggressive", window_from=first)
    cons = oracle_stall(*args, schedule="conservative", loads=cache.loads, orders=orders, window_from=first)
    pre = oracle_stall(*args, schedule="aggressive", window_from=first, preload=True)
    loads = cache.loads
    out = belady_dict(rates, int((loads[:, 0] >= first).sum()), int(cache.stats["inserts"]))
    add_oracle(out, aggr, cons, pre)
    return out
