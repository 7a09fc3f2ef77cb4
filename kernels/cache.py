"""``policies.cache.ExpertCache`` and the eviction policies without ``on_predict``, as flat arrays.

The state of one cache is a :class:`CacheState`: a tuple of numpy arrays indexed by key, partition or slot
(numba passes it to compiled functions as one argument; the scalars live in ``ctr``/``fp`` so they can
change). Every function here does what the Python method of the same name does, in the same order, and
breaks ties the same way:

- ``lru``: one doubly linked recency list per partition (``prev``/``nxt``/``head``/``tail``), the order of
  ``OrderedDict.move_to_end``; the victim is the first key from the old end that is neither protected nor in
  flight (``LRU.victim_skipping``).
- ``static``: the same list without the pinned keys, which are resident from the start and never leave.
- ``lfu``: min of (count, last touch, key); counts survive eviction unless ``keep_counts`` is off.
- ``lfru``: min of (decayed score, last touch, key), score ``s * 2 ** (-(now - t) / h) + 1`` per touch.
- ``two_level``: the ``lfu`` min over the low-priority candidates (last touch ``window`` layer-steps ago or
  more), else min of (last touch, key).
- ``belady``: max of (recorded next use, -key), and ``defer``: no victim while a key of this layer-step that
  is not a candidate is used later than it (``policies.eviction.belady``).

"Last touch" is the hook-call counter ``ctr[CLOCK]`` (``_seq``/``_clock`` of the Python policies). A key is
protected while ``prot[key] == ctr[EPOCH]``: setting a new protected set is one increment.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ._jit import helper
from .keys import next_use

LRU, LFU, LFRU, STATIC, BELADY, TWO_LEVEL = range(6)
POLICY_CODES = {"lru": LRU, "lfu": LFU, "lfru": LFRU, "static": STATIC, "belady": BELADY, "two_level": TWO_LEVEL}

# kf: per-key integer fields (rows of one array: numba compiles a few wide arrays much faster than many)
PART, RESIDENT, INFLIGHT, PINNED, PF_UNUSED, PROT, SLOT, PREV, NEXT, LISTED, COUNT, SEQ, LAST, NU = range(14)
# PART: partition; RESIDENT: resident or in flight (ExpertCache.present); INFLIGHT: copy not landed; PINNED:
# loaded before the run, never evicted (static); PF_UNUSED: prefetched, not used yet; PROT: protected while
# equal to ctr[EPOCH]; SLOT: physical slot, -1 if none; PREV/NEXT: the recency list (lru, static), -1 at the
# ends; LISTED: in it; COUNT: touches (lfu, two_level); SEQ: hook-call counter at the last touch, 0 if never;
# LAST: layer-step of the last touch (lfru, two_level); NU: belady's recorded next use, -1 if not resident
N_KF = 14
# pf: per-partition fields. CAP: slots; START: first slot; USED: keys resident or in flight; NFREE: free slots,
# a stack at sf[FREE, START .. START + NFREE]; HEAD/TAIL: least/most recently touched listed key, -1 if none
CAP, START, USED, NFREE, HEAD, TAIL = range(6)
# sf: per-slot fields. SLOT_KEY: the key in the slot, -1 if none; FREE: the free stacks
SLOT_KEY, FREE = range(2)
# ctr: integer scalars. The first eight are CacheStats' fields, in its order.
HITS, LATE, MISSES, INSERTS, PF_INSERTS, PF_USED, PF_WASTED, EVICTIONS = range(8)
CLOCK, EPOCH, NLOG, LOGGING, POLICY, KEEP_COUNTS, DEFER, HORIZON = range(8, 16)
N_CTR = 16
# fp: float scalars
HALF_LIFE, WINDOW, TWO = range(3)  # lfru's h in layer-steps, two_level's window in layer-steps, the constant 2.0
STATS_FIELDS = ("hits", "late_hits", "misses", "inserts", "prefetch_inserts", "prefetch_used", "prefetch_wasted",
                "evictions")


class CacheState(NamedTuple):
    kf: np.ndarray  # int64 [N_KF, N]: per-key fields (above)
    score: np.ndarray  # float64 [N]: lfru score at the last touch
    pf: np.ndarray  # int64 [6, P]: per-partition fields
    sf: np.ndarray  # int64 [2, slots]: per-slot fields
    fut: np.ndarray  # int64: the future, keys.pack_future (belady)
    ptr: np.ndarray  # int64 [layer-steps + 1]: the stream (keys.layer_step_keys), for belady's defer rule
    keys: np.ndarray  # int64
    log: np.ndarray  # int64 [loads, 3]: (layer-step, key, evicted or -1) of each slot claimed, if logging
    ctr: np.ndarray  # int64 [N_CTR]
    fp: np.ndarray  # float64 [3]

    @property
    def stats(self) -> dict[str, int]:
        """The cache's counters by ``CacheStats`` field name."""
        return dict(zip(STATS_FIELDS, self.ctr[:len(STATS_FIELDS)].tolist()))


