"""Policy interfaces shared by the simulator and the real executor.

Nothing here knows about SimPy or CUDA: a driver (``sim`` or ``executor``) owns time and copies, and calls
these objects at the same points in the same order. Time inside policies is a logical clock, the index of
the *layer-step* being computed (``step * num_layers + layer``), so decisions that do not depend on timing
are identical in both drivers.

Expert keys are flat ints unique across layers: ``key = layer_offsets[layer] + expert``.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


class PolicyConfigError(ValueError):
    """A policy was configured with values it cannot work with."""


# ---------------------------------------------------------------------------------------------- future index
class FutureIndex:
    """Perfect knowledge of the replay's future: for each key, the sorted layer-steps that use it.
    Belady and the oracle predictor read it; nothing else may."""

    def __init__(self, needed: list[np.ndarray]):
        # every (key, layer-step) pair, grouped by key in layer-step order (a stable sort: no loop per use)
        lens = np.fromiter(map(len, needed), dtype=np.int64, count=len(needed))
        keys = np.concatenate(needed).astype(np.int64, copy=False) if lens.sum() else np.zeros(0, np.int64)
        steps = np.repeat(np.arange(len(needed), dtype=np.int64), lens)
        small = keys.astype(np.int16) if len(keys) and keys.max() < 2**15 else keys  # numpy radix-sorts 16 bits
        order = np.argsort(small, kind="stable")
        keys, steps = keys[order], steps[order]
        cut = np.flatnonzero(keys[1:] != keys[:-1]) + 1
        starts, ends = np.r_[0, cut].tolist(), np.r_[cut, len(keys)].tolist()
        self._uses: dict[int, list[int]] = {int(keys[a]): steps[a:b].tolist() for a, b in zip(starts, ends) if b > a}
        self.needed = needed  # needed[t] = unique keys used at layer-step t
        self.horizon = len(needed)

    def next_use(self, key: int, now: int) -> int:
        """First layer-step >= now that uses ``key`` (``horizon`` if none)."""
        u = self._uses.get(key)
        if not u:
            return self.horizon
        i = bisect.bisect_left(u, now)
        return u[i] if i < len(u) else self.horizon


class FarthestNextUse:
    """The keys of one cache partition by next use, farthest first: the victim order of MIN-style rules
    (Belady, the perfect-foresight bounds) without scanning every resident key per eviction.

    ``touch(key, now)`` records that ``key`` is resident and was used (or loaded) at ``now``: its next use is
    the first one strictly after ``now``. Every use of a resident key must be touched, so a key's recorded next
    use is still ``next_use(key, now + 1)`` when a victim is chosen later. A lazy max-heap: a touch pushes an
    entry, ``remove`` forgets the key, and stale entries are dropped when they reach the top. Ties of next use
    go to the lowest key, or the highest with ``high_key_first``."""

    def __init__(self, future: FutureIndex, high_key_first: bool = False):
        self._future = future
        self._sign = -1 if high_key_first else 1
        self._next: dict[int, int] = {}  # resident key -> its next use
        self._heap: list[tuple[int, int, int]] = []  # (-next use, sign * key, key)

    def touch(self, key: int, now: int) -> None:
        nu = self._future.next_use(key, now + 1)
        if self._next.get(key) != nu:
            self._next[key] = nu
            heapq.heappush(self._heap, (-nu, self._sign * key, key))
            if len(self._heap) > 4 * len(self._next) + 64:  # mostly stale entries: rebuild
                self._heap = [(-n, self._sign * k, k) for k, n in self._next.items()]
                heapq.heapify(self._heap)

    def remove(self, key: int) -> None:
        self._next.pop(key, None)

    def next_of(self, key: int) -> int | None:
        """The recorded next use of a resident key (None if not resident)."""
        return self._next.get(key)

    def farthest(self, allowed: Callable[[int], bool]) -> int | None:
        """The resident key with the farthest next use among those ``allowed`` (None if none is)."""
        heap, nxt, skipped, found = self._heap, self._next, [], None
        while heap:
            neg, _, key = heap[0]
            if nxt.get(key) != -neg:  # stale: removed, or touched again since
                heapq.heappop(heap)
                continue
            if allowed(key):
                found = key
                break
            skipped.append(heapq.heappop(heap))  # resident but not a candidate now (protected, in flight)
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found


# ------------------------------------------------------------------------------------------------ contexts
@dataclass
class CacheContext:
    """What an eviction policy may know when a run starts."""

    num_experts: list[int]  # routed experts per layer
    partition_of: np.ndarray  # int [total_experts]: partition (cache region) of each key
    capacity: list[int]  # slots per partition
    future: FutureIndex | None = None  # only for clairvoyant policies (belady)
    popularity: np.ndarray | None = None  # float [total_experts]: use counts on the training split


@dataclass
class Observation:
    """What is known when layer ``layer`` of a step is about to compute."""

    layer_step: int  # logical clock: step * num_layers + layer
    step: int  # index of the batch step in the replay
    layer: int  # MoE layer about to compute
    tokens: np.ndarray  # trace token indices in this step's batch
    experts: np.ndarray  # int [B, K]: the experts those tokens actually use at ``layer`` (their router ran)
    token_ids: np.ndarray  # int [B]: input token ids (-1 where unknown)
    hidden: np.ndarray | None = None  # [B, H] input hidden state of ``layer``, where the trace has them
    seq_ids: np.ndarray | None = None  # int [B]: the sequence each token belongs to (for per-sequence history)


@dataclass
class PredictorContext:
    """What a predictor may know when a run starts."""

    num_experts: list[int]  # routed experts per layer
    top_k: int
    train: object | None = None  # traces.Trace of the training split (learned predictors fit on it)
    future: FutureIndex | None = None  # only for the oracle
    layer_offsets: np.ndarray | None = None  # to turn (layer, expert) into keys
    model_path: str = ""  # model the trace came from, for predictors that need its weights


@dataclass
class HorizonFeedback:
    """Measured after each layer computes; drives adaptive horizons."""

    layer_compute_s: float  # compute time of the layer just finished
    stall_s: float  # time that layer waited for experts
    bandwidth_bytes_per_s: float  # recent achieved copy bandwidth (0 if no copy finished yet)
    experts_needed: int  # distinct experts the layer used that needed a copy: demand loads + prefetched for it
    prefetch_hits: int  # of those, how many were resident/in flight thanks to a prefetch
    prefetch_issued: int  # prefetches issued since the last feedback
    prefetch_wasted: int  # prefetched experts evicted unused since the last feedback
    late_hits: int = 0  # needed experts still in flight when the layer wanted them
    misses: int = 0  # needed experts neither resident nor in flight (demand loads)
    predicted: int = 0  # experts the predictor named for this layer-step one layer-step ahead that needed a copy
    predicted_used: int = 0  # of those, how many this layer-step used (prefetched or not: known at distance 0 too)
    prefetch_harm: int = 0  # experts loaded again now that a prefetch evicted within the last 2 x L layer-steps


@dataclass
class HorizonContext:
    num_layers: int
    top_k: int
    expert_bytes: int
    batch_size: int
    num_experts: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- protocols
@runtime_checkable
class EvictionPolicy(Protocol):
    """Which resident expert to drop. Hooks in the style of libCacheSim: the cache calls them, the policy
    only keeps its own bookkeeping."""

    def reset(self, ctx: CacheContext) -> None: ...
    def on_hit(self, key: int, now: int) -> None: ...
    def on_insert(self, key: int, now: int) -> None: ...
    def on_remove(self, key: int) -> None: ...
    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        """Pick one key from ``candidates`` (resident, unprotected, in ``partition``); None = keep all."""
        ...

    def pinned(self) -> set[int]:
        """Keys loaded before the run and never evicted (static policies)."""
        ...

    # Optional, defined on the class: ``victim_skipping(partition, protected, inflight, now) -> int | None``,
    # the victim ``victim`` would pick from this partition's resident, unpinned keys not in ``protected`` nor
    # ``inflight`` (None: none found; the cache then falls back to ``victim``). Saves building the set.


@runtime_checkable
class Predictor(Protocol):
    def reset(self, ctx: PredictorContext) -> None: ...
    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        """Scores in [0, 1] over the experts of layer ``(obs.layer + ahead) % L`` (of the next step when it
        wraps): how likely this step's batch is to use each. Zeros = no opinion."""
        ...

    def observe(self, obs: Observation) -> None:
        """Feedback: the actual routing of ``obs.layer`` for this step."""
        ...

    # Optional, defined on the class, only by a predictor whose ``predict`` reads nothing but ``obs.layer``,
    # ``obs.layer_step`` and ``obs.experts`` and whose ``observe`` does nothing:
    # ``predict_steps(layer, ahead, experts, layer_steps) -> scores``, experts [N, B, K] and layer_steps [N] of N
    # observations at ``layer`` -> [N, E_target], row n equal (bit for bit) to ``predict`` of an observation
    # with ``experts[n]`` at ``layer_steps[n]``. The runtime then scores many steps in one call and builds no
    # Observation.
    # Optional class attribute ``never_predicts = True``: ``predict`` always scores zero and ``observe`` does
    # nothing (on-demand loading), so the runtime asks neither.
    # Optional class attribute ``clairvoyant = True``: the predictor reads the replay's FutureIndex (the oracle);
    # its prefetches are then admitted on the exact scale (policies/admission.py) and never speculative.


