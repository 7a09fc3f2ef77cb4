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

    try:
        with safe_open(str(path), framework="numpy") as f:
            if "hidden" not in f.keys():
                raise TraceError(f"{path}: no tensor 'hidden' (has {sorted(f.keys())}), expected hidden [tokens, layers, hidden]")
            hidden = f.get_tensor("hidden")
    except TraceError:
        raise
    except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for corrupt or short files
        raise TraceError(f"{path}: not a readable safetensors file ({exc})") from exc
    L = trace.meta.num_layers
    idx = getattr(trace, "_parent_index", None)
    if hidden.ndim != 3 or hidden.shape[1] != L:
        raise TraceError(f"{path}: hidden has shape {hidden.shape}, expected (tokens, {L}, hidden)")
    if idx is None and hidden.shape[0] != trace.num_tokens:
        raise TraceError(f"{path}: hidden has {hidden.shape[0]} tokens, expected {trace.num_tokens} like {trace.path}")
    # a selected trace reads rows of its parent file's sidecar: the sidecar must hold every one of them
    if idx is not None and idx.size and hidden.shape[0] <= idx.max():
        raise TraceError(f"{path}: hidden has {hidden.shape[0]} tokens, expected one per token of {trace.path} "
                         f"(token {int(idx.max())} is selected)")
    return hidden if idx is None else hidden[idx]
