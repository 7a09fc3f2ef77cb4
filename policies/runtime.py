"""The policy decisions every driver shares (the simulator, the trace executor and model mode all run them
through the one driver loop, ``replay/driver.py``).

A driver owns time and copies; at the same points of every layer it calls :class:`PolicyRuntime`, which asks
the cache, predictor and horizon what to do. Decisions use the logical clock ``now = step * L + layer``, so
every decision that does not depend on timing (all of them for on-demand caches) is identical whichever
driver runs it.

The protocol, per layer of a step:

0. (optional, once before the first layer) ``runtime.set_schedule(steps)``: the whole replay's steps, so a
   stateless predictor is scored a block of steps per call.
1. ``plan = runtime.begin_layer(step, layer, tokens, max_layer_step, uses=None, link=None) -> LayerPlan``: the
   router of that layer has run, so the needed experts are known (``tokens``: trace token indices of the step;
   ``uses``: key -> tokens using it, if precomputed; no prefetch targets a layer-step beyond ``max_layer_step``).
   ``plan.needed`` lists the keys (use counts in ``plan.uses``), ``plan.hits`` / ``plan.late`` /
   ``plan.misses`` their outcome, ``plan.demand`` the keys whose copy must start now at demand priority,
   ``plan.prefetch`` the ``(key, target layer-step, priority)`` of copies for later layers (slots are reserved
   at decision time, so an in-flight key already holds its slot), ``plan.order`` the compute order. ``link``
   (a :class:`~policies.link_budget.LinkFacts`: the driver's copy backlog, copy time and compute estimate)
   enables the link-time budget and lets the runtime cancel queued prefetches that can no longer help
   (:mod:`policies.prefetch_queue`); a prefetch that evicts is admitted by :mod:`policies.admission`.
2. The driver computes the needed experts in ``plan.order`` (resident ones first, so loads overlap compute),
   waiting for each one's copy; a key in ``runtime.deferred`` has no slot yet: ``runtime.retry_deferred() ->
   list[int]`` hands out slots as copies land (start those copies). After computing a key it calls
   ``runtime.release(key) -> list[int]``, which may return deferred demand keys that got a slot (the layer
   needs more experts than its partition holds).
3. ``runtime.end_layer(layer_compute_s, stall_s, bandwidth_bytes_per_s, plan)`` hands the measured layer
   compute time, stall and recent copy bandwidth to the horizon.

A driver that cancels a queued prefetch itself (without passing ``link``) calls ``runtime.cancel(key)``.
"""

from __future__ import annotations

from collections import deque
from functools import partial

import numpy as np

from .admission import ExactAdmission, ScoreAdmission
from .base import FutureIndex, Horizon, HorizonFeedback, Observation, PolicyConfigError, Predictor, top_scores
from .cache import ExpertCache
from .clairvoyant import ClairvoyantLoads
from .link_budget import LinkFacts, lands_in_time, prefetch_priority
from .plan import LayerPlan, RuntimeConfig, contexts
from .prefetch_queue import PendingPrefetches
from .prefetch_table import PrefetchTable

