"""The on-demand cache decisions without time: ``sim.bounds.ondemand_replay``, compiled.

Per layer-step: the layer's keys become the protected set, they are looked up (resident ones touched, in
order), each miss claims a slot or waits (deferred), the claimed copies land at once, then the keys are
computed in order (hits, then misses) and released one by one, each release letting waiting misses retry
in order. With Belady this is MIN (its hit rate, its loads in order: the load log, and each layer-step's
compute order, which the conservative schedule follows); with any policy at one token per step, the cache
curves of ``traces stats`` (:func:`hit_curves`): the simulator's decisions, which do not depend on time for
an on-demand cache.
"""

from __future__ import annotations

import numpy as np

from . import cache as kc
from ._jit import helper, jit
from .keys import layer_step_keys, pack_future


@helper
def _release_retry(c, dq, dq_state, now, started):
    """``release`` of a key already unprotected: waiting misses get slots in order while they can, then their
    copies land (all reserved first, then completed, as ``ondemand_replay`` completes the returned list)."""
    n = 0
    while dq_state[1] > dq_state[0]:
        k = dq[dq_state[0]]
        ok, _ = kc.reserve(c, k, now, False)
        if not ok:
            break
        dq_state[0] += 1
        started[n] = k
        n += 1
    for i in range(n):
        kc.complete(c, started[i])


@jit
def _decide_kernel(ptr, keys, counts, num_layers, c, hits_l, orders, record):
    width = 1
    for i in range(len(ptr) - 1):
        width = max(width, ptr[i + 1] - ptr[i])
    hits = np.empty(width, np.int64)
    late = np.empty(width, np.int64)
    misses = np.empty(width, np.int64)
    started = np.empty(width, np.int64)
    dq = np.empty(width, np.int64)
    dq_state = np.zeros(2, np.int64)
    for now in range(len(ptr) - 1):
        a = ptr[now]
        b = ptr[now + 1]
        kc.protect_row(c, keys, a, b)
        total = 0
        for j in range(a, b):
            total += counts[j]
        nh, nl, nm, h, _, _, _ = kc.use_layer(c, keys, counts, a, b, now, total == b - a, hits, late, misses)
        hits_l[now % num_layers] += h
        dq_state[0] = 0
        dq_state[1] = 0
        nd = 0
        for i in range(nm):
            k = keys[misses[i]]
            ok, _ = kc.reserve(c, k, now, False)
            if ok:
                started[nd] = k
                nd += 1
            else:
                dq[dq_state[1]] = k
                dq_state[1] += 1
        for i in range(nd):
            kc.complete(c, started[i])
        o = a  # the compute order: hits, late hits, misses
        for part in range(3):
            buf = hits if part == 0 else (late if part == 1 else misses)
            n = nh if part == 0 else (nl if part == 1 else nm)
            for i in range(n):
                k = keys[buf[i]]
                if record:
                    orders[o] = k
                    o += 1
                c.kf[kc.PROT, k] = 0  # release(k)
                _release_retry(c, dq, dq_state, now, started)


def decide(ptr, keys, counts, num_layers: int, cache: kc.CacheState, record_orders: bool = False):
    """Replay the stream through ``cache`` (updated in place; its load log if it logs). Returns the hit uses per
    layer (int64 [L]) and, with ``record_orders``, every layer-step's compute order over the stream's layout
    (``orders[ptr[i]:ptr[i + 1]]``; else None)."""
    keys = np.asarray(keys, np.int64)
    hits_l = np.zeros(int(num_layers), np.int64)
    orders = np.zeros(len(keys) if record_orders else 0, np.int64)
    _decide_kernel(np.asarray(ptr, np.int64), keys, np.asarray(counts, np.int64), int(num_layers), cache, hits_l,
                   orders, bool(record_orders))
    return hits_l, (orders if record_orders else None)


def min_loads(cache: kc.CacheState) -> list[tuple[int, int, int | None]]:
    """The load log as ``ExpertCache.load_log`` holds it: (layer-step, key, evicted key or None)."""
    log = cache.log[:cache.ctr[kc.NLOG]].tolist()
    return [(now, key, None if ev < 0 else ev) for now, key, ev in log]


def hit_curves(experts: np.ndarray, num_experts: list[int], capacities, policies=("lru", "lfu", "belady"),
               **params) -> dict[str, np.ndarray]:
    """Hit uses per (capacity, layer), int64 [C, L], of each on-demand policy with per-layer caches of
    ``capacities`` slots, for ``experts`` int [T, L, K] replayed one token per step in trace order: the
    simulator's decisions (``sim.engine.replay`` at batch size 1 with no prefetch gives the same hits).
    ``params``: the policies' parameters (``keep_counts``, ``half_life_steps``, ``window_steps``, ``defer``)."""
    T, L, _ = experts.shape
    offsets = np.zeros(L, dtype=np.int64)
    np.cumsum(np.asarray(num_experts[:-1], dtype=np.int64), out=offsets[1:])
    num_keys = int(sum(num_experts))
    ptr, keys, counts = layer_step_keys(experts, offsets, np.arange(T + 1), np.arange(T), num_keys)
    part_of = np.repeat(np.arange(L, dtype=np.int64), num_experts)
    fut = pack_future(ptr, keys, num_keys) if "belady" in policies else None
    out = {}
    for policy in policies:
        if policy == "static":
            raise ValueError("hit_curves: the static policy needs a training split's popularity (not a curve)")
        rows = []
        for cap in capacities:
            cache = kc.new_cache(policy, part_of, [int(cap)] * L, ptr, keys, fut, num_layers=L, **params)
            rows.append(decide(ptr, keys, counts, L, cache)[0])
        out[policy] = np.array(rows, dtype=np.int64).reshape(len(rows), L)
    return out
