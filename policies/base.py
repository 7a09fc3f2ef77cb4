"""Policy interfaces shared by the simulator and the real executor.

Nothing here knows about SimPy or CUDA: a driver (``sim`` or ``executor``, through the loop in
``replay/driver.py``) owns time and copies, and calls these objects at the same points in the same order.
Every policy subclasses one of the base classes below (:class:`EvictionPolicy`, :class:`Predictor`,
:class:`Horizon`, :class:`Scheduler`), which declare its whole interface, optional capabilities included. Time inside policies is a logical clock, the index of
the *layer-step* being computed (``step * num_layers + layer``), so decisions that do not depend on timing
are identical in both drivers.

Expert keys are flat ints unique across layers: ``key = layer_offsets[layer] + expert``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .future import FutureIndex


class PolicyConfigError(ValueError):
    """A policy was configured with values it cannot work with."""


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


# ------------------------------------------------------------------------------------------- base classes
# Every policy subclasses one of these. The whole interface a driver may use is declared here: the required
# methods (abstract), and each optional capability as a class flag (False here: "not supported") next to the
# method it enables, whose default raises or does nothing. A driver tests the flag, never ``getattr``;
# ``tests/test_policies_contract.py`` checks that every configured policy's flags and methods agree.
class EvictionPolicy(ABC):
    """Which resident expert to drop. Hooks in the style of libCacheSim: the cache calls them, the policy
    only keeps its own bookkeeping."""

    #: ``victim_skipping`` is implemented: victims are picked without the candidate set being built.
    has_victim_skipping: ClassVar[bool] = False
    #: the runtime must call ``on_predict`` for every expert it decides to prefetch or keep (predictive caches).
    wants_predictions: ClassVar[bool] = False

    @abstractmethod
    def reset(self, ctx: CacheContext) -> None: ...

    @abstractmethod
    def on_hit(self, key: int, now: int) -> None:
        """``key`` (resident or in flight) is used at layer-step ``now``."""

    def on_hits(self, keys: list[int], now: int) -> None:
        """``on_hit`` for each of ``keys`` in order (one call per layer-step; a policy may do it faster)."""
        for k in keys:
            self.on_hit(k, now)

    @abstractmethod
    def on_insert(self, key: int, now: int) -> None:
        """``key`` got a slot at layer-step ``now`` (its copy starts: a demand load or a prefetch)."""

    @abstractmethod
    def on_remove(self, key: int) -> None:
        """``key`` left the cache (evicted, or its queued prefetch cancelled)."""

    @abstractmethod
    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        """Pick one key from ``candidates`` (resident, unprotected, in ``partition``); None = keep all."""

    def pinned(self) -> set[int]:
        """Keys loaded before the run and never evicted (static policies); none by default."""
        return set()

    def victim_skipping(self, partition: int, protected: set[int], inflight: set[int], now: int) -> int | None:
        """Only where ``has_victim_skipping``: the victim ``victim`` would pick from this partition's resident,
        unpinned keys not in ``protected`` nor ``inflight`` (None: none found; the cache then falls back to
        ``victim``). Saves building the candidate set."""
        raise NotImplementedError(f"{type(self).__name__} has no victim_skipping (has_victim_skipping is False)")

    def on_predict(self, key: int, target: int) -> None:
        """Only where ``wants_predictions``: the runtime predicts ``key`` to be used at layer-step ``target`` (it
        prefetches it, or it is already resident or in flight)."""
        raise NotImplementedError(f"{type(self).__name__} has no on_predict (wants_predictions is False)")

    def policy_stats(self) -> dict[str, int]:
        """Policy-specific counters for ``results.json`` (``policy_stats``); none by default."""
        return {}


class Predictor(ABC):
    """Scores, per later layer, how likely the current batch is to use each expert (prefetch candidates)."""

    #: ``predict`` always scores zero and ``observe`` does nothing (on-demand loading): the runtime asks neither.
    never_predicts: ClassVar[bool] = False
    #: ``predict_steps`` is implemented: ``predict`` reads nothing but ``obs.layer``, ``obs.layer_step`` and
    #: ``obs.experts`` and ``observe`` does nothing, so the runtime scores many steps per call, no Observation.
    stateless: ClassVar[bool] = False
    #: ``predict`` reads ``obs.hidden``: the driver loads the trace's hidden-state sidecar.
    needs_hidden: ClassVar[bool] = False
    #: ``reset`` learns from the training split's token ids (a trace without them cannot train it).
    needs_token_ids: ClassVar[bool] = False
    #: reads the replay's FutureIndex (the oracle): its prefetches are admitted on the exact scale
    #: (policies/admission.py), planned from the eviction policy's own loads, and never speculative.
    clairvoyant: ClassVar[bool] = False

    @abstractmethod
    def reset(self, ctx: PredictorContext) -> None: ...

    @abstractmethod
    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        """Scores in [0, 1] over the experts of layer ``(obs.layer + ahead) % L`` (of the next step when it
        wraps): how likely this step's batch is to use each. Zeros = no opinion."""

    @abstractmethod
    def observe(self, obs: Observation) -> None:
        """Feedback: the actual routing of ``obs.layer`` for this step."""

    def predict_steps(self, layer: int, ahead: int, experts: np.ndarray, layer_steps: np.ndarray) -> np.ndarray:
        """Only where ``stateless``: ``experts`` [N, B, K] and ``layer_steps`` [N] of N observations at ``layer``
        -> scores [N, E_target], row n equal (bit for bit) to ``predict`` of an observation with ``experts[n]``
        at ``layer_steps[n]``."""
        raise NotImplementedError(f"{type(self).__name__} has no predict_steps (stateless is False)")


class Horizon(ABC):
    """How many layers ahead to prefetch. ``min_distance <= distance() <= max_distance`` always; an instance
    sets both in its constructor (equal for a horizon that never changes its distance)."""

    min_distance: int
    max_distance: int
    #: ``feedback`` does nothing: the runtime does not build the HorizonFeedback object every layer.
    ignores_feedback: ClassVar[bool] = False

    @abstractmethod
    def reset(self, ctx: HorizonContext) -> None: ...

    @abstractmethod
    def distance(self) -> int:
        """How many layers ahead to prefetch now (0 = no prefetch)."""

    @abstractmethod
    def feedback(self, fb: HorizonFeedback) -> None:
        """What the layer just computed measured (see :class:`HorizonFeedback`)."""


class Scheduler(ABC):
    """How the trace's tokens are grouped into batch steps."""

    #: ``plan`` needs predicted routes: the driver passes them (``routes``; else None).
    needs_routes: ClassVar[bool] = False

    @abstractmethod
    def plan(self, seq_id: np.ndarray, phase: np.ndarray, batch_size: int, routes: np.ndarray | None) -> list[Step]:
        """Order the trace's tokens into steps. ``routes`` [T, L, K] may be predicted routes (never the truth
        unless the caller is an oracle experiment)."""

@dataclass
class Step:
    """One forward pass of the batch: which trace tokens it computes."""

    tokens: np.ndarray  # trace token indices
    phase: int  # traces.PHASE_PREFILL or PHASE_DECODE
    sequences: np.ndarray  # sequence ids in the batch (for latency accounting)


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
