"""``policies.cache.ExpertCache`` and the eviction policies without ``on_predict``, as flat arrays.

Every function here does what the Python method of the same name does, in the same order, and breaks ties the
same way:

- ``lru``: one doubly linked recency list per partition (rows PREV/NEXT, HEAD/TAIL), the order of
  ``OrderedDict.move_to_end``; the victim is the first key from the old end that is neither protected nor in
  flight (``LRU.victim_skipping``).
- ``static``: the same list without the pinned keys, which are resident from the start and never leave.
- ``lfu``: min of (count, last touch, key); counts survive eviction unless ``keep_counts`` is off.
- ``lfru``: min of (decayed score, last touch, key), score ``s * 2 ** (-(now - t) / h) + 1`` per touch.
- ``two_level``: the ``lfu`` min over the low-priority candidates (last touch ``window`` layer-steps ago or
  more), else min of (last touch, key).
- ``belady``: max of (recorded next use, -key), and ``defer``: no victim while a key of this layer-step that
  is not a candidate is used later than it (``policies.eviction.belady``).

"Last touch" is the hook-call counter ``CLOCK`` (``_seq``/``_clock`` of the Python policies). A key is
protected while its PROT equals ``EPOCH``: setting a new protected set is one increment.

Layout. One cache is a :class:`CacheState` of four arrays, so that a compiled call passes four array
descriptors rather than one per field (with thirty fields, calls and compile times were several times
longer): ``m``, int64 rows of one width (at least the number of keys), a row per per-key field (indexed by
key), per-partition field (by partition), per-slot field (by slot), and the ``CTR`` row of integer scalars;
``f``, the float rows; ``s``, the read-only stream (:func:`replay_kernels.keys.pack_stream`), which caches over the
same stream may share; ``log``, the loads claimed, when logging.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ._jit import helper, inline
from .keys import next_use

LRU, LFU, LFRU, STATIC, BELADY, TWO_LEVEL = range(6)
POLICY_CODES = {"lru": LRU, "lfu": LFU, "lfru": LFRU, "static": STATIC, "belady": BELADY, "two_level": TWO_LEVEL}

# m rows by key. PART: partition; RESIDENT: resident or in flight (ExpertCache.present); INFLIGHT: copy not
# landed; PINNED: loaded before the run, never evicted (static); PF_UNUSED: prefetched, not used yet; PROT:
# protected while equal to EPOCH; SLOT: physical slot, -1 if none; PREV/NEXT: the recency list (lru, static),
# -1 at the ends; LISTED: in it; COUNT: touches (lfu, two_level); SEQ: CLOCK at the last touch, 0 if never;
# LAST: layer-step of the last touch (lfru, two_level); NU: belady's recorded next use, -1 if not resident;
# CURSOR: where keys.next_use last found the key's next use
PART, RESIDENT, INFLIGHT, PINNED, PF_UNUSED, PROT, SLOT, PREV, NEXT, LISTED, COUNT, SEQ, LAST, NU, CURSOR = range(15)
# m rows by partition. CAP: slots; START: its first slot; USED: keys resident or in flight; NFREE: free slots,
# a stack at m[FREE, START .. START + NFREE]; HEAD/TAIL: least/most recently touched listed key, -1 if none
CAP, START, USED, NFREE, HEAD, TAIL = range(15, 21)
# m rows by slot. SLOT_KEY: the key in the slot, -1 if none; FREE: the free stacks
SLOT_KEY, FREE = range(21, 23)
CTR = 23  # m row of integer scalars:
# the first eight are CacheStats' fields, in its order
HITS, LATE, MISSES, INSERTS, PF_INSERTS, PF_USED, PF_WASTED, EVICTIONS = range(8)
CLOCK, EPOCH, NLOG, LOGGING, POLICY, KEEP_COUNTS, DEFER, HORIZON, O_KEYS, O_FUT = range(8, 18)
N_ROWS, N_CTR = 24, 18
# f rows: SCORE by key (lfru's score at the last touch); FP, float scalars: HALF_LIFE (lfru's h in
# layer-steps), WINDOW (two_level's window in layer-steps), TWO (the constant 2.0, see decayed)
SCORE, FP = range(2)
HALF_LIFE, WINDOW, TWO = range(3)
STATS_FIELDS = ("hits", "late_hits", "misses", "inserts", "prefetch_inserts", "prefetch_used", "prefetch_wasted",
                "evictions")


class CacheState(NamedTuple):
    m: np.ndarray  # int64 [N_ROWS, width]: the rows above
    f: np.ndarray  # float64 [2, width]
    s: np.ndarray  # int64: the stream and its future (kernels.keys.pack_stream), read only
    log: np.ndarray  # int64 [loads, 3]: (layer-step, key, evicted or -1) of each slot claimed, if logging

    @property
    def stats(self) -> dict[str, int]:
        """The cache's counters by ``CacheStats`` field name."""
        return dict(zip(STATS_FIELDS, self.m[CTR, :len(STATS_FIELDS)].tolist()))

    @property
    def loads(self) -> np.ndarray:
        """The load log so far, int64 [n, 3]."""
        return self.log[:self.m[CTR, NLOG]]

    def resident_slots(self) -> dict[int, int]:
        """Resident (or in-flight) key -> physical slot (``ExpertCache.slot_of``)."""
        keys = np.flatnonzero(self.m[RESIDENT])
        return dict(zip(keys.tolist(), self.m[SLOT, keys].tolist()))


