"""Prefetch predictors (one module each): scores in [0, 1] over the experts of a later layer.

Shared helpers live here so every predictor agrees on which layer a horizon ``ahead`` targets and on how
per-token probabilities become a batch score.
"""

from __future__ import annotations

import numpy as np

from ..base import Observation, PolicyConfigError


def target_layer(obs: Observation, ahead: int, num_layers: int) -> int:
    """Layer that ``ahead`` layers after ``obs.layer`` lands on (of the next step when it wraps)."""
    if ahead < 1:
        raise PolicyConfigError(f"predictor: ahead must be >= 1, got {ahead}")
    return (obs.layer + ahead) % num_layers


def batch_union(p_token: np.ndarray) -> np.ndarray:
    """P(at least one token uses e) from per-token probabilities [B, E], tokens taken as independent:
    ``1 - prod_b (1 - p_b(e))``. Clipped to [0, 1] against rounding."""
    p = np.clip(np.asarray(p_token, dtype=np.float64), 0.0, 1.0)
    return np.clip(1.0 - np.prod(1.0 - p, axis=0), 0.0, 1.0)


def layer_counts(experts: np.ndarray, num_experts: list[int]) -> list[np.ndarray]:
    """Per layer, how many tokens of ``experts`` [T, L, K] use each expert (a token uses an expert once)."""
    return [
        np.bincount(experts[:, layer, :].ravel().astype(np.int64), minlength=n)[:n].astype(np.float64)
        for layer, n in enumerate(num_experts)
    ]
