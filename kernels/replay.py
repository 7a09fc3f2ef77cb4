"""The simulator's timed replay, on demand (no prefetch), compiled.

The same steps, in the same order, as ``sim/fused.py``'s loop (and so ``sim/engine.py``'s) with a predictor
that never prefetches: per layer the dense part runs, the layer's experts are looked up (a layer whose experts
are all resident just computes them as one block), misses claim slots (or wait for one: deferred), demand
copies start on the serial channel at priority 0, the resident experts compute first as one block (one by one
while a demand waits for a slot), then the others, each waiting for its copy; after each, while demands wait,
it is released and waiting demands retry. Floats are computed with the same operations in the same order, so
results are equal bit for bit (``tests/test_kernel_replay.py``); a sum of several experts' times is Python's
``sum()`` of a list, which adds with Neumaier compensation from Python 3.12 on (``neumaier``).

Inputs are flat: the stream of :mod:`kernels.keys`, per step its token count and dense time, the expert time
by use count (``expert_s[n]``, n tokens), a :class:`~kernels.cache.CacheState` and a
:class:`~kernels.channel.Channel`. Outputs go to arrays the caller allocates (:func:`replay_ondemand`).
"""

from __future__ import annotations

import sys

import numpy as np

from . import cache as kc
from . import channel as kch
from ._jit import helper, jit

TOTAL, STALL, COMPUTE = range(3)  # out_f
DEMAND_LOADS, QUIET_USES = range(2)  # out_i
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
def _retry_deferred(c, dq, dq_state, is_def, now, started):
    """``PolicyRuntime.retry_deferred``: slots for waiting demands, in order, while they can be had; returns
    how many started (their keys in ``started``)."""
    n = 0
    while dq_state[1] > dq_state[0]:
        k = dq[dq_state[0]]
        ok, _ = kc.reserve(c, k, now, False)
        if not ok:
            break
        dq_state[0] += 1
        is_def[k] = False
        started[n] = k
        n += 1
    return n


@helper
def _wait_ready(ch, c, key, t, dq, dq_state, is_def, now, started):
    """``sim.fused.wait_ready``: run the channel until ``key`` is usable (a deferred key first gets a slot)."""
    kch.advance(ch, c, t)
    while c.kf[kc.INFLIGHT, key] or is_def[key]:
        if not ch.kq[kch.PENDING, key]:
            n = _retry_deferred(c, dq, dq_state, is_def, now, started)
            for i in range(n):
                kch.submit(ch, started[i], 0)
            if is_def[key]:
                if not kch.busy(ch):
                    raise RuntimeError("deadlock: an expert can never get a slot (capacity too small)")
                kch.wait_any(ch, c)
            continue
        kch.wait_key(ch, c, key)
    return ch.cf[kch.NOW] if ch.cf[kch.NOW] > t else t


