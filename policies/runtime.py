"""The decision loop that the simulator and the real executor share.

A driver owns time and copies; at the same points of every layer it calls :class:`PolicyRuntime`, which asks
the cache, predictor and horizon what to do. Decisions use the logical clock ``now = step * L + layer``, so
every decision that does not depend on timing (all of them for on-demand caches) is identical whichever
driver runs it.

Per layer of a step the driver does:

1. ``plan = runtime.begin_layer(step_index, layer, tokens)``: the router of that layer has run, so the
   needed experts are known. ``plan.needed`` lists them (keys, with use counts), ``plan.demand`` the keys
   whose copy must start now at high priority, ``plan.prefetch`` the keys to copy at low priority for
   later layers (slots are reserved at decision time, so an in-flight key already holds its slot).
2. It computes the needed experts in ``plan.order`` (resident ones first, so loads overlap compute), waiting
   for each one's copy; after computing one it calls ``runtime.release(key)``, which may return more demand
   keys that could not get a slot before (the layer needs more experts than its partition holds).
3. ``runtime.end_layer(feedback)`` hands the measured stall/bandwidth to the horizon.
A queued prefetch whose copy has not started may be cancelled with ``runtime.cancel(key)``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .base import (
    CacheContext,
    FutureIndex,
    Horizon,
    HorizonContext,
    HorizonFeedback,
    Observation,
    Predictor,
    PredictorContext,
    top_scores,
)
from .cache import ExpertCache


@dataclass
class LayerPlan:
    layer_step: int  # logical clock of this layer
    needed: list[int]  # distinct keys the layer uses, first-seen order
    uses: dict[int, int]  # key -> number of (token, expert) uses in this layer-step
    outcome: dict[int, str]  # key -> 'hit' | 'late' | 'miss' as first seen
    order: list[int]  # compute order: resident keys first, then in-flight, then demand loads
    demand: list[int]  # keys whose demand copy starts now (slot reserved)
    prefetch: list[tuple[int, int]] = field(default_factory=list)  # (key, target layer-step), slot reserved
    evicted: list[int] = field(default_factory=list)  # keys evicted by this layer's decisions


@dataclass
class RuntimeConfig:
    num_layers: int  # MoE layers
    num_experts: list[int]  # routed experts per layer
    expert_bytes: int  # bytes of one expert copy
    min_score: float = 0.05  # predictor scores below this are not prefetched
    max_per_layer: int | None = None  # prefetch at most this many per target layer (None: min(k x batch, slots))


class PolicyRuntime:
    """Cache + predictor + horizon, driven layer by layer. See the module docstring for the protocol."""

    def __init__(
        self,
        cache: ExpertCache,
        predictor: Predictor,
        horizon: Horizon,
        cfg: RuntimeConfig,
        experts: np.ndarray,
        token_ids: np.ndarray,
        hidden=None,
        seq_id: np.ndarray | None = None,
    ):
        self.cache = cache
        self.predictor = predictor
        self.horizon = horizon
        self.cfg = cfg
        self.experts = experts  # int [T, L, K] routed experts of the replayed trace
        self.token_ids = token_ids
        self.hidden = hidden  # lazily indexed [T, L, H] array or None
        self.seq_id = seq_id  # int [T] sequence of each token, or None
        self.offsets = np.concatenate([[0], np.cumsum(cfg.num_experts)[:-1]]).astype(np.int64)
        self.protected: set[int] = set()
        self.deferred: deque[int] = deque()  # demand keys waiting for a slot
        self.now = -1
        self.prefetch_issued = 0
        self._last_wasted = 0
        self._last_issued = 0
        self._prefetch_hits = 0
        self._on_predict = getattr(cache.policy, "on_predict", None)  # optional hook of the eviction policy

    def observation(self, step: int, layer: int, tokens: np.ndarray) -> Observation:
        hid = None
        if self.hidden is not None:
            hid = np.asarray(self.hidden[tokens, layer], dtype=np.float32)
        return Observation(
            layer_step=step * self.cfg.num_layers + layer,
            step=step,
            layer=layer,
            tokens=tokens,
            experts=self.experts[tokens, layer],
            token_ids=self.token_ids[tokens],
            hidden=hid,
            seq_ids=None if self.seq_id is None else self.seq_id[tokens],
        )

    def begin_layer(
        self, step: int, layer: int, tokens: np.ndarray, max_layer_step: int, uses: dict[int, int] | None = None
    ) -> LayerPlan:
        """Decisions for one layer of a step. ``uses`` (key -> tokens using it) may be passed precomputed."""
        L = self.cfg.num_layers
        now = step * L + layer
        self.now = now
        cache = self.cache
        obs = self.observation(step, layer, tokens)
        if uses is None:
            uses = {}
            for k in (obs.experts.astype(np.int64) + self.offsets[layer]).ravel().tolist():
                uses[k] = uses.get(k, 0) + 1
        needed = list(uses)
        self.protected = set(needed)
        outcome: dict[int, str] = {}
        hits, late, misses = [], [], []
        self._prefetch_hits = 0
        for k in needed:
            was_prefetched = k in cache.prefetched_unused
            o = cache.use(k, now)
            if uses[k] > 1:
                cache.count_repeat_use(o, uses[k] - 1)
            outcome[k] = o
            if o == "hit":
                hits.append(k)
            elif o == "late":
                late.append(k)
            else:
                misses.append(k)
            if was_prefetched:
                self._prefetch_hits += 1
        plan = LayerPlan(now, needed, uses, outcome, hits + late, [], evicted=[])
        for k in misses:
            ok, ev = cache.reserve(k, now, self.protected)
            if ev is not None:
                plan.evicted.append(ev)
            if ok:
                plan.demand.append(k)
            else:
                self.deferred.append(k)
        plan.order += misses
        self.predictor.observe(obs)
        self._plan_prefetch(obs, plan, max_layer_step)
        return plan

    def _plan_prefetch(self, obs: Observation, plan: LayerPlan, max_layer_step: int) -> None:
        d = int(self.horizon.distance())
        L = self.cfg.num_layers
        cache = self.cache
        for ahead in range(1, d + 1):
            target_step = plan.layer_step + ahead
            if target_step > max_layer_step:
                break
            tl = (obs.layer + ahead) % L
            scores = self.predictor.predict(obs, ahead)
            base = int(self.offsets[tl])
            part = int(cache.partition_of[base])
            # default: no more than the batch can use (k per token), nor than the partition holds
            limit = self.cfg.max_per_layer or min(
                self.cfg.num_experts[tl], cache.capacity[part], self.experts.shape[2] * len(obs.tokens)
            )
            chosen = [base + e for e in top_scores(scores, limit, self.cfg.min_score)]
            if self._on_predict is not None:  # predictive caches (expertflow) keep predicted slots
                for key in chosen:
                    self._on_predict(key, target_step)
            # A prefetch must not evict what this layer still needs, another expert predicted for the same
            # target, or an earlier prefetch not yet used.
            keep = self.protected | set(chosen) | cache.prefetched_unused
            for key in chosen:
                if cache.is_resident(key) or cache.is_inflight(key):
                    continue
                ok, ev = cache.reserve(key, plan.layer_step, keep, prefetch=True)
                if not ok:
                    break
                if ev is not None:
                    plan.evicted.append(ev)
                plan.prefetch.append((key, target_step))
                self.prefetch_issued += 1

    def release(self, key: int) -> list[int]:
        """``key`` has been computed for this layer: unprotect it and hand out slots to deferred demands."""
        self.protected.discard(key)
        return self.retry_deferred()

    def retry_deferred(self) -> list[int]:
        """Reserve slots for deferred demand keys, in order, while slots can be had; returns those started."""
        started = []
        while self.deferred:
            k = self.deferred[0]
            ok, _ = self.cache.reserve(k, self.now, self.protected)
            if not ok:
                break
            self.deferred.popleft()
            started.append(k)
        return started

    def cancel(self, key: int) -> None:
        self.cache.cancel(key)
        self.prefetch_issued -= 1

    def end_layer(self, layer_compute_s: float, stall_s: float, bandwidth_bytes_per_s: float, plan: LayerPlan) -> None:
        st = self.cache.stats
        fb = HorizonFeedback(
            layer_compute_s=layer_compute_s,
            stall_s=stall_s,
            bandwidth_bytes_per_s=bandwidth_bytes_per_s,
            experts_needed=len(plan.needed),
            prefetch_hits=self._prefetch_hits,
            prefetch_issued=self.prefetch_issued - self._last_issued,
            prefetch_wasted=st.prefetch_wasted - self._last_wasted,
            late_hits=sum(1 for k in plan.needed if plan.outcome[k] == "late"),
        )
        self._last_issued = self.prefetch_issued
        self._last_wasted = st.prefetch_wasted
        self.horizon.feedback(fb)


def contexts(
    num_experts: list[int],
    partition_of: np.ndarray,
    capacity: list[int],
    top_k: int,
    expert_bytes: int,
    batch_size: int,
    future: FutureIndex,
    train=None,
    popularity: np.ndarray | None = None,
    model_path: str = "",
) -> tuple[CacheContext, PredictorContext, HorizonContext]:
    """Build the three policy contexts of a run (shared by sim and executor)."""
    offsets = np.concatenate([[0], np.cumsum(num_experts)[:-1]]).astype(np.int64)
    return (
        CacheContext(num_experts, partition_of, capacity, future=future, popularity=popularity),
        PredictorContext(num_experts, top_k, train=train, future=future, layer_offsets=offsets, model_path=model_path),
        HorizonContext(len(num_experts), top_k, expert_bytes, batch_size, list(num_experts)),
    )
