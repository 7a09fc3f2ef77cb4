"""The executor's replay loop: the simulator's loop (sim/engine.py) with real copies and real compute.

Same calls into the same policy runtime in the same order; time is the wall clock. Copies land on I/O
threads; the main thread marks them resident in the cache when it next looks (before each layer's decisions
and after every wait), so the cache itself is only ever touched by the main thread.
"""

from __future__ import annotations

import time

from policies.base import Step
from policies.link_budget import DEMAND
from policies.runtime import PolicyRuntime
from replay.results import LayerStats, ReplayResult
from replay.window import take_mark

from .compute import LayerCompute
from .link import MeasuredLink
from .transfer import TransferEngine


def execute(
    steps: list[Step],
    runtime: PolicyRuntime,
    transfer: TransferEngine,
    compute: LayerCompute,
    num_layers: int,
    uses: list[dict[int, int]],
    log: bool = False,
    phases: dict[str, float] | None = None,
    warmup_steps: int = 0,
) -> ReplayResult:
    """Replay ``steps``; with ``phases`` (a dict), also add there the wall seconds the main thread spent in each
    part of the loop (instrumentation only: the decisions are the same with or without it):
    ``dense`` and ``expert`` compute, ``decide`` (landed copies + ``begin_layer`` + cancels), ``submit``
    (queueing copies), ``wait`` (the stall), ``release`` and ``end`` (stats + ``end_layer``), and the counts
    ``layer_steps`` and ``expert_runs``. ``total_s - sum(parts)`` is loop overhead not in any part. The result's
    ``mark`` holds the totals when step ``warmup_steps`` (the first measured one, :mod:`replay.window`) began."""
    cache = runtime.cache
    clock = time.perf_counter
    ph = {k: 0.0 for k in ("dense", "decide", "submit", "wait", "expert", "release", "end", "layer_steps",
                            "expert_runs")}
    L = num_layers
    max_ls = len(steps) * L - 1
    stats = LayerStats.zeros(L)
    link = MeasuredLink(transfer)
    events: list = []
    stall_total = compute_total = 0.0
    step_s: list[float] = []
    demand_loads = 0

    def sync() -> None:
        for k in transfer.landed():
            if cache.is_inflight(k):
                cache.complete(k)

    def submit(key: int, priority: int) -> None:
        transfer.submit(key, cache.slot_of[key], priority)

    def wait_for(key: int) -> float:
        waited = 0.0
        while key in runtime.deferred:
            for k in runtime.retry_deferred():
                submit(k, DEMAND)
            if key in runtime.deferred:
                waited += transfer.wait_any()
                sync()
        if cache.is_inflight(key):
            waited += transfer.wait(key)
        sync()
        return waited

    # Pinned experts (static policies) are loaded into their slots before the replay, as the simulator assumes:
    # their copies count in bytes_moved, not in the timed run.
    preload = sorted(cache.policy.pinned())
    for k in preload:
        submit(k, DEMAND)
    for k in preload:
        transfer.wait(k)
    transfer.landed()  # pinned keys were never in flight in the cache: nothing to mark
    first_record = len(transfer.records)

    t_run = clock()
    mark = None
    for si, step in enumerate(steps):
        if si == warmup_steps:
            mark = take_mark(si, clock() - t_run, stall_total, compute_total, demand_loads, transfer.copies_started,
                             transfer.bytes_started, cache.stats, stats.requests, stats.hits, stats.late_hits,
                             stats.misses, stats.stall_s)
        t_step = clock()
        ntok = len(step.tokens)
        for layer in range(L):
            t0 = clock()
            compute.run_dense(ntok)
            t1 = clock()
            dense = t1 - t0
            compute_total += dense
            sync()
            now = si * L + layer
            plan = runtime.begin_layer(si, layer, step.tokens, max_ls, uses[now], link)
            t2 = clock()
            for k in plan.demand:
                submit(k, DEMAND)
            for k, _, prio in plan.prefetch:
                submit(k, prio)
            for k in plan.needed:
                if plan.outcome[k] == "late":
                    transfer.upgrade(k)
            t3 = clock()
            ph["dense"] += dense
            ph["decide"] += t2 - t1
            ph["submit"] += t3 - t2
            layer_stall = expert_s = release_s = 0.0
            for k in plan.order:
                if cache.is_inflight(k) or k in runtime.deferred:
                    layer_stall += wait_for(k)
                t1 = clock()
                compute.run_expert(cache.slot_of[k], plan.uses[k])
                t2 = clock()
                dt = t2 - t1
                if log:
                    events.append((t1 - t_run, dt, layer, k))
                expert_s += dt
                for s in runtime.release(k):
                    submit(s, DEMAND)
                release_s += clock() - t2
            t4 = clock()
            compute_total += expert_s
            stall_total += layer_stall
            demand_loads += stats.record(layer, plan, layer_stall)
            runtime.end_layer(dense + expert_s, layer_stall, transfer.bandwidth_bytes_per_s(), plan)
            link.observe_layer(dense + expert_s)
            ph["end"] += clock() - t4
            ph["expert"] += expert_s
            ph["wait"] += layer_stall
            ph["release"] += release_s
            ph["expert_runs"] += len(plan.order)
        step_s.append(clock() - t_step)
    ph["layer_steps"] += len(steps) * L
    total = clock() - t_run
    if phases is not None:
        for k, v in ph.items():
            phases[k] = phases.get(k, 0.0) + v
    return ReplayResult(
        total_s=total, stall_s=stall_total, compute_s=compute_total, step_s=step_s,
        step_phase=[s.phase for s in steps], step_tokens=[len(s.tokens) for s in steps],
        bytes_moved=transfer.bytes_started, copies=transfer.copies_started, demand_loads=demand_loads,
        layers=stats, wall_s=total, events=events, copy_records=transfer.records[first_record:],
        preload_copies=len(preload), mark=mark,
    )
