"""Helpers the importers share for reading their sources: every problem with a source file is a TraceError
naming it (open() and np.load() would raise bare FileNotFoundError, IsADirectoryError, UnicodeDecodeError or
ValueError)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .schema import TraceError, TraceMeta

INT32 = np.iinfo(np.int32)


def source_file(path: Path, flag: str = "") -> Path:
    """``path`` if it is an existing regular file; ``flag`` (e.g. ``--weights``) says which argument named it."""
    label = f"{flag} {path}" if flag else str(path)
    if not path.exists():
        raise TraceError(f"{label}: no such file")
    if not path.is_file():
        raise TraceError(f"{label}: not a regular file{' (a directory)' if path.is_dir() else ''}, expected a file")
    return path


def text_lines(path: Path, expected: str) -> list[str]:
    """The lines of a UTF-8 text file, ends kept (for the csv module); a binary file is an error naming the line
    where decoding failed."""
    data = source_file(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TraceError(f"{path}: line {line}: not UTF-8 text ({exc.reason}), expected {expected}") from None
    # lines as open(newline="") gives them (str.splitlines would also split inside a JSON string at U+2028)
    return io.StringIO(text, newline="").readlines()


def load_npy(path: Path, flag: str, kinds: str, expected: str) -> np.ndarray:
    """A ``.npy`` array whose dtype kind is one of ``kinds`` (numpy's one-letter codes)."""
    source_file(path, flag)
    label = f"{flag} {path}" if flag else str(path)
    try:
        arr = np.load(path, allow_pickle=False)  # never unpickle a source: object arrays are refused here
    except (OSError, ValueError, EOFError) as exc:
        raise TraceError(f"{label}: not a readable .npy array ({exc}), expected {expected}") from exc
    if not isinstance(arr, np.ndarray):  # an .npz archive
        raise TraceError(f"{label}: an .npz archive, expected one .npy array of {expected}")
    if arr.dtype.kind not in kinds:
        raise TraceError(f"{label}: array of dtype {arr.dtype}, expected {expected}")
    return arr


def check_expert_range(ex: np.ndarray, meta: TraceMeta, where: str) -> np.ndarray:
    bad = np.argwhere((ex < 0) | (ex >= np.asarray(meta.num_experts)[None, :, None]))
    if bad.size:
        t, layer, k = (int(x) for x in bad[0])
        raise TraceError(
            f"{where}: token {t} layer {layer} rank {k}: expert {int(ex[t, layer, k])} out of range, "
            f"expected 0..{meta.num_experts[layer] - 1}"
        )
    return ex.astype(np.int16)
