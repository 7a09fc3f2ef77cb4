"""Per-layer popularity: how likely the batch is to use each expert, from training-split counts.

With ``p_l(e)`` = share of training tokens that use expert e at layer l (count / tokens, so in [0, 1]), the
score of a batch of B tokens is ``1 - (1 - p_l(e)) ** B`` (at least one of B independent tokens uses e). With
``online=True`` every ``observe`` adds the batch's routing to the counts. Without a training split the
counts start at zero (only ``online`` can then make scores non-zero).
"""

from __future__ import annotations

import numpy as np

from ..base import Observation, Predictor, PredictorContext
from . import batch_union, layer_counts, target_layer


class FrequencyPredictor(Predictor):
    def __init__(self, online: bool = False) -> None:
        self.online = bool(online)
        self._num_experts: list[int] = []
        self._counts: list[np.ndarray] = []
        self._tokens: list[float] = []

    def reset(self, ctx: PredictorContext) -> None:
        self._num_experts = list(ctx.num_experts)
        train = ctx.train
        if train is not None and train.num_tokens > 0:
            self._counts = layer_counts(train.experts, self._num_experts)
            self._tokens = [float(train.num_tokens)] * len(self._num_experts)
        else:
            self._counts = [np.zeros(n) for n in self._num_experts]
            self._tokens = [0.0] * len(self._num_experts)

    def token_probability(self, layer: int) -> np.ndarray:
        """p_l(e): share of tokens that use each expert of ``layer``."""
        n = self._tokens[layer]
        return self._counts[layer] / n if n > 0 else np.zeros(self._num_experts[layer])

    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        tl = target_layer(obs, ahead, len(self._num_experts))
        p = self.token_probability(tl)
        b = max(1, len(obs.experts))
        return batch_union(np.repeat(p[None, :], b, axis=0))

    def observe(self, obs: Observation) -> None:
        if not self.online:
            return
        ex = np.asarray(obs.experts, dtype=np.int64)
        for row in ex:  # a token counts an expert once even if listed twice
            self._counts[obs.layer][np.unique(row)] += 1.0
        self._tokens[obs.layer] += float(len(ex))
