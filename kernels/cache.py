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

from ._jit import jit
from .keys import next_use

LRU, LFU, LFRU, STATIC, BELADY, TWO_LEVEL = range(6)
POLICY_CODES = {"lru": LRU, "lfu": LFU, "lfru": LFRU, "static": STATIC, "belady": BELADY, "two_level": TWO_LEVEL}

# ctr: integer scalars. The first eight are CacheStats' fields, in its order.
HITS, LATE, MISSES, INSERTS, PF_INSERTS, PF_USED, PF_WASTED, EVICTIONS = range(8)
CLOCK, EPOCH, NLOG, LOGGING, POLICY, KEEP_COUNTS, DEFER, HORIZON = range(8, 16)
N_CTR = 16
# fp: float scalars
HALF_LIFE, WINDOW, TWO = range(3)  # lfru's h in layer-steps, two_level's window in layer-steps, the constant 2.0
STATS_FIELDS = ("hits", "late_hits", "misses", "inserts", "prefetch_inserts", "prefetch_used", "prefetch_wasted",
                "evictions")


class CacheState(NamedTuple):
    part_of: np.ndarray  # int64 [N]: partition of each key
    cap: np.ndarray  # int64 [P]: slots per partition
    start: np.ndarray  # int64 [P]: first physical slot of each partition
    used: np.ndarray  # int64 [P]: keys resident or in flight per partition
    resident: np.ndarray  # bool [N]: resident or in flight (ExpertCache.present)
    inflight: np.ndarray  # bool [N]: copy not landed yet
    pinned: np.ndarray  # bool [N]: loaded before the run, never evicted (static)
    pf_unused: np.ndarray  # bool [N]: prefetched, not used yet
    prot: np.ndarray  # int64 [N]: protected while equal to ctr[EPOCH]
    slot_of: np.ndarray  # int64 [N]: physical slot of a resident key, else -1
    slot_key: np.ndarray  # int64 [slots]: key in each slot, else -1
    free: np.ndarray  # int64 [slots]: per partition a stack of free slots at start[p] .. start[p] + nfree[p]
    nfree: np.ndarray  # int64 [P]
    prev: np.ndarray  # int64 [N]: recency list (lru, static), -1 at the ends
    nxt: np.ndarray  # int64 [N]
    head: np.ndarray  # int64 [P]: least recently touched listed key, -1 if none
    tail: np.ndarray  # int64 [P]: most recently touched
    listed: np.ndarray  # bool [N]: in its partition's recency list
    count: np.ndarray  # int64 [N]: touches (lfu, two_level)
    seq: np.ndarray  # int64 [N]: hook-call counter at the last touch, 0 if never touched
    last: np.ndarray  # int64 [N]: layer-step of the last touch (lfru, two_level)
    score: np.ndarray  # float64 [N]: lfru score at the last touch
    nu: np.ndarray  # int64 [N]: belady's recorded next use of a resident key, -1 if none
    fptr: np.ndarray  # int64 [N + 1]: the future (keys.future_index), for belady
    fat: np.ndarray  # int64
    ptr: np.ndarray  # int64 [layer-steps + 1]: the stream (keys.layer_step_keys), for belady's defer rule
    keys: np.ndarray  # int64
    log: np.ndarray  # int64 [loads, 3]: (layer-step, key, evicted or -1) of each slot claimed, if logging
    ctr: np.ndarray  # int64 [N_CTR]
    fp: np.ndarray  # float64 [3]