def new_cache(policy: str, part_of: np.ndarray, capacity, ptr: np.ndarray, keys: np.ndarray,
              fut: np.ndarray | None = None, *, pinned=(), keep_counts: bool = True, half_life_steps: float = 4.0,
              window_steps: float = 1.0, defer: bool = True, num_layers: int = 1,
              log_loads: bool = False) -> CacheState:
    """An empty cache over the stream (ptr, keys) with ``policy`` and its parameters (as the Python policy's
    constructor takes them; ``num_layers`` scales lfru's half-life and two_level's window to layer-steps as
    their ``reset`` does), ``pinned`` keys loaded first in ascending order (``ExpertCache.__init__``).
    ``fut``: the stream's future (:func:`kernels.keys.pack_future`), needed by belady."""
    part_of = np.asarray(part_of, dtype=np.int64)
    cap = np.asarray(list(capacity), dtype=np.int64)
    N, P = len(part_of), len(cap)
    if policy == "belady" and fut is None:
        raise ValueError("new_cache: belady needs the stream's future (fut)")
    kf = np.zeros((N_KF, N), dtype=np.int64)
    kf[PART] = part_of
    kf[[SLOT, PREV, NEXT, NU]] = -1
    pf = np.zeros((6, P), dtype=np.int64)
    pf[CAP] = cap
    np.cumsum(cap[:-1], out=pf[START, 1:])
    pf[NFREE] = cap
    pf[[HEAD, TAIL]] = -1
    sf = np.full((2, int(cap.sum())), -1, dtype=np.int64)
    for p in range(P):  # list(range(s + c - 1, s - 1, -1)): popped from the end, lowest slot first
        s0 = pf[START, p]
        sf[FREE, s0:s0 + cap[p]] = np.arange(s0 + cap[p] - 1, s0 - 1, -1)
    ctr = np.zeros(N_CTR, dtype=np.int64)
    ctr[POLICY] = POLICY_CODES[policy]
    ctr[KEEP_COUNTS], ctr[DEFER], ctr[LOGGING] = int(keep_counts), int(defer), int(log_loads)
    ctr[HORIZON] = len(ptr) - 1
    fp = np.array([float(half_life_steps) * max(1, num_layers), float(window_steps) * num_layers, 2.0])
    c = CacheState(kf, np.zeros(N), pf, sf, np.zeros(N + 1, np.int64) if fut is None else np.asarray(fut, np.int64),
                   np.asarray(ptr, np.int64), np.asarray(keys, np.int64),
                   np.zeros((len(keys) if log_loads else 0, 3), np.int64), ctr, fp)
    for key in sorted(int(k) for k in pinned):
        p = int(part_of[key])
        if pf[USED, p] >= cap[p]:
            raise ValueError(f"cache: pinned experts exceed the {cap[p]} slots of partition {p}")
        kf[PINNED, key] = kf[RESIDENT, key] = 1
        pf[USED, p] += 1
        pf[NFREE, p] -= 1
        slot = sf[FREE, pf[START, p] + pf[NFREE, p]]
        kf[SLOT, key], sf[SLOT_KEY, slot] = slot, key
    return c


def resident_slots(c: CacheState) -> dict[int, int]:
    """Resident (or in-flight) key -> physical slot (``ExpertCache.slot_of``)."""
    keys = np.flatnonzero(c.kf[RESIDENT])
    return dict(zip(keys.tolist(), c.kf[SLOT, keys].tolist()))


# ------------------------------------------------------------------------------------------ policy hooks
@helper
def _unlink(c, key):
    p = c.kf[PART, key]
    a, b = c.kf[PREV, key], c.kf[NEXT, key]
    if a >= 0:
        c.kf[NEXT, a] = b
    else:
        c.pf[HEAD, p] = b
    if b >= 0:
        c.kf[PREV, b] = a
    else:
        c.pf[TAIL, p] = a
    c.kf[LISTED, key] = 0


