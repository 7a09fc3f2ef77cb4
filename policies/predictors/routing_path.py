"""Routing-path predictor (ExpertFlow 2024): a small transformer over a sequence's token ids that predicts,
for each token, its experts in every MoE layer at once, before the first MoE layer runs.

The paper's RPP is a T5-style encoder-decoder (hidden 32, feed-forward 2048) with L heads over E experts,
trained as multi-label classification with binary cross-entropy on the route r in {0,1}^(L x E). Ours is a
causal transformer encoder over the last ``window`` token ids of the sequence (hidden ``d_model``, 2 layers,
4 heads, feed-forward ``ff``) with one linear head of L x E logits, trained the same way on the training split
at ``reset`` (deterministic from ``seed``; CPU seconds on the reference model's traces). Needs token ids in the
trace (the reference model's have them; imported traces usually do not).

At layer 0 of each step the predictor reads the batch's token ids (``observe``), appends them to each
sequence's history and predicts all layers of those tokens; ``predict`` then returns, for a target layer in
the same step, ``1 - prod_b (1 - p_b)`` over the batch. A target in the next step (next token unknown) gets
zeros.
"""

from __future__ import annotations

import numpy as np

from ..base import Observation, PolicyConfigError, Predictor, PredictorContext
from . import batch_union, target_layer


class RoutingPathPredictor(Predictor):
    needs_token_ids = True  # learned from the token ids of the training split

    def __init__(self, window: int = 32, d_model: int = 32, ff: int = 256, epochs: int = 8, seed: int = 0) -> None:
        self.window, self.d_model, self.ff, self.epochs, self.seed = int(window), int(d_model), int(ff), int(epochs), int(seed)
        self._history: dict[int, list[int]] = {}
        self._probs: np.ndarray | None = None  # [B, L, E] for the current step's tokens

    def _build(self):
        import torch

        L, E, W = self._L, self._E, self.window

        class RPP(torch.nn.Module):
            def __init__(self, d: int, ff: int):
                super().__init__()
                self.tok = torch.nn.Embedding(4097, d)  # id 4096 pads
                self.pos = torch.nn.Embedding(W, d)
                layer = torch.nn.TransformerEncoderLayer(d, 4, ff, dropout=0.0, batch_first=True)
                self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
                self.head = torch.nn.Linear(d, L * E)
                self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(W), persistent=False)

            def forward(self, ids):
                n = ids.shape[1]
                h = self.tok(ids) + self.pos(torch.arange(n))
                return self.head(self.enc(h, mask=self.mask[:n, :n], is_causal=True)).view(ids.shape[0], n, L, E)

        return RPP(self.d_model, self.ff)

    def reset(self, ctx: PredictorContext) -> None:
        import torch

        train = ctx.train
        if train is None or (train.token_id < 0).all():
            raise PolicyConfigError("routing_path predictor: needs token ids in the training split (record with `traces collect`)")
        if len(set(ctx.num_experts)) != 1:
            raise PolicyConfigError("routing_path predictor: layers with different expert counts are not supported")
        self._L, self._E = len(ctx.num_experts), ctx.num_experts[0]
        W = self.window
        ids, ys = [], []
        for s in np.unique(train.seq_id):
            idx = np.flatnonzero(train.seq_id == s)
            for start in range(0, len(idx), W):
                chunk = idx[start:start + W]
                tok = np.full(W, 4096, np.int64)
                tok[:len(chunk)] = np.clip(train.token_id[chunk], 0, None) % 4096
                y = np.zeros((W, self._L, self._E), np.float32)
                for j, t in enumerate(chunk):
                    y[j, np.arange(self._L)[:, None], train.experts[t]] = 1.0
                ids.append(tok)
                ys.append(y)
        x, y = torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(ys))
        valid = (x != 4096).float()[:, :, None, None]
        torch.manual_seed(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        self._net = self._build()
        opt = torch.optim.Adam(self._net.parameters(), lr=3e-3)
        for _ in range(self.epochs):
            for b in torch.randperm(len(x), generator=g).split(16):
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self._net(x[b]), y[b], weight=valid[b].expand_as(y[b]))
                opt.zero_grad()
                loss.backward()
                opt.step()
        self._net.eval()
        self._history = {}

    def observe(self, obs: Observation) -> None:
        import torch

        if obs.layer != 0:
            return
        seqs = obs.seq_ids if obs.seq_ids is not None else np.zeros(len(obs.tokens), np.int64)
        ctxs = []
        for s, t in zip(seqs.tolist(), obs.token_ids.tolist()):
            h = self._history.setdefault(s, [])
            h.append(max(t, 0) % 4096)
            del h[:-self.window]
            ctxs.append(list(h))
        probs = []
        with torch.no_grad():
            for c in ctxs:
                logits = self._net(torch.tensor([c]))[0, -1]
                probs.append(torch.sigmoid(logits).numpy())
        self._probs = np.stack(probs)

    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        tl = target_layer(obs, ahead, self._L)
        if obs.layer + ahead >= self._L or self._probs is None:
            return np.zeros(self._E)
        return batch_union(self._probs[:, tl])
