"""The driver loop of :mod:`replay.driver` with the policy runtime's per-layer decisions inlined, specialised to
the simulator's backends, for the common configurations (see :func:`fused_applies`): every eviction policy but
the predictive ``expertflow`` cache (it wants predictions), on-demand or with a stateless predictor (scored
ahead by the runtime's :class:`~policies.prefetch_table.PrefetchTable`) at a fixed distance, one serial copy
channel (every hardware preset).

Why a second loop: at batch size 1 a layer-step is six expert uses, and the general loop spends about 13 us on
it, almost all in the calls and containers between driver, backends, runtime and cache (``begin_layer``,
``use_layer``, ``LayerPlan``, ``_plan_prefetch``, ``end_layer``). Here the same steps run in one function,
and a layer whose experts are all resident and whose predictions are all present already (most layers) costs
a few set tests.

It makes the same calls on the same policy objects, in the same order, as ``PolicyRuntime.begin_layer`` and
``ExpertCache.use_layer`` followed by :meth:`replay.driver.LayerDriver.layer_step` on the simulator's backends,
through public runtime and cache methods only; ``tests/test_sim_fused.py`` pins its results equal, float for
float, to the general loop's on every policy family it accepts. Change one, change both.
"""

from __future__ import annotations

import time

from policies.link_budget import DEMAND
from policies.runtime import PolicyRuntime
from replay.driver import LayerDriver, replay_result
from replay.link import SimLink
from replay.results import ReplayResult
from replay.serial_channel import SerialChannel
from replay.window import take_mark

from .backends import ChannelCopies, ModelCompute, hits_compute_s


def fused_applies(runtime: PolicyRuntime, chan, log: bool) -> bool:
    """Whether :func:`replay_fused` handles this run exactly (else the general loop does): one serial copy
    channel, no event log, a predictor that is stateless (scored by the runtime's table) or never predicts, a
    horizon of fixed distance that ignores feedback, a cache that wants no predictions, and no clairvoyant load
    plan (the oracle's: :mod:`policies.clairvoyant`)."""
    horizon = runtime.horizon
    return (
        type(chan) is SerialChannel
        and not log
        and (runtime.silent or runtime.prefetch_table is not None)
        and horizon.min_distance == horizon.max_distance
        and type(horizon).ignores_feedback
        and not type(runtime.cache.policy).wants_predictions
        and runtime.cache.load_log is None
        and runtime.loads is None
    )


def wait_ready(key: int, t: float, chan, runtime: PolicyRuntime) -> float:
    """:meth:`~replay.driver.LayerDriver.layer_step`'s wait for ``key`` on the serial channel: run it until
    ``key`` is usable (its copy landed; a deferred demand first gets a slot as copies land and free one); returns
    the new compute time (``t`` if it did not have to wait)."""
    chan.advance(t)
    inflight, deferred = runtime.cache.inflight, runtime.deferred
    while key in deferred:
        for k in runtime.retry_deferred():
            chan.submit(k, DEMAND)
        if key in deferred:
            if not chan.busy():
                raise RuntimeError(f"deadlock: expert key {key} can never get a slot (capacity too small)")
            chan.wait_any()
    if key in inflight:
        chan.wait_key(key)
    return chan.now if chan.now > t else t


