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
from .keys import layer_step_keys, pack_stream, stream_rows

HITS, LATE, MISSES, STARTED, DQ = range(5)  # rows of the scratch: stream positions, then keys


@helper
def _release_retry(c, w, dq_ends, now):
    """``release`` of a key already unprotected: waiting misses get slots in order while they can, then their
    copies land (all reserved first, then completed, as ``ondemand_replay`` completes the returned list)."""
    n = 0
    while dq_ends[1] > dq_ends[0]:
        k = w[DQ, dq_ends[0]]
        ok, _ = kc.reserve(c, k, now, False)
        if not ok:
            break
        dq_ends[0] += 1
        w[STARTED, n] = k
        n += 1
    for i in range(n):
        kc.complete(c, w[STARTED, i])


@jit(nrt=False)
def _decide_kernel(c, counts, num_layers, hits_l, orders, record, w, dq_ends, mark_at, mark):
    n_ls = c.s[0]
    ptr = c.s[3:3 + n_ls + 1]
    keys = c.s[3 + n_ls + 1:]
    for now in range(n_ls):
        if now == mark_at:  # the counters as this layer-step begins
            for q in range(len(mark)):
                mark[q] = c.m[kc.CTR, q]
        a = ptr[now]
        b = ptr[now + 1]
        if kc.quiet(c, keys, a, b):  # all hits: nothing to decide
            total = 0
            for j in range(a, b):
                kc.on_hit(c, keys[j], now)
                total += counts[j]
                if record:
                    orders[j] = keys[j]
            c.m[kc.CTR, kc.HITS] += total
            hits_l[now % num_layers] += total
            continue
        kc.protect_row(c, keys, a, b)
        nh, nl, nm, h, _, _, _ = kc.use_layer(c, keys, counts, a, b, now, w[HITS], w[LATE], w[MISSES])
        hits_l[now % num_layers] += h
        dq_ends[0] = 0
        dq_ends[1] = 0
        nd = 0
        full = -1  # a partition where a miss found no slot: the next ones there find none either (see reserve)
        for i in range(nm):
            k = keys[w[MISSES, i]]
            ok = False
            if c.m[kc.PART, k] != full:
                ok, _ = kc.reserve(c, k, now, False)
                if not ok:
                    full = c.m[kc.PART, k]
            if ok:
                w[STARTED, nd] = k
                nd += 1
            else:
                w[DQ, dq_ends[1]] = k
                dq_ends[1] += 1
        for i in range(nd):
            kc.complete(c, w[STARTED, i])
        o = a  # the compute order: hits, late hits, misses; each released after it computed
        for part in range(3):
            row = HITS if part == 0 else (LATE if part == 1 else MISSES)
            n = nh if part == 0 else (nl if part == 1 else nm)
            for i in range(n):
                k = keys[w[row, i]]
                if record:
                    orders[o] = k
                    o += 1
                c.m[kc.PROT, k] = 0  # release(k)
                if dq_ends[1] > dq_ends[0]:
                    _release_retry(c, w, dq_ends, now)


def decide(cache: kc.CacheState, counts, num_layers: int, record_orders: bool = False,
           mark_at: int = -1) -> tuple[np.ndarray, np.ndarray | None, dict[str, int] | None]:
    """Replay the cache's stream through it (updated in place; its load log if it logs). Returns the hit uses
    per layer (int64 [L]); with ``record_orders``, every layer-step's compute order over the stream's layout
    (``orders[ptr[i]:ptr[i + 1]]``; else None); with ``mark_at`` (a layer-step), the cache's counters
    (``CacheState.stats``) when that layer-step began (else None: the measured window's start,
    :mod:`replay.window`)."""
    ptr, keys = stream_rows(cache.s)
    hits_l = np.zeros(int(num_layers), np.int64)
    orders = np.zeros(len(keys) if record_orders else 0, np.int64)
    width = max(int(np.diff(ptr).max(initial=0)), 2)
    mark = np.zeros(len(kc.STATS_FIELDS), np.int64)
    mark_at = int(mark_at) if 0 <= mark_at < len(ptr) - 1 else -1
    _decide_kernel(cache, np.asarray(counts, np.int64), int(num_layers), hits_l, orders, bool(record_orders),
                   np.zeros((5, width), np.int64), np.zeros(2, np.int64), mark_at, mark)
    return (hits_l, orders if record_orders else None,
            dict(zip(kc.STATS_FIELDS, mark.tolist())) if mark_at >= 0 else None)


def min_loads(cache: kc.CacheState) -> list[tuple[int, int, int | None]]:
    """The load log as ``ExpertCache.load_log`` holds it: (layer-step, key, evicted key or None)."""
    return [(now, key, None if ev < 0 else ev) for now, key, ev in cache.loads.tolist()]


def hit_curves(experts: np.ndarray, num_experts: list[int], capacities, policies=("lru", "lfu", "belady"),
               steps: tuple[np.ndarray, np.ndarray] | None = None, **params) -> dict[str, np.ndarray]:
    """Hit uses per (capacity, layer), int64 [C, L], of each on-demand policy with per-layer caches of
    ``capacities`` slots, for ``experts`` int [T, L, K] replayed one token per step in trace order: the
    simulator's decisions (``sim.engine.replay`` at batch size 1 with no prefetch gives the same hits).
    ``steps``: ``(step_ptr, step_tokens)`` (:func:`replay_kernels.keys.steps_csr`) to replay in a scheduler's
    steps instead. ``params``: the policies' parameters (``keep_counts``, ``half_life_steps``, ``window_steps``,
    ``defer``)."""
    T, L, _ = experts.shape
    offsets = np.zeros(L, dtype=np.int64)
    np.cumsum(np.asarray(num_experts[:-1], dtype=np.int64), out=offsets[1:])
    num_keys = int(sum(num_experts))
    step_ptr, step_tokens = steps if steps is not None else (np.arange(T + 1), np.arange(T))
    ptr, keys, counts = layer_step_keys(experts, offsets, step_ptr, step_tokens, num_keys)
    stream = pack_stream(ptr, keys, num_keys if "belady" in policies else None)  # shared by every cache
    part_of = np.repeat(np.arange(L, dtype=np.int64), num_experts)
    out = {}
    for policy in policies:
        if policy == "static":
            raise ValueError("hit_curves: the static policy needs a training split's popularity (not a curve)")
        rows = [decide(kc.new_cache(policy, part_of, [int(cap)] * L, stream, num_layers=L, **params), counts, L)[0]
                for cap in capacities]
        out[policy] = np.array(rows, dtype=np.int64).reshape(len(rows), L)
    return out
