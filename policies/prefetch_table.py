"""Prefetch choices of a stateless predictor, scored a block of layer-steps per numpy call (see
:meth:`policies.runtime.PolicyRuntime.set_schedule`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import Predictor, top_scores_rows
from .future import steps_by_size


class PrefetchTable:
    """Prefetch choices of a stateless predictor (keys, best first) for every layer-step and distance, scored
    a block of steps at a time with ``predict_steps`` and ``top_scores_rows``. Steps of one block with the same
    number of tokens share one call. Only the current block is kept: ``rows[ahead * L + layer][step - start]``
    for the steps ``start <= step < stop`` (the runtime reads it directly; ``score`` fills a missing entry).

    It scores with ``predictor`` over ``experts`` [T, L, K] (the replay's routing); ``offsets`` turn a layer's
    experts into keys; ``limit(target_layer, ntok)`` and ``min_score`` cut each row as the runtime would."""

    BLOCK = 512  # steps per block: big enough to amortise numpy's per-call cost, small enough to stay in cache

    def __init__(self, predictor: Predictor, experts: np.ndarray, offsets: np.ndarray, num_layers: int,
                 limit: Callable[[int, int], int], min_score: float, steps: list):
        self.predictor = predictor
        self.experts = experts
        self.offsets = offsets
        self.num_layers = num_layers
        self.limit = limit
        self.min_score = min_score
        self.steps = steps
        self.start = self.stop = 0
        self._groups: list[tuple[int, list[int], np.ndarray]] = []  # (tokens per step, steps, tokens [N, B])
        self.rows: dict[int, list[list[int]]] = {}

    def chosen(self, step: int, layer: int, ahead: int) -> list[int]:
        if not self.start <= step < self.stop:
            self.enter(step)
        rows = self.rows.get(ahead * self.num_layers + layer)
        if rows is None:
            rows = self.score(layer, ahead)
        return rows[step - self.start]

    def enter(self, step: int) -> None:
        """Make ``step``'s block the current one."""
        self.start = step - step % self.BLOCK
        steps = self.steps[self.start:self.start + self.BLOCK]
        self.stop = self.start + len(steps)
        self._groups = steps_by_size(steps)
        self.rows = {}

    def by_step(self, max_ahead: int) -> list[tuple[list[int], ...]]:
        """The current block scored for every layer and distance 1..``max_ahead``, per step: ``by_step(d)[step -
        start][(ahead - 1) * L + layer]`` are the chosen keys (one C-level transpose of ``rows``)."""
        L = self.num_layers
        cols = [self.rows.get(a * L + layer) or self.score(layer, a) for a in range(1, max_ahead + 1) for layer in range(L)]
        return list(zip(*cols))

    def score(self, layer: int, ahead: int) -> list[list[int]]:
        """Score the current block for ``layer`` and ``ahead`` and keep the result."""
        L = self.num_layers
        tl = (layer + ahead) % L
        base = int(self.offsets[tl])
        predict_steps = self.predictor.predict_steps
        if len(self._groups) == 1:  # every step of the block has as many tokens (always at batch size 1)
            ntok, _, tokens = self._groups[0]
            steps = np.arange(self.start, self.stop) * L + layer
            scores = predict_steps(layer, ahead, self.experts[tokens, layer], steps)
            out = top_scores_rows(scores, self.limit(tl, ntok), self.min_score, base)
        else:
            out = [[] for _ in range(self.stop - self.start)]
            for ntok, idx, tokens in self._groups:
                steps = (self.start + np.asarray(idx)) * L + layer
                scores = predict_steps(layer, ahead, self.experts[tokens, layer], steps)
                for i, row in zip(idx, top_scores_rows(scores, self.limit(tl, ntok), self.min_score, base)):
                    out[i] = row
        self.rows[ahead * L + layer] = out
        return out
