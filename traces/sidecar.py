"""Hidden-state sidecar: ``<trace>.hidden.safetensors`` holds tensor ``hidden`` [T, L, H] (float16), the input
hidden state of every MoE layer for every token of the trace file. Written here; read lazily (by predictors that
need it) through :meth:`traces.schema.Trace.hidden_states`, which lives with the trace so that reading it needs
no import of the writers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import atomic_path
from .schema import sidecar_path


def write_hidden(trace_path: str | Path, hidden: np.ndarray, dtype=np.float16) -> Path:
    """Write the [T, L, H] hidden states for the trace at ``trace_path`` atomically (float16 by default;
    float32 where exact recomputation matters)."""
    from safetensors.numpy import save_file

    out = sidecar_path(trace_path)
    with atomic_path(out) as tmp:
        save_file({"hidden": np.ascontiguousarray(hidden, dtype=dtype)}, str(tmp))
    return out
