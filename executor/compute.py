"""Real compute of a layer on the CPU: a dense part of the model's shape and the routed experts' SwiGLU FFNs,
with each expert's weights read in place from its RAM slot (no copy)."""

from __future__ import annotations

import numpy as np
import torch

from .tier import StoreLayout


class LayerCompute:
    """Dense part: q, k, v, o projections (4 x hidden^2) over the step's tokens, a stand-in for attention.
    Experts: y = W2 (silu(W1 x) * W3 x) for the tokens routed to each, float32."""

    def __init__(self, layout: StoreLayout, slots: memoryview, seed: int = 0, threads: int = 1):
        torch.set_num_threads(threads)  # leave the other core to the I/O threads
        self.h, self.i = layout.hidden, layout.intermediate
        self.stride_f = layout.stride_bytes // 4
        self.slots = torch.frombuffer(slots, dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        self.dense = torch.randn(4, self.h, self.h, generator=g) / np.sqrt(self.h)
        self.x_cache: dict[int, torch.Tensor] = {}

    def tokens(self, n: int) -> torch.Tensor:
        x = self.x_cache.get(n)
        if x is None:
            x = self.x_cache[n] = torch.randn(n, self.h, generator=torch.Generator().manual_seed(n))
        return x

    def run_dense(self, n_tokens: int) -> torch.Tensor:
        x = self.tokens(n_tokens)
        for w in self.dense:
            x = torch.tanh(x @ w)  # tanh keeps magnitudes bounded across layers
        return x

    def expert_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        base = slot * self.stride_f
        hi = self.h * self.i
        w = self.slots[base:base + 3 * hi]
        return w[:hi].view(self.i, self.h), w[hi:2 * hi].view(self.i, self.h), w[2 * hi:].view(self.h, self.i)

    def run_expert(self, slot: int, n_tokens: int) -> torch.Tensor:
        w1, w3, w2 = self.expert_weights(slot)
        x = self.tokens(n_tokens)
        return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