def replay_fused(steps, runtime: PolicyRuntime, copies: ChannelCopies, comp: ModelCompute, link: SimLink,
                 num_layers: int, uses, warmup_steps: int = 0) -> ReplayResult:
    """Replay ``steps`` (``uses[i]``: key -> tokens at layer-step i, required) on the simulator's backends
    (``copies`` over a :class:`~replay.serial_channel.SerialChannel`, ``link`` its facts), as
    :func:`replay.driver.replay_steps` does, the window mark taken when step ``warmup_steps`` begins; the runtime
    has its schedule (``set_schedule``)."""
    wall0 = time.perf_counter()
    rt = runtime
    cache = rt.cache
    pinned = sorted(cache.policy.pinned())
    copies.preload(pinned)
    driver = LayerDriver(rt, copies.clock, copies, comp, link, num_layers)  # holds the totals and tallies
    tally = driver.tally
    chan, compute = copies.chan, comp.model
    stats = cache.stats
    present, inflight, pu = cache.present, cache.inflight, cache.prefetched_unused
    use_layer = cache.use_layer
    on_hits = cache.policy.on_hits
    distance = rt.horizon.distance
    tab = rt.prefetch_table
    L = num_layers
    max_ls = len(steps) * L - 1
    pending = rt.pending
    t = 0.0
    stall_total = compute_total = 0.0
    demand_loads = 0
    step_s: list[float] = []
    dense_cache: dict[int, float] = {}
    expert_s = comp.expert_s
    req_l, hit_l, late_l, miss_l, stall_l = tally.requests, tally.hits, tally.late, tally.misses, tally.stall_s
    deferred = rt.deferred
    advance, submit, upgrade, wait_until_landed = chan.advance, chan.submit, chan.upgrade, chan.wait_until_landed
    queued, copying = chan.queued, chan.copying

    K = int(rt.experts.shape[2])
    d = 0 if rt.silent else int(distance())  # constant: fused_applies requires a fixed distance
    if not rt.silent:
        rt.note_distance(0, d)
    e1 = expert_s[1] if len(expert_s) > 1 else 0.0
    quiet_uses = 0  # uses in quiet layers: all hits, added to the cache's stats at the end (nothing reads them before)
    mark = None
    done_uses = 0  # (token, expert) uses per layer in the steps replayed so far
    for si, step in enumerate(steps):
        if si == warmup_steps:  # the per-layer requests and hits this loop only sums at the end
            stats.hits += quiet_uses
            quiet_uses = 0
            bytes_moved, ncopies, _ = copies.totals()
            mark = take_mark(si, t, stall_total, compute_total, demand_loads, ncopies, bytes_moved, stats,
                             [done_uses] * L, [done_uses - lt - m for lt, m in zip(late_l, miss_l)], late_l, miss_l,
                             stall_l)
        done_uses += K * len(step.tokens)
        t_step = t
        ntok = len(step.tokens)
        nuses = ntok * K  # (token, expert) uses per layer-step: every token routes to K experts
        dense = dense_cache.get(ntok)
        if dense is None:
            dense = dense_cache[ntok] = compute.dense_time_s(ntok)
        if d:
            if not tab.start <= si < tab.stop:  # a new block: score all of it, then read it step by step
                tab.enter(si)
                by_step = tab.by_step(d)  # per step of the block: chosen keys by (ahead - 1) * L + layer
            step_chosen = by_step[si - tab.start]
        for layer in range(L):
            t += dense
            compute_total += dense
            if queued or copying:
                advance(t)
            now = si * L + layer
            u = uses[now]
            needed = list(u)
            once = len(needed) == nuses  # every key used by one token (always at batch size 1)
            # The prefetch choices (pure lookups: the table scores a block at a time, the same whenever asked).
            quiet = True
            if d:
                chosen_by = step_chosen[layer::L]  # by distance 1..d
                if now + d > max_ls:  # the last layer-steps: no target beyond the replay's end
                    chosen_by = chosen_by[:max_ls - now]
                for chosen in chosen_by:
                    if not present.issuperset(chosen):
                        quiet = False
                        break
            else:
                chosen_by = ()
            # A quiet layer: every expert resident (not in flight, not an unused prefetch), every prediction
            # already present, no expired prefetch to drop. Then no copy starts and the experts just compute.
            if (quiet and present.issuperset(needed) and inflight.isdisjoint(needed)
                    and (not pu or pu.isdisjoint(needed)) and pending.review_at() > now):
                on_hits(needed, now)
                block = e1 * nuses if once else sum([expert_s[u[k]] for k in needed])  # hits_compute_s, inlined
                t += block
                compute_total += block
                quiet_uses += nuses
                continue
            rt.at(si, layer, step.tokens, len(needed))
            # PolicyRuntime.begin_layer's steps for a layer where something happens, without its LayerPlan (the
            # count of prefetches used only feeds the horizon, which ignores feedback here)
            hits, late, misses, (h, lt, m), _ = use_layer(needed, u, now, once)
            if pending.review_at() <= now:
                rt.review_prefetches(u, link)
            demand = []
            protected = bool(misses)  # rt.protected is read by the reservations and by release: built only then
            if misses:
                rt.protected = set(needed)
                rt.reserve_demands(misses, now, demand, None)
            prefetch = []
            for ahead, chosen in enumerate(chosen_by, 1):
                if not present.issuperset(chosen):
                    if not protected:
                        rt.protected = set(needed)
                        protected = True
                    rt.reserve_prefetches(chosen, now, now + ahead, prefetch, None, link)
            # --- LayerDriver.layer_step
            if demand or prefetch:
                advance(t)
            for k in demand:
                submit(k, DEMAND)
            for k, _, priority in prefetch:
                submit(k, priority)
            for k in late:
                upgrade(k)
            layer_stall = 0.0
            if not deferred:
                block = hits_compute_s(hits, h, u, expert_s)
                t += block
                compute_total += block
                order = late + misses if late else misses
            else:
                order = hits + late + misses
            for k in order:
                if k in inflight or k in deferred:
                    before = t
                    if deferred:
                        t = wait_ready(k, t, chan, rt)
                    else:  # wait_for without deferred demands: the key's copy is queued or running
                        t = wait_until_landed(k, t)
                    layer_stall += t - before
                et = expert_s[u[k]]
                t += et
                compute_total += et
                if deferred:
                    started = rt.release(k)
                    if started:
                        advance(t)
                        for s in started:
                            submit(s, DEMAND)
            stall_total += layer_stall
            stall_l[layer] += layer_stall
            late_l[layer] += lt
            miss_l[layer] += m
            demand_loads += len(misses)
        step_s.append(t - t_step)
    # every layer-step has ``nuses`` uses; per layer the hits are the rest after late hits and misses
    uses_per_layer = K * sum(len(st.tokens) for st in steps)
    for layer in range(L):
        req_l[layer] += uses_per_layer
        hit_l[layer] += uses_per_layer - late_l[layer] - miss_l[layer]
    stats.hits += quiet_uses
    rt.now = max_ls
    driver.stall_s, driver.compute_s, driver.demand_loads = stall_total, compute_total, demand_loads
    copies.clock.t = t
    return replay_result(steps, driver, t, step_s, len(pinned), time.perf_counter() - wall0, mark)
