"""The replay loop: one compute stream, SimPy copy channels, the shared policy runtime.

The compute stream is sequential, so it is plain Python that advances the clock ``t`` layer by layer; SimPy
simulates the copy channels between compute events (``env.run(until=...)``). Per layer: the dense part runs
(attention etc.), the router's choice is handed to the policy runtime (demand copies, prefetches), then the
needed experts compute one by one (resident ones first), each waiting for its copy if needed. The wait is
the stall.
"""

from __future__ import annotations

import gc
import heapq
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import simpy

from policies.base import Step
from policies.runtime import PolicyRuntime

from .channels import CopyChannels, make_channels
from .fused import expert_times_s, fused_applies, hits_compute_s, replay_fused, wait_ready
from .hardware import ComputeModel, CopyModel


@dataclass
class LayerStats:
    requests: np.ndarray  # per layer: (token, expert) uses
    hits: np.ndarray
    late_hits: np.ndarray
    misses: np.ndarray
    stall_s: np.ndarray

    @classmethod
    def zeros(cls, num_layers: int) -> LayerStats:
        return cls(*(np.zeros(num_layers, dtype=np.int64) for _ in range(4)), np.zeros(num_layers))

    def accumulator(self) -> LayerTally:
        """A faster recorder for the simulator's loop (plain Python lists); merge it back with :meth:`absorb`."""
        return LayerTally(len(self.requests))

    def absorb(self, tally: LayerTally) -> None:
        for arr, vals in ((self.requests, tally.requests), (self.hits, tally.hits), (self.late_hits, tally.late),
                          (self.misses, tally.misses)):
            arr += np.asarray(vals, dtype=np.int64)
        self.stall_s += np.asarray(tally.stall_s, dtype=float)

    def record(self, layer: int, plan, stall_s: float) -> int:
        """Add one layer-step's outcomes; returns its demand loads (distinct experts that missed)."""
        self.stall_s[layer] += stall_s
        counters = {"hit": self.hits, "late": self.late_hits, "miss": self.misses}
        loads = 0
        for k in plan.needed:
            u = plan.uses[k]
            self.requests[layer] += u
            counters[plan.outcome[k]][layer] += u
            loads += plan.outcome[k] == "miss"
        return loads


class LayerTally:
    """Per-layer sums in plain Python lists, which the simulator's loop adds to from the use counts each
    :class:`~policies.runtime.LayerPlan` carries (the sums :meth:`LayerStats.record` makes, without a loop over
    keys or numpy scalar updates); :meth:`LayerStats.absorb` merges them."""

    def __init__(self, num_layers: int):
        self.requests = [0] * num_layers
        self.hits = [0] * num_layers
        self.late = [0] * num_layers
        self.misses = [0] * num_layers
        self.stall_s = [0.0] * num_layers


@dataclass
class ReplayResult:
    total_s: float  # simulated time of the whole replay
    stall_s: float  # time the compute stream waited for copies
    compute_s: float  # time the compute stream was busy
    step_s: list[float]  # duration of each step
    step_phase: list[int]  # phase of each step
    step_tokens: list[int]  # tokens in each step
    bytes_moved: int  # bytes of every copy started (a started copy always completes), preload included
    copies: int  # copies started, preload included
    demand_loads: int  # distinct experts per layer-step that had to be loaded on demand (misses)
    layers: LayerStats
    wall_s: float  # host time the replay took
    events: list = field(default_factory=list)  # compute spans for the Chrome trace (if logged)
    copy_records: list | None = None
    preload_copies: int = 0  # pinned experts (static policies) loaded before the replay: counted, not timed


def replay(
    steps: list[Step],
    runtime: PolicyRuntime,
    copy_model: CopyModel,
    compute: ComputeModel,
    expert_bytes: int,
    num_layers: int,
    log: bool = False,
    uses: list[dict[int, int]] | None = None,
    simpy_channels: bool = False,
    fused: bool = True,
) -> ReplayResult:
    """Replay ``steps`` through ``runtime``; ``uses[i]`` (key -> tokens at layer-step i) may be precomputed.
    ``simpy_channels`` forces the SimPy copy channels even where the direct :class:`SerialChannel` applies
    (the two give identical results, float for float); ``fused=False`` forces this module's general loop where
    :mod:`sim.fused`'s would apply (identical results too)."""
    with gc_paused():
        return _replay(steps, runtime, copy_model, compute, expert_bytes, num_layers, log, uses, simpy_channels, fused)


