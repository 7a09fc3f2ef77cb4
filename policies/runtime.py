"""The policy decisions every driver shares (the simulator, the trace executor and model mode all run them
through the one driver loop, ``replay/driver.py``).

A driver owns time and copies; at the same points of every layer it calls :class:`PolicyRuntime`, which asks
the cache, predictor and horizon what to do. Decisions use the logical clock ``now = step * L + layer``, so
every decision that does not depend on timing (all of them for on-demand caches) is identical whichever
driver runs it.

The protocol, per layer of a step:

0. (optional, once before the first layer) ``runtime.set_schedule(steps)``: the whole replay's steps, so a
   stateless predictor is scored a block of steps per call.
1. ``plan = runtime.begin_layer(step, layer, tokens, max_layer_step, uses=None) -> LayerPlan``: the router of
   that layer has run, so the needed experts are known (``tokens``: trace token indices of the step; ``uses``:
   key -> tokens using it, if precomputed; no prefetch targets a layer-step beyond ``max_layer_step``).
   ``plan.needed`` lists the keys (use counts in ``plan.uses``), ``plan.hits`` / ``plan.late`` /
   ``plan.misses`` their outcome, ``plan.demand`` the keys whose copy must start now at high priority,
   ``plan.prefetch`` the (key, target layer-step) to copy at low priority for later layers (slots are reserved
   at decision time, so an in-flight key already holds its slot), ``plan.order`` the compute order.
2. The driver computes the needed experts in ``plan.order`` (resident ones first, so loads overlap compute),
   waiting for each one's copy; a key in ``runtime.deferred`` has no slot yet: ``runtime.retry_deferred() ->
   list[int]`` hands out slots as copies land (start those copies). After computing a key it calls
   ``runtime.release(key) -> list[int]``, which may return deferred demand keys that got a slot (the layer
   needs more experts than its partition holds).
3. ``runtime.end_layer(layer_compute_s, stall_s, bandwidth_bytes_per_s, plan)`` hands the measured layer
   compute time, stall and recent copy bandwidth to the horizon.

A queued prefetch whose copy has not started may be dropped: ``runtime.cancel(key)`` gives its slot back.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

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
from .prefetch_table import PrefetchTable


class LayerPlan:
    """What the runtime decided for one layer-step (a plain class with slots: one is built per layer-step)."""

    __slots__ = ("layer_step", "needed", "uses", "hits", "late", "misses", "order", "demand", "prefetch", "evicted",
                 "use_counts", "_outcome")

    def __init__(self, layer_step: int, needed: list[int], uses: dict[int, int], hits: list[int], late: list[int],
                 misses: list[int], use_counts: tuple[int, int, int]):
        self.layer_step = layer_step  # logical clock of this layer
        self.needed = needed  # distinct keys the layer uses, first-seen order
        self.uses = uses  # key -> number of (token, expert) uses in this layer-step
        self.hits = hits  # needed keys resident when the layer wanted them
        self.late = late  # needed keys still in flight then (late hits)
        self.misses = misses  # needed keys neither: demand loads, started now (``demand``) or deferred
        # compute order: resident, then in flight, then demand loads (usually all hits: no copy then)
        self.order = hits + late + misses if late or misses else hits
        self.demand: list[int] = []  # keys whose demand copy starts now (slot reserved)
        self.prefetch: list[tuple[int, int]] = []  # (key, target layer-step), slot reserved
        self.evicted: list[int] = []  # keys evicted by this layer's decisions
        self.use_counts = use_counts  # (token, expert) uses that were hits, late hits, misses
        self._outcome: dict[int, str] | None = None

    @property
    def outcome(self) -> dict[int, str]:
        """key -> 'hit' | 'late' | 'miss' (built on first access: the simulator's loop does not need it)."""
        if self._outcome is None:
            out = dict.fromkeys(self.needed, "hit")  # in ``needed`` order, as it was built before
            out.update(dict.fromkeys(self.late, "late"))
            out.update(dict.fromkeys(self.misses, "miss"))
            self._outcome = out
        return self._outcome


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
        # predictive caches (expertflow) hear of every expert the runtime prefetches or keeps
        self._on_predict = cache.policy.on_predict if type(cache.policy).wants_predictions else None
        self._feedback = None if type(horizon).ignores_feedback else horizon.feedback
        self._table: PrefetchTable | None = None  # set by set_schedule for a stateless predictor
        # A predictor that never predicts (on-demand loading) is not asked.
        self.silent = type(predictor).never_predicts

    def set_schedule(self, steps: list) -> None:
        """Optional, before the first ``begin_layer``: the whole replay's steps. With a stateless predictor
        (one that defines ``predict_steps``, see :class:`~policies.base.Predictor`) the runtime then scores a
        block of steps per numpy call and builds no Observation; decisions are the same."""
        stateless = type(self.predictor).stateless
        self._table = PrefetchTable(self.predictor, self.experts, self.offsets, self.cfg.num_layers, self.limit,
                                    self.cfg.min_score, steps) if stateless and not self.silent else None

    @property
    def prefetch_table(self) -> PrefetchTable | None:
        """The block-scored prefetch choices :meth:`set_schedule` set up for a stateless predictor (else None)."""
        return self._table

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
        now = step * self.cfg.num_layers + layer
        self.now = now
        cache = self.cache
        obs = None if self._table is not None or self.silent else self.observation(step, layer, tokens)
        if uses is None:
            ex = self.experts[tokens, layer] if obs is None else obs.experts
            uses = {}
            for k in (ex.astype(np.int64) + self.offsets[layer]).ravel().tolist():
                uses[k] = uses.get(k, 0) + 1
        needed = list(uses)
        self.protected = set(needed)
        hits, late, misses, counts, self._prefetch_hits = cache.use_layer(needed, uses, now)
        plan = LayerPlan(now, needed, uses, hits, late, misses, counts)
        if misses:
            self.reserve_demands(misses, now, plan.demand, plan.evicted)
        if obs is not None:
            self.predictor.observe(obs)
        if not self.silent:
            self._plan_prefetch(obs, step, layer, len(tokens), plan, max_layer_step)
        return plan

    def _plan_prefetch(self, obs: Observation | None, step: int, layer: int, ntok: int, plan: LayerPlan,
                       max_layer_step: int) -> None:
        d = int(self.horizon.distance())
        L = self.cfg.num_layers
        cache = self.cache
        for ahead in range(1, d + 1):
            target_step = plan.layer_step + ahead
            if target_step > max_layer_step:
                break
            if obs is None:  # PrefetchTable.chosen, inlined
                tab = self._table
                if not tab.start <= step < tab.stop:
                    tab.enter(step)
                rows = tab.rows.get(ahead * L + layer)
                if rows is None:
                    rows = tab.score(layer, ahead)
                chosen = rows[step - tab.start]
            else:
                tl = (layer + ahead) % L
                scores = self.predictor.predict(obs, ahead)
                base = int(self.offsets[tl])
                chosen = [base + e for e in top_scores(scores, self.limit(tl, ntok), self.cfg.min_score)]
            if self._on_predict is not None:  # predictive caches (expertflow) keep predicted slots
                for key in chosen:
                    self._on_predict(key, target_step)
            if not cache.present.issuperset(chosen):  # the common case: all resident or in flight already
                self.reserve_prefetches(chosen, plan.layer_step, target_step, plan.prefetch, plan.evicted)

    def reserve_demands(self, misses: list[int], now: int, demand: list[int], evicted: list[int] | None) -> None:
        """Slots for this layer's misses, in order: those that get one go to ``demand`` (their copies start now),
        the others wait in ``deferred``. Victims go to ``evicted`` unless it is None."""
        reserve, protected = self.cache.reserve, self.protected
        for k in misses:
            ok, ev = reserve(k, now, protected)
            if ev is not None and evicted is not None:
                evicted.append(ev)
            if ok:
                demand.append(k)
            else:
                self.deferred.append(k)

    def reserve_prefetches(self, chosen: list[int], now: int, target: int, prefetch: list[tuple[int, int]],
                           evicted: list[int] | None) -> None:
        """Slots for the keys of ``chosen`` (best first) not yet present, until one cannot get a slot; each goes
        to ``prefetch`` as (key, target layer-step). A prefetch must not evict what this layer still needs,
        another expert predicted for the same target, or an earlier prefetch not yet used. (That set is built
        at the first key that needs a slot: nothing changes before that.)"""
        cache = self.cache
        present = cache.present  # resident or in flight
        keep = None
        for key in chosen:
            if key in present:
                continue
            if keep is None:
                keep = self.protected | set(chosen) | cache.prefetched_unused
            ok, ev = cache.reserve(key, now, keep, prefetch=True)
            if not ok:
                break
            if ev is not None and evicted is not None:
                evicted.append(ev)
            prefetch.append((key, target))
            self.prefetch_issued += 1

    def limit(self, target_layer: int, ntok: int) -> int:
        """Prefetches per target layer: ``max_per_layer``, by default no more than the batch can use (k per
        token), nor than the layer has experts or its partition holds."""
        part = int(self.cache.partition_of[self.offsets[target_layer]])
        return self.cfg.max_per_layer or min(
            self.cfg.num_experts[target_layer], self.cache.capacity[part], self.experts.shape[2] * ntok
        )

    def release(self, key: int) -> list[int]:
        """``key`` has been computed for this layer: unprotect it and hand out slots to deferred demands.
        While nothing is deferred this only unprotects ``key``, which nothing reads until the next
        ``begin_layer`` replaces the protected set, so a driver may skip the call then (the simulator does)."""
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
        wasted = self.cache.stats.prefetch_wasted
        if self._feedback is not None:
            self._feedback(HorizonFeedback(
                layer_compute_s=layer_compute_s,
                stall_s=stall_s,
                bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                experts_needed=len(plan.needed),
                prefetch_hits=self._prefetch_hits,
                prefetch_issued=self.prefetch_issued - self._last_issued,
                prefetch_wasted=wasted - self._last_wasted,
                late_hits=len(plan.late),
            ))
        self._last_issued = self.prefetch_issued
        self._last_wasted = wasted


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
