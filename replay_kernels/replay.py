"""The simulator's timed replay, on demand (no prefetch), compiled.

The same steps, in the same order, as ``sim/fused.py``'s loop (and so ``sim/engine.py``'s) with a predictor
that never prefetches: per layer the dense part runs, the layer's experts are looked up (a layer whose experts
are all resident just computes them as one block), misses claim slots (or wait for one: deferred), demand
copies start on the serial channel at priority 0, the resident experts compute first as one block (one by one
while a demand waits for a slot), then the others, each waiting for its copy; after each, while demands wait,
it is released and waiting demands retry. Floats are computed with the same operations in the same order, so
results are equal bit for bit (``tests/test_kernel_replay.py``); a sum of several experts' times is Python's
``sum()`` of a list, which adds with Neumaier compensation from Python 3.12 on (``neumaier``).

Inputs are flat: the stream of :mod:`replay_kernels.keys`, per step its token count and dense time, the expert time
by use count (``expert_s[n]``, n tokens), a :class:`~kernels.cache.CacheState` and a
:class:`~kernels.channel.Channel`. Outputs go to arrays the caller allocates (:func:`replay_ondemand`).
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from . import cache as kc
from . import channel as kch
from ._jit import helper, jit
from .keys import stream_rows

TOTAL, STALL, COMPUTE = range(3)  # out_f
DEMAND_LOADS, QUIET_USES = range(2)  # out_i
# the window mark (the totals when step mark_step begins): mark_f holds the clock, stall and compute, then the
# stall per layer; mark_i the demand loads, the copies the channel started, the uses per layer so far, the cache's
# eight CacheStats counters, then the late hits and the misses per layer
MARK_T, MARK_STALL, MARK_COMPUTE, MARK_F_LAYERS = range(4)
N_STATS = len(kc.STATS_FIELDS)
MARK_DEMAND_LOADS, MARK_COPIES, MARK_USES, MARK_STATS = range(4)
MARK_I_LAYERS = MARK_STATS + N_STATS
# rows of the int scratch: stream positions of a layer-step's hits, late hits, misses and compute order; keys of
# its demands, of the demands a retry started, of the deferred queue (DQ[head:tail], head/tail in DQ_ENDS); by
# key: deferred (0/1)
HITS, LATE, MISSES, ORDER, DEMAND, STARTED, DQ, DQ_ENDS, DEFERRED = range(9)
NEUMAIER_SUM = sys.version_info >= (3, 12)  # how this Python's sum() adds floats


@helper
def py_sum(values, n, neumaier):
    """Python's ``sum(values[:n])`` of a list of floats, bit for bit: the int 0 plus the first item, then
    plain additions (up to 3.11) or Neumaier's compensated ones (3.12 on)."""
    if n == 0:
        return 0.0
    total = 0.0 + values[0]
    comp = 0.0
    for i in range(1, n):
        x = values[i]
        if neumaier:
            t = total + x
            if abs(total) >= abs(x):
                comp += (total - t) + x
            else:
                comp += (x - t) + total
            total = t
        else:
            total += x
    if neumaier and comp != 0.0 and np.isfinite(comp):
        total += comp
    return total


@helper
def _uses_time(counts, pos, n, expert_s, e1, hit_uses, neumaier, scratch):
    """``hits_compute_s``: the compute time of ``n`` resident experts (stream positions ``pos``) as one block."""
    if hit_uses == n:
        return e1 * hit_uses if hit_uses else 0.0
    for i in range(n):
        scratch[i] = expert_s[counts[pos[i]]]
    return py_sum(scratch, n, neumaier)


@helper
def _retry_deferred(c, w, now):
    """``PolicyRuntime.retry_deferred``: slots for waiting demands, in order, while they can be had; returns
    how many started (their keys in ``w[STARTED]``)."""
    n = 0
    while w[DQ_ENDS, 1] > w[DQ_ENDS, 0]:
        k = w[DQ, w[DQ_ENDS, 0]]
        ok, _ = kc.reserve(c, k, now, False)
        if not ok:
            break
        w[DQ_ENDS, 0] += 1
        w[DEFERRED, k] = 0
        w[STARTED, n] = k
        n += 1
    return n