__all__ = ["LayerPlan", "PolicyRuntime", "RuntimeConfig", "contexts"]


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
        future: FutureIndex | None = None,
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
        # A clairvoyant predictor (the oracle) is judged on the exact scale.
        self.clairvoyant = type(predictor).clairvoyant
        self._admission = None
        if cfg.admission and not self.silent:
            if self.clairvoyant and future is None:
                raise PolicyConfigError("admission: a clairvoyant predictor needs the replay's FutureIndex (future)")
            self._admission = (ExactAdmission(future) if self.clairvoyant
                               else ScoreAdmission(list(cfg.num_experts), cfg.admission_margin))
        # a clairvoyant predictor's prefetches: the eviction policy's own on-demand loads, started early
        # (policies/clairvoyant.py; set with use_loads, else the predictor's choices judged by ExactAdmission)
        self.loads: ClairvoyantLoads | None = None
        self.pending = PendingPrefetches()  # queued prefetches, reviewed at every begin_layer given a link
        self.horizon_trajectory: list[tuple[int, int]] = []  # (layer-step, distance) at every change of distance
        # the current layer-step, for scoring on demand (admission, priority class)
        self._step = self._layer = self._ntok = self._nneeded = 0
        self._tokens: np.ndarray | None = None
        self._obs: Observation | None = None
        self._scores: dict[int, np.ndarray] = {}  # ahead -> the predictor's scores for the current layer-step
        self._decided: list[int] = []  # priorities of the prefetches decided at the current layer-step
        self._demand_now = 0  # demand copies decided at the current layer-step (or waiting for a slot)
        # what the predictor named one layer-step ahead that needed a copy, whether prefetched or not (the
        # adaptive horizon's precision signal): (target layer-step, keys)
        self._shadow: tuple[int, list[int]] = (-1, [])
        self._shadow_seen = (0, 0)  # (named, used) at the current layer-step
        # experts a prefetch evicted -> that layer-step; one loaded again within two rounds of the layers counts
        # as a copy the prefetch cost (``HorizonFeedback.prefetch_harm``)
        self._victims: dict[int, int] = {}
        self._harm = 0

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

    def use_loads(self, loads: ClairvoyantLoads) -> None:
        """Before the first ``begin_layer``, for a clairvoyant predictor: make the eviction policy's on-demand
        loads, each as early as it does no harm (:mod:`policies.clairvoyant`)."""
        if not self.clairvoyant:
            raise PolicyConfigError("use_loads: planned loads need a clairvoyant predictor (the oracle)")
        self.loads = loads

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

    def at(self, step: int, layer: int, tokens: np.ndarray, needed: int, obs: Observation | None = None) -> None:
        """Enter a layer-step (``begin_layer`` does; a driver that inlines it calls this first): ``needed``
        distinct experts, ``obs`` its observation if one was built."""
        self.now = step * self.cfg.num_layers + layer
        self._step, self._layer, self._tokens, self._obs = step, layer, tokens, obs
        self._ntok, self._nneeded = len(tokens), needed
        self._scores = {}
        self._decided = []
        self._demand_now = len(self.deferred)

    def begin_layer(
        self, step: int, layer: int, tokens: np.ndarray, max_layer_step: int, uses: dict[int, int] | None = None,
        link: LinkFacts | None = None,
    ) -> LayerPlan:
        """Decisions for one layer of a step. ``uses`` (key -> tokens using it) may be passed precomputed;
        ``link``: the driver's copy facts (see the module docstring)."""
        now = step * self.cfg.num_layers + layer
        cache = self.cache
        obs = None if self._table is not None or self.silent else self.observation(step, layer, tokens)
        if uses is None:
            ex = self.experts[tokens, layer] if obs is None else obs.experts
            uses = {}
            for k in (ex.astype(np.int64) + self.offsets[layer]).ravel().tolist():
                uses[k] = uses.get(k, 0) + 1
        needed = list(uses)
        self.at(step, layer, tokens, len(needed), obs)
        self.protected = set(needed)
        hits, late, misses, counts, self._prefetch_hits = cache.use_layer(needed, uses, now)
        plan = LayerPlan(now, needed, uses, hits, late, misses, counts)
        self._harm = self.count_reloads(misses) if self._victims else 0
        if link is not None and self.pending.review_at() <= now:
            self.review_prefetches(uses, link)
        if self._feedback is not None:
            self.score_shadow(uses)
        if misses:
            self.reserve_demands(misses, now, plan.demand, plan.evicted)
        if obs is not None:
            self.predictor.observe(obs)
        if not self.silent:
            self._plan_prefetch(obs, step, layer, len(tokens), plan, max_layer_step, link)
        return plan

    def review_prefetches(self, uses, link: LinkFacts) -> None:
        """Cancel, on ``link`` and here, the queued prefetches that can no longer help (target passed unused,
        speculative and no longer landing in time; :mod:`policies.prefetch_queue`)."""
        for k in self.pending.due(self.now, uses, self.cache.inflight, link, self._ntok, self._nneeded):
            if link.cancel(k):
                self.cancel(k)

    def score_shadow(self, uses) -> None:
        """Count how many of the experts named one layer-step ago for this one (those that needed a copy) it
        uses: the adaptive horizon's precision signal (kept also while the horizon is 0)."""
        target, keys = self._shadow
        self._shadow_seen = (len(keys), sum(1 for k in keys if k in uses)) if target == self.now else (0, 0)

    def count_reloads(self, keys) -> int:
        """How many of ``keys`` (loaded now) a prefetch evicted within the last two rounds of the layers."""
        victims, window, n = self._victims, 2 * self.cfg.num_layers, 0
        for k in keys:
            t = victims.pop(k, None)
            if t is not None and self.now - t <= window:
                n += 1
        return n

    def note_distance(self, now: int, d: int) -> None:
        if not self.horizon_trajectory or self.horizon_trajectory[-1][1] != d:
            self.horizon_trajectory.append((now, d))

    def chosen(self, obs: Observation | None, step: int, layer: int, ntok: int, ahead: int) -> list[int]:
        """The prefetch candidates (keys, best first) ``ahead`` layer-steps on from the current one."""
        if obs is None:  # PrefetchTable.chosen, inlined
            tab = self._table
            if not tab.start <= step < tab.stop:
                tab.enter(step)
            rows = tab.rows.get(ahead * self.cfg.num_layers + layer)
            if rows is None:
                rows = tab.score(layer, ahead)
            return rows[step - tab.start]
        tl = (layer + ahead) % self.cfg.num_layers
        scores = self._scores[ahead] = self.predictor.predict(obs, ahead)
        base = int(self.offsets[tl])
        return [base + e for e in top_scores(scores, self.limit(tl, ntok), self.cfg.min_score)]

    def _plan_prefetch(self, obs: Observation | None, step: int, layer: int, ntok: int, plan: LayerPlan,
                       max_layer_step: int, link: LinkFacts | None) -> None:
        d = int(self.horizon.distance())
        self.note_distance(plan.layer_step, d)
        cache = self.cache
        if self.loads is not None:
            if self._on_predict is not None:  # a predictive cache still hears what the oracle names
                for ahead in range(1, min(d, max_layer_step - plan.layer_step) + 1):
                    for key in self.chosen(obs, step, layer, ntok, ahead):
                        self._on_predict(key, plan.layer_step + ahead)
            self.prefetch_planned(d, plan.prefetch, link)
            return
        shadow = self._feedback is not None  # the adaptive horizon hears what distance 1 would have named
        for ahead in range(1, max(d, int(shadow)) + 1):
            target_step = plan.layer_step + ahead
            if target_step > max_layer_step:
                break
            chosen = self.chosen(obs, step, layer, ntok, ahead)
            if shadow and ahead == 1:
                present = cache.present
                self._shadow = (target_step, [k for k in chosen if k not in present])
            if ahead > d:
                break
            if self._on_predict is not None:  # predictive caches (expertflow) keep predicted slots
                for key in chosen:
                    self._on_predict(key, target_step)
            if not cache.present.issuperset(chosen):  # the common case: all resident or in flight already
                self.reserve_prefetches(chosen, plan.layer_step, target_step, plan.prefetch, plan.evicted, link)

    def reserve_demands(self, misses: list[int], now: int, demand: list[int], evicted: list[int] | None) -> None:
        """Slots for this layer's misses, in order: those that get one go to ``demand`` (their copies start now),
        the others wait in ``deferred``. Victims go to ``evicted`` unless it is None."""
        reserve = self.cache.reserve if self.loads is None else self._reserve_planned
        protected = self.protected
        self._demand_now += len(misses)
        for k in misses:
            ok, ev = reserve(k, now, protected)
            if ev is not None and evicted is not None:
                evicted.append(ev)
            if ok:
                demand.append(k)
            else:
                self.deferred.append(k)

    def _reserve_planned(self, key: int, now: int, protected: set[int]) -> tuple[bool, int | None]:
        """A demand load as the eviction policy made it on demand (its planned victim); the policy's own choice
        where the plan has none or its victim is gone (the run left the plan)."""
        planned = self.loads.demand(now, key)
        if planned is not None:
            i, victim = planned
            if self.cache.reserve_as(key, now, protected, victim):
                self.loads.started(i)
                return True, victim
            if victim is not None and victim in self.cache.present:
                return False, None  # its victim is still to compute in this layer-step (or in flight): wait
        return self.cache.reserve(key, now, protected)

    def prefetch_planned(self, distance: int, prefetch: list[tuple[int, int, int]], link: LinkFacts | None) -> None:
        """Start the planned loads (:mod:`policies.clairvoyant`) used within ``distance`` layer-steps, in order,
        while each does no harm, fits the link budget and gets its planned slot."""
        now, cache, loads = self.now, self.cache, self.loads
        budget = link is not None and self.cfg.link_budget
        for i, use, key, victim in loads.upcoming(now, distance):
            if key in cache.present:  # the run left the plan here: nothing to load
                loads.started(i)
                continue
            if not loads.harmless(victim, now, use):
                return
            prio = prefetch_priority(use, False)
            if budget:
                extra = sum(1 for q in self._decided if q <= prio)
                if not lands_in_time(link, prio, now, use, self._demand_now, extra, self._ntok, self._nneeded, p=1.0):
                    return
            if not cache.reserve_as(key, now, self.protected, victim, prefetch=True):
                return
            loads.started(i)
            prefetch.append((key, use, prio))
            self._decided.append(prio)
            self.pending.add(key, use, prio, False)
            self.prefetch_issued += 1

    def score(self, ahead: int, key: int) -> float:
        """The predictor's score of ``key`` (an expert of the layer ``ahead`` layer-steps on) from the current
        layer-step: the scale admission and the priority class judge on (computed once per distance)."""
        scores = self._scores.get(ahead)
        if scores is None:
            if self._obs is not None:
                scores = self.predictor.predict(self._obs, ahead)
            else:  # a stateless predictor: one row of its block scoring
                ex = self.experts[self._tokens, self._layer][None]
                scores = self.predictor.predict_steps(self._layer, ahead, ex, np.array([self.now]))[0]
            self._scores[ahead] = scores
        tl = (self._layer + ahead) % self.cfg.num_layers
        return float(scores[key - int(self.offsets[tl])])

    def reserve_prefetches(self, chosen: list[int], now: int, target: int, prefetch: list[tuple[int, int, int]],
                           evicted: list[int] | None, link: LinkFacts | None = None) -> None:
        """Slots for the keys of ``chosen`` (best first) not yet present, until one cannot get a slot; each goes
        to ``prefetch`` as (key, target layer-step, priority). A prefetch must not evict what this layer still
        needs, another expert predicted for the same target, or an earlier prefetch not yet used, and evicts
        only a victim the admission rule lets it take (:mod:`policies.admission`). With ``link``, only the
        prefetches that can land before the target are taken (:mod:`policies.link_budget`). (The keep set is
        built at the first key that needs a slot: nothing changes before that.)"""
        cache, cfg = self.cache, self.cfg
        present = cache.present  # resident or in flight
        keep = None
        ahead = target - now
        budget = link is not None and cfg.link_budget
        busy = 1.0 if link is None else link.busy_share()
        for key in chosen:
            if key in present:
                continue
            p = 1.0 if self.clairvoyant else self.score(ahead, key)
            spec = p < cfg.speculative_below
            prio = prefetch_priority(target, spec)
            if budget:
                extra = sum(1 for q in self._decided if q <= prio)
                if not lands_in_time(link, prio, now, target, self._demand_now, extra, self._ntok, self._nneeded, p=p):
                    break
            if keep is None:
                keep = self.protected | set(chosen) | cache.prefetched_unused
            admit = None if self._admission is None else partial(self._admits, key=key, target=target, busy=busy)
            ok, ev = cache.reserve(key, now, keep, prefetch=True, admit=admit)
            if not ok:
                break
            if self._victims:
                self._harm += self.count_reloads((key,))
            if ev is not None:
                if self._feedback is not None:  # only a horizon that listens hears of the harm
                    self._victims[ev] = now
                if evicted is not None:
                    evicted.append(ev)
            prefetch.append((key, target, prio))
            self._decided.append(prio)
            self.pending.add(key, target, prio, spec)
            self.prefetch_issued += 1

    def _admits(self, victim: int, key: int, target: int, busy: float) -> bool:
        return self._admission.admits(victim, key, target, self.now, self.score, busy)

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
        reserve = self.cache.reserve if self.loads is None else self._reserve_planned
        while self.deferred:
            k = self.deferred[0]
            ok, _ = reserve(k, self.now, self.protected)
            if not ok:
                break
            self.deferred.popleft()
            started.append(k)
        return started

    def cancel(self, key: int) -> None:
        """A queued prefetch of ``key`` was dropped from the link before its copy started: give its slot back."""
        self.cache.cancel(key)
        self.pending.forget(key)
        self.prefetch_issued -= 1

    def end_layer(self, layer_compute_s: float, stall_s: float, bandwidth_bytes_per_s: float, plan: LayerPlan) -> None:
        wasted = self.cache.stats.prefetch_wasted
        if self._feedback is not None:
            named, used = self._shadow_seen
            self._feedback(HorizonFeedback(
                layer_compute_s=layer_compute_s,
                stall_s=stall_s,
                bandwidth_bytes_per_s=bandwidth_bytes_per_s,
                experts_needed=len(plan.misses) + self._prefetch_hits,
                prefetch_hits=self._prefetch_hits,
                prefetch_issued=self.prefetch_issued - self._last_issued,
                prefetch_wasted=wasted - self._last_wasted,
                late_hits=len(plan.late),
                misses=len(plan.misses),
                prefetch_harm=self._harm,
                predicted=named,
                predicted_used=used,
            ))
        self._last_issued = self.prefetch_issued
        self._last_wasted = wasted