@contextmanager
def gc_paused():
    """Pause the cyclic GC for a block that allocates containers by the hundred thousand (the replay loop,
    the per-layer-step keys), none of them in reference cycles, so refcounting frees them. With the GC on,
    its collections run every few hundred allocations and keep re-traversing the long-lived ones: 15% or more
    of a replay, and most of building the keys. Resumed after (gc.freeze/unfreeze instead would leave the
    next collections miscalibrated)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _replay(steps, runtime, copy_model, compute, expert_bytes, num_layers, log, uses, simpy_channels, fused) -> ReplayResult:
    wall0 = time.perf_counter()
    cache = runtime.cache
    if simpy_channels:
        chan = CopyChannels(simpy.Environment(), copy_model, expert_bytes, cache.complete, log=log)
    else:
        chan = make_channels(copy_model, expert_bytes, cache.complete, log=log)
    runtime.set_schedule(steps)  # lets a stateless predictor score many layer-steps in one numpy call
    L = num_layers

    def result(t, stall_total, compute_total, step_s, demand_loads, tally, wall_s) -> ReplayResult:
        stats = LayerStats.zeros(L)
        stats.absorb(tally)
        pinned = len(cache.policy.pinned())
        return ReplayResult(
            total_s=t,
            stall_s=stall_total,
            compute_s=compute_total,
            step_s=step_s,
            step_phase=[s.phase for s in steps],
            step_tokens=[len(s.tokens) for s in steps],
            bytes_moved=chan.bytes_started + pinned * expert_bytes,
            copies=chan.copies_started + pinned,
            preload_copies=pinned,
            demand_loads=demand_loads,
            layers=stats,
            wall_s=wall_s,
            events=events,
            copy_records=chan.records,
        )

    events: list = []
    if uses is not None and fused and fused_applies(runtime, chan, log):
        return replay_fused(steps, runtime, chan, compute, L, uses, LayerTally(L), result)
    max_ls = len(steps) * L - 1
    pending_prefetch: list[tuple[int, int]] = []  # heap of (target layer-step, key)
    t = 0.0
    stall_total = compute_total = 0.0
    demand_loads = 0
    step_s: list[float] = []
    dense_cache: dict[int, float] = {}
    expert_s = expert_times_s(compute, steps)
    tally = LayerTally(L)
    req_l, hit_l, late_l, miss_l, stall_l = tally.requests, tally.hits, tally.late, tally.misses, tally.stall_s
    deferred = runtime.deferred
    inflight = cache.inflight
    advance, submit = chan.advance, chan.submit
    queued, copying = chan.queued, chan.copying  # busy() is ``queued or copying``; read them directly per layer
    heappush, heappop = heapq.heappush, heapq.heappop

    for si, step in enumerate(steps):
        t_step = t
        ntok = len(step.tokens)
        dense = dense_cache.get(ntok)
        if dense is None:
            dense = dense_cache[ntok] = compute.dense_time_s(ntok)
        for layer in range(L):
            t += dense
            compute_total += dense
            if queued or copying:
                advance(t)
            plan = runtime.begin_layer(si, layer, step.tokens, max_ls, uses[si * L + layer] if uses else None)
            if plan.demand or plan.prefetch:
                advance(t)
            now = plan.layer_step
            # prefetches whose target layer has come and gone without starting: drop them
            while pending_prefetch and pending_prefetch[0][0] <= now:
                _, k = heappop(pending_prefetch)
                if chan.is_queued(k) and k not in plan.uses and chan.cancel(k):
                    runtime.cancel(k)
            for k in plan.demand:
                submit(k, 0)
            for k, target in plan.prefetch:
                submit(k, 1 + target - now)
                heappush(pending_prefetch, (target, k))
            for k in plan.late:
                chan.upgrade(k)
            t_layer = t
            layer_stall = 0.0
            puses = plan.uses
            order = plan.order
            if not deferred:
                # The common case, first: hits are resident and stay so (protected), and with nothing deferred
                # there is nothing to release, so they compute back to back, as one block.
                hits = plan.hits
                block = hits_compute_s(hits, plan.use_counts[0], puses, expert_s)
                if log:
                    start = t
                    for k in hits:
                        et = expert_s[puses[k]]
                        events.append((start, et, layer, k))
                        start += et
                t += block
                compute_total += block
                order = order[len(hits):]
            for k in order:
                if k in inflight or k in deferred:
                    before = t
                    t = wait_ready(k, t, chan, runtime)
                    layer_stall += t - before
                et = expert_s[puses[k]]
                if log:
                    events.append((t, et, layer, k))
                t += et
                compute_total += et
                if deferred:  # release(k) only matters while demands wait for a slot (else it just unprotects k)
                    started = runtime.release(k)
                    if started:
                        advance(t)
                        for s in started:
                            submit(s, 0)
            stall_total += layer_stall
            # LayerStats.record's sums, from the plan's counts
            h, lt, m = plan.use_counts
            stall_l[layer] += layer_stall
            req_l[layer] += h + lt + m
            hit_l[layer] += h
            late_l[layer] += lt
            miss_l[layer] += m
            demand_loads += len(plan.misses)
            runtime.end_layer(t - t_layer - layer_stall + dense, layer_stall, chan.bw_ewma_bytes_per_s, plan)
        step_s.append(t - t_step)
    return result(t, stall_total, compute_total, step_s, demand_loads, tally, time.perf_counter() - wall0)