@helper
def _append(c, key):
    p = c.kf[PART, key]
    t = c.pf[TAIL, p]
    c.kf[PREV, key] = t
    c.kf[NEXT, key] = -1
    if t >= 0:
        c.kf[NEXT, t] = key
    else:
        c.pf[HEAD, p] = key
    c.pf[TAIL, p] = key
    c.kf[LISTED, key] = 1


@helper
def decayed(c, key, now):
    """lfru's score of ``key`` at ``now`` (0 if never touched). The base 2.0 is read from ``fp`` so the
    compiler cannot rewrite ``pow(2, x)`` as ``exp2(x)``, which may round differently from Python's ``**``."""
    if c.kf[SEQ, key] == 0:
        return 0.0
    return c.score[key] * math.pow(c.fp[TWO], -(now - c.kf[LAST, key]) / c.fp[HALF_LIFE])


@helper
def _touch(c, key, now):
    pol = c.ctr[POLICY]
    if pol == LFRU:
        c.score[key] = decayed(c, key, now) + 1.0
        c.kf[LAST, key] = now
    else:  # lfu, two_level
        c.kf[COUNT, key] += 1
        c.kf[LAST, key] = now
    c.ctr[CLOCK] += 1
    c.kf[SEQ, key] = c.ctr[CLOCK]


@helper
def on_hit(c, key, now):
    pol = c.ctr[POLICY]
    if pol == LRU or pol == STATIC:
        if c.kf[LISTED, key] and c.pf[TAIL, c.kf[PART, key]] != key:  # move_to_end; pinned keys are not listed
            _unlink(c, key)
            _append(c, key)
    elif pol == BELADY:
        c.kf[NU, key] = next_use(c.fut, key, now + 1, c.ctr[HORIZON])
    else:
        _touch(c, key, now)


@helper
def on_insert(c, key, now):
    pol = c.ctr[POLICY]
    if pol == LRU or pol == STATIC:
        if not c.kf[PINNED, key]:
            if c.kf[LISTED, key]:
                _unlink(c, key)
            _append(c, key)
    elif pol == BELADY:
        c.kf[NU, key] = next_use(c.fut, key, now + 1, c.ctr[HORIZON])
    else:
        _touch(c, key, now)


@helper
def on_remove(c, key):
    pol = c.ctr[POLICY]
    if pol == LRU or pol == STATIC:
        if c.kf[LISTED, key]:
            _unlink(c, key)
    elif pol == BELADY:
        c.kf[NU, key] = -1
    elif pol == LFU and c.ctr[KEEP_COUNTS] == 0:
        c.kf[COUNT, key] = 0


@helper
def candidate(c, key):
    """Resident (its partition is being scanned), and neither protected, in flight nor pinned."""
    return c.kf[PROT, key] != c.ctr[EPOCH] and not c.kf[INFLIGHT, key] and not c.kf[PINNED, key]


@helper
def victim(c, part, now):
    """The key the policy evicts from full partition ``part``, or -1 (none: the copy must wait)."""
    pol = c.ctr[POLICY]
    if pol == LRU or pol == STATIC:
        k = c.pf[HEAD, part]
        while k >= 0:
            if c.kf[PROT, k] != c.ctr[EPOCH] and not c.kf[INFLIGHT, k]:
                return k
            k = c.kf[NEXT, k]
        return -1
    best = -1
    best_f = 0.0
    best_i = 0
    lo = c.pf[START, part]
    for s in range(lo, lo + c.pf[CAP, part]):
        k = c.sf[SLOT_KEY, s]
        if k < 0 or not candidate(c, k):
            continue
        if pol == BELADY:  # farthest recorded next use, ties to the lowest key
            if best < 0 or c.kf[NU, k] > c.kf[NU, best] or (c.kf[NU, k] == c.kf[NU, best] and k < best):
                best = k
        elif pol == LFRU:
            f = decayed(c, k, now)
            if best < 0 or f < best_f or (f == best_f and _touched_before(c, k, best)):
                best, best_f = k, f
        elif pol == TWO_LEVEL:
            low = 0 if now - c.kf[LAST, k] < c.fp[WINDOW] else 1  # high priority: touched within the window
            if best < 0 or low > best_i or (low == best_i and _before(c, k, best, low)):
                best, best_i = k, low
        elif best < 0 or c.kf[COUNT, k] < c.kf[COUNT, best] or (
                c.kf[COUNT, k] == c.kf[COUNT, best] and _touched_before(c, k, best)):
            best = k  # lfu
    if pol == BELADY and best >= 0 and c.ctr[DEFER] != 0 and now < c.ctr[HORIZON]:
        far = c.kf[NU, best]
        for j in range(c.ptr[now], c.ptr[now + 1]):
            k = c.keys[j]
            if c.kf[PART, k] == part and c.kf[NU, k] >= 0 and not candidate(c, k) and c.kf[NU, k] > far:
                return -1  # a key of this layer-step, not yet computed, is the better victim: wait for it
    return best


