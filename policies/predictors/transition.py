"""Layer-to-layer transition predictor, learned from the training split.

At ``reset`` it counts, for every layer l and distance d = 1..max_distance, how often a token that uses
expert e at layer l uses expert e' at layer l' = l + d::

    P_{l,d}(e' | e) = #(tokens using e at l and e' at l') / #(tokens using e at l)

When l + d >= L the target is layer (l + d) % L of the *next token of the same sequence* (the next row of that
sequence in the trace, i.e. what the sequence computes in the next step), so cross-step prediction is learned
too; a token without a next token contributes to neither count. A source expert never seen (zero count)
falls back to the marginal ``p_{l'}(e')`` (share of tokens using e' at l'), as does any ``ahead >
max_distance``.

At ``predict`` each batch token b with experts E_b at the current layer gets
``p_b(e') = mean_{e in E_b} P(e' | e)`` (a mean, not a noisy-or: a token's k experts are strongly correlated,
and the mean keeps sum_e' p_b(e') = k), and the batch score is ``1 - prod_b (1 - p_b(e'))``. All tables are
dense numpy arrays built with ``bincount``; ``predict`` is one fancy-index, a mean and a product.
"""

from __future__ import annotations

import numpy as np

from ..base import Observation, PolicyConfigError, Predictor, PredictorContext
from . import batch_union, layer_counts, target_layer


def next_token_index(seq_id: np.ndarray) -> np.ndarray:
    """Per token, the index of the next token of the same sequence (rows are ordered by sequence), else -1."""
    nxt = np.arange(1, len(seq_id) + 1, dtype=np.int64)
    same = np.zeros(len(seq_id), dtype=bool)
    same[:-1] = seq_id[1:] == seq_id[:-1]
    return np.where(same, nxt, -1)


def transition_table(src: np.ndarray, dst: np.ndarray, n_src: int, n_dst: int, fallback: np.ndarray) -> np.ndarray:
    """P(dst expert | src expert) [n_src, n_dst] from paired rows src [N, K], dst [N, K]; unseen rows -> fallback."""
    src = src.astype(np.int64)
    dst = dst.astype(np.int64)
    pair = (src[:, :, None] * n_dst + dst[:, None, :]).ravel()
    joint = np.bincount(pair, minlength=n_src * n_dst)[: n_src * n_dst].reshape(n_src, n_dst).astype(np.float64)
    rows = np.bincount(src.ravel(), minlength=n_src)[:n_src].astype(np.float64)
    # a token's k experts are distinct (top-k), so each (token, e, e') triple is counted once
    table = np.divide(joint, rows[:, None], out=np.zeros_like(joint), where=rows[:, None] > 0)
    table[rows == 0] = fallback
    return np.clip(table, 0.0, 1.0)


class TransitionPredictor(Predictor):
    stateless = True  # predict reads only obs.layer and obs.experts; predict_steps scores many steps at once

    def __init__(self, max_distance: int = 4) -> None:
        if int(max_distance) < 1:
            raise PolicyConfigError(f"transition.max_distance: expected >= 1, got {max_distance}")
        self.max_distance = int(max_distance)
        self._num_experts: list[int] = []
        self._tables: list[list[np.ndarray]] = []  # [layer][d - 1] -> [E_l, E_{l'}]
        self._marginal: list[np.ndarray] = []

    def reset(self, ctx: PredictorContext) -> None:
        train = ctx.train
        if train is None or train.num_tokens == 0:
            raise PolicyConfigError("transition predictor: needs ctx.train (a non-empty training split) to learn from")
        ne = list(ctx.num_experts)
        L = len(ne)
        self._num_experts = ne
        ex = train.experts
        self._marginal = [c / train.num_tokens for c in layer_counts(ex, ne)]
        nxt = next_token_index(np.asarray(train.seq_id))
        has_next = nxt >= 0
        self._tables = []
        for layer in range(L):
            per_d = []
            for d in range(1, self.max_distance + 1):
                tl = (layer + d) % L
                if layer + d < L:
                    src, dst = ex[:, layer, :], ex[:, tl, :]
                else:
                    src, dst = ex[has_next, layer, :], ex[nxt[has_next], tl, :]
                per_d.append(transition_table(src, dst, ne[layer], ne[tl], self._marginal[tl]))
            self._tables.append(per_d)

    def probability(self, layer: int, ahead: int) -> np.ndarray:
        """The learned table P(e' at layer + ahead | e at layer), [E_layer, E_target]."""
        return self._tables[layer][ahead - 1]

    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        tl = target_layer(obs, ahead, len(self._num_experts))
        ex = np.asarray(obs.experts, dtype=np.int64)
        b = max(1, ex.shape[0])
        if ahead > self.max_distance or ex.size == 0:
            return batch_union(np.repeat(self._marginal[tl][None, :], b, axis=0))
        p_token = self._tables[obs.layer][ahead - 1][ex].mean(axis=1)  # [B, E_target]
        return batch_union(p_token)

    def predict_steps(self, layer: int, ahead: int, experts: np.ndarray, layer_steps: np.ndarray | None = None) -> np.ndarray:
        """``predict`` for N observations of ``layer`` at once: experts [N, B, K] -> scores [N, E_target]
        (``layer_steps`` is not needed: the tables do not depend on time).
        The same floating-point operations with a leading axis (so the same floats, row for row): numpy's mean
        over each token's K rows and ``batch_union``'s product over the B tokens both reduce a non-contiguous
        axis one element after the other, in order. Allowed because ``predict`` reads only ``obs.layer`` / ``obs.experts`` and ``observe`` is a no-op."""
        if ahead < 1:
            raise PolicyConfigError(f"predictor: ahead must be >= 1, got {ahead}")
        tl = (layer + ahead) % len(self._num_experts)
        ex = np.asarray(experts, dtype=np.int64)
        n, b, k = ex.shape
        if ahead > self.max_distance or b * k == 0:
            m = self._marginal[tl]
            p_token = np.broadcast_to(m, (n, max(1, b), len(m)))
        else:  # the mean over each token's K rows, summed in order as ``mean`` does (without the 4-D gather)
            table = self._tables[layer][ahead - 1]
            total = table[ex[:, :, 0]]  # a copy (fancy indexing), so the in-place sums leave the table alone
            for j in range(1, k):
                total += table[ex[:, :, j]]
            total /= k
            p_token = total  # [N, B, E_target]
        p = np.clip(np.asarray(p_token, dtype=np.float64), 0.0, 1.0)  # batch_union over axis 1
        return np.clip(1.0 - np.prod(1.0 - p, axis=1), 0.0, 1.0)

    def observe(self, obs: Observation) -> None:
        pass  # the tables are fixed after reset; the current layer's routing comes with each predict
