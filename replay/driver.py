"""THE driver loop: one layer-step at a time, the same for the simulator, the executor and model mode.

Per layer-step (:meth:`LayerDriver.layer_step`):

1. the dense part of the layer runs (``compute.dense``);
2. landed copies become usable (``copies.sync``), then ``runtime.begin_layer`` decides: which needed experts
   hit, which are late (still in flight), which miss (demand copies, slots reserved), what to prefetch;
3. the demand and prefetch copies are submitted at the priorities the runtime gave them (demand first), late
   ones upgraded to demand priority (the runtime itself cancels, on the ``link``, queued prefetches that can
   no longer help: :mod:`policies.prefetch_queue`);
4. the resident experts compute as one block (``compute.resident``), then the others in order, each waiting
   for its copy (a deferred demand first waits for a slot); after each, ``runtime.release`` may start deferred
   demands (only while any are deferred: otherwise releasing only unprotects the key, which nothing reads
   before the next ``begin_layer``);
5. ``runtime.end_layer`` gets the layer's compute time (clock time since the submits, less the stall, plus the
   dense part), its stall and the recent copy bandwidth; the ``link`` gets the compute time too (a measured
   link estimates a layer-step's compute from it).

The backends (:mod:`replay.backends`) own time, copies and compute, the ``link``
(:class:`~policies.link_budget.LinkFacts`) tells the runtime about the copies' backlog and timing; the loop
owns the order of calls and the tallies. :func:`replay_steps` takes a :class:`~replay.window.WindowMark` of the
totals when the measured window's first step begins (``warmup_steps``). ``sim/fused.py`` is the simulator's
fast path for common configurations, pinned equal to this loop, float for float, by ``tests/test_sim_fused.py``.
"""

from __future__ import annotations

import time

from policies.base import Step
from policies.link_budget import DEMAND, LinkFacts
from policies.runtime import LayerPlan, PolicyRuntime

from .backends import Clock, ComputeBackend, CopyBackend
from .results import LayerStats, LayerTally, ReplayResult
from .window import WindowMark, take_mark

PHASES = ("dense", "decide", "submit", "wait", "expert", "release", "end", "layer_steps", "expert_runs")


class LayerDriver:
    """The loop state of one replay (or one live model): totals and per-layer tallies.

    ``events`` (a list) collects compute spans for the Chrome trace. ``phases`` (a dict) gets the host seconds
    spent in each part of the loop added to it (instrumentation only, the decisions are the same): ``dense``,
    ``decide`` (sync + ``begin_layer`` + cancels), ``submit``, ``wait`` (the stall), ``expert``, ``release``,
    ``end`` (tallies + ``end_layer``), and the counts ``layer_steps`` and ``expert_runs``."""

    def __init__(self, runtime: PolicyRuntime, clock: Clock, copies: CopyBackend, compute: ComputeBackend,
                 link: LinkFacts, num_layers: int, events: list | None = None,
                 phases: dict[str, float] | None = None):
        self.runtime, self.clock, self.copies, self.compute, self.link = runtime, clock, copies, compute, link
        self.num_layers = num_layers
        self.events = events
        self.phases = phases
        if phases is not None:
            for k in PHASES:
                phases.setdefault(k, 0.0)
        self.tally = LayerTally(num_layers)
        self.stall_s = 0.0  # the compute stream's waits for copies
        self.compute_s = 0.0  # its dense and expert compute
        self.demand_loads = 0  # distinct experts per layer-step loaded on demand (misses)

    def layer_step(self, step: int, layer: int, tokens, max_layer_step: int,
                   uses: dict[int, int] | None = None) -> LayerPlan:
        """Run layer ``layer`` of step ``step`` (trace token indices ``tokens``); ``uses`` (key -> tokens) may be
        precomputed. ``max_layer_step``: the last layer-step of the replay (no prefetch targets beyond it)."""
        rt, clock, copies, compute = self.runtime, self.clock, self.copies, self.compute
        ph = self.phases
        dense = compute.dense(len(tokens))  # its seconds (measured, for a real backend): the phase too
        self.compute_s += dense
        if ph is not None:
            t1 = time.perf_counter()
        copies.sync()
        plan = rt.begin_layer(step, layer, tokens, max_layer_step, uses, self.link)
        if plan.demand or plan.prefetch:
            copies.start()
        puses = plan.uses
        if ph is not None:
            t2 = time.perf_counter()
        submit = copies.submit
        for k in plan.demand:
            submit(k, DEMAND)
        for k, _, priority in plan.prefetch:
            submit(k, priority)
        for k in plan.late:
            copies.upgrade(k)
        if ph is not None:
            t3 = time.perf_counter()
            ph["dense"] += dense
            ph["decide"] += t2 - t1
            ph["submit"] += t3 - t2
        t_layer = clock.now()
        layer_stall = expert_s = release_s = 0.0
        events = self.events
        deferred, inflight = rt.deferred, rt.cache.inflight
        order = plan.order
        if not deferred:  # hits are resident and stay so (protected): they compute back to back, as one block
            hits = plan.hits
            if hits:
                block = compute.resident(hits, plan.use_counts[0], puses, layer, events)
                self.compute_s += block
                expert_s += block
                order = order[len(hits):]
        for k in order:
            if k in inflight or k in deferred:
                copies.begin_wait()
                while k in deferred:  # no slot yet: retry as copies land and computed experts free slots
                    for s in rt.retry_deferred():
                        submit(s, DEMAND)
                    if k in deferred:
                        copies.wait_any(k)
                if k in inflight:
                    copies.wait_key(k)
                layer_stall += copies.end_wait()
            if events is not None:
                start = clock.now()
            et = compute.expert(k, puses[k])
            if events is not None:
                events.append((start, et, layer, k))
            self.compute_s += et
            expert_s += et
            if deferred:
                if ph is not None:
                    t4 = time.perf_counter()
                started = rt.release(k)
                if started:
                    copies.start()
                    for s in started:
                        submit(s, DEMAND)
                if ph is not None:
                    release_s += time.perf_counter() - t4
        if ph is not None:
            t5 = time.perf_counter()
        self.stall_s += layer_stall
        tally = self.tally
        h, lt, m = plan.use_counts
        tally.stall_s[layer] += layer_stall
        tally.requests[layer] += h + lt + m
        tally.hits[layer] += h
        tally.late[layer] += lt
        tally.misses[layer] += m
        self.demand_loads += len(plan.misses)
        compute_s = clock.now() - t_layer - layer_stall + dense
        rt.end_layer(compute_s, layer_stall, copies.bandwidth_bytes_per_s(), plan)
        self.link.observe_layer(compute_s)
        if ph is not None:
            ph["end"] += time.perf_counter() - t5
            ph["expert"] += expert_s
            ph["wait"] += layer_stall
            ph["release"] += release_s
            ph["layer_steps"] += 1
            ph["expert_runs"] += len(plan.order)
        return plan

    def mark(self, step: int, t: float) -> WindowMark:
        """The totals now, at clock time ``t``, as step ``step`` (the measured window's first) begins."""
        bytes_moved, copies, _ = self.copies.totals()
        tally = self.tally
        return take_mark(step, t, self.stall_s, self.compute_s, self.demand_loads, copies, bytes_moved,
                         self.runtime.cache.stats, tally.requests, tally.hits, tally.late, tally.misses, tally.stall_s)


