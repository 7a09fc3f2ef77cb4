"""The perfect-foresight schedules of ``sim.bounds.oracle_stall`` (aggressive and conservative), compiled.

Same state and steps as the Python ``_OracleState`` and its ``fetch_more`` closures, on the serial channel:
residency per key, the keys in flight, the layer's protected keys, per partition the resident keys (a slot
list, scanned for the victim: the farthest recorded next use, ties to the highest key, among keys neither
protected nor in flight). Copies land through :func:`_landed`, which, like the Python ``landed`` callback,
asks the schedule for more copies from inside the landing. See ``sim/bounds.py`` for the schedules.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import channel as kch
from ._jit import helper, jit
from .keys import next_use

AGGRESSIVE, CONSERVATIVE = 0, 1
# kf: per-key fields. PART: partition; RESIDENT: resident or in flight; INFLIGHT: copy not landed; PROT:
# protected while equal to si[EPOCH]; NU: recorded next use of a resident key (FarthestNextUse), -1 if none;
# MPOS: index of a resident key in ``members``
PART, RESIDENT, INFLIGHT, PROT, NU, MPOS = range(6)
# pf: per-partition fields. CAP: slots; START: first entry of its member list; PCOUNT: resident keys (in flight
# included), members[START .. START + PCOUNT]; BLOCKED: blocked in this aggressive scan while equal to si[STAMP]
CAP, START, PCOUNT, BLOCKED = range(4)
NOW, EPOCH, NINFLIGHT, SCAN_I, SCAN_J, POS, STAMP, SCHEDULE, WINDOW, RESUME, CHANNELS, HORIZON = range(12)


class OracleState(NamedTuple):
    kf: np.ndarray  # int64 [6, N]: per-key fields (above)
    pf: np.ndarray  # int64 [4, P]: per-partition fields
    members: np.ndarray  # int64 [slots]: the resident keys, by partition
    fut: np.ndarray  # int64: the future (keys.pack_future)
    ptr: np.ndarray  # int64: the stream (keys.layer_step_keys)
    keys: np.ndarray
    loads: np.ndarray  # int64 [n, 3]: MIN's (layer-step, key, evicted or -1), for conservative
    si: np.ndarray  # int64 scalars (names above)


@helper
def _victim(o, part):
    best = -1
    for m in range(o.pf[START, part], o.pf[START, part] + o.pf[PCOUNT, part]):
        k = o.members[m]
        if o.kf[PROT, k] == o.si[EPOCH] or o.kf[INFLIGHT, k]:
            continue
        if best < 0 or o.kf[NU, k] > o.kf[NU, best] or (o.kf[NU, k] == o.kf[NU, best] and k > best):
            best = k
    return best


@helper
def _load(o, ch, key, victim):
    part = o.kf[PART, key]
    if victim >= 0:
        o.kf[RESIDENT, victim] = 0
        o.kf[NU, victim] = -1
        last = o.pf[START, part] + o.pf[PCOUNT, part] - 1
        moved = o.members[last]
        o.members[o.kf[MPOS, victim]] = moved
        o.kf[MPOS, moved] = o.kf[MPOS, victim]
        o.pf[PCOUNT, part] -= 1
    o.members[o.pf[START, part] + o.pf[PCOUNT, part]] = key
    o.kf[MPOS, key] = o.pf[START, part] + o.pf[PCOUNT, part]
    o.pf[PCOUNT, part] += 1
    o.kf[RESIDENT, key] = 1
    o.kf[NU, key] = next_use(o.fut, key, o.si[NOW] + 1, o.si[HORIZON])
    o.kf[INFLIGHT, key] = 1
    o.si[NINFLIGHT] += 1
    kch.submit(ch, key, 0)


@helper
def _aggressive(o, ch):
    now = o.si[NOW]
    end = min(o.si[HORIZON], now + o.si[WINDOW])
    o.si[STAMP] += 1  # a fresh set of blocked partitions
    resume = o.si[RESUME] != 0
    if resume and o.si[SCAN_I] >= now:
        i, j = o.si[SCAN_I], o.si[SCAN_J]
    else:
        i, j = now, 0
    clean = resume
    while o.si[NINFLIGHT] < o.si[CHANNELS] and i < end:
        a = o.ptr[i]
        if j >= o.ptr[i + 1] - a:
            i, j = i + 1, 0
            if clean:
                o.si[SCAN_I], o.si[SCAN_J] = i, 0
            continue
        key = o.keys[a + j]
        j += 1
        part = o.kf[PART, key]
        if (i == now and o.kf[PROT, key] != o.si[EPOCH]) or o.kf[RESIDENT, key]:
            if clean:
                o.si[SCAN_I], o.si[SCAN_J] = i, j
            continue
        clean = False
        if o.pf[BLOCKED, part] == o.si[STAMP]:
            continue
        victim = -1
        if o.pf[PCOUNT, part] >= o.pf[CAP, part]:
            victim = _victim(o, part)
            if victim < 0 or next_use(o.fut, victim, now + 1, o.si[HORIZON]) <= i:
                o.pf[BLOCKED, part] = o.si[STAMP]
                continue
        _load(o, ch, key, victim)


@helper
def _conservative(o, ch):
    while o.si[NINFLIGHT] < o.si[CHANNELS] and o.si[POS] < len(o.loads):
        need_at, key, victim = o.loads[o.si[POS], 0], o.loads[o.si[POS], 1], o.loads[o.si[POS], 2]
        part = o.kf[PART, key]
        if o.kf[RESIDENT, key]:
            o.si[POS] += 1
            continue
        if victim >= 0 and o.kf[RESIDENT, victim] and o.kf[PART, victim] == part:
            if (o.kf[PROT, victim] == o.si[EPOCH] or o.kf[INFLIGHT, victim]
                    or next_use(o.fut, victim, o.si[NOW] + 1, o.si[HORIZON]) <= need_at):
                return  # the victim is still needed before this load's use: wait
        elif o.pf[PCOUNT, part] >= o.pf[CAP, part]:
            return  # MIN had a free slot here that this schedule has not freed yet
        else:
            victim = -1
        _load(o, ch, key, victim)
        o.si[POS] += 1


@helper
def _fetch_more(o, ch):
    if o.si[SCHEDULE] == AGGRESSIVE:
        _aggressive(o, ch)
    else:
        _conservative(o, ch)


@helper
def _landed(o, ch):
    key = kch.land_begin(ch)
    o.kf[INFLIGHT, key] = 0
    o.si[NINFLIGHT] -= 1
    _fetch_more(o, ch)
    kch.land_end(ch, key)


@helper
def _advance(o, ch, to):
    now = ch.cf[kch.NOW]
    if not to > now:
        return
    at = now + (to - now)
    if ch.ci[kch.WAKE] != 0:
        kch.serve(ch, now)
    while ch.ci[kch.CUR] >= 0 and ch.cf[kch.END] < at:
        _landed(o, ch)
    ch.cf[kch.NOW] = at


@helper
def _wait_any(o, ch):
    if ch.ci[kch.WAKE] != 0:
        kch.serve(ch, ch.cf[kch.NOW])
    if ch.ci[kch.CUR] < 0:
        raise RuntimeError("oracle: no copy in flight to wait for")
    _landed(o, ch)


@jit
def _oracle_kernel(o, ch, counts, orders, use_orders, step_dense_s, expert_s, num_layers):
    L = num_layers
    rem = np.zeros(o.kf.shape[1], np.bool_)  # keys of the layer-step not computed yet
    uses = np.zeros(o.kf.shape[1], np.int64)
    t = 0.0
    stall = 0.0
    for si in range(len(step_dense_s)):
        dense = step_dense_s[si]
        for layer in range(L):
            i = si * L + layer
            a, b = o.ptr[i], o.ptr[i + 1]
            t += dense
            o.si[NOW] = i
            o.si[EPOCH] += 1
            for j in range(a, b):
                k = o.keys[j]
                o.kf[PROT, k] = o.si[EPOCH]
                rem[k] = True
                uses[k] = counts[j]
            remaining = b - a
            while remaining:
                _advance(o, ch, t)
                _fetch_more(o, ch)
                nxt = -1
                ready = -1
                if use_orders:  # fixed order: the next expert or nothing
                    for j in range(a, b):
                        if rem[orders[j]]:
                            nxt = orders[j]
                            break
                    if not o.kf[INFLIGHT, nxt] and o.kf[RESIDENT, nxt]:
                        ready = nxt
                else:
                    for j in range(a, b):
                        k = o.keys[j]
                        if rem[k] and not o.kf[INFLIGHT, k] and o.kf[RESIDENT, k] and (ready < 0 or k < ready):
                            ready = k
                if ready < 0:
                    if o.si[NINFLIGHT] == 0:  # off the schedule's plan: load on demand
                        key = nxt
                        if not use_orders:
                            for j in range(a, b):
                                k = o.keys[j]
                                if rem[k] and (key < 0 or k < key):
                                    key = k
                        part = o.kf[PART, key]
                        full = o.pf[PCOUNT, part] >= o.pf[CAP, part]
                        victim = _victim(o, part) if full else -1
                        if full and victim < 0:
                            raise RuntimeError("oracle: no slot for a needed expert")
                        _load(o, ch, key, victim)
                    _wait_any(o, ch)
                    if ch.cf[kch.NOW] > t:
                        stall += ch.cf[kch.NOW] - t
                        t = ch.cf[kch.NOW]
                    continue
                t += expert_s[uses[ready]]
                rem[ready] = False
                remaining -= 1
                o.kf[PROT, ready] = 0
                o.kf[NU, ready] = next_use(o.fut, ready, i + 1, o.si[HORIZON])  # computed at i
    return stall


def oracle_stall(ptr, keys, counts, fut, part_of, capacity, step_dense_s, expert_s, num_layers: int, copy_s: float,
                 schedule: str = "aggressive", loads=None, orders=None, window: int | None = None, channels: int = 1,
                 resume_scan: bool = True) -> float:
    """``sim.bounds.oracle_stall`` on the serial channel: the stream (ptr, keys, counts) and its future
    (:func:`kernels.keys.pack_future`), partitions, dense time per step, expert time by use count, ``copy_s``
    per copy. ``loads``: MIN's load log, int [n, 3] with -1 for no victim (conservative); ``orders``: MIN's
    compute order over the stream's layout (conservative); ``window``: default 4 x ``num_layers``."""
    part_of = np.asarray(part_of, np.int64)
    cap = np.asarray(list(capacity), np.int64)
    N, P = len(part_of), len(cap)
    if schedule == "aggressive":
        code = AGGRESSIVE
    elif schedule == "conservative":
        code = CONSERVATIVE
        if loads is None or orders is None:
            raise ValueError("oracle_stall: the conservative schedule needs MIN's loads and compute orders")
    else:
        raise ValueError(f"oracle_stall: schedule must be 'aggressive' or 'conservative', got {schedule!r}")
    si = np.zeros(12, np.int64)
    si[SCHEDULE], si[WINDOW], si[RESUME] = code, window or 4 * num_layers, int(resume_scan)
    si[CHANNELS], si[HORIZON] = channels, len(ptr) - 1
    kf = np.zeros((6, N), np.int64)
    kf[PART] = part_of
    kf[NU] = -1
    pf = np.zeros((4, P), np.int64)
    pf[CAP] = cap
    np.cumsum(cap[:-1], out=pf[START, 1:])
    loads = np.zeros((0, 3), np.int64) if loads is None else np.asarray(loads, np.int64).reshape(-1, 3)
    o = OracleState(kf, pf, np.full(int(cap.sum()), -1, np.int64), np.asarray(fut, np.int64),
                    np.asarray(ptr, np.int64), np.asarray(keys, np.int64), loads, si)
    ch = kch.new_channel(N, channels + 1, copy_s)  # a schedule queues a copy only while fewer are in flight
    use_orders = orders is not None
    orders = np.zeros(0, np.int64) if orders is None else np.asarray(orders, np.int64)
    return float(_oracle_kernel(o, ch, np.asarray(counts, np.int64), orders, use_orders,
                                np.asarray(step_dense_s, np.float64), np.asarray(expert_s, np.float64),
                                int(num_layers)))