@helper
def _wait_ready(ch, c, key, t, w, now):
    """``sim.fused.wait_ready``: run the channel until ``key`` is usable (a deferred key first gets a slot)."""
    kch.advance(ch, c, t)
    while c.m[kc.INFLIGHT, key] or w[DEFERRED, key]:
        if not kch.pending(ch, key):
            n = _retry_deferred(c, w, now)
            for i in range(n):
                kch.submit(ch, w[STARTED, i], 0)
            if w[DEFERRED, key]:
                if not kch.busy(ch):
                    raise RuntimeError("deadlock: an expert can never get a slot (capacity too small)")
                kch.wait_any(ch, c)
            continue
        kch.wait_key(ch, c, key)
    return kch.now(ch) if kch.now(ch) > t else t


@helper
def _take_mark(c, ch, L, t, stall_total, compute_total, demand_loads, quiet_uses, done_uses, late_l, miss_l, stall_l,
               mark_f, mark_i):
    """The totals as the measured window's first step begins (``replay.window.take_mark``'s inputs; see
    :data:`MARK_T`...)."""
    mark_f[MARK_T] = t
    mark_f[MARK_STALL] = stall_total
    mark_f[MARK_COMPUTE] = compute_total
    mark_i[MARK_DEMAND_LOADS] = demand_loads
    mark_i[MARK_COPIES] = ch.q[kch.CI, kch.COPIES]
    mark_i[MARK_USES] = done_uses
    for q in range(N_STATS):
        mark_i[MARK_STATS + q] = c.m[kc.CTR, q]
    mark_i[MARK_STATS + kc.HITS] += quiet_uses  # the quiet layers' hits so far, which the loop adds at its end
    for layer in range(L):
        mark_f[MARK_F_LAYERS + layer] = stall_l[layer]
        mark_i[MARK_I_LAYERS + layer] = late_l[layer]
        mark_i[MARK_I_LAYERS + L + layer] = miss_l[layer]


