"""What the policy runtime decides per layer-step (:class:`LayerPlan`), its settings (:class:`RuntimeConfig`) and the
policy contexts of a run (:func:`contexts`); :mod:`policies.runtime` re-exports them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import CacheContext, FutureIndex, HorizonContext, PredictorContext


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
        self.prefetch: list[tuple[int, int, int]] = []  # (key, target layer-step, queue priority), slot reserved
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
    admission: bool = True  # a prefetch evicts only a victim worth less than it (policies/admission.py)
    link_budget: bool = True  # queue no prefetch that cannot land before its target (policies/link_budget.py)
    speculative_below: float = 0.5  # prefetches scoring below this go to the low-priority, cancellable class
    admission_margin: float = 0.1  # predicted probabilities closer than this do not justify a swap (admission.py)



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
