"""Plain reference implementations of the eviction policies, for hit-for-hit checks.

Deliberately naive: lists, dicts and linear scans, sharing no code with ``policies/``. ``ref_replay``
replays a trace on demand with batch size 1 under the one documented cache semantics (the simulator's, which
``traces stats`` reports too: ``traces/cachesim.py``'s ``SEMANTICS`` and ``docs/architecture.md``):

- time ``now = token * L + layer``; the needed keys of a (token, layer) are its experts, first-seen order;
- every needed key is looked up first (a resident key is a hit and is touched, in needed order);
- then each miss gets a slot in order, evicting (if the partition is full) a resident key that is neither
  needed by this (token, layer) and not yet computed, nor pinned; if there is no such key the miss waits;
- keys are computed hits first, then misses; after each one, it stops being protected and waiting misses
  get slots in order while they can.

The policies (what a touch and a victim mean) are described in each ``policies/eviction`` module.
"""

from __future__ import annotations

import numpy as np

POLICIES = ("lru", "lfu", "lfru", "static", "belady")


def ref_replay(
    policy: str,
    experts: np.ndarray,
    num_experts: list[int],
    scope: str,
    capacity: list[int],
    popularity: np.ndarray | None = None,
    keep_counts: bool = True,
    half_life_steps: float = 4.0,
    pin_share: float | None = None,
    defer: bool = True,
) -> list[str]:
    """Outcome ('hit' / 'miss') of every distinct needed key, in order of lookup."""
    T, L, _ = experts.shape
    offsets = [sum(num_experts[:i]) for i in range(L)]

    def part(key):
        if scope == "global":
            return 0
        for layer in range(L - 1, -1, -1):
            if key >= offsets[layer]:
                return layer
        raise AssertionError(key)

    # every layer-step's needed keys, for Belady's look-ahead
    needed_at = []
    for t in range(T):
        for layer in range(L):
            keys = []
            for e in experts[t, layer]:
                k = offsets[layer] + int(e)
                if k not in keys:
                    keys.append(k)
            needed_at.append(keys)

    resident = [[] for _ in capacity]
    recency = []  # keys, least recently touched first
    count = {}
    score = {}
    last = {}
    h = half_life_steps * L

    pinned = []
    if policy == "static":
        for p in range(len(capacity)):
            keys = [k for k in range(sum(num_experts)) if part(k) == p]
            keys.sort(key=lambda k: (-popularity[k], k))
            n_pin = capacity[p] - 1 if pin_share is None else min(capacity[p] - 1, int(pin_share * capacity[p]))
            pinned += keys[: max(0, n_pin)]
        for k in sorted(pinned):
            resident[part(k)].append(k)

    def decayed(k, now):
        if k not in score:
            return 0.0
        return score[k] * 2.0 ** (-(now - last[k]) / h)

    def touch(k, now):
        if k in recency:
            recency.remove(k)
        recency.append(k)
        count[k] = count.get(k, 0) + 1
        score[k] = decayed(k, now) + 1.0
        last[k] = now

    def next_use(k, now):
        for t2 in range(now + 1, len(needed_at)):
            if k in needed_at[t2]:
                return t2
        return len(needed_at)

    def choose(cands, now):
        best = None
        for k in cands:
            if policy in ("lru", "static"):
                rank = (recency.index(k),)
            elif policy == "lfu":
                rank = (count.get(k, 0), recency.index(k), k)
            elif policy == "lfru":
                rank = (decayed(k, now), recency.index(k), k)
            else:  # belady: farthest next use, ties to the lowest key
                rank = (-next_use(k, now), k)
            if best is None or rank < best[0]:
                best = (rank, k)
        return best[1]

    def try_insert(k, now, protected):
        res = resident[part(k)]
        if len(res) >= capacity[part(k)]:
            cands = [r for r in res if r not in protected and r not in pinned]
            if not cands:
                return False
            v = choose(cands, now)
            if policy == "belady" and defer:  # wait for a current key, still protected, used later than v
                for h in needed_at[now]:
                    if h in res and h in protected and next_use(h, now) > next_use(v, now):
                        return False
            res.remove(v)
            if policy == "lfu" and not keep_counts:
                del count[v]
        res.append(k)
        touch(k, now)
        return True

    outcomes = []
    for now, needed in enumerate(needed_at):
        hits, misses = [], []
        for k in needed:
            if k in resident[part(k)]:
                outcomes.append("hit")
                hits.append(k)
                if k not in pinned:
                    touch(k, now)
            else:
                outcomes.append("miss")
                misses.append(k)
        protected = list(needed)
        waiting = []
        for k in misses:
            if not try_insert(k, now, protected):
                waiting.append(k)
        for k in hits + misses:
            protected.remove(k)
            while waiting and try_insert(waiting[0], now, protected):
                waiting.pop(0)
        assert not waiting
    return outcomes
