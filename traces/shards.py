"""The manifest of ``traces collect``'s shards: the inputs of the run that wrote them, so a rerun resumes only
that run. Without it a rerun with other prompts, another model or other generation settings would reuse the
finished shards by their number and merge them with new ones into a trace of no single run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .io import atomic_path, settings_diff
from .schema import SCHEMA_VERSION, TraceError

MANIFEST = "manifest.json"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_digest(model) -> str:
    """sha256 of every tensor of the model's state dict (names, dtypes, shapes, bytes): identifies an in-memory
    model (a tiny random one, the freshly trained reference model) that has no checkpoint on disk."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(dtype=torch.uint8).numpy())
    return f"sha256 {h.hexdigest()[:16]}"


def checkpoint_id(model_dir: Path) -> str:
    """Identity of a checkpoint directory from its files' names, sizes and modification times: hashing the
    weights themselves could take minutes for a model of tens of GB."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file())
    stamp = [(str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return f"{len(files)} files, sha256 {_sha(json.dumps(stamp))}"


def run_settings(model, prompts_ids: list[list[int]], max_new_tokens: int, batch_size: int, hidden: bool,
                 hidden_dtype, model_path: str, pad_id: int, weights_id: str | None = None) -> dict:
    """Everything that decides what the shards hold, one JSON value per setting (digests for the large ones)."""
    param = next(model.parameters())
    return {
        "schema_version": SCHEMA_VERSION,
        "model_path": model_path,
        "model config": f"sha256 {_sha(model.config.to_json_string(use_diff=False))}",
        "model weights": weights_id or weights_digest(model),
        "model dtype": str(param.dtype).removeprefix("torch."),
        "device": param.device.type,
        "prompts": f"{len(prompts_ids)} prompts, sha256 {_sha(json.dumps(prompts_ids, default=int))}",
        "max_new_tokens": int(max_new_tokens),
        "batch_size": int(batch_size),
        "pad_id": int(pad_id),
        "hidden_states": np.dtype(hidden_dtype).name if hidden else False,
    }


def check_manifest(shard_dir: Path, settings: dict) -> None:
    """Resume only the run that wrote ``shard_dir``: write the manifest for a fresh directory, accept a matching
    one, stop on a mismatch naming every setting that differs."""
    path = shard_dir / MANIFEST
    restart = f"pick another -o, or delete {shard_dir} to start over"
    shards = any(shard_dir.glob("shard-*"))
    if not path.exists() or not shards:  # nothing to resume (a fresh directory, or stopped before a shard)
        if shards:
            raise TraceError(f"{shard_dir}: shards without a {MANIFEST} (an older collector's?), so it is unknown "
                             f"which run they belong to; {restart}")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"settings": settings}, indent=2, sort_keys=True) + "\n")
        return
    try:
        old = json.loads(path.read_text())["settings"]
        if not isinstance(old, dict):
            raise TypeError("'settings' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"{path}: unreadable manifest ({exc}), expected JSON with a 'settings' object; {restart}") from exc
    diff = settings_diff(old, settings)
    if diff:
        raise TraceError(f"{shard_dir}: its shards are from a run with other settings: {'; '.join(diff)}; {restart}")
