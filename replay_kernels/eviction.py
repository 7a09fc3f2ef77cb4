"""The eviction policies without ``on_predict``, compiled: their hooks (``on_hit``, ``on_insert``, ``on_remove``)
and victims, over a :class:`~replay_kernels.state.CacheState`.

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
"""

from __future__ import annotations

import math

from ._jit import inline
from .keys import next_use
from .state import (
    BELADY,
    CAP,
    CLOCK,
    COUNT,
    CTR,
    CURSOR,
    DEFER,
    EPOCH,
    FP,
    HALF_LIFE,
    HEAD,
    HORIZON,
    INFLIGHT,
    KEEP_COUNTS,
    LAST,
    LFRU,
    LFU,
    LISTED,
    LRU,
    NEXT,
    NU,
    O_FUT,
    O_KEYS,
    PART,
    PINNED,
    POLICY,
    PREV,
    PROT,
    SCORE,
    SEQ,
    SLOT_KEY,
    START,
    STATIC,
    TAIL,
    TWO,
    TWO_LEVEL,
    WINDOW,
)


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
