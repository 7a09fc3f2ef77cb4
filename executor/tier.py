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

import contextlib
import fcntl
import json
import mmap
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

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


MIN_DIM = 8  # the smallest hidden or intermediate size the tier packs


def scaled_layout(meta, scale: int, seed: int = 0) -> StoreLayout:
    """The trace model's expert shape divided by ``scale`` (hidden and intermediate sizes, at least
    ``MIN_DIM``). A scale that would take a known shape below ``MIN_DIM`` is refused rather than clamped (the run
    would then not be at the scale it reports). A trace without a hidden size gives its expert's bytes as
    ``MIN_DIM`` x intermediate."""
    if scale < 1:
        raise TierError(f"executor.scale: expected an integer >= 1, got {scale}")
    inter = meta.intermediate_size or max(1, meta.expert_bytes // (3 * 2 * max(meta.hidden_size, 1)))
    if meta.hidden_size:
        largest = max(1, min(meta.hidden_size, inter) // MIN_DIM)
        if scale > largest:
            raise TierError(
                f"executor.scale: {scale} would shrink {meta.model!r}'s experts (hidden {meta.hidden_size}, intermediate "
                f"{inter}) below {MIN_DIM}, the smallest size the tier packs; the largest scale for this model is {largest}")
    return StoreLayout(list(meta.num_experts), max(MIN_DIM, meta.hidden_size // scale), max(MIN_DIM, inter // scale), seed)


def ensure_store(path: str | Path, layout: StoreLayout, log=None) -> Path:
    """The expert file ``path``, written (announced, with progress) unless it exists; first removes what runs
    killed while writing an expert file left in its directory. Raises TierError, naming the directory, when it
    cannot be made, is a file, or has too little free space, and when the write fails (the disk filled, ...)."""
    path = Path(path)
    log = log or sys.stderr
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TierError(f"paths.tier_dir: cannot use {path.parent} as the tier's directory ({exc.strerror or exc})") from exc
    removed, freed = clean_stale_temps(path.parent)
    if removed:
        print(f"executor: removed {removed} temp file(s) that killed runs left in {path.parent} ({freed / 1e9:.2f} GB)",
              file=log)
    if path.exists():
        return path
    need, free = layout.file_bytes(), shutil.disk_usage(path.parent).free
    if need > free:
        raise TierError(f"paths.tier_dir: the expert file needs {need / 1e9:.2f} GB and {path.parent} has "
                        f"{free / 1e9:.2f} GB free; raise executor.scale or point paths.tier_dir at a larger disk")
    print(f"executor: writing the expert file {path} ({need / 1e9:.2f} GB: {layout.total_experts} experts of "
          f"{layout.stride_bytes / 2**20:.2f} MiB); later runs of this model shape and seed reuse it", file=log)
    try:
        return write_store(path, layout, progress=True)
    except OSError as exc:
        raise TierError(f"{path}: cannot write the expert file ({exc.strerror or exc}); nothing was left behind") from exc


def write_store(path: str | Path, layout: StoreLayout, progress: bool = False) -> Path:
    """Write random expert weights (seeded, scaled like a real init) atomically; ``progress``: a progress bar
    on stderr (a full-size file takes a minute or more)."""
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
    with locked_temp(path) as f, _bar(layout.file_bytes(), f"writing {path.name}", progress) as bar:
        f.write(header.ljust(HEADER_BYTES, b" "))
        for _ in range(layout.total_experts):
            f.write((rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype(np.float32).tobytes())
            f.write(pad.tobytes())
            bar.update(layout.stride_bytes)
    return path


def _bar(total_bytes: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not show, leave=False)


@contextlib.contextmanager
def locked_temp(path: str | Path) -> Iterator[BinaryIO]:
    """A temp file next to ``path`` (``.NAME.XXXXXXXX.tmp``), open for writing and ``flock``-ed by this process
    for as long as it is written; renamed onto ``path`` if the block succeeds, removed if not. The lock is how
    :func:`clean_stale_temps` tells a temp some live run is writing from one a killed run left behind: the
    kernel releases it when its holder dies, however it dies (a pid in the name could be reused)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _lock(fd, blocking=True)
        if _same_file(tmp, fd):
            break
        os.close(fd)  # a cleaner removed it between mkstemp and the lock (it was unlocked then): another name
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give outputs the usual permissions
        os.replace(tmp, path)  # still locked: no cleaner can take it before it has its final name
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        f.close()  # releases the lock


def clean_stale_temps(directory: str | Path, pattern: str = ".*.experts.*.tmp") -> tuple[int, int]:
    """Remove the temps of expert files (:func:`locked_temp`'s) in ``directory`` that no live process holds
    locked: what runs killed while writing left behind. Returns (files removed, bytes freed). A temp whose
    lock cannot be tested (a filesystem without locks) is left alone."""
    removed = freed = 0
    for tmp in Path(directory).glob(pattern) if Path(directory).is_dir() else ():
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _lock(fd, blocking=False) or not _same_file(tmp, fd):
                continue
            size = os.fstat(fd).st_size
            os.unlink(tmp)
            removed, freed = removed + 1, freed + size
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed, freed


def _lock(fd: int, blocking: bool) -> bool:
    """Take an exclusive flock on ``fd``: True if held, False if another process holds it or the filesystem
    has no locks (a writer then writes unlocked, and a cleaner leaves the file alone)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _same_file(path: str | Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


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
