"""Hidden-state sidecar: ``<trace>.hidden.safetensors`` holds tensor ``hidden`` [T, L, H] (float16), the input
hidden state of every MoE layer for every token of the trace file. Loaded lazily, only by predictors that
need it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import atomic_path
from .schema import Trace, TraceError

SIDECAR_SUFFIX = ".hidden.safetensors"


def sidecar_path(trace_path: str | Path) -> Path:
    p = Path(trace_path)
    return p.with_name(p.name.removesuffix(".parquet") + SIDECAR_SUFFIX)


def write_hidden(trace_path: str | Path, hidden: np.ndarray, dtype=np.float16) -> Path:
    """Write the [T, L, H] hidden states for the trace at ``trace_path`` atomically (float16 by default;
    float32 where exact recomputation matters)."""
    from safetensors.numpy import save_file

    out = sidecar_path(trace_path)
    with atomic_path(out) as tmp:
        save_file({"hidden": np.ascontiguousarray(hidden, dtype=dtype)}, str(tmp))
    return out


def load_hidden(trace: Trace) -> np.ndarray:
    if trace.path is None:
        raise TraceError("trace was not loaded from a file, so it has no hidden-state sidecar")
    path = sidecar_path(trace.path)
    if not path.exists():
        raise TraceError(f"{trace.path}: no hidden-state sidecar at {path} (record with --hidden-states)")
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        hidden = f.get_tensor("hidden")
    idx = getattr(trace, "_parent_index", None)
    if idx is not None:
        hidden = hidden[idx]
    L = trace.meta.num_layers
    if hidden.ndim != 3 or hidden.shape[:2] != (trace.num_tokens, L):
        raise TraceError(f"{path}: hidden has shape {hidden.shape}, expected ({trace.num_tokens}, {L}, hidden)")
    return hidden