@runtime_checkable
class Horizon(Protocol):
    def reset(self, ctx: HorizonContext) -> None: ...
    def distance(self) -> int:
        """How many layers ahead to prefetch now (0 = no prefetch)."""
        ...

    def feedback(self, fb: HorizonFeedback) -> None: ...

    # Optional attribute: ``ignores_feedback = True`` when ``feedback`` does nothing (the runtime then does not
    # build the HorizonFeedback object every layer).


@dataclass
class Step:
    """One forward pass of the batch: which trace tokens it computes."""

    tokens: np.ndarray  # trace token indices
    phase: int  # traces.PHASE_PREFILL or PHASE_DECODE
    sequences: np.ndarray  # sequence ids in the batch (for latency accounting)


def steps_by_size(steps: list) -> list[tuple[int, list[int], np.ndarray]]:
    """The steps grouped by how many tokens they compute, for one numpy call per group: (tokens per step,
    the steps' indices in ``steps``, their token indices as an int [steps, tokens] array)."""
    by_size: dict[int, list[int]] = {}
    for i, st in enumerate(steps):
        by_size.setdefault(len(st.tokens), []).append(i)
    return [(ntok, idx, np.stack([np.asarray(steps[i].tokens, dtype=np.int64) for i in idx]).reshape(len(idx), ntok))
            for ntok, idx in by_size.items()]


