"""The slow tier on a CPU machine: every expert of every layer packed in one file, read with O_DIRECT.

File layout (``*.experts``): a 4096-byte header, then one block per expert key (``layer_offsets[l] + e``) at
``HEADER_BYTES + key * stride_bytes``. The header is UTF-8 JSON padded with spaces::

    {"schema": "expertflow.experts/1", "num_experts": [...], "hidden": H, "intermediate": I,
     "dtype": "float32", "expert_bytes": 3*H*I*4, "stride_bytes": expert_bytes rounded up to 4096, "seed": S}

An expert block holds W1 [I, H], W3 [I, H] and W2 [H, I] (SwiGLU: y = W2 (silu(W1 x) * W3 x)) contiguously,
float32. Blocks are 4096-aligned so O_DIRECT reads need no bounce buffer. Shapes are the trace model's divided
by an integer ``scale`` so tests and this 2-core machine can hold them; float32 because bf16 matmuls are slow
on CPUs (the copy size is what matters for the tier, and it is recorded).
"""

from __future__ import annotations

import json
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from traces.io import atomic_path

HEADER_BYTES = 4096
ALIGN = 4096
SCHEMA = "expertflow.experts/1"


class TierError(RuntimeError):
    """The expert file is missing, short, foreign, or a read failed."""


@dataclass(frozen=True)
class StoreLayout:
    num_experts: list[int]  # routed experts per layer
    hidden: int  # model width at this scale
    intermediate: int  # expert FFN width at this scale
    seed: int = 0  # weights are drawn from this seed

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * 4

    @property
    def stride_bytes(self) -> int:
        return -(-self.expert_bytes // ALIGN) * ALIGN

    @property
    def total_experts(self) -> int:
        return sum(self.num_experts)

    def file_bytes(self) -> int:
        return HEADER_BYTES + self.total_experts * self.stride_bytes


def scaled_layout(meta, scale: int, seed: int = 0) -> StoreLayout:
    """The trace model's expert shape divided by ``scale`` (hidden and intermediate sizes, at least 8)."""
    if scale < 1:
        raise TierError(f"executor.scale: expected an integer >= 1, got {scale}")
    inter = meta.intermediate_size or max(1, meta.expert_bytes // (3 * 2 * max(meta.hidden_size, 1)))
    return StoreLayout(list(meta.num_experts), max(8, meta.hidden_size // scale), max(8, inter // scale), seed)


def write_store(path: str | Path, layout: StoreLayout) -> Path:
    """Write random expert weights (seeded, scaled like a real init) atomically."""
    path = Path(path)
    header = json.dumps({"schema": SCHEMA, "num_experts": layout.num_experts, "hidden": layout.hidden,
                         "intermediate": layout.intermediate, "dtype": "float32", "expert_bytes": layout.expert_bytes,
                         "stride_bytes": layout.stride_bytes, "seed": layout.seed}).encode()
    if len(header) > HEADER_BYTES:
        raise TierError(f"{path}: header of {len(header)} bytes does not fit in {HEADER_BYTES}")
    rng = np.random.default_rng(layout.seed)
    n = layout.expert_bytes // 4
    pad = np.zeros((layout.stride_bytes - layout.expert_bytes) // 4, np.float32)
    std = 1.0 / np.sqrt(layout.hidden)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b" "))
        for _ in range(layout.total_experts):
            f.write((rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype(np.float32).tobytes())
            f.write(pad.tobytes())
    return path


def read_layout(path: str | Path) -> StoreLayout:
    path = Path(path)
    if not path.exists():
        raise TierError(f"{path}: no such expert file")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    try:
        h = json.loads(raw.decode().strip())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TierError(f"{path}: not an expert file (header is not JSON: {exc})") from exc
    if h.get("schema") != SCHEMA:
        raise TierError(f"{path}: header field 'schema' = {h.get('schema')!r}, expected {SCHEMA!r}")
    layout = StoreLayout(h["num_experts"], h["hidden"], h["intermediate"], h.get("seed", 0))
    size = path.stat().st_size
    if size < layout.file_bytes():
        raise TierError(f"{path}: {size} bytes, expected {layout.file_bytes()} for {layout.total_experts} experts (short file)")
    return layout


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned anonymous memory (what O_DIRECT needs); raises TierError if it cannot be had."""
    try:
        return mmap.mmap(-1, max(nbytes, ALIGN))
    except (OSError, ValueError, OverflowError) as exc:
        raise TierError(f"cannot allocate {nbytes / 2**20:.1f} MiB of slot memory ({exc})") from exc


class ExpertReader:
    """Reads expert blocks from the packed file, with O_DIRECT where the filesystem allows it."""

    def __init__(self, path: str | Path, direct: bool | None = None):
        self.path = Path(path)
        self.layout = read_layout(self.path)
        self.direct = False
        want = direct is not False
        if want and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as exc:
                if direct:
                    raise TierError(f"{self.path}: O_DIRECT refused ({exc})") from exc
                warnings.warn(
                    f"{self.path}: the filesystem refuses O_DIRECT ({exc.strerror}); falling back to buffered reads "
                    "with posix_fadvise(DONTNEED), so the page cache does not hide the tier",
                    RuntimeWarning, stacklevel=2,
                )
        if not self.direct:
            self.fd = os.open(self.path, os.O_RDONLY)

    def offset(self, key: int) -> int:
        return HEADER_BYTES + key * self.layout.stride_bytes

    def read_into(self, key: int, buf: memoryview) -> int:
        """Read expert ``key`` into ``buf`` (one stride, page-aligned). Returns bytes read."""
        off, want = self.offset(key), self.layout.stride_bytes
        try:
            got = os.preadv(self.fd, [buf], off)
        except OSError as exc:
            raise TierError(f"{self.path}: read of expert {key} at offset {off} ({want} bytes) failed: {exc}") from exc
        if got != want:
            raise TierError(f"{self.path}: read of expert {key} at offset {off} returned {got} bytes, expected {want}")
        if not self.direct:
            os.posix_fadvise(self.fd, off, want, os.POSIX_FADV_DONTNEED)
        return got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
