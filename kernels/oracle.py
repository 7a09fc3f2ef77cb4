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
from ._jit import jit
from .keys import next_use

AGGRESSIVE, CONSERVATIVE = 0, 1
NOW, EPOCH, NINFLIGHT, SCAN_I, SCAN_J, POS, STAMP, SCHEDULE, WINDOW, RESUME, CHANNELS, HORIZON = range(12)


class OracleState(NamedTuple):
    part_of: np.ndarray  # int64 [N]
    cap: np.ndarray  # int64 [P]
    start: np.ndarray  # int64 [P]: first entry of each partition's member list
    pcount: np.ndarray  # int64 [P]: resident keys (in flight included)
    members: np.ndarray  # int64 [slots]: the resident keys of partition p at start[p] .. start[p] + pcount[p]
    mpos: np.ndarray  # int64 [N]: index of a resident key in members
    resident: np.ndarray  # bool [N]
    inflight: np.ndarray  # bool [N]
    prot: np.ndarray  # int64 [N]: protected while equal to si[EPOCH]
    nu: np.ndarray  # int64 [N]: recorded next use of a resident key (FarthestNextUse), -1 if none
    blocked: np.ndarray  # int64 [P]: blocked in this aggressive scan while equal to si[STAMP]
    fptr: np.ndarray  # the future (keys.future_index)
    fat: np.ndarray
    ptr: np.ndarray  # the stream (keys.layer_step_keys)
    keys: np.ndarray
    loads: np.ndarray  # int64 [n, 3]: MIN's (layer-step, key, evicted or -1), for conservative
    si: np.ndarray  # int64 scalars (names above)


@jit
def _victim(o, part):
    best = -1
    for m in range(o.start[part], o.start[part] + o.pcount[part]):
        k = o.members[m]
        if o.prot[k] == o.si[EPOCH] or o.inflight[k]:
            continue
        if best < 0 or o.nu[k] > o.nu[best] or (o.nu[k] == o.nu[best] and k > best):
            best = k
    return best


@jit
def _load(o, ch, key, victim):
    part = o.part_of[key]
    if victim >= 0:
        o.resident[victim] = False
        o.nu[victim] = -1
        last = o.start[part] + o.pcount[part] - 1
        moved = o.members[last]
        o.members[o.mpos[victim]] = moved
        o.mpos[moved] = o.mpos[victim]
        o.pcount[part] -= 1
    o.members[o.start[part] + o.pcount[part]] = key
    o.mpos[key] = o.start[part] + o.pcount[part]
    o.pcount[part] += 1
    o.resident[key] = True
    o.nu[key] = next_use(o.fptr, o.fat, key, o.si[NOW] + 1, o.si[HORIZON])
    o.inflight[key] = True
    o.si[NINFLIGHT] += 1
    kch.submit(ch, key, 0)


@jit
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
        part = o.part_of[key]
        if (i == now and o.prot[key] != o.si[EPOCH]) or o.resident[key]:
            if clean:
                o.si[SCAN_I], o.si[SCAN_J] = i, j
            continue
        clean = False
        if o.blocked[part] == o.si[STAMP]:
            continue
        victim = -1
        if o.pcount[part] >= o.cap[part]:
            victim = _victim(o, part)
            if victim < 0 or next_use(o.fptr, o.fat, victim, now + 1, o.si[HORIZON]) <= i:
                o.blocked[part] = o.si[STAMP]
                continue
        _load(o, ch, key, victim)


@jit
def _conservative(o, ch):
    while o.si[NINFLIGHT] < o.si[CHANNELS] and o.si[POS] < len(o.loads):
        need_at, key, victim = o.loads[o.si[POS], 0], o.loads[o.si[POS], 1], o.loads[o.si[POS], 2]
        part = o.part_of[key]
        if o.resident[key]:
            o.si[POS] += 1
            continue
        if victim >= 0 and o.resident[victim] and o.part_of[victim] == part:
            if (o.prot[victim] == o.si[EPOCH] or o.inflight[victim]
                    or next_use(o.fptr, o.fat, victim, o.si[NOW] + 1, o.si[HORIZON]) <= need_at):
                return  # the victim is still needed before this load's use: wait
        elif o.pcount[part] >= o.cap[part]:
            return  # MIN had a free slot here that this schedule has not freed yet
        else:
            victim = -1
        _load(o, ch, key, victim)
        o.si[POS] += 1


