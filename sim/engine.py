"""The replay loop: one compute stream, SimPy copy channels, the shared policy runtime.

The compute stream is sequential, so it is plain Python that advances the clock ``t`` layer by layer; SimPy
simulates the copy channels between compute events (``env.run(until=...)``). Per layer: the dense part runs
(attention etc.), the router's choice is handed to the policy runtime (demand copies, prefetches), then the
needed experts compute one by one (resident ones first), each waiting for its copy if needed. The wait is
the stall.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np
import simpy

from policies.base import Step
from policies.runtime import PolicyRuntime

from .channels import CopyChannels
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


@dataclass
class ReplayResult:
    total_s: float  # simulated time of the whole replay
    stall_s: float  # time the compute stream waited for copies
    compute_s: float  # time the compute stream was busy
    step_s: list[float]  # duration of each step
    step_phase: list[int]  # phase of each step
    step_tokens: list[int]  # tokens in each step
    bytes_moved: int  # bytes of every copy started (a started copy always completes)
    copies: int
    demand_loads: int  # distinct experts per layer-step that had to be loaded on demand (misses)
    layers: LayerStats
    wall_s: float  # host time the replay took
    events: list = field(default_factory=list)  # compute spans for the Chrome trace (if logged)
    copy_records: list | None = None


def replay(
    steps: list[Step],
    runtime: PolicyRuntime,
    copy_model: CopyModel,
    compute: ComputeModel,
    expert_bytes: int,
    num_layers: int,
    log: bool = False,
    uses: list[dict[int, int]] | None = None,
) -> ReplayResult:
    """Replay ``steps`` through ``runtime``; ``uses[i]`` (key -> tokens at layer-step i) may be precomputed."""
    wall0 = time.perf_counter()
    env = simpy.Environment()
    cache = runtime.cache
    chan = CopyChannels(env, copy_model, expert_bytes, cache.complete, log=log)
    L = num_layers
    max_ls = len(steps) * L - 1
    stats = LayerStats.zeros(L)
    pending_prefetch: list[tuple[int, int]] = []  # heap of (target layer-step, key)
    events: list = []
    t = 0.0
    stall_total = compute_total = 0.0
    demand_loads = 0
    step_s: list[float] = []
    dense_cache: dict[int, float] = {}
    expert_cache: dict[int, float] = {}

    def advance(to: float) -> None:
        # copies only progress while the channels have work; an idle link needs no simulated events
        if to > env.now:
            env.run(until=to)

    def wait_for(key: int) -> None:
        nonlocal t
        advance(t)
        while cache.is_inflight(key) or key in runtime.deferred:
            ev = chan.pending(key)
            if ev is None:  # deferred: no slot yet; wait for any copy to land, then retry
                for k in runtime.retry_deferred():
                    chan.submit(k, 0)
                if key in runtime.deferred:
                    if not chan.busy():
                        raise RuntimeError(f"deadlock: expert key {key} can never get a slot (capacity too small)")
                    env.run(until=chan.any_done)
                continue
            env.run(until=ev)
        t = max(t, env.now)

    for si, step in enumerate(steps):
        t_step = t
        ntok = len(step.tokens)
        dense = dense_cache.get(ntok)
        if dense is None:
            dense = dense_cache[ntok] = compute.dense_time_s(ntok)
        for layer in range(L):
            t += dense
            compute_total += dense
            if chan.busy():
                advance(t)
            plan = runtime.begin_layer(si, layer, step.tokens, max_ls, uses[si * L + layer] if uses else None)
            if plan.demand or plan.prefetch:
                advance(t)
            now = plan.layer_step
            # prefetches whose target layer has come and gone without starting: drop them
            while pending_prefetch and pending_prefetch[0][0] <= now:
                _, k = heapq.heappop(pending_prefetch)
                if chan.is_queued(k) and k not in plan.uses and chan.cancel(k):
                    runtime.cancel(k)
            for k in plan.demand:
                chan.submit(k, 0)
            for k, target in plan.prefetch:
                chan.submit(k, 1 + target - now)
                heapq.heappush(pending_prefetch, (target, k))
            for k in plan.needed:
                if plan.outcome[k] == "late":
                    chan.upgrade(k)
            t_layer = t
            layer_stall = 0.0
            for k in plan.order:
                if cache.is_inflight(k) or k in runtime.deferred:
                    before = t
                    wait_for(k)
                    layer_stall += t - before
                n = plan.uses[k]
                et = expert_cache.get(n)
                if et is None:
                    et = expert_cache[n] = compute.expert_time_s(n)
                if log:
                    events.append((t, et, layer, k))
                t += et
                compute_total += et
                started = runtime.release(k)
                if started:
                    advance(t)
                    for s in started:
                        chan.submit(s, 0)
            stall_total += layer_stall
            demand_loads += stats.record(layer, plan, layer_stall)
            runtime.end_layer(t - t_layer - layer_stall + dense, layer_stall, chan.bw_ewma_bytes_per_s, plan)
        step_s.append(t - t_step)
    return ReplayResult(
        total_s=t,
        stall_s=stall_total,
        compute_s=compute_total,
        step_s=step_s,
        step_phase=[s.phase for s in steps],
        step_tokens=[len(s.tokens) for s in steps],
        bytes_moved=chan.bytes_started,
        copies=chan.copies_started,
        demand_loads=demand_loads,
        layers=stats,
        wall_s=time.perf_counter() - wall0,
        events=events,
        copy_records=chan.records,
    )
