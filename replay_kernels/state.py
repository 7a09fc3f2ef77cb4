"""The state of one compiled cache (see :mod:`replay_kernels.cache`).

Layout. One cache is a :class:`CacheState` of four arrays, so that a compiled call passes four array
descriptors rather than one per field (with thirty fields, calls and compile times were several times
longer): ``m``, int64 rows of one width (at least the number of keys), a row per per-key field (indexed by
key), per-partition field (by partition), per-slot field (by slot), and the ``CTR`` row of integer scalars;
``f``, the float rows; ``s``, the read-only stream (:func:`replay_kernels.keys.pack_stream`), which caches over the
same stream may share; ``log``, the loads claimed, when logging.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

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
