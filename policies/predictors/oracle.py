"""Perfect routing foresight: 1.0 for exactly the experts the batch uses at the target layer-step.

Reads ``ctx.future.needed[obs.layer_step + ahead]`` (the replay's true keys) and turns keys back into
experts of the target layer. Past the end of the replay it scores zero. An upper bound for prediction."""

from __future__ import annotations

import numpy as np

from ..base import Observation, PolicyConfigError, Predictor, PredictorContext
from ..future import FutureIndex
from . import target_layer


class OraclePredictor(Predictor):
    stateless = True  # predict reads only obs.layer_step (the future index); predict_steps scores many at once
    clairvoyant = True  # reads the future: prefetches admitted on the exact scale (policies/admission.py)

    def __init__(self) -> None:
        self._future: FutureIndex | None = None
        self._num_experts: list[int] = []
        self._offsets = np.zeros(0, dtype=np.int64)

    def reset(self, ctx: PredictorContext) -> None:
        if ctx.future is None:
            raise PolicyConfigError("oracle predictor: needs ctx.future (the replay's FutureIndex); none was given")
        self._future = ctx.future
        self._num_experts = list(ctx.num_experts)
        if ctx.layer_offsets is not None:
            self._offsets = np.asarray(ctx.layer_offsets, dtype=np.int64)
        else:
            self._offsets = np.concatenate([[0], np.cumsum(self._num_experts)[:-1]]).astype(np.int64)

    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        tl = target_layer(obs, ahead, len(self._num_experts))
        n = self._num_experts[tl]
        scores = np.zeros(n)
        t = obs.layer_step + ahead
        if self._future is None or t >= self._future.horizon:
            return scores
        experts = np.asarray(self._future.needed[t], dtype=np.int64) - self._offsets[tl]
        scores[experts[(experts >= 0) & (experts < n)]] = 1.0
        return scores

    def predict_steps(self, layer: int, ahead: int, experts: np.ndarray, layer_steps: np.ndarray) -> np.ndarray:
        """``predict`` for N observations of ``layer`` at the layer-steps ``layer_steps`` [N] (``experts`` is not
        needed: the future is read from the index)."""
        if ahead < 1:
            raise PolicyConfigError(f"predictor: ahead must be >= 1, got {ahead}")
        tl = (layer + ahead) % len(self._num_experts)
        n = self._num_experts[tl]
        scores = np.zeros((len(layer_steps), n))
        if self._future is None:
            return scores
        base, horizon, needed = int(self._offsets[tl]), self._future.horizon, self._future.needed
        for i, ls in enumerate(np.asarray(layer_steps).tolist()):
            t = ls + ahead
            if t < horizon:
                ex = np.asarray(needed[t], dtype=np.int64) - base
                scores[i, ex[(ex >= 0) & (ex < n)]] = 1.0
        return scores

    def observe(self, obs: Observation) -> None:
        pass
