"""The replay loop: one compute stream, SimPy copy channels, the shared policy runtime.

The compute stream is sequential, so it is plain Python that advances the clock ``t`` layer by layer; SimPy
simulates the copy channels between compute events (``env.run(until=...)``). Per layer: the dense part runs
(attention etc.), the router's choice is handed to the policy runtime (demand copies, prefetches), then the
needed experts compute one by one (resident ones first), each waiting for its copy if needed. The wait is
the stall.
"""

from __future__ import annotations

import time

import simpy

from policies.base import Step
from policies.link_budget import DEMAND
from policies.runtime import PolicyRuntime
from replay.channels import CopyChannels, make_channels
from replay.hardware import ComputeModel, CopyModel
from replay.link import SimLink
from replay.prepare import gc_paused
from replay.results import LayerStats, LayerTally, ReplayResult
from replay.window import take_mark

from .fused import expert_times_s, fused_applies, hits_compute_s, replay_fused, wait_ready


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
    warmup_steps: int = 0,
) -> ReplayResult:
    """Replay ``steps`` through ``runtime``; ``uses[i]`` (key -> tokens at layer-step i) may be precomputed.
    ``simpy_channels`` forces the SimPy copy channels even where the direct :class:`SerialChannel` applies
    (the two give identical results, float for float); ``fused=False`` forces this module's general loop where
    :mod:`sim.fused`'s would apply (identical results too). The result's ``mark`` holds the totals when step
    ``warmup_steps`` (the first measured one, :mod:`replay.window`) began."""
    with gc_paused():
        return _replay(steps, runtime, copy_model, compute, expert_bytes, num_layers, log, uses, simpy_channels, fused,
                       warmup_steps)


def _replay(steps, runtime, copy_model, compute, expert_bytes, num_layers, log, uses, simpy_channels, fused,
            warm) -> ReplayResult:
    wall0 = time.perf_counter()
    cache = runtime.cache
    if simpy_channels:
        chan = CopyChannels(simpy.Environment(), copy_model, expert_bytes, cache.complete, log=log)
    else:
        chan = make_channels(copy_model, expert_bytes, cache.complete, log=log)
    runtime.set_schedule(steps)  # lets a stateless predictor score many layer-steps in one numpy call
    L = num_layers

    pinned = len(cache.policy.pinned())

    def mark_now(si, t, stall_total, compute_total, demand_loads, requests, hits, late, misses, stall_l):
        return take_mark(si, t, stall_total, compute_total, demand_loads, chan.copies_started + pinned,
                         chan.bytes_started + pinned * expert_bytes, cache.stats, requests, hits, late, misses, stall_l)

    def result(t, stall_total, compute_total, step_s, demand_loads, tally, wall_s, mark) -> ReplayResult:
        stats = LayerStats.zeros(L)
        stats.absorb(tally)
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
            mark=mark,
        )

    events: list = []
    if uses is not None and fused and fused_applies(runtime, chan, log):
        return replay_fused(steps, runtime, chan, compute, L, uses, LayerTally(L), result, warm, mark_now)
    max_ls = len(steps) * L - 1
    link = SimLink(chan, compute, int(runtime.experts.shape[2]))
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

    mark = None
    for si, step in enumerate(steps):
        if si == warm:
            mark = mark_now(si, t, stall_total, compute_total, demand_loads, req_l, hit_l, late_l, miss_l, stall_l)
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
            plan = runtime.begin_layer(si, layer, step.tokens, max_ls, uses[si * L + layer] if uses else None, link)
            if plan.demand or plan.prefetch:
                advance(t)
            for k in plan.demand:
                submit(k, DEMAND)
            for k, _, prio in plan.prefetch:
                submit(k, prio)
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
                            submit(s, DEMAND)
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
    return result(t, stall_total, compute_total, step_s, demand_loads, tally, time.perf_counter() - wall0, mark)