def new_cache(policy: str, part_of: np.ndarray, capacity, stream: np.ndarray, *, pinned=(), keep_counts: bool = True,
              half_life_steps: float = 4.0, window_steps: float = 1.0, defer: bool = True, num_layers: int = 1,
              log_loads: bool = False) -> CacheState:
    """An empty cache over ``stream`` (:func:`replay_kernels.keys.pack_stream`, with the future for belady) with
    ``policy`` and its parameters as the Python policy's constructor takes them (``num_layers`` scales lfru's
    half-life and two_level's window to layer-steps as their ``reset`` does), ``pinned`` keys loaded first in
    ascending order (``ExpertCache.__init__``)."""
    part_of = np.asarray(part_of, dtype=np.int64)
    cap = np.asarray(list(capacity), dtype=np.int64)
    N, P, S = len(part_of), len(cap), int(cap.sum())
    n_ls, n_keys, o_fut = int(stream[0]), int(stream[1]), int(stream[2])
    if policy == "belady" and o_fut == len(stream):
        raise ValueError("new_cache: belady needs the stream's future (pack_stream(..., future=True))")
    m = np.zeros((N_ROWS, max(N, S, P, N_CTR)), dtype=np.int64)
    m[PART, :N] = part_of
    m[[SLOT, PREV, NEXT, NU, HEAD, TAIL, SLOT_KEY, FREE]] = -1
    m[CAP, :P] = cap
    np.cumsum(cap[:-1], out=m[START, 1:P])
    m[NFREE, :P] = cap
    for p in range(P):  # list(range(s + c - 1, s - 1, -1)): popped from the end, lowest slot first
        s0 = m[START, p]
        m[FREE, s0:s0 + cap[p]] = np.arange(s0 + cap[p] - 1, s0 - 1, -1)
    ctr = m[CTR]
    ctr[POLICY] = POLICY_CODES[policy]
    ctr[KEEP_COUNTS], ctr[DEFER], ctr[LOGGING] = int(keep_counts), int(defer), int(log_loads)
    ctr[HORIZON], ctr[O_KEYS], ctr[O_FUT] = n_ls, 3 + n_ls + 1, o_fut
    f = np.zeros((2, m.shape[1]))
    f[FP, :3] = float(half_life_steps) * max(1, num_layers), float(window_steps) * num_layers, 2.0
    for key in sorted(int(k) for k in pinned):
        p = int(part_of[key])
        if m[USED, p] >= cap[p]:
            raise ValueError(f"cache: pinned experts exceed the {cap[p]} slots of partition {p}")
        m[PINNED, key] = m[RESIDENT, key] = 1
        m[USED, p] += 1
        m[NFREE, p] -= 1
        slot = m[FREE, m[START, p] + m[NFREE, p]]
        m[SLOT, key], m[SLOT_KEY, slot] = slot, key
    return CacheState(m, f, stream, np.zeros((n_keys if log_loads else 0, 3), np.int64))


# ------------------------------------------------------------------------------------------ policy hooks
@inline
def _unlink(c, key):
    m = c.m
    p = m[PART, key]
    a = m[PREV, key]
    b = m[NEXT, key]
    if a >= 0:
        m[NEXT, a] = b
    else:
        m[HEAD, p] = b
    if b >= 0:
        m[PREV, b] = a
    else:
        m[TAIL, p] = a
    m[LISTED, key] = 0


@inline
def _append(c, key):
    m = c.m
    p = m[PART, key]
    t = m[TAIL, p]
    m[PREV, key] = t
    m[NEXT, key] = -1
    if t >= 0:
        m[NEXT, t] = key
    else:
        m[HEAD, p] = key
    m[TAIL, p] = key
    m[LISTED, key] = 1