@runtime_checkable
class Scheduler(Protocol):
    def plan(self, seq_id: np.ndarray, phase: np.ndarray, batch_size: int, routes: np.ndarray | None) -> list[Step]:
        """Order the trace's tokens into steps. ``routes`` [T, L, K] may be predicted routes (never the truth
        unless the caller is an oracle experiment)."""
        ...


def top_scores(scores: np.ndarray, limit: int, min_score: float) -> list[int]:
    """Experts to prefetch from a score vector: best first, at most ``limit``, score >= ``min_score`` (> 0)."""
    if limit <= 0:
        return []
    cand = np.flatnonzero(scores >= max(min_score, 1e-12))
    if cand.size == 0:
        return []
    order = cand[np.argsort(-scores[cand], kind="stable")]
    return order[:limit].tolist()


def top_scores_rows(scores: np.ndarray, limit: int, min_score: float, offset: int = 0) -> list[list[int]]:
    """``top_scores`` of every row of ``scores`` [N, E] at once, each chosen expert plus ``offset``.

    Same result row for row, without a stable sort of whole rows (the slow part): each row's ``limit`` best
    experts are those scoring above the ``limit``-th best score ``v`` plus the lowest-index ones scoring
    exactly ``v`` (the order ``top_scores``' stable sort gives ties); only those are then sorted, stably, by
    score; the experts scoring >= the threshold are a prefix of that order."""
    scores = np.asarray(scores, dtype=np.float64)
    n, e = scores.shape
    if limit <= 0 or n == 0:
        return [[] for _ in range(n)]
    if np.isnan(scores).any():  # NaN never passes the threshold; keep the plain definition for it
        return [[offset + x for x in top_scores(row, limit, min_score)] for row in scores]
    k = min(limit, e)
    if k < e:
        v = np.sort(scores, axis=1)[:, e - k:e - k + 1]  # the k-th best score of each row
        sel = scores >= v
        extra = np.flatnonzero(sel.sum(axis=1) > k)  # rows with ties at v beyond the k-th: keep the lowest index
        if extra.size:
            sub, vs = scores[extra], v[extra]
            tie = sub == vs
            need = k - (sub > vs).sum(axis=1, keepdims=True)
            sel[extra] = (sub > vs) | (tie & (np.cumsum(tie, axis=1) <= need))
        cols = (np.flatnonzero(sel) % e).reshape(n, k)  # k per row, ascending index
    else:
        cols = np.broadcast_to(np.arange(e), (n, e))
    best = np.take_along_axis(scores, cols, axis=1)
    order = np.argsort(-best, axis=1, kind="stable")
    cols = np.take_along_axis(cols, order, axis=1) + offset
    counts = (np.take_along_axis(best, order, axis=1) >= max(min_score, 1e-12)).sum(axis=1).tolist()
    return [row if c == k else row[:c] for row, c in zip(cols.tolist(), counts)]


def unique_keys(keys: Iterable[int]) -> list[int]:
    """Distinct keys in first-seen order (deterministic, unlike set iteration)."""
    return list(dict.fromkeys(keys))