def new_cache(policy: str, part_of: np.ndarray, capacity, ptr: np.ndarray, keys: np.ndarray,
              fptr: np.ndarray | None = None, fat: np.ndarray | None = None, *, pinned=(), keep_counts: bool = True,
              half_life_steps: float = 4.0, window_steps: float = 1.0, defer: bool = True, num_layers: int = 1,
              log_loads: bool = False) -> CacheState:
    """An empty cache over the stream (ptr, keys) with ``policy`` and its parameters (as the Python policy's
    constructor takes them; ``num_layers`` scales lfru's half-life and two_level's window to layer-steps as
    their ``reset`` does), ``pinned`` keys loaded first in ascending order (``ExpertCache.__init__``)."""
    part_of = np.asarray(part_of, dtype=np.int64)
    cap = np.asarray(list(capacity), dtype=np.int64)
    N, P = len(part_of), len(cap)
    start = np.zeros(P, dtype=np.int64)
    np.cumsum(cap[:-1], out=start[1:])
    slots = int(cap.sum())
    free = np.empty(slots, dtype=np.int64)
    for p in range(P):  # list(range(s + c - 1, s - 1, -1)): popped from the end, lowest slot first
        free[start[p]:start[p] + cap[p]] = np.arange(start[p] + cap[p] - 1, start[p] - 1, -1)
    if fptr is None or fat is None:
        fptr, fat = np.zeros(N + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ctr = np.zeros(N_CTR, dtype=np.int64)
    ctr[POLICY] = POLICY_CODES[policy]
    ctr[KEEP_COUNTS], ctr[DEFER], ctr[LOGGING] = int(keep_counts), int(defer), int(log_loads)
    ctr[HORIZON] = len(ptr) - 1
    fp = np.array([float(half_life_steps) * max(1, num_layers), float(window_steps) * num_layers, 2.0])
    c = CacheState(
        part_of, cap, start, np.zeros(P, np.int64), np.zeros(N, np.bool_), np.zeros(N, np.bool_),
        np.zeros(N, np.bool_), np.zeros(N, np.bool_), np.zeros(N, np.int64), np.full(N, -1, np.int64),
        np.full(slots, -1, np.int64), free, cap.copy(), np.full(N, -1, np.int64), np.full(N, -1, np.int64),
        np.full(P, -1, np.int64), np.full(P, -1, np.int64), np.zeros(N, np.bool_), np.zeros(N, np.int64),
        np.zeros(N, np.int64), np.zeros(N, np.int64), np.zeros(N, np.float64), np.full(N, -1, np.int64),
        np.asarray(fptr, np.int64), np.asarray(fat, np.int64), np.asarray(ptr, np.int64), np.asarray(keys, np.int64),
        np.zeros((len(keys) if log_loads else 0, 3), np.int64), ctr, fp,
    )
    for key in sorted(int(k) for k in pinned):
        p = int(part_of[key])
        if c.used[p] >= cap[p]:
            raise ValueError(f"cache: pinned experts exceed the {cap[p]} slots of partition {p}")
        c.pinned[key] = c.resident[key] = True
        c.used[p] += 1
        c.nfree[p] -= 1
        slot = c.free[start[p] + c.nfree[p]]
        c.slot_of[key], c.slot_key[slot] = slot, key
    return c


# ------------------------------------------------------------------------------------------ policy hooks
@jit
def _unlink(c, key):
    p = c.part_of[key]
    a, b = c.prev[key], c.nxt[key]
    if a >= 0:
        c.nxt[a] = b
    else:
        c.head[p] = b
    if b >= 0:
        c.prev[b] = a
    else:
        c.tail[p] = a
    c.listed[key] = False


@jit
def _append(c, key):
    p = c.part_of[key]
    t = c.tail[p]
    c.prev[key] = t
    c.nxt[key] = -1
    if t >= 0:
        c.nxt[t] = key
    else:
        c.head[p] = key
    c.tail[p] = key
    c.listed[key] = True


@jit
def decayed(c, key, now):
    """lfru's score of ``key`` at ``now`` (0 if never touched). The base 2.0 is read from ``fp`` so the
    compiler cannot rewrite ``pow(2, x)`` as ``exp2(x)``, which may round differently from Python's ``**``."""
    if c.seq[key] == 0:
        return 0.0
    return c.score[key] * math.pow(c.fp[TWO], -(now - c.last[key]) / c.fp[HALF_LIFE])


@jit
def _touch(c, key, now):
    pol = c.ctr[POLICY]
    if pol == LFRU:
        c.score[key] = decayed(c, key, now) + 1.0
        c.last[key] = now
    else:  # lfu, two_level
        c.count[key] += 1
        c.last[key] = now
    c.ctr[CLOCK] += 1
    c.seq[key] = c.ctr[CLOCK]


@jit
def on_hit(c, key, now):
    pol = c.ctr[POLICY]
    if pol == LRU or pol == STATIC:
        if c.listed[key] and c.tail[c.part_of[key]] != key:  # move_to_end; pinned keys are not listed
            _unlink(c, key)
            _append(c, key)
    elif pol == BELADY:
        c.nu[key] = next_use(c.fptr, c.fat, key, now + 1, c.ctr[HORIZON])
    else:
        _touch(c, key, now)


@jit
def on_insert(c, key, now):
    pol = c.ctr[POLICY]
    if pol == LRU or pol == STATIC:
        if not c.pinned[key]:
            if c.listed[key]:
                _unlink(c, key)
            _append(c, key)
    elif pol == BELADY:
        c.nu[key] = next_use(c.fptr, c.fat, key, now + 1, c.ctr[HORIZON])
    else:
        _touch(c, key, now)


@jit
def on_remove(c, key):
    pol = c.ctr[POLICY]
    if pol == LRU or pol == STATIC:
        if c.listed[key]:
            _unlink(c, key)
    elif pol == BELADY:
        c.nu[key] = -1
    elif pol == LFU and c.ctr[KEEP_COUNTS] == 0:
        c.count[key] = 0


@jit
def candidate(c, key):
    """Resident (its partition is being scanned), and neither protected, in flight nor pinned."""
    return c.prot[key] != c.ctr[EPOCH] and not c.inflight[key] and not c.pinned[key]


@jit
def victim(c, part, now):
    """The key the policy evicts from full partition ``part``, or -1 (none: the copy must wait)."""
    pol = c.ctr[POLICY]
    if pol == LRU or pol == STATIC:
        k = c.head[part]
        while k >= 0:
            if c.prot[k] != c.ctr[EPOCH] and not c.inflight[k]:
                return k
            k = c.nxt[k]
        return -1
    best = -1
    best_f = 0.0
    best_i = 0
    lo = c.start[part]
    for s in range(lo, lo + c.cap[part]):
        k = c.slot_key[s]
        if k < 0 or not candidate(c, k):
            continue
        if pol == BELADY:  # farthest recorded next use, ties to the lowest key
            if best < 0 or c.nu[k] > c.nu[best] or (c.nu[k] == c.nu[best] and k < best):
                best = k
        elif pol == LFRU:
            f = decayed(c, k, now)
            if best < 0 or f < best_f or (f == best_f and (c.seq[k] < c.seq[best] or (c.seq[k] == c.seq[best] and k < best))):
                best, best_f = k, f
        elif pol == TWO_LEVEL:
            low = 0 if now - c.last[k] < c.fp[WINDOW] else 1  # high priority: touched within the window
            if best < 0 or low > best_i or (low == best_i and _before(c, k, best, low)):
                best, best_i = k, low
        elif best < 0 or c.count[k] < c.count[best] or (
                c.count[k] == c.count[best] and (c.seq[k] < c.seq[best] or (c.seq[k] == c.seq[best] and k < best))):
            best = k  # lfu
    if pol == BELADY and best >= 0 and c.ctr[DEFER] != 0 and now < c.ctr[HORIZON]:
        far = c.nu[best]
        for j in range(c.ptr[now], c.ptr[now + 1]):
            k = c.keys[j]
            if c.part_of[k] == part and c.nu[k] >= 0 and not candidate(c, k) and c.nu[k] > far:
                return -1  # a key of this layer-step, not yet computed, is the better victim: wait for it
    return best


@jit
def _before(c, k, other, low):
    """two_level's order between two candidates of the same tier: low (count, touch, key), high (touch, key)."""
    if low == 1 and c.count[k] != c.count[other]:
        return c.count[k] < c.count[other]
    return c.seq[k] < c.seq[other] or (c.seq[k] == c.seq[other] and k < other)


# ------------------------------------------------------------------------------------------ cache operations
@jit
def reserve(c, key, now, prefetch):
    """``ExpertCache.reserve``: a slot for ``key``; returns (ok, evicted key or -1)."""
    if c.resident[key]:  # resident or in flight already
        return True, -1
    part = c.part_of[key]
    ev = -1
    if c.used[part] >= c.cap[part]:
        ev = victim(c, part, now)
        if ev < 0:
            return False, -1
        c.resident[ev] = False
        slot = c.slot_of[ev]
        c.slot_of[ev] = -1
        c.ctr[EVICTIONS] += 1
        if c.pf_unused[ev]:
            c.pf_unused[ev] = False
            c.ctr[PF_WASTED] += 1
        on_remove(c, ev)
    else:
        c.nfree[part] -= 1
        slot = c.free[c.start[part] + c.nfree[part]]
        c.used[part] += 1
    c.slot_of[key] = slot
    c.slot_key[slot] = key
    c.resident[key] = True
    c.inflight[key] = True
    c.ctr[INSERTS] += 1
    if prefetch:
        c.ctr[PF_INSERTS] += 1
        c.pf_unused[key] = True
    on_insert(c, key, now)
    if c.ctr[LOGGING] != 0:
        n = c.ctr[NLOG]
        c.log[n, 0] = now
        c.log[n, 1] = key
        c.log[n, 2] = ev
        c.ctr[NLOG] = n + 1
    return True, ev


@jit
def use_layer(c, keys, counts, a, b, now, once, hits, late, misses):
    """``ExpertCache.use_layer`` for the distinct keys ``keys[a:b]`` (use counts ``counts[a:b]``): touches the
    resident ones in order and counts the outcomes. Fills ``hits``/``late``/``misses`` with stream positions
    (indices into ``keys``); returns (hit keys, late keys, miss keys, hit uses, late uses, miss uses,
    prefetched keys used)."""
    used = 0
    for j in range(a, b):
        k = keys[j]
        if c.pf_unused[k]:
            c.pf_unused[k] = False
            used += 1
    nt = 0
    nm = 0
    for j in range(a, b):
        k = keys[j]
        if c.resident[k]:
            on_hit(c, k, now)
        else:
            misses[nm] = j
            nm += 1
    nh = 0
    nl = 0
    h = lt = m = 0
    for j in range(a, b):
        k = keys[j]
        if c.resident[k]:
            nt += 1
            if c.inflight[k]:
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


@jit
def complete(c, key):
    c.inflight[key] = False


@jit
def protect_row(c, keys, a, b):
    """The protected set becomes ``keys[a:b]`` (the runtime's ``protected = set(needed)``)."""
    c.ctr[EPOCH] += 1
    e = c.ctr[EPOCH]
    for j in range(a, b):
        c.prot[keys[j]] = e