@inline
def decayed(c, key, now):
    """lfru's score of ``key`` at ``now`` (0 if never touched). The base 2.0 is read from memory so the
    compiler cannot rewrite ``pow(2, x)`` as ``exp2(x)``, which may round differently from Python's ``**``."""
    if c.m[SEQ, key] == 0:
        return 0.0
    return c.f[SCORE, key] * math.pow(c.f[FP, TWO], -(now - c.m[LAST, key]) / c.f[FP, HALF_LIFE])


@inline
def _next_use(c, key, now):
    return next_use(c.s, c.m[CTR, O_FUT], key, now, c.m[CTR, HORIZON], c.m[CURSOR])


@inline
def _touch(c, key, now):
    m = c.m
    if m[CTR, POLICY] == LFRU:
        c.f[SCORE, key] = decayed(c, key, now) + 1.0
    else:  # lfu, two_level
        m[COUNT, key] += 1
    m[LAST, key] = now
    m[CTR, CLOCK] += 1
    m[SEQ, key] = m[CTR, CLOCK]


@inline
def on_hit(c, key, now):
    pol = c.m[CTR, POLICY]
    if pol == LRU or pol == STATIC:
        if c.m[LISTED, key] and c.m[TAIL, c.m[PART, key]] != key:  # move_to_end; pinned keys are not listed
            _unlink(c, key)
            _append(c, key)
    elif pol == BELADY:
        c.m[NU, key] = _next_use(c, key, now + 1)
    else:
        _touch(c, key, now)


@inline
def on_insert(c, key, now):
    pol = c.m[CTR, POLICY]
    if pol == LRU or pol == STATIC:
        if not c.m[PINNED, key]:
            if c.m[LISTED, key]:
                _unlink(c, key)
            _append(c, key)
    elif pol == BELADY:
        c.m[NU, key] = _next_use(c, key, now + 1)
    else:
        _touch(c, key, now)


@inline
def on_remove(c, key):
    pol = c.m[CTR, POLICY]
    if pol == LRU or pol == STATIC:
        if c.m[LISTED, key]:
            _unlink(c, key)
    elif pol == BELADY:
        c.m[NU, key] = -1
    elif pol == LFU and c.m[CTR, KEEP_COUNTS] == 0:
        c.m[COUNT, key] = 0


@inline
def candidate(c, key):
    """Resident (its partition is being scanned), and neither protected, in flight nor pinned."""
    m = c.m
    return m[PROT, key] != m[CTR, EPOCH] and not m[INFLIGHT, key] and not m[PINNED, key]


@inline
def _touched_before(m, k, other):
    """``k`` comes first in the order (last touch, key): the common tie-break."""
    return m[SEQ, k] < m[SEQ, other] or (m[SEQ, k] == m[SEQ, other] and k < other)


@inline
def victim(c, part, now):
    """The key the policy evicts from full partition ``part``, or -1 (none: the copy must wait)."""
    m = c.m
    pol = m[CTR, POLICY]
    if pol == LRU or pol == STATIC:
        k = m[HEAD, part]
        while k >= 0:
            if m[PROT, k] != m[CTR, EPOCH] and not m[INFLIGHT, k]:
                return k
            k = m[NEXT, k]
        return -1
    best = -1
    best_f = 0.0
    best_low = False
    lo = m[START, part]
    for slot in range(lo, lo + m[CAP, part]):
        k = m[SLOT_KEY, slot]
        if k < 0 or not candidate(c, k):
            continue
        f = decayed(c, k, now) if pol == LFRU else 0.0
        if best < 0:
            better = True
        elif pol == BELADY:  # farthest recorded next use, ties to the lowest key
            better = m[NU, k] > m[NU, best] or (m[NU, k] == m[NU, best] and k < best)
        elif pol == LFRU:
            better = f < best_f or (f == best_f and _touched_before(m, k, best))
        elif pol == TWO_LEVEL:  # low priority (last touched a window or more ago) first, then lfu's order
            low = not now - m[LAST, k] < c.f[FP, WINDOW]
            if low != best_low:
                better = low
            elif low and m[COUNT, k] != m[COUNT, best]:
                better = m[COUNT, k] < m[COUNT, best]
            else:
                better = _touched_before(m, k, best)
        else:  # lfu
            better = m[COUNT, k] < m[COUNT, best] or (m[COUNT, k] == m[COUNT, best] and _touched_before(m, k, best))
        if better:
            best = k
            best_f = f
            if pol == TWO_LEVEL:
                best_low = not now - m[LAST, k] < c.f[FP, WINDOW]
    if pol == BELADY and best >= 0 and m[CTR, DEFER] != 0 and now < m[CTR, HORIZON]:
        far = m[NU, best]
        o = m[CTR, O_KEYS]
        for j in range(o + c.s[3 + now], o + c.s[3 + now + 1]):
            k = c.s[j]
            if m[PART, k] == part and m[NU, k] >= 0 and not candidate(c, k) and m[NU, k] > far:
                return -1  # a key of this layer-step, not yet computed, is the better victim: wait for it
    return best


