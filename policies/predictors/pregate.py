"""Pre-gating: predict layer l+d's experts by running layer l+d's router on the hidden state at layer l.

Needs the weights of the model the trace came from (``ctx.model_path``, relative paths resolved against the
project root, as the reference model's traces record them): the routers ``model.layers.{i}.mlp.gate.weight`` (or ``...block_sparse_moe.gate.weight``)
[E, H] of a Mixtral-style checkpoint (safetensors). The hidden state the driver hands over (``obs.hidden``) is
what the collector recorded, the router's own input at layer l, i.e. already normed by layer l's
``post_attention_layernorm``; we apply layer l+d's router to it directly (an approximation of applying layer
l+d's norm to the residual stream, which the trace does not keep). Per token the score is the router's
softmax over experts; the batch score is ``1 - prod_b (1 - p_b)``. When ``ahead`` wraps into the next step,
the next token's hidden state is unknown: the scores fall back to zeros (no opinion).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..base import Observation, PolicyConfigError, Predictor, PredictorContext
from . import batch_union, target_layer

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def load_router_weights(model_path: str, num_layers: int) -> list[np.ndarray]:
    if not model_path:
        raise PolicyConfigError("pregate predictor: the trace has no model_path (record it with `traces collect`)")
    path = Path(model_path)
    if not path.is_absolute():
        path = PROJECT_ROOT / path
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PolicyConfigError(f"pregate predictor: no safetensors weights under {path}")
    from safetensors import safe_open

    weights: dict[int, np.ndarray] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                # the router of a layer: "...layers.{i}.mlp.gate.weight" or the saved Mixtral form
                # "...layers.{i}.block_sparse_moe.gate.weight"
                if name.endswith(".gate.weight") and ".layers." in name and ".experts." not in name:
                    layer = int(name.split(".layers.")[1].split(".")[0])
                    weights[layer] = st.get_tensor(name).float().numpy()
    missing = [i for i in range(num_layers) if i not in weights]
    if missing:
        raise PolicyConfigError(f"pregate predictor: {path} has no router weights for layers {missing}")
    return [weights[i] for i in range(num_layers)]


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


class PreGatePredictor(Predictor):
    needs_hidden = True  # the driver passes obs.hidden from the trace's sidecar

    def __init__(self) -> None:
        self._routers: list[np.ndarray] = []

    def reset(self, ctx: PredictorContext) -> None:
        self._routers = load_router_weights(ctx.model_path, len(ctx.num_experts))
        self._num_experts = list(ctx.num_experts)

    def token_probs(self, hidden: np.ndarray, layer: int) -> np.ndarray:
        """Router softmax of ``layer`` on hidden states [B, H] -> [B, E]."""
        return softmax_rows(hidden.astype(np.float32) @ self._routers[layer].T)

    def predict(self, obs: Observation, ahead: int) -> np.ndarray:
        L = len(self._num_experts)
        tl = target_layer(obs, ahead, L)
        if obs.hidden is None:
            raise PolicyConfigError("pregate predictor: no hidden states (the trace needs a hidden-state sidecar)")
        if obs.layer + ahead >= L:
            return np.zeros(self._num_experts[tl])
        return batch_union(self.token_probs(obs.hidden, tl))

    def observe(self, obs: Observation) -> None:
        pass
