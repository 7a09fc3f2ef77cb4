"""Helpers the importers share for reading their sources."""

from __future__ import annotations

import numpy as np

from .schema import TraceError, TraceMeta


def check_expert_range(ex: np.ndarray, meta: TraceMeta, where: str) -> np.ndarray:
    bad = np.argwhere((ex < 0) | (ex >= np.asarray(meta.num_experts)[None, :, None]))
    if bad.size:
        t, layer, k = (int(x) for x in bad[0])
        raise TraceError(
            f"{where}: token {t} layer {layer} rank {k}: expert {int(ex[t, layer, k])} out of range, "
            f"expected 0..{meta.num_experts[layer] - 1}"
        )
    return ex.astype(np.int16)