# ------------------------------------------------------------------------------------------ cache operations
@helper
def reserve(c, key, now, prefetch):
    """``ExpertCache.reserve``: a slot for ``key``; returns (ok, evicted key or -1). A reservation that fails
    changes nothing (no policy's victim choice has side effects), so until something else changes, every other
    key of that partition would fail too: the drivers skip those calls."""
    m = c.m
    if m[RESIDENT, key]:  # resident or in flight already
        return True, -1
    part = m[PART, key]
    ev = -1
    if m[USED, part] >= m[CAP, part]:
        ev = victim(c, part, now)
        if ev < 0:
            return False, -1
        m[RESIDENT, ev] = 0
        slot = m[SLOT, ev]
        m[SLOT, ev] = -1
        m[CTR, EVICTIONS] += 1
        if m[PF_UNUSED, ev]:
            m[PF_UNUSED, ev] = 0
            m[CTR, PF_WASTED] += 1
        on_remove(c, ev)
    else:
        m[NFREE, part] -= 1
        slot = m[FREE, m[START, part] + m[NFREE, part]]
        m[USED, part] += 1
    m[SLOT, key] = slot
    m[SLOT_KEY, slot] = key
    m[RESIDENT, key] = 1
    m[INFLIGHT, key] = 1
    m[CTR, INSERTS] += 1
    if prefetch:
        m[CTR, PF_INSERTS] += 1
        m[PF_UNUSED, key] = 1
    on_insert(c, key, now)
    if m[CTR, LOGGING] != 0:
        n = m[CTR, NLOG]
        c.log[n, 0] = now
        c.log[n, 1] = key
        c.log[n, 2] = ev
        m[CTR, NLOG] = n + 1
    return True, ev


@helper
def use_layer(c, keys, counts, a, b, now, hits, late, misses):
    """``ExpertCache.use_layer`` for the distinct keys ``keys[a:b]`` (use counts ``counts[a:b]``): touches the
    resident ones in order and counts the outcomes. Fills ``hits``/``late``/``misses`` with stream positions
    (indices into ``keys``); returns (hit keys, late keys, miss keys, hit uses, late uses, miss uses,
    prefetched keys used)."""
    m = c.m
    used = 0
    for j in range(a, b):
        k = keys[j]
        if m[PF_UNUSED, k]:
            m[PF_UNUSED, k] = 0
            used += 1
    nm = 0
    for j in range(a, b):
        k = keys[j]
        if m[RESIDENT, k]:
            on_hit(c, k, now)
        else:
            misses[nm] = j
            nm += 1
    nh = 0
    nl = 0
    h = 0
    lt = 0
    mu = 0
    for j in range(a, b):
        k = keys[j]
        if m[RESIDENT, k]:
            if m[INFLIGHT, k]:
                late[nl] = j
                nl += 1
                lt += counts[j]
            else:
                hits[nh] = j
                nh += 1
                h += counts[j]
    for i in range(nm):
        mu += counts[misses[i]]
    m[CTR, PF_USED] += used
    m[CTR, HITS] += h
    m[CTR, LATE] += lt
    m[CTR, MISSES] += mu
    return nh, nl, nm, h, lt, mu, used


@inline
def complete(c, key):
    c.m[INFLIGHT, key] = 0


@inline
def quiet(c, keys, a, b):
    """Every key of ``keys[a:b]`` resident, none in flight or an unused prefetch: a layer-step of hits only."""
    m = c.m
    for j in range(a, b):
        k = keys[j]
        if not m[RESIDENT, k] or m[INFLIGHT, k] or m[PF_UNUSED, k]:
            return False
    return True


@inline
def protect_row(c, keys, a, b):
    """The protected set becomes ``keys[a:b]`` (the runtime's ``protected = set(needed)``)."""
    m = c.m
    m[CTR, EPOCH] += 1
    e = m[CTR, EPOCH]
    for j in range(a, b):
        m[PROT, keys[j]] = e
