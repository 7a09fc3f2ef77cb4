"""The perfect-foresight schedules of ``replay.oracle.oracle_stall`` (aggressive, conservative, and aggressive from
a preloaded cache), compiled.

Same state and steps as the Python ``_OracleState`` and its ``fetch_more`` closures, on the serial channel:
residency per key, the keys in flight, the layer's protected keys, per partition the resident keys (a slot
list, scanned for the victim: the farthest recorded next use, ties to the highest key, among keys neither
protected nor in flight). Copies land through :func:`_landed`, which, like the Python ``landed`` callback,
asks the schedule for more copies from inside the landing. See ``replay/oracle.py`` for the schedules.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import channel as kch
from ._jit import helper, inline, jit
from .keys import next_use, stream_rows

AGGRESSIVE, CONSERVATIVE = 0, 1
# m rows by key: PART (partition), RESIDENT (resident or in flight), INFLIGHT (copy not landed), PROT (protected
# while equal to EPOCH), NU (recorded next use of a resident key, FarthestNextUse; -1 if none), MPOS (index of
# a resident key in MEMBERS), REM (a key of the current layer-step not computed yet), USES (its use count),
# CURSOR (where keys.next_use last found the key's next use)
PART, RESIDENT, INFLIGHT, PROT, NU, MPOS, REM, USES, CURSOR = range(9)
# by partition: CAP (slots), START (first entry of its members), PCOUNT (resident keys, in flight included:
# MEMBERS[START .. START + PCOUNT]), BLOCKED (blocked in this aggressive scan while equal to STAMP)
CAP, START, PCOUNT, BLOCKED = range(9, 13)
MEMBERS, SI = 13, 14  # by slot: the resident keys by partition; SI: the integer scalars
NOW, EPOCH, NINFLIGHT, SCAN_I, SCAN_J, POS, STAMP, SCHEDULE, WINDOW, RESUME, CHANNELS, HORIZON, O_FUT, NPART = range(14)
N_ROWS = 15


class OracleState(NamedTuple):
    m: np.ndarray  # int64 [N_ROWS, width]: the rows above
    s: np.ndarray  # int64: the stream and its future (kernels.keys.pack_stream)
    loads: np.ndarray  # int64 [n, 3]: MIN's (layer-step, key, evicted or -1), for conservative


@inline
def _next_use(o, key, now):
    return next_use(o.s, o.m[SI, O_FUT], key, now, o.m[SI, HORIZON], o.m[CURSOR])


@helper
def _victim(o, part):
    """The resident key of ``part`` used farthest after now, ties to the highest key, among those neither
    protected nor in flight; -1 if none."""
    m = o.m
    best = -1
    for i in range(m[START, part], m[START, part] + m[PCOUNT, part]):
        k = m[MEMBERS, i]
        if m[PROT, k] == m[SI, EPOCH] or m[INFLIGHT, k]:
            continue
        if best < 0 or m[NU, k] > m[NU, best] or (m[NU, k] == m[NU, best] and k > best):
            best = k
    return best


@helper
def _load(o, ch, key, victim):
    m = o.m
    part = m[PART, key]
    if victim >= 0:
        m[RESIDENT, victim] = 0
        m[NU, victim] = -1
        moved = m[MEMBERS, m[START, part] + m[PCOUNT, part] - 1]
        m[MEMBERS, m[MPOS, victim]] = moved
        m[MPOS, moved] = m[MPOS, victim]
        m[PCOUNT, part] -= 1
    m[MEMBERS, m[START, part] + m[PCOUNT, part]] = key
    m[MPOS, key] = m[START, part] + m[PCOUNT, part]
    m[PCOUNT, part] += 1
    m[RESIDENT, key] = 1
    m[NU, key] = _next_use(o, key, m[SI, NOW] + 1)
    m[INFLIGHT, key] = 1
    m[SI, NINFLIGHT] += 1
    kch.submit(ch, key, 0)


@helper
def _aggressive(o, ch):
    m = o.m
    si = m[SI]
    n_ls = o.s[0]
    ptr = o.s[3:3 + n_ls + 1]
    keys = o.s[3 + n_ls + 1:]
    now = si[NOW]
    end = min(si[HORIZON], now + si[WINDOW])
    si[STAMP] += 1  # a fresh set of blocked partitions
    resume = si[RESUME] != 0
    if resume and si[SCAN_I] >= now:
        i, j = si[SCAN_I], si[SCAN_J]
    else:
        i, j = now, 0
    clean = resume
    while si[NINFLIGHT] < si[CHANNELS] and i < end:
        a = ptr[i]
        if j >= ptr[i + 1] - a:
            i, j = i + 1, 0
            if clean:
                si[SCAN_I], si[SCAN_J] = i, 0
            continue
        key = keys[a + j]
        j += 1
        part = m[PART, key]
        if (i == now and m[PROT, key] != si[EPOCH]) or m[RESIDENT, key]:
            if clean:
                si[SCAN_I], si[SCAN_J] = i, j
            continue
        clean = False
        if m[BLOCKED, part] == si[STAMP]:
            continue
        victim = -1
        if m[PCOUNT, part] >= m[CAP, part]:
            victim = _victim(o, part)
            if victim < 0 or _next_use(o, victim, now + 1) <= i:
                m[BLOCKED, part] = si[STAMP]
                continue
        _load(o, ch, key, victim)


@helper
def _conservative(o, ch):
    m = o.m
    si = m[SI]
    while si[NINFLIGHT] < si[CHANNELS] and si[POS] < len(o.loads):
        need_at, key, victim = o.loads[si[POS], 0], o.loads[si[POS], 1], o.loads[si[POS], 2]
        part = m[PART, key]
        if m[RESIDENT, key]:
            si[POS] += 1
            continue
        if victim >= 0 and m[RESIDENT, victim] and m[PART, victim] == part:
            if m[PROT, victim] == si[EPOCH] or m[INFLIGHT, victim] or _next_use(o, victim, si[NOW] + 1) <= need_at:
                return  # the victim is still needed before this load's use: wait
        elif m[PCOUNT, part] >= m[CAP, part]:
            return  # MIN had a free slot here that this schedule has not freed yet
        else:
            victim = -1
        _load(o, ch, key, victim)
        si[POS] += 1


@inline
def _fetch_more(o, ch):
    if o.m[SI, SCHEDULE] == AGGRESSIVE:
        _aggressive(o, ch)
    else:
        _conservative(o, ch)


@inline
def _landed(o, ch):
    key = kch.land_begin(ch)
    o.m[INFLIGHT, key] = 0
    o.m[SI, NINFLIGHT] -= 1
    _fetch_more(o, ch)
    kch.land_end(ch, key)


@helper
def _advance(o, ch, to):
    now = kch.now(ch)
    if not to > now:
        return
    at = now + (to - now)
    if ch.q[kch.CI, kch.WAKE] != 0:
        kch.serve(ch, now)
    while ch.q[kch.CI, kch.CUR] >= 0 and ch.cf[kch.END] < at:
        _landed(o, ch)
    ch.cf[kch.NOW] = at


@helper
def _wait_any(o, ch):
    if ch.q[kch.CI, kch.WAKE] != 0:
        kch.serve(ch, kch.now(ch))
    if ch.q[kch.CI, kch.CUR] < 0:
        raise RuntimeError("oracle: no copy in flight to wait for")
    _landed(o, ch)


@helper
def _preload(o):
    """Fill every partition, untimed, with its first-used keys in stream order, stopping after the layer-step
    that fills the last one (``oracle_stall(preload=True)``)."""
    m = o.m
    n_ls = o.s[0]
    ptr = o.s[3:3 + n_ls + 1]
    keys = o.s[3 + n_ls + 1:]
    n_parts = m[SI, NPART]
    full = 0
    for p in range(n_parts):
        if m[PCOUNT, p] >= m[CAP, p]:
            full += 1
    for i in range(n_ls):
        for j in range(ptr[i], ptr[i + 1]):
            key = keys[j]
            part = m[PART, key]
            if not m[RESIDENT, key] and m[PCOUNT, part] < m[CAP, part]:
                m[MEMBERS, m[START, part] + m[PCOUNT, part]] = key
                m[MPOS, key] = m[START, part] + m[PCOUNT, part]
                m[PCOUNT, part] += 1
                m[RESIDENT, key] = 1
                m[NU, key] = _next_use(o, key, 0)  # touched at -1: its first use
                if m[PCOUNT, part] >= m[CAP, part]:
                    full += 1
        if full >= n_parts:
            break


@jit(nrt=False)
def _oracle_kernel(o, ch, counts, orders, use_orders, step_dense_s, expert_s, num_layers, window_from, preload,
                   out):
    m = o.m
    L = num_layers
    n_ls = o.s[0]
    ptr = o.s[3:3 + n_ls + 1]
    keys = o.s[3 + n_ls + 1:]
    if preload:
        _preload(o)
    t = 0.0
    stall = 0.0
    out[0] = 0.0  # the stall when layer-step window_from began
    for si in range(len(step_dense_s)):
        dense = step_dense_s[si]
        for layer in range(L):
            i = si * L + layer
            if i == window_from:
                out[0] = stall
            a, b = ptr[i], ptr[i + 1]
            t += dense
            m[SI, NOW] = i
            m[SI, EPOCH] += 1
            for j in range(a, b):
                k = keys[j]
                m[PROT, k] = m[SI, EPOCH]
                m[REM, k] = 1
                m[USES, k] = counts[j]
            remaining = b - a
            while remaining:
                _advance(o, ch, t)
                _fetch_more(o, ch)
                nxt = -1
                ready = -1
                if use_orders:  # fixed order: the next expert or nothing
                    for j in range(a, b):
                        if m[REM, orders[j]]:
                            nxt = orders[j]
                            break
                    if not m[INFLIGHT, nxt] and m[RESIDENT, nxt]:
                        ready = nxt
                else:  # the lowest resident key
                    for j in range(a, b):
                        k = keys[j]
                        if m[REM, k] and not m[INFLIGHT, k] and m[RESIDENT, k] and (ready < 0 or k < ready):
                            ready = k
                if ready < 0:
                    if m[SI, NINFLIGHT] == 0:  # off the schedule's plan: load on demand
                        key = nxt
                        if not use_orders:
                            for j in range(a, b):
                                k = keys[j]
                                if m[REM, k] and (key < 0 or k < key):
                                    key = k
                        part = m[PART, key]
                        full = m[PCOUNT, part] >= m[CAP, part]
                        victim = _victim(o, part) if full else -1
                        if full and victim < 0:
                            raise RuntimeError("oracle: no slot for a needed expert")
                        _load(o, ch, key, victim)
                    _wait_any(o, ch)
                    if kch.now(ch) > t:
                        stall += kch.now(ch) - t
                        t = kch.now(ch)
                    continue
                t += expert_s[m[USES, ready]]
                m[REM, ready] = 0
                remaining -= 1
                m[PROT, ready] = 0
                m[NU, ready] = _next_use(o, ready, i + 1)  # computed at i
    return stall


def oracle_stall(stream, counts, part_of, capacity, step_dense_s, expert_s, num_layers: int, copy_s: float,
                 schedule: str = "aggressive", loads=None, orders=None, window: int | None = None, channels: int = 1,
                 resume_scan: bool = True, window_from: int | None = None,
                 preload: bool = False) -> float | tuple[float, float]:
    """``replay.oracle.oracle_stall`` on the serial channel: the packed stream with its future
    (:func:`replay_kernels.keys.pack_stream`) and its use counts, partitions, dense time per step, expert time by use
    count, ``copy_s`` per copy. ``loads``: MIN's load log, int [n, 3] with -1 for no victim (conservative);
    ``orders``: MIN's compute order over the stream's layout (conservative); ``window``: default 4 x
    ``num_layers``. With ``window_from`` (a layer-step) it returns (the whole replay's stall, the stall from that
    layer-step on); ``preload``: every partition starts full, untimed, with its first-used keys."""
    part_of = np.asarray(part_of, np.int64)
    cap = np.asarray(list(capacity), np.int64)
    N, P, S = len(part_of), len(cap), int(cap.sum())
    if schedule == "aggressive":
        code = AGGRESSIVE
    elif schedule == "conservative":
        code = CONSERVATIVE
        if loads is None or orders is None:
            raise ValueError("oracle_stall: the conservative schedule needs MIN's loads and compute orders")
    else:
        raise ValueError(f"oracle_stall: schedule must be 'aggressive' or 'conservative', got {schedule!r}")
    if int(stream[2]) == len(stream):
        raise ValueError("oracle_stall: the stream needs its future (pack_stream(..., num_keys))")
    ptr, _ = stream_rows(stream)
    m = np.zeros((N_ROWS, max(N, P, S, NPART + 1)), np.int64)
    m[PART, :N] = part_of
    m[NU] = -1
    m[CAP, :P] = cap
    np.cumsum(cap[:-1], out=m[START, 1:P])
    si = m[SI]
    si[SCHEDULE], si[WINDOW], si[RESUME] = code, window or 4 * num_layers, int(resume_scan)
    si[CHANNELS], si[HORIZON], si[O_FUT], si[NPART] = channels, len(ptr) - 1, int(stream[2]), P
    loads = np.zeros((0, 3), np.int64) if loads is None else np.asarray(loads, np.int64).reshape(-1, 3)
    o = OracleState(m, np.asarray(stream, np.int64), loads)
    ch = kch.new_channel(N, channels + 1, copy_s)  # a schedule queues a copy only while fewer are in flight
    use_orders = orders is not None
    orders = np.zeros(0, np.int64) if orders is None else np.asarray(orders, np.int64)
    out = np.zeros(1)
    stall = float(_oracle_kernel(o, ch, np.asarray(counts, np.int64), orders, use_orders,
                                 np.asarray(step_dense_s, np.float64), np.asarray(expert_s, np.float64),
                                 int(num_layers), -1 if window_from is None else int(window_from), bool(preload), out))
    return stall if window_from is None else (stall, stall - float(out[0]))
