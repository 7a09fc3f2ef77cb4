"""Last token: predict that the target layer uses the experts it used the last time it computed.

Tokens are not tracked across steps (the batch changes under continuous batching); instead each layer keeps
the set of experts its most recent ``observe`` saw, over the whole batch. For a target layer later in the
current step that is the previous step's set; for a wrapped target (next step) it is this step's set. The
predicted experts score 1.0, all others 0 (and everything 0 before the layer was first observed).
"""

from __future__ import annotations

import numpy as np

from ..base import Observation, Predictor, PredictorContext
from . import target_layer


class LastTokenPredictor(Predictor):
    def __init__(self) -> None:
        self._num_experts: list[int] = []
        self._last: list[np.ndarray] = []

    def reset(self, ctx: PredictorContext) -> None:
        self._num_experts = list(ctx.num_experts)
        self._last = [np.zeros(n) for n in self._num_experts]

    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        return self._last[target_layer(obs, ahead, len(self._num_experts))].copy()

    def observe(self, obs: Observation) -> None:
        used = np.zeros(self._num_experts[obs.layer])
        used[np.asarray(obs.experts, dtype=np.int64).ravel()] = 1.0
        self._last[obs.layer] = used
