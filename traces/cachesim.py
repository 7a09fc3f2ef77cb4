"""Cache hit rates of a routing trace: ``hit_rates`` (what ``traces stats`` reports) replays the trace through the
simulator's own policy objects, so its numbers are the simulator's; ``simulate_hits`` reproduces published
tables under their own semantics (for calibrating the synthetic generator against them).

``hit_rates``: the semantics (:data:`SEMANTICS`, also printed by ``traces stats --help``) are those of
``python -m sim`` with ``split.test_fraction=null batch_size=1 scheduler=fifo cache.scope=per_layer
cache.slots=C predictor=none`` and ``cache=lru|lfu|belady`` (``belady_hit_rate`` for Belady); the tests pin the
equality. It drives :class:`policies.cache.ExpertCache` with :mod:`policies.eviction`'s LRU, LFU and Belady
through the shared runtime on demand (:func:`policies.ondemand.ondemand_replay`), one replay per policy and
capacity (all layers at once: their caches are independent).

``simulate_hits`` is NOT the simulator's semantics: it is the rule of the published tables the calibration
targets (``traces/calibration.py``): for each token its k experts are one request batch; an expert already
resident is a hit (checked for the whole batch before anything is inserted); misses are inserted in rank order;
the victim is a resident expert that is not among the current token's experts (LRU: least recently used token,
LFU: lowest use count since the start, counts surviving eviction, ties least recently used; Belady: farthest
next use, ``traces.schema.next_use_of``); remaining ties go to the lowest expert id; with fewer free or
evictable slots than misses (capacity < k) the remaining lower-ranked misses are served without being cached.
Its two variants (``seq_id``: caches reset per sequence; ``protect_current=False``: Belady may drop a current
expert) reproduce moe-trace's published numbers. It is vectorised over (capacity, layer) rows with numpy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .schema import Trace, TraceError, next_use_of

POLICIES = ("lru", "lfu", "belady")

SEMANTICS = """\
Cache hit rates are the simulator's (python -m sim with split.test_fraction=null batch_size=1 scheduler=fifo
cache.scope=per_layer cache.slots=C predictor=none), computed with its own policy objects:
- every MoE layer has its own cache of C slots; nothing is reset between sequences: the trace is one
  continuous stream in file order, a sequence's prefill tokens forming one step, then one step per decode token;
- batching rule: a step's experts at a layer (a token's k experts) are looked up together. Each distinct
  expert is a hit if resident; all of them are protected while the misses get slots, in first-seen (rank)
  order; hits are touched first, then the misses as they are inserted (so among experts last used by the same
  token, the hits are the older ones, each group in rank order);
- LRU evicts the least recently touched expert; LFU the fewest touches since the start of the trace (counts
  survive eviction), ties to the least recently touched; Belady the farthest next use (in steps), ties to the
  lowest expert id, and a miss waits for a current expert used later than every other candidate to finish and
  then evicts it (sequential MIN);
- with fewer slots than a step needs, a miss waits until a computed expert of the step frees one;
- hit rate = hits / (token, expert) uses."""


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

    Two variants reproduce moe-trace's published numbers (the default is the published tables' rule of the
    module docstring):
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
    """Per-layer hit rates {policy: float [C, L]} at the given slots per layer, with the simulator's semantics
    (:data:`SEMANTICS`): :func:`hit_counts` over the (token, expert) uses of each layer.
    ``moe_trace_semantics``: instead the rule of the published Qwen3 tables the calibration fits (caches emptied
    at each sequence start, Belady may evict the current token's experts; :func:`simulate_hits`)."""
    uses = max(trace.num_tokens * trace.meta.top_k, 1)
    if moe_trace_semantics:
        out = {}
        for policy in policies:
            nu = trace.next_use() if policy == "belady" else None
            out[policy] = simulate_hits(trace.experts, capacities, policy, nu, seq_id=trace.seq_id,
                                        protect_current=False) / uses
        return out
    return {p: h / uses for p, h in hit_counts(trace, capacities, policies).items()}


def hit_counts(trace: Trace, capacities: Sequence[int], policies: Sequence[str] = POLICIES,
               compiled: bool | None = None) -> dict[str, np.ndarray]:
    """Per-layer hits {policy: int64 [C, L]} at the given slots per layer: the policy objects replayed on
    demand as the simulator replays them (:data:`SEMANTICS`), one replay per policy and capacity (a progress bar
    on a terminal). ``compiled`` (default: when numba is there): the same decisions by the compiled cache
    curves (:func:`replay_kernels.decide.hit_curves`, pinned equal in tests), about 10x faster."""
    from tqdm import tqdm

    import replay_kernels
    from policies.cache import ExpertCache, capacities_for, partitions_for
    from policies.eviction.belady import Belady
    from policies.eviction.lfu import LFU
    from policies.eviction.lru import LRU
    from policies.future import FutureIndex, step_keys
    from policies.horizons.fixed import FixedHorizon
    from policies.ondemand import ondemand_replay
    from policies.predictors.none import NoPredictor
    from policies.runtime import PolicyRuntime, RuntimeConfig, contexts
    from policies.schedulers.fifo import FIFOScheduler

    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise TraceError(f"cache policy: expected one of {POLICIES}, got {unknown[0]!r}")
    meta = trace.meta
    L, ne = meta.num_layers, list(meta.num_experts)
    caps = [int(c) for c in capacities]
    if any(not 1 <= c < min(ne) for c in caps):
        raise TraceError(f"cache capacities: expected slots per layer in 1..{min(ne) - 1}, got {caps}")
    steps = FIFOScheduler().plan(trace.seq_id, trace.phase, 1, None)
    if replay_kernels.available() if compiled is None else compiled:
        from replay_kernels.decide import hit_curves
        from replay_kernels.keys import steps_csr

        return hit_curves(trace.experts, ne, caps, tuple(policies), steps=steps_csr(steps))
    needed, uses = step_keys(trace, steps, meta.layer_offsets)
    future = FutureIndex(needed)
    part = partitions_for(ne, "per_layer")
    rcfg = RuntimeConfig(L, ne, meta.expert_bytes)
    make = {"lru": LRU, "lfu": LFU, "belady": Belady}
    out = {p: np.zeros((len(caps), L), dtype=np.int64) for p in policies}
    work = [(p, i, c) for p in policies for i, c in enumerate(caps)]
    for policy, i, c in tqdm(work, desc="hit rates (policy x capacity)", disable=None, leave=False):
        cctx, _, _ = contexts(ne, part, capacities_for(ne, "per_layer", c, None), meta.top_k, meta.expert_bytes, 1,
                              future)
        rt = PolicyRuntime(ExpertCache(make[policy](), cctx), NoPredictor(), FixedHorizon(0), rcfg, trace.experts,
                           trace.token_id)
        hits = [0] * L
        ondemand_replay(steps, rt, layer_hits=hits, uses=uses)
        out[policy][i] = hits
    return out