def replay_steps(steps: list[Step], runtime: PolicyRuntime, clock: Clock, copies: CopyBackend,
                 compute: ComputeBackend, link: LinkFacts, num_layers: int, uses: list[dict[int, int]] | None = None,
                 log: bool = False, phases: dict[str, float] | None = None, warmup_steps: int = 0) -> ReplayResult:
    """Replay ``steps`` x layers through :class:`LayerDriver`: pinned experts preloaded first (counted, not
    timed), then every layer-step; ``uses[i]`` (key -> tokens at layer-step i) may be precomputed. The caller has
    handed the runtime the steps (``runtime.set_schedule``), if it wants a stateless predictor scored ahead.
    The result's ``mark`` holds the totals when step ``warmup_steps`` began (:mod:`replay.window`)."""
    wall0 = time.perf_counter()
    pinned = sorted(runtime.cache.policy.pinned())
    copies.preload(pinned)
    clock.start()
    driver = LayerDriver(runtime, clock, copies, compute, link, num_layers, [] if log else None, phases)
    L = num_layers
    max_ls = len(steps) * L - 1
    step_s: list[float] = []
    layer_step = driver.layer_step
    mark = None
    for si, step in enumerate(steps):
        t_step = clock.now()
        if si == warmup_steps:
            mark = driver.mark(si, t_step)
        tokens = step.tokens
        for layer in range(L):
            layer_step(si, layer, tokens, max_ls, uses[si * L + layer] if uses else None)
        step_s.append(clock.now() - t_step)
    return replay_result(steps, driver, clock.now(), step_s, len(pinned), time.perf_counter() - wall0, mark)


def replay_result(steps: list[Step], driver: LayerDriver, total_s: float, step_s: list[float], preloaded: int,
                  wall_s: float, mark: WindowMark | None) -> ReplayResult:
    """The :class:`ReplayResult` of a finished replay from its driver's totals (the fused fast path fills a
    driver's totals the same way)."""
    stats = LayerStats.zeros(driver.num_layers)
    stats.absorb(driver.tally)
    bytes_moved, copies, records = driver.copies.totals()
    return ReplayResult(
        total_s=total_s, stall_s=driver.stall_s, compute_s=driver.compute_s, step_s=step_s,
        step_phase=[s.phase for s in steps], step_tokens=[len(s.tokens) for s in steps], bytes_moved=bytes_moved,
        copies=copies, demand_loads=driver.demand_loads, layers=stats, wall_s=wall_s,
        events=driver.events if driver.events is not None else [], copy_records=records, preload_copies=preloaded,
        mark=mark,
    )
