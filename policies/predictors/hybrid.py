"""Hybrid predictor (ExpertFlow 2025): pre-gating corrected by a small model trained on the training split.

For a token at layer l and a target layer l+d (same step), a two-layer MLP (one per distance d) reads
- the pre-gate probabilities: layer l+d's router on the hidden state at layer l (``pregate``),
- the hidden state at layer l itself (the intermediate representation),
- the token id (a learned 16-dim embedding),
- the activation history: the token's experts at layers l and l-1 (one-hot),
- the target layer (one-hot),
and outputs a logit per expert of the target layer, trained with binary cross-entropy on the true route (the
paper uses a random-forest regressor; a small torch model fits the same inputs and trains in seconds here).
Training happens at ``reset`` from ``ctx.train`` (deterministic from ``seed``); the batch score is
``1 - prod_b (1 - p_b)``. Targets that wrap into the next step get zeros (no opinion), like ``pregate``.
"""

from __future__ import annotations

import numpy as np

from ..base import Observation, PolicyConfigError, Predictor, PredictorContext
from . import batch_union, target_layer
from .pregate import load_router_weights, softmax_rows


class HybridPredictor(Predictor):
    needs_hidden = True

    def __init__(self, max_distance: int = 4, epochs: int = 6, hidden_units: int = 128, seed: int = 0) -> None:
        self.max_distance, self.epochs, self.units, self.seed = int(max_distance), int(epochs), int(hidden_units), int(seed)
        self._models: dict[int, object] = {}
        self._prev: np.ndarray | None = None  # experts of the previous layer, per batch token, this step
        self._cur: np.ndarray | None = None  # experts of the layer last observed

    # ------------------------------------------------------------------------------------------ features
    def features(self, hidden: np.ndarray, tokens: np.ndarray, cur: np.ndarray, prev: np.ndarray | None,
                 layer: int, target: int) -> tuple:
        import torch

        E, L = self._E, self._L
        n = len(hidden)
        pre = softmax_rows(hidden.astype(np.float32) @ self._routers[target].T)
        hot = np.zeros((n, 2 * E + L), np.float32)
        np.put_along_axis(hot[:, :E], cur.astype(np.int64), 1.0, axis=1)
        if prev is not None:
            np.put_along_axis(hot[:, E:2 * E], prev.astype(np.int64), 1.0, axis=1)
        hot[:, 2 * E + target] = 1.0
        x = np.concatenate([pre, hidden.astype(np.float32), hot], axis=1)
        return torch.from_numpy(x), torch.from_numpy(np.clip(tokens, 0, None).astype(np.int64) % 4096)

    def _net(self, n_in: int):
        import torch

        class Net(torch.nn.Module):
            def __init__(self, n_in: int, units: int, n_out: int):
                super().__init__()
                self.emb = torch.nn.Embedding(4096, 16)
                self.mlp = torch.nn.Sequential(torch.nn.Linear(n_in + 16, units), torch.nn.ReLU(),
                                               torch.nn.Linear(units, n_out))

            def forward(self, x, tok):
                return self.mlp(torch.cat([x, self.emb(tok)], dim=1))

        return Net(n_in, self.units, self._E)

    # ------------------------------------------------------------------------------------------ training
    def reset(self, ctx: PredictorContext) -> None:
        import torch

        if len(set(ctx.num_experts)) != 1:
            raise PolicyConfigError("hybrid predictor: layers with different expert counts are not supported")
        train = ctx.train
        if train is None or not train.has_hidden_states():
            raise PolicyConfigError("hybrid predictor: needs a training split with hidden states")
        self._L, self._E = len(ctx.num_experts), ctx.num_experts[0]
        self._routers = load_router_weights(ctx.model_path, self._L)
        hid = np.asarray(train.hidden_states(), np.float32)
        ex, tok = train.experts, train.token_id
        torch.manual_seed(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        for d in range(1, min(self.max_distance, self._L - 1) + 1):
            xs, ts, ys = [], [], []
            for layer in range(self._L - d):
                prev = ex[:, layer - 1] if layer else None
                x, t = self.features(hid[:, layer], tok, ex[:, layer], prev, layer, layer + d)
                y = np.zeros((len(x), self._E), np.float32)
                np.put_along_axis(y, ex[:, layer + d].astype(np.int64), 1.0, axis=1)
                xs.append(x)
                ts.append(t)
                ys.append(torch.from_numpy(y))
            x, t, y = torch.cat(xs), torch.cat(ts), torch.cat(ys)
            net = self._net(x.shape[1])
            opt = torch.optim.Adam(net.parameters(), lr=3e-3)
            for _ in range(self.epochs):
                for idx in torch.randperm(len(x), generator=g).split(256):
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx], t[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            self._models[d] = net.eval()

    # ---------------------------------------------------------------------------------------- prediction
    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        import torch

        tl = target_layer(obs, ahead, self._L)
        if obs.layer + ahead >= self._L or ahead not in self._models:
            return np.zeros(self._E)
        if obs.hidden is None:
            raise PolicyConfigError("hybrid predictor: no hidden states (the trace needs a hidden-state sidecar)")
        x, t = self.features(obs.hidden, obs.token_ids, obs.experts, self._prev if obs.layer else None, obs.layer, tl)
        with torch.no_grad():
            p = torch.sigmoid(self._models[ahead](x, t)).numpy()
        return batch_union(p)

    def observe(self, obs: Observation) -> None:
        # predict() for this layer runs after observe(): keep the previous layer's experts aside first
        self._prev, self._cur = self._cur, np.asarray(obs.experts)
