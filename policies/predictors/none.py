"""No prediction: on-demand loading only (the baseline of mixtral-offloading and ExpertFlow)."""

from __future__ import annotations

import numpy as np

from ..base import Observation, Predictor, PredictorContext
from . import target_layer


class NoPredictor(Predictor):
    """Always scores zero, so the driver never prefetches."""

    never_predicts = True  # the runtime skips predict/observe (the same decisions: zero never passes min_score)

    def __init__(self) -> None:
        self._num_experts: list[int] = []

    def reset(self, ctx: PredictorContext) -> None:
        self._num_experts = list(ctx.num_experts)

    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        return np.zeros(self._num_experts[target_layer(obs, ahead, len(self._num_experts))])

    def observe(self, obs: Observation) -> None:
        pass