@jit
def _fetch_more(o, ch):
    if o.si[SCHEDULE] == AGGRESSIVE:
        _aggressive(o, ch)
    else:
        _conservative(o, ch)


@jit
def _landed(o, ch):
    key = kch.land_begin(ch)
    o.inflight[key] = False
    o.si[NINFLIGHT] -= 1
    _fetch_more(o, ch)
    kch.land_end(ch, key)


@jit
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


@jit
def _wait_any(o, ch):
    if ch.ci[kch.WAKE] != 0:
        kch.serve(ch, ch.cf[kch.NOW])
    if ch.ci[kch.CUR] < 0:
        raise RuntimeError("oracle: no copy in flight to wait for")
    _landed(o, ch)


@jit
def _oracle_kernel(o, ch, counts, orders, use_orders, step_dense_s, expert_s, num_layers):
    L = num_layers
    rem = np.zeros(len(o.part_of), np.bool_)  # keys of the layer-step not computed yet
    uses = np.zeros(len(o.part_of), np.int64)
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
                o.prot[k] = o.si[EPOCH]
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
                    if not o.inflight[nxt] and o.resident[nxt]:
                        ready = nxt
                else:
                    for j in range(a, b):
                        k = o.keys[j]
                        if rem[k] and not o.inflight[k] and o.resident[k] and (ready < 0 or k < ready):
                            ready = k
                if ready < 0:
                    if o.si[NINFLIGHT] == 0:  # off the schedule's plan: load on demand
                        key = nxt
                        if not use_orders:
                            for j in range(a, b):
                                k = o.keys[j]
                                if rem[k] and (key < 0 or k < key):
                                    key = k
                        part = o.part_of[key]
                        full = o.pcount[part] >= o.cap[part]
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
                o.prot[ready] = 0
                o.nu[ready] = next_use(o.fptr, o.fat, ready, i + 1, o.si[HORIZON])  # computed at i
    return stall


def oracle_stall(ptr, keys, counts, fptr, fat, part_of, capacity, step_dense_s, expert_s, num_layers: int,
                 copy_s: float, schedule: str = "aggressive", loads=None, orders=None, window: int | None = None,
                 channels: int = 1, resume_scan: bool = True) -> float:
    """``sim.bounds.oracle_stall`` on the serial channel: the stream (ptr, keys, counts) and its future (fptr,
    fat), partitions, dense time per step, expert time by use count, ``copy_s`` per copy. ``loads``: MIN's
    load log, int [n, 3] with -1 for no victim (conservative); ``orders``: MIN's compute order over the
    stream's layout (conservative); ``window``: default 4 x ``num_layers``."""
    part_of = np.asarray(part_of, np.int64)
    cap = np.asarray(list(capacity), np.int64)
    N, P = len(part_of), len(cap)
    start = np.zeros(P, np.int64)
    np.cumsum(cap[:-1], out=start[1:])
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
    loads = np.zeros((0, 3), np.int64) if loads is None else np.asarray(loads, np.int64).reshape(-1, 3)
    o = OracleState(part_of, cap, start, np.zeros(P, np.int64), np.full(int(cap.sum()), -1, np.int64),
                    np.zeros(N, np.int64), np.zeros(N, np.bool_), np.zeros(N, np.bool_), np.zeros(N, np.int64),
                    np.full(N, -1, np.int64), np.zeros(P, np.int64), np.asarray(fptr, np.int64),
                    np.asarray(fat, np.int64), np.asarray(ptr, np.int64), np.asarray(keys, np.int64), loads, si)
    ch = kch.new_channel(N, channels + 1, copy_s)  # a schedule queues a copy only while fewer are in flight
    use_orders = orders is not None
    orders = np.zeros(0, np.int64) if orders is None else np.asarray(orders, np.int64)
    return float(_oracle_kernel(o, ch, np.asarray(counts, np.int64), orders, use_orders,
                                np.asarray(step_dense_s, np.float64), np.asarray(expert_s, np.float64),
                                int(num_layers)))
