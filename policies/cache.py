"""The fast-memory residency container that the simulator and the executor both drive.

It knows which expert keys are resident or in flight, which partition (cache region) each key belongs to
and how many slots each partition has. The *eviction policy* (one module per policy) only chooses victims
through hooks. The driver decides what is protected (experts the current layer still needs).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .base import CacheContext, EvictionPolicy, PolicyConfigError


@dataclass
class CacheStats:
    hits: int = 0  # uses whose expert was resident
    late_hits: int = 0  # uses whose expert was still in flight (partial stall)
    misses: int = 0  # uses whose expert was neither (demand load)
    inserts: int = 0  # slots filled (demand + prefetch)
    prefetch_inserts: int = 0  # slots filled by prefetches
    prefetch_used: int = 0  # prefetched experts used before eviction
    prefetch_wasted: int = 0  # prefetched experts evicted unused
    evictions: int = 0


def partitions_for(num_experts: list[int], scope: str) -> np.ndarray:
    """Partition id per flat key: one per layer (``per_layer``) or a single shared one (``global``)."""
    if scope == "per_layer":
        return np.repeat(np.arange(len(num_experts)), num_experts)
    if scope == "global":
        return np.zeros(sum(num_experts), dtype=np.int64)
    raise PolicyConfigError(f"cache.scope: expected 'per_layer' or 'global', got {scope!r}")


def capacities_for(num_experts: list[int], scope: str, slots: int | None, fraction: float | None) -> list[int]:
    """Slots per partition from either ``slots`` (per layer, or total when global) or ``fraction`` of all
    experts. Capacity 0, or as many slots as experts (nothing to decide), is a configuration error."""
    if (slots is None) == (fraction is None):
        raise PolicyConfigError("cache: set exactly one of cache.slots or cache.fraction")
    sizes = list(num_experts) if scope == "per_layer" else [sum(num_experts)]
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 < float(fraction) < 1.0:
            raise PolicyConfigError(f"cache.fraction: expected a number in (0, 1), got {fraction!r}")
        caps = [max(1, int(round(n * float(fraction)))) for n in sizes]
    else:
        if isinstance(slots, bool) or not isinstance(slots, numbers.Integral):  # 2.5 slots would silently become 2
            raise PolicyConfigError(f"cache.slots: expected a whole number of slots, got {slots!r}")
        caps = [int(slots)] * len(sizes)
    for n, c in zip(sizes, caps):
        if not 1 <= c < n:
            what = "per layer" if scope == "per_layer" else "in total"
            raise PolicyConfigError(
                f"cache capacity: {c} slots {what} is out of range; expected 1..{n - 1} "
                f"(0 holds nothing, {n} or more holds every expert)"
            )
    return caps


class ExpertCache:
    """Residency of expert keys across partitions, with an eviction policy deciding victims."""

    def __init__(self, policy: EvictionPolicy, ctx: CacheContext):
        self.policy = policy
        self.ctx = ctx
        self.partition_of = ctx.partition_of
        self._part: list[int] = np.asarray(ctx.partition_of).tolist()  # int indexing of a list is ~10x numpy's
        self.capacity = list(ctx.capacity)
        self.resident: list[set[int]] = [set() for _ in self.capacity]
        self.present: set[int] = set()  # union of ``resident`` (so one lookup answers "resident or in flight")
        # Physical slot of every resident/in-flight key: the executor copies into it, the simulator ignores it.
        starts = np.concatenate([[0], np.cumsum(self.capacity)[:-1]]).astype(int)
        self.free_slots: list[list[int]] = [list(range(s + c - 1, s - 1, -1)) for s, c in zip(starts, self.capacity)]
        self.slot_of: dict[int, int] = {}
        self.inflight: set[int] = set()
        self.prefetched_unused: set[int] = set()
        self.stats = CacheStats()
        self.load_log: list[tuple[int, int, int | None]] | None = None  # (now, key, evicted) if set to a list
        # A policy class with ``has_victim_skipping`` picks victims without the candidate set (LRU, static).
        self.skips_candidates = type(policy).has_victim_skipping
        policy.reset(ctx)
        for key in sorted(policy.pinned()):
            part = int(self.partition_of[key])
            if len(self.resident[part]) >= self.capacity[part]:
                raise PolicyConfigError(f"cache: pinned experts exceed the {self.capacity[part]} slots of partition {part}")
            self.resident[part].add(key)
            self.present.add(key)
            self.slot_of[key] = self.free_slots[part].pop()

    # -------------------------------------------------------------------------------------- queries
    def is_resident(self, key: int) -> bool:
        return key in self.present

    def is_inflight(self, key: int) -> bool:
        return key in self.inflight

    def used(self, part: int) -> int:
        return len(self.resident[part])

    # ------------------------------------------------------------------------------------- decisions
    def use(self, key: int, now: int) -> str:
        """Record one use of ``key`` at layer-step ``now``; returns 'hit', 'late' (in flight) or 'miss'."""
        if key in self.prefetched_unused:
            self.prefetched_unused.discard(key)
            self.stats.prefetch_used += 1
        if key in self.inflight:
            self.stats.late_hits += 1
            self.policy.on_hit(key, now)
            return "late"
        if self.is_resident(key):
            self.stats.hits += 1
            self.policy.on_hit(key, now)
            return "hit"
        self.stats.misses += 1
        return "miss"

    def use_layer(self, keys: list[int], uses: dict[int, int], now: int, once: bool | None = None):
        """``use`` + ``count_repeat_use`` for each distinct key of a layer-step, in order, in one call: the
        same hooks in the same order and the same counts, with C-level set operations instead of a Python loop
        per key. ``once``: every key has one use (the caller may know; None: counted here). Returns (hit keys,
        late keys, miss keys, (hit, late, miss) use counts, how many keys were prefetched and not used before)."""
        pu, inflight, present = self.prefetched_unused, self.inflight, self.present
        used = 0
        if pu and not pu.isdisjoint(keys):
            was = pu.intersection(keys)
            used = len(was)
            pu -= was
        # resident or in flight: a hit or a late hit (the superset test is the common all-hit case in C)
        if present.issuperset(keys):
            touched, misses = keys, []
        else:
            touched = [k for k in keys if k in present]
            misses = [k for k in keys if k not in present]
        self.policy.on_hits(touched, now)
        if inflight.isdisjoint(touched):
            late, hits = [], touched
        else:
            late = [k for k in touched if k in inflight]
            hits = [k for k in touched if k not in inflight]
        if once is None:
            once = sum(uses.values()) == len(keys)  # every key used once (always at batch size 1)
        if once:
            counts = (len(hits), len(late), len(misses))
        else:
            counts = (sum(uses[k] for k in hits), sum(uses[k] for k in late), sum(uses[k] for k in misses))
        st = self.stats
        st.prefetch_used += used
        st.hits += counts[0]
        st.late_hits += counts[1]
        st.misses += counts[2]
        return hits, late, misses, counts, used

    def count_repeat_use(self, outcome: str, n: int = 1) -> None:
        """``n`` extra uses of an expert by more tokens of the same layer-step count with the first use's outcome."""
        if outcome == "hit":
            self.stats.hits += n
        elif outcome == "late":
            self.stats.late_hits += n
        else:
            self.stats.misses += n

    def reserve(self, key: int, now: int, protected: set[int], prefetch: bool = False,
                admit: Callable[[int], bool] | None = None) -> tuple[bool, int | None]:
        """Claim a slot for ``key`` (a copy is about to start). Returns (ok, evicted key or None).
        Not ok when the partition is full of protected, pinned or in-flight keys (the copy must wait or drop), or
        when ``admit`` (given: the admission rule of a prefetch, :mod:`policies.admission`) refuses the victim the
        eviction policy chose; then nothing changes."""
        part = self._part[key]
        res = self.resident[part]
        inflight = self.inflight
        if key in res or key in inflight:
            return True, None
        evicted = None
        if len(res) >= self.capacity[part]:
            if self.skips_candidates:
                evicted = self.policy.victim_skipping(part, protected, inflight, now)
                if evicted is not None and (evicted not in res or evicted in protected or evicted in inflight):
                    raise RuntimeError(f"{type(self.policy).__name__}.victim_skipping returned {evicted}, not a candidate")
            if evicted is None:  # no fast pick: build the candidates (an empty set means the copy must wait)
                candidates = res - protected - inflight - self.policy.pinned()
                if not candidates:
                    return False, None
                evicted = self.policy.victim(part, candidates, now)
                if evicted is None:
                    return False, None
                if evicted not in candidates:
                    raise RuntimeError(f"{type(self.policy).__name__}.victim returned {evicted}, not a candidate")
            if admit is not None and not admit(evicted):
                return False, None
        self._take(key, part, now, evicted, prefetch)
        return True, evicted

    def reserve_as(self, key: int, now: int, protected: set[int], victim: int | None,
                   prefetch: bool = False) -> bool:
        """Claim a slot for ``key`` in the place of ``victim`` (a load planned ahead, :mod:`policies.clairvoyant`:
        the eviction policy's own choice in an earlier replay), or in a free slot when ``victim`` is None. Not ok
        (nothing changes) when ``victim`` is not resident or is protected, pinned or in flight, or when None is
        given and the partition is full."""
        part = self._part[key]
        res = self.resident[part]
        if key in res or key in self.inflight:
            return True
        if victim is None:
            if len(res) >= self.capacity[part]:
                return False
        elif (victim not in res or victim in protected or victim in self.inflight or victim in self.policy.pinned()
              or self._part[victim] != part):
            return False
        self._take(key, part, now, victim, prefetch)
        return True

    def _take(self, key: int, part: int, now: int, evicted: int | None, prefetch: bool) -> None:
        """``key`` takes ``evicted``'s slot (a free one if None) and its copy starts."""
        res = self.resident[part]
        stats = self.stats
        if evicted is not None:
            # remove the victim (inline: this runs once per eviction, the cache's most frequent change); the key
            # takes its slot (what freeing it and popping the free list, last in first out, would give)
            res.discard(evicted)
            self.present.discard(evicted)
            self.slot_of[key] = self.slot_of.pop(evicted)
            stats.evictions += 1
            if evicted in self.prefetched_unused:
                self.prefetched_unused.discard(evicted)
                stats.prefetch_wasted += 1
            self.policy.on_remove(evicted)
        else:
            self.slot_of[key] = self.free_slots[part].pop()
        res.add(key)
        self.present.add(key)
        self.inflight.add(key)
        stats.inserts += 1
        if prefetch:
            stats.prefetch_inserts += 1
            self.prefetched_unused.add(key)
        self.policy.on_insert(key, now)
        if self.load_log is not None:
            self.load_log.append((now, key, evicted))

    def complete(self, key: int) -> None:
        """The copy of ``key`` finished: it is now usable."""
        self.inflight.discard(key)

    def cancel(self, key: int) -> None:
        """A queued prefetch is dropped before its copy started: give the slot back."""
        self.inflight.discard(key)
        self.prefetched_unused.discard(key)
        self.stats.prefetch_inserts -= 1
        self.stats.inserts -= 1
        part = self._part[key]
        self.resident[part].discard(key)
        self.present.discard(key)
        self.free_slots[part].append(self.slot_of.pop(key))
        self.policy.on_remove(key)