@jit(nrt=False)
def _replay_kernel(c, ch, counts, step_ntok, step_dense_s, expert_s, num_layers, top_k, neumaier, w, scratch,
                   step_s, late_l, miss_l, stall_l, out_f, out_i, mark_step, mark_f, mark_i):
    L = num_layers
    n_ls = c.s[0]
    ptr = c.s[3:3 + n_ls + 1]
    keys = c.s[3 + n_ls + 1:]
    e1 = expert_s[1] if len(expert_s) > 1 else 0.0
    t = 0.0
    stall_total = 0.0
    compute_total = 0.0
    demand_loads = 0
    quiet_uses = 0
    done_uses = 0  # (token, expert) uses per layer in the steps replayed so far
    for si in range(len(step_ntok)):
        if si == mark_step:
            _take_mark(c, ch, L, t, stall_total, compute_total, demand_loads, quiet_uses, done_uses, late_l, miss_l,
                       stall_l, mark_f, mark_i)
        done_uses += step_ntok[si] * top_k
        t_step = t
        nuses = step_ntok[si] * top_k  # every token routes to top_k experts
        dense = step_dense_s[si]
        for layer in range(L):
            t += dense
            compute_total += dense
            if kch.busy(ch):
                kch.advance(ch, c, t)
            now = si * L + layer
            a = ptr[now]
            b = ptr[now + 1]
            if kc.quiet(c, keys, a, b):  # every expert resident: they compute back to back, nothing to copy
                for j in range(a, b):
                    kc.on_hit(c, keys[j], now)
                if b - a == nuses:  # every key used by one token (always at batch size 1)
                    block = e1 * nuses
                else:
                    for j in range(a, b):
                        scratch[j - a] = expert_s[counts[j]]
                    block = py_sum(scratch, b - a, neumaier)
                t += block
                compute_total += block
                quiet_uses += nuses
                continue
            nh, nl, nm, h, lt, mu, _ = kc.use_layer(c, keys, counts, a, b, now, w[HITS], w[LATE], w[MISSES])
            nd = 0
            w[DQ_ENDS, 0] = 0
            w[DQ_ENDS, 1] = 0
            if nm:
                kc.protect_row(c, keys, a, b)
                full = -1  # a partition where a miss found no slot: the next ones there find none either
                for i in range(nm):
                    k = keys[w[MISSES, i]]
                    ok = False
                    if c.m[kc.PART, k] != full:
                        ok, _ = kc.reserve(c, k, now, False)
                        if not ok:
                            full = c.m[kc.PART, k]
                    if ok:
                        w[DEMAND, nd] = k
                        nd += 1
                    else:
                        w[DQ, w[DQ_ENDS, 1]] = k
                        w[DQ_ENDS, 1] += 1
                        w[DEFERRED, k] = 1
            if nd:
                kch.advance(ch, c, t)
            for i in range(nd):
                kch.submit(ch, w[DEMAND, i], 0)
            for i in range(nl):
                kch.upgrade(ch, keys[w[LATE, i]])
            layer_stall = 0.0
            n = 0
            if w[DQ_ENDS, 1] == w[DQ_ENDS, 0]:
                block = _uses_time(counts, w[HITS], nh, expert_s, e1, h, neumaier, scratch)
                t += block
                compute_total += block
            else:
                for i in range(nh):
                    w[ORDER, n] = w[HITS, i]
                    n += 1
            for i in range(nl):
                w[ORDER, n] = w[LATE, i]
                n += 1
            for i in range(nm):
                w[ORDER, n] = w[MISSES, i]
                n += 1
            for i in range(n):
                j = w[ORDER, i]
                k = keys[j]
                if c.m[kc.INFLIGHT, k] or w[DEFERRED, k]:
                    before = t
                    if w[DQ_ENDS, 1] > w[DQ_ENDS, 0]:
                        t = _wait_ready(ch, c, k, t, w, now)
                    else:
                        t = kch.wait_until_landed(ch, c, k, t)
                    layer_stall += t - before
                et = expert_s[counts[j]]
                t += et
                compute_total += et
                if w[DQ_ENDS, 1] > w[DQ_ENDS, 0]:  # release(k): unprotect it, waiting demands retry
                    c.m[kc.PROT, k] = 0
                    ns = _retry_deferred(c, w, now)
                    if ns:
                        kch.advance(ch, c, t)
                        for s in range(ns):
                            kch.submit(ch, w[STARTED, s], 0)
            stall_total += layer_stall
            stall_l[layer] += layer_stall
            late_l[layer] += lt
            miss_l[layer] += mu
            demand_loads += nm
        step_s[si] = t - t_step
    out_f[TOTAL] = t
    out_f[STALL] = stall_total
    out_f[COMPUTE] = compute_total
    out_i[DEMAND_LOADS] = demand_loads
    out_i[QUIET_USES] = quiet_uses
    c.m[kc.CTR, kc.HITS] += quiet_uses  # the quiet layers' uses, all hits


class OndemandMark(NamedTuple):
    """The totals when the measured window's first step began (what ``replay.window.take_mark`` records)."""

    step: int  # the first measured step
    t: float  # simulated time so far
    stall_s: float
    compute_s: float
    demand_loads: int
    copies: int  # copies the channel started (pinned preloads not included)
    uses: int  # (token, expert) uses per layer so far (every layer has the same)
    stats: dict  # the cache's counters by CacheStats field
    late_hits: np.ndarray  # int64 [L]
    misses: np.ndarray  # int64 [L]
    layer_stall_s: np.ndarray  # float64 [L]


