"""``policies.cache.ExpertCache``, compiled: claiming slots (``reserve``), looking a layer-step's experts up
(``use_layer``), copies landing, the protected set; over a :class:`~replay_kernels.state.CacheState`, with the
policies of :mod:`replay_kernels.eviction`. Every function does what the Python method of the same name does,
in the same order. The state's names are re-exported here: ``cache`` is what drivers import.
"""

from __future__ import annotations

from ._jit import helper, inline
from .eviction import on_hit, on_insert, on_remove, victim
from .state import *  # noqa: F403  (the state's names and new_cache, which the drivers use from here)
from .state import (
    CAP,
    CTR,
    EPOCH,
    EVICTIONS,
    FREE,
    HITS,
    INFLIGHT,
    INSERTS,
    LATE,
    LOGGING,
    MISSES,
    NFREE,
    NLOG,
    PART,
    PF_INSERTS,
    PF_UNUSED,
    PF_USED,
    PF_WASTED,
    PROT,
    RESIDENT,
    SLOT,
    SLOT_KEY,
    START,
    USED,
)


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
