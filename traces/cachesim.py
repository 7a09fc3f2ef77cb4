"""Reference per-layer expert-cache simulations (LRU, LFU, Belady) on a routing trace.

Semantics (the reference others compare against; the tests check them against a brute-force loop):

- Every layer has its own cache of ``capacity`` slots; layers never share slots.
- Tokens are replayed in trace order (sequence after sequence). Nothing is reset between sequences: the
  trace is one continuous stream, like a server decoding the sequences one after another.
- For each token the layer's k experts are one request batch. An expert already resident is a hit (checked
  for the whole batch before anything is inserted). Misses are inserted in rank order. When the cache is
  full, the victim is a resident expert that is NOT among the current token's experts:

  * LRU: least recently used (last token that used it).
  * LFU: lowest use count since the start of the trace (counts survive eviction), ties -> least recently used.
  * Belady: farthest next use (``traces.schema.next_use_of``; never used again = farthest).

  Remaining ties go to the lowest expert id. If fewer slots are free or evictable than there are misses
  (capacity < k), the remaining lower-ranked misses are served without being cached.
- Hit rate = hits / accesses where each (token, layer, rank) is one access.

The simulation loops over tokens in Python and is vectorised over (capacity, layer) rows with numpy, so one
call simulates every capacity and layer at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .schema import Trace, TraceError, next_use_of

POLICIES = ("lru", "lfu", "belady")


def layer_next_use(experts: np.ndarray) -> np.ndarray:
    """int64 [T, L, K]: next token at which the same expert of the same layer is used again, else T."""
    T, L, K = experts.shape
    E = int(experts.max()) + 1 if experts.size else 1
    keys = experts.astype(np.int64) + (np.arange(L, dtype=np.int64) * E)[None, :, None]
    return next_use_of(keys.reshape(T, L * K), T).reshape(T, L, K)


def simulate_hits(
    experts: np.ndarray,
    capacities: Sequence[int],
    policy: str,
    next_use: np.ndarray | None = None,
    *,
    seq_id: np.ndarray | None = None,
    protect_current: bool = True,
) -> np.ndarray:
    """Hits per (capacity, layer): int64 [C, L], for ``experts`` int [T, L, K] replayed in order.

    ``next_use`` (int [T, L, K], only for Belady) defaults to :func:`layer_next_use`; pass
    ``Trace.next_use()`` to reuse a trace's cached one (same values: flat ids are unique per layer).

    Two variants exist only to reproduce published numbers (the default is the reference semantics above):
    ``seq_id`` given: every cache is emptied (and LFU counts cleared) at each sequence start, and Belady
    looks no further than the end of the sequence. ``protect_current=False``: all misses are inserted, then
    the cache is trimmed back to capacity by the policy over ALL residents, the current token's included
    (so Belady may decline to keep a current expert: the "oracle" of github.com/gajsanders/moe-trace)."""
    if policy not in POLICIES:
        raise TraceError(f"cache policy: expected one of {POLICIES}, got {policy!r}")
    experts = np.asarray(experts)
    T, L, K = experts.shape
    caps = np.asarray(list(capacities), dtype=np.int64)
    if caps.size == 0 or caps.min() < 1:
        raise TraceError(f"cache capacities: expected positive slot counts, got {list(capacities)}")
    C = caps.size
    E = int(experts.max()) + 1 if T else 1
    if policy == "belady" and next_use is None:
        next_use = layer_next_use(experts)
    starts = np.zeros(T, dtype=bool)
    if seq_id is not None:
        seq_id = np.asarray(seq_id)
        starts[1:] = seq_id[1:] != seq_id[:-1]
        if policy == "belady":  # a use in a later sequence is no use: the cache is emptied before it
            same = seq_id[np.minimum(next_use, T - 1)] == seq_id[:, None, None]
            next_use = np.where(same, next_use, T)

    R = C * L  # one row per (capacity, layer)
    rows = np.arange(R)[:, None]
    cap = np.repeat(caps, L)
    resident = np.zeros((R, E), dtype=bool)
    last_used = np.full((R, E), -1, dtype=np.int64)
    count = np.zeros((R, E), dtype=np.int64)
    next_at = np.zeros((R, E), dtype=np.int64)
    hits = np.zeros(R, dtype=np.int64)

    for t in range(T):
        if starts[t]:
            resident[:] = False
            last_used[:] = -1
            count[:] = 0
        ids = np.tile(experts[t].astype(np.int64), (C, 1))  # [R, K]
        hit = resident[rows, ids]  # [R, K], before this token's inserts
        hits += hit.sum(axis=1)
        if not protect_current:
            _update(t, ids, rows, last_used, count, next_at, next_use, C, policy)
            resident[rows, ids] = True
            n_evict = np.maximum(resident.sum(axis=1) - cap, 0)
            if n_evict.any():
                _evict(resident, resident, n_evict, policy, last_used, count, next_at, T, K)
            continue
        cur = np.zeros((R, E), dtype=bool)
        cur[rows, ids] = True
        miss = ~hit
        evictable = resident & ~cur
        room = cap - resident.sum(axis=1) + evictable.sum(axis=1)
        n_insert = np.minimum(miss.sum(axis=1), room)
        n_evict = np.maximum(resident.sum(axis=1) + n_insert - cap, 0)
        if n_evict.any():
            _evict(resident, evictable, n_evict, policy, last_used, count, next_at, T, K)
        insert = miss & (np.cumsum(miss, axis=1) <= n_insert[:, None])
        resident[rows, ids] |= insert
        _update(t, ids, rows, last_used, count, next_at, next_use, C, policy)
    return hits.reshape(C, L)


def _update(t, ids, rows, last_used, count, next_at, next_use, C, policy) -> None:
    """Record the use of the current token's experts ``ids`` [R, K] at token ``t``."""
    last_used[rows, ids] = t
    count[rows, ids] += 1
    if policy == "belady":
        next_at[rows, ids] = np.tile(next_use[t], (C, 1))


def _evict(resident, candidates, n_evict, policy, last_used, count, next_at, T, K) -> None:
    """Clear ``n_evict[r]`` lowest-priority ``candidates`` of each row r from ``resident`` (in place)."""
    E = resident.shape[1]
    if policy == "lru":
        prio = last_used
    elif policy == "lfu":
        prio = count * (T + 1) + last_used + 1
    else:  # belady: the farthest next use has the smallest key
        prio = T - next_at
    # Appending the expert id makes keys unique, so ties go to the lowest id whatever the sort algorithm.
    key = np.where(candidates, prio * E + np.arange(E, dtype=np.int64)[None, :], np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1)[:, :K]
    victim = np.arange(K)[None, :] < n_evict[:, None]
    resident[np.arange(resident.shape[0])[:, None], order] &= ~victim


def hit_rates(
    trace: Trace, capacities: Sequence[int], policies: Sequence[str] = POLICIES, moe_trace_semantics: bool = False
) -> dict[str, np.ndarray]:
    """Per-layer hit rates: {policy: float [C, L]} for the given slots-per-layer capacities.
    ``moe_trace_semantics``: caches emptied at each sequence start and Belady may evict the current token's
    experts (the published Qwen3 numbers' setting, see :func:`simulate_hits`); default: the reference semantics."""
    accesses = trace.num_tokens * trace.meta.top_k
    variant = dict(seq_id=trace.seq_id, protect_current=False) if moe_trace_semantics else {}
    out = {}
    for policy in policies:
        nu = trace.next_use() if policy == "belady" else None
        out[policy] = simulate_hits(trace.experts, capacities, policy, nu, **variant) / max(accesses, 1)
    return out