class OndemandResult:
    """What :func:`replay_ondemand` computed (the fields of ``sim.engine.ReplayResult`` it can know)."""

    def __init__(self, total_s, stall_s, compute_s, step_s, requests, hits, late_hits, misses, layer_stall_s,
                 copies, demand_loads, mark=None):
        self.total_s = total_s  # simulated time of the whole replay
        self.stall_s = stall_s  # time the compute stream waited for copies
        self.compute_s = compute_s  # time the compute stream was busy
        self.step_s = step_s  # float64 [steps]: duration of each step
        self.requests = requests  # int64 [L]: (token, expert) uses per layer
        self.hits = hits  # int64 [L]
        self.late_hits = late_hits  # int64 [L]
        self.misses = misses  # int64 [L]
        self.layer_stall_s = layer_stall_s  # float64 [L]
        self.copies = copies  # copies started by the channel (pinned preloads not included)
        self.demand_loads = demand_loads  # distinct experts per layer-step loaded on demand
        self.mark: OndemandMark | None = mark  # the totals when the measured window began (mark_step), if asked


def replay_ondemand(cache: kc.CacheState, counts, step_ntok, step_dense_s, expert_s, num_layers: int, top_k: int,
                    copy_s: float, neumaier: bool = NEUMAIER_SUM, mark_step: int = -1) -> OndemandResult:
    """Replay the cache's stream through it (updated in place: its stats are ``cache.stats``) on a fresh serial
    channel whose copies take ``copy_s`` each. ``counts``: the stream's use counts; ``step_ntok`` and
    ``step_dense_s``: tokens and dense time per step; ``expert_s[n]``: one expert's time for n tokens
    (``expert_s[0] = 0``). ``mark_step``: take the totals when this step begins (the result's ``mark``)."""
    ptr, _ = stream_rows(cache.s)
    step_ntok = np.asarray(step_ntok, np.int64)
    S, L = len(step_ntok), int(num_layers)
    if len(ptr) - 1 != S * L:
        raise ValueError(f"replay_ondemand: {len(ptr) - 1} layer-steps in the stream, expected {S} x {L}")
    width = max(int(np.diff(ptr).max(initial=0)), 2)
    num_keys = cache.m.shape[1]
    ch = kch.new_channel(num_keys, width + 1, copy_s)  # heap rows: on demand, only this layer-step's misses wait
    step_s = np.zeros(S)
    late_l, miss_l, stall_l = np.zeros(L, np.int64), np.zeros(L, np.int64), np.zeros(L)
    out_f, out_i = np.zeros(3), np.zeros(2, np.int64)
    mark_step = int(mark_step) if 0 <= mark_step < S else -1
    mark_f, mark_i = np.zeros(MARK_F_LAYERS + L), np.zeros(MARK_I_LAYERS + 2 * L, np.int64)
    _replay_kernel(cache, ch, np.asarray(counts, np.int64), step_ntok, np.asarray(step_dense_s, np.float64),
                   np.asarray(expert_s, np.float64), L, int(top_k), bool(neumaier),
                   np.zeros((DEFERRED + 1, max(width, num_keys)), np.int64), np.zeros(width), step_s, late_l, miss_l,
                   stall_l, out_f, out_i, mark_step, mark_f, mark_i)
    per_layer = int(top_k) * int(step_ntok.sum())  # every layer-step has ntok x top_k uses
    requests = np.full(L, per_layer, np.int64)
    mark = None
    if mark_step >= 0:
        mi = mark_i.tolist()
        mark = OndemandMark(mark_step, float(mark_f[MARK_T]), float(mark_f[MARK_STALL]), float(mark_f[MARK_COMPUTE]),
                            mi[MARK_DEMAND_LOADS], mi[MARK_COPIES], mi[MARK_USES],
                            dict(zip(kc.STATS_FIELDS, mi[MARK_STATS:MARK_STATS + N_STATS])),
                            mark_i[MARK_I_LAYERS:MARK_I_LAYERS + L].copy(), mark_i[MARK_I_LAYERS + L:].copy(),
                            mark_f[MARK_F_LAYERS:].copy())
    return OndemandResult(float(out_f[TOTAL]), float(out_f[STALL]), float(out_f[COMPUTE]), step_s, requests,
                          requests - late_l - miss_l, late_l, miss_l, stall_l, int(ch.q[kch.CI, kch.COPIES]),
                          int(out_i[DEMAND_LOADS]), mark)