@helper
def _touched_before(c, k, other):
    """``k`` comes first in the order (last touch, key): the common tie-break."""
    return c.kf[SEQ, k] < c.kf[SEQ, other] or (c.kf[SEQ, k] == c.kf[SEQ, other] and k < other)


@helper
def _before(c, k, other, low):
    """two_level's order between two candidates of the same tier: low (count, touch, key), high (touch, key)."""
    if low == 1 and c.kf[COUNT, k] != c.kf[COUNT, other]:
        return c.kf[COUNT, k] < c.kf[COUNT, other]
    return _touched_before(c, k, other)


# ------------------------------------------------------------------------------------------ cache operations
@helper
def reserve(c, key, now, prefetch):
    """``ExpertCache.reserve``: a slot for ``key``; returns (ok, evicted key or -1)."""
    if c.kf[RESIDENT, key]:  # resident or in flight already
        return True, -1
    part = c.kf[PART, key]
    ev = -1
    if c.pf[USED, part] >= c.pf[CAP, part]:
        ev = victim(c, part, now)
        if ev < 0:
            return False, -1
        c.kf[RESIDENT, ev] = 0
        slot = c.kf[SLOT, ev]
        c.kf[SLOT, ev] = -1
        c.ctr[EVICTIONS] += 1
        if c.kf[PF_UNUSED, ev]:
            c.kf[PF_UNUSED, ev] = 0
            c.ctr[PF_WASTED] += 1
        on_remove(c, ev)
    else:
        c.pf[NFREE, part] -= 1
        slot = c.sf[FREE, c.pf[START, part] + c.pf[NFREE, part]]
        c.pf[USED, part] += 1
    c.kf[SLOT, key] = slot
    c.sf[SLOT_KEY, slot] = key
    c.kf[RESIDENT, key] = 1
    c.kf[INFLIGHT, key] = 1
    c.ctr[INSERTS] += 1
    if prefetch:
        c.ctr[PF_INSERTS] += 1
        c.kf[PF_UNUSED, key] = 1
    on_insert(c, key, now)
    if c.ctr[LOGGING] != 0:
        n = c.ctr[NLOG]
        c.log[n, 0] = now
        c.log[n, 1] = key
        c.log[n, 2] = ev
        c.ctr[NLOG] = n + 1
    return True, ev


@helper
def use_layer(c, keys, counts, a, b, now, once, hits, late, misses):
    """``ExpertCache.use_layer`` for the distinct keys ``keys[a:b]`` (use counts ``counts[a:b]``): touches the
    resident ones in order and counts the outcomes. Fills ``hits``/``late``/``misses`` with stream positions
    (indices into ``keys``); returns (hit keys, late keys, miss keys, hit uses, late uses, miss uses,
    prefetched keys used)."""
    used = 0
    for j in range(a, b):
        k = keys[j]
        if c.kf[PF_UNUSED, k]:
            c.kf[PF_UNUSED, k] = 0
            used += 1
    nm = 0
    for j in range(a, b):
        k = keys[j]
        if c.kf[RESIDENT, k]:
            on_hit(c, k, now)
        else:
            misses[nm] = j
            nm += 1
    nh = 0
    nl = 0
    h = lt = m = 0
    for j in range(a, b):
        k = keys[j]
        if c.kf[RESIDENT, k]:
            if c.kf[INFLIGHT, k]:
                late[nl] = j
                nl += 1
                lt += counts[j]
            else:
                hits[nh] = j
                nh += 1
                h += counts[j]
    for i in range(nm):
        m += counts[misses[i]]
    if once:
        h, lt, m = nh, nl, nm
    c.ctr[PF_USED] += used
    c.ctr[HITS] += h
    c.ctr[LATE] += lt
    c.ctr[MISSES] += m
    return nh, nl, nm, h, lt, m, used


@helper
def complete(c, key):
    c.kf[INFLIGHT, key] = 0


@helper
def protect_row(c, keys, a, b):
    """The protected set becomes ``keys[a:b]`` (the runtime's ``protected = set(needed)``)."""
    c.ctr[EPOCH] += 1
    e = c.ctr[EPOCH]
    for j in range(a, b):
        c.kf[PROT, keys[j]] = e