@jit
def _replay_kernel(ptr, keys, counts, step_ntok, step_dense_s, expert_s, num_layers, top_k, c, ch, neumaier,
                   step_s, late_l, miss_l, stall_l, out_f, out_i):
    L = num_layers
    width = 1
    for i in range(len(ptr) - 1):
        width = max(width, ptr[i + 1] - ptr[i])
    hits = np.empty(width, np.int64)
    late = np.empty(width, np.int64)
    misses = np.empty(width, np.int64)
    demand = np.empty(width, np.int64)
    order = np.empty(width, np.int64)
    started = np.empty(width, np.int64)
    scratch = np.empty(width, np.float64)
    dq = np.empty(width, np.int64)  # deferred demands of the current layer: dq[head:tail]
    dq_state = np.zeros(2, np.int64)
    is_def = np.zeros(c.kf.shape[1], np.bool_)
    e1 = expert_s[1] if len(expert_s) > 1 else 0.0
    t = 0.0
    stall_total = 0.0
    compute_total = 0.0
    demand_loads = 0
    quiet_uses = 0
    for si in range(len(step_ntok)):
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
            once = b - a == nuses  # every key used by one token (always at batch size 1)
            quiet = True
            for j in range(a, b):
                k = keys[j]
                if not c.kf[kc.RESIDENT, k] or c.kf[kc.INFLIGHT, k] or c.kf[kc.PF_UNUSED, k]:
                    quiet = False
                    break
            if quiet:  # every expert resident: they compute back to back, nothing to copy
                for j in range(a, b):
                    kc.on_hit(c, keys[j], now)
                if once:
                    block = e1 * nuses
                else:
                    for j in range(a, b):
                        scratch[j - a] = expert_s[counts[j]]
                    block = py_sum(scratch, b - a, neumaier)
                t += block
                compute_total += block
                quiet_uses += nuses
                continue
            nh, nl, nm, h, lt, m, _ = kc.use_layer(c, keys, counts, a, b, now, once, hits, late, misses)
            nd = 0
            dq_state[0] = 0
            dq_state[1] = 0
            if nm:
                kc.protect_row(c, keys, a, b)
                for i in range(nm):
                    k = keys[misses[i]]
                    ok, _ = kc.reserve(c, k, now, False)
                    if ok:
                        demand[nd] = k
                        nd += 1
                    else:
                        dq[dq_state[1]] = k
                        dq_state[1] += 1
                        is_def[k] = True
            if nd:
                kch.advance(ch, c, t)
            for i in range(nd):
                kch.submit(ch, demand[i], 0)
            for i in range(nl):
                kch.upgrade(ch, keys[late[i]])
            layer_stall = 0.0
            n = 0
            if dq_state[1] == dq_state[0]:
                block = _uses_time(counts, hits, nh, expert_s, e1, h, neumaier, scratch)
                t += block
                compute_total += block
            else:
                for i in range(nh):
                    order[n] = hits[i]
                    n += 1
            for i in range(nl):
                order[n] = late[i]
                n += 1
            for i in range(nm):
                order[n] = misses[i]
                n += 1
            for i in range(n):
                j = order[i]
                k = keys[j]
                if c.kf[kc.INFLIGHT, k] or is_def[k]:
                    before = t
                    if dq_state[1] > dq_state[0]:
                        t = _wait_ready(ch, c, k, t, dq, dq_state, is_def, now, started)
                    else:
                        t = kch.wait_until_landed(ch, c, k, t)
                    layer_stall += t - before
                et = expert_s[counts[j]]
                t += et
                compute_total += et
                if dq_state[1] > dq_state[0]:  # release(k): unprotect it, waiting demands retry
                    c.kf[kc.PROT, k] = 0
                    ns = _retry_deferred(c, dq, dq_state, is_def, now, started)
                    if ns:
                        kch.advance(ch, c, t)
                        for s in range(ns):
                            kch.submit(ch, started[s], 0)
            stall_total += layer_stall
            stall_l[layer] += layer_stall
            late_l[layer] += lt
            miss_l[layer] += m
            demand_loads += nm
        step_s[si] = t - t_step
    out_f[TOTAL] = t
    out_f[STALL] = stall_total
    out_f[COMPUTE] = compute_total
    out_i[DEMAND_LOADS] = demand_loads
    out_i[QUIET_USES] = quiet_uses
    c.ctr[kc.HITS] += quiet_uses  # the quiet layers' uses, all hits


class OndemandResult:
    """What :func:`replay_ondemand` computed (the fields of ``sim.engine.ReplayResult`` it can know)."""

    def __init__(self, total_s, stall_s, compute_s, step_s, requests, hits, late_hits, misses, layer_stall_s,
                 copies, demand_loads):
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


def replay_ondemand(ptr, keys, counts, step_ntok, step_dense_s, expert_s, num_layers: int, top_k: int,
                    cache: kc.CacheState, copy_s: float, neumaier: bool = NEUMAIER_SUM) -> OndemandResult:
    """Replay the stream through ``cache`` (updated in place: its stats are ``cache.ctr[:8]``) on a fresh
    serial channel whose copies take ``copy_s`` each. ``step_ntok``/``step_dense_s``: tokens and dense time
    per step; ``expert_s[n]``: one expert's time for n tokens (``expert_s[0] = 0``)."""
    ptr = np.asarray(ptr, np.int64)
    step_ntok = np.asarray(step_ntok, np.int64)
    S, L = len(step_ntok), int(num_layers)
    if len(ptr) - 1 != S * L:
        raise ValueError(f"replay_ondemand: {len(ptr) - 1} layer-steps in the stream, expected {S} x {L}")
    # heap rows: on demand, only the misses of the current layer-step wait in the queue
    ch = kch.new_channel(cache.kf.shape[1], int(np.diff(ptr).max(initial=0)) + 1, copy_s)
    step_s = np.zeros(S)
    late_l, miss_l, stall_l = np.zeros(L, np.int64), np.zeros(L, np.int64), np.zeros(L)
    out_f, out_i = np.zeros(3), np.zeros(2, np.int64)
    _replay_kernel(ptr, np.asarray(keys, np.int64), np.asarray(counts, np.int64), step_ntok,
                   np.asarray(step_dense_s, np.float64), np.asarray(expert_s, np.float64), L, int(top_k), cache, ch,
                   bool(neumaier), step_s, late_l, miss_l, stall_l, out_f, out_i)
    per_layer = int(top_k) * int(step_ntok.sum())  # every layer-step has ntok x top_k uses
    requests = np.full(L, per_layer, np.int64)
    return OndemandResult(float(out_f[TOTAL]), float(out_f[STALL]), float(out_f[COMPUTE]), step_s, requests,
                          requests - late_l - miss_l, late_l, miss_l, stall_l, int(ch.ci[kch.COPIES]),
                          int(out_i[DEMAND_LOADS]))
