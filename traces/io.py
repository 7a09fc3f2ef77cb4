"""Read and write traces as Parquet; atomic writes (temp file + rename) so an error never leaves output."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import META_KEY, PHASE_DECODE, PHASE_PREFILL, Trace, TraceError, TraceMeta

COLUMNS = ("seq_id", "position", "phase", "layer", "token_id", "experts", "weights")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        if os.path.exists(tmp):  # mkstemp makes 0600 files; give outputs the usual permissions
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


def safe_name(name: object, max_chars: int = 160) -> str:
    """``name`` (a trace's model field, a trace or run name: text from data or config) as one file name that
    stays inside the directory it is joined to. Every character but ASCII letters, digits and ``._+=,-``
    (path separators, NUL, spaces, other scripts) becomes ``_``, leading dots go (no ``..``, no hidden files),
    and a long name is cut; whenever anything changed, 8 hex digits of the original's digest are appended, so
    two names that differ still map to different files. A safe name (the empty one included: callers add
    their own suffix) is returned unchanged."""
    s = str(name)
    out = _UNSAFE.sub("_", s).lstrip(".")[:max_chars]
    if out == s:
        return out
    digest = hashlib.sha1(s.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{out or 'unnamed'}-{digest}"


def settings_diff(stored: dict, now: dict) -> list[str]:
    """The settings that differ between a stored manifest and a new run, as ``key (was X, now Y)``, by key
    (what a resumable job names when it refuses outputs of other settings)."""
    return [f"{k} (was {stored.get(k)!r}, now {now.get(k)!r})" for k in sorted(set(stored) | set(now))
            if stored.get(k) != now.get(k)]


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory next to ``path``; swap it in for ``path`` only if the block succeeds. A directory
    cannot be renamed over a non-empty one, so the old one is moved aside first (and put back if the swap
    fails; if even that fails, the old copy stays at its hidden name, which the error gives): at no point is
    there a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 directories
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists():
                try:
                    os.replace(old, path)
                except OSError as exc:
                    raise OSError(f"{path}: the swap failed and so did putting the old copy back; it is kept at "
                                  f"{old}") from exc
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old.exists() and path.exists():  # else the old copy is the only one: leave it for the user
            shutil.rmtree(old)


def trace_to_table(trace: Trace) -> pa.Table:
    T, L, K = trace.experts.shape
    rep = lambda a: np.repeat(a, L)  # noqa: E731 - one row per (token, layer)
    table = pa.table(
        {
            "seq_id": pa.array(rep(trace.seq_id.astype(np.int32))),
            "position": pa.array(rep(trace.position.astype(np.int32))),
            "phase": pa.array(rep(trace.phase.astype(np.int8))),
            "layer": pa.array(np.tile(np.arange(L, dtype=np.int16), T)),
            "token_id": pa.array(rep(trace.token_id.astype(np.int32))),
            "experts": pa.FixedSizeListArray.from_arrays(pa.array(trace.experts.reshape(-1).astype(np.int16)), K),
            "weights": pa.FixedSizeListArray.from_arrays(
                pa.array(trace.weights.reshape(-1).astype(np.float32)), K
            ),
        }
    )
    return table.replace_schema_metadata({META_KEY: trace.meta.to_json().encode()})


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Validate and write ``trace`` to ``path`` atomically. Returns the path."""
    if Path(path).is_dir():
        raise TraceError(f"{path}: is a directory; expected the path of a trace file to write (e.g. OUT.parquet)")
    check_trace(trace, where=str(path))
    with atomic_path(path) as tmp:
        pq.write_table(trace_to_table(trace), tmp, compression="zstd")
    return Path(path)


def read_trace(path: str | Path) -> Trace:
    """Load a trace file into dense arrays. Errors name the file and what was wrong with it."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise TraceError(f"{where}: no such trace file")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for truncated/foreign files
        raise TraceError(f"{where}: not a readable Parquet file ({exc})") from exc
    raw_meta = (pf.schema_arrow.metadata or {}).get(META_KEY)
    if raw_meta is None:
        raise TraceError(f"{where}: Parquet file has no '{META_KEY.decode()}' metadata: not an expertflow trace")
    meta = TraceMeta.from_json(raw_meta, where=f"{where}: metadata")
    names = set(pf.schema_arrow.names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise TraceError(f"{where}: missing column(s) {missing}; expected {list(COLUMNS)}")
    try:
        table = pf.read(columns=list(COLUMNS))
    except Exception as exc:
        raise TraceError(f"{where}: could not read Parquet data ({exc})") from exc
    return table_to_trace(table, meta, where, path)


def table_to_trace(table: pa.Table, meta: TraceMeta, where: str, path: Path | None = None) -> Trace:
    L, K = meta.num_layers, meta.top_k
    n = table.num_rows
    if n == 0:
        raise TraceError(f"{where}: no rows, expected at least one token ({L} rows per token)")
    if n % L:
        raise TraceError(f"{where}: {n} rows is not a multiple of num_layers={L} (one row per token and layer)")
    col = lambda name: table.column(name).combine_chunks()  # noqa: E731
    layer = _int_column(col("layer"), "layer", where, np.int64)
    bad_layer = np.flatnonzero(layer != np.tile(np.arange(L), n // L))
    if bad_layer.size:
        r = int(bad_layer[0])
        raise TraceError(f"{where}: row {r}: field 'layer' = {layer[r]}, expected {r % L} (rows grouped by token)")
    experts = _fixed_list(col("experts"), K, where, "experts", np.int16)
    weights = _fixed_list(col("weights"), K, where, "weights", np.float32)
    per_token = {name: _int_column(col(name), name, where, dtype)[::L].astype(dtype)
                 for name, dtype in (("seq_id", np.int32), ("position", np.int32), ("phase", np.int8),
                                     ("token_id", np.int32))}
    trace = Trace(meta, experts.reshape(n // L, L, K), weights.reshape(n // L, L, K), per_token["seq_id"],
                  per_token["position"], per_token["phase"], per_token["token_id"], path)
    check_trace(trace, where)
    return trace


def _no_nulls(arr: pa.Array, where: str, name: str, expected: str, per_row: int = 1) -> None:
    """A null would otherwise become 0 in numpy (a null phase reads as prefill, a null expert as expert 0)."""
    if arr.null_count:
        r = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]) // per_row
        raise TraceError(f"{where}: row {r}: field '{name}' {'holds a' if per_row > 1 else 'is'} null, expected {expected}")


def _in_range(values: np.ndarray, dtype, where: str, name: str, per_row: int = 1) -> np.ndarray:
    """``values`` cast to ``dtype`` after checking they fit (a cast would wrap 65536 to expert 0)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        bad = np.flatnonzero((values < info.min) | (values > info.max))
        if bad.size:
            i = int(bad[0])
            raise TraceError(f"{where}: row {i // per_row}: field '{name}' = {values[i]}, expected an integer in "
                             f"{info.min}..{info.max}")
    return values.astype(dtype)


def _int_column(arr: pa.Array, name: str, where: str, dtype) -> np.ndarray:
    if not pa.types.is_integer(arr.type):
        raise TraceError(f"{where}: column '{name}' has type {arr.type}, expected integers")
    _no_nulls(arr, where, name, "an integer")
    return _in_range(arr.to_numpy(zero_copy_only=False).astype(np.int64), dtype, where, name)


def _fixed_list(arr: pa.Array, k: int, where: str, name: str, dtype) -> np.ndarray:
    """The flat values of a column of k-element lists, as ``dtype``, after checking lengths, types and nulls."""
    fixed = pa.types.is_fixed_size_list(arr.type)
    if not (fixed or pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise TraceError(f"{where}: column '{name}' has type {arr.type}, expected a list of {k} numbers")
    _no_nulls(arr, where, name, f"a list of {k} numbers")
    if fixed and arr.type.list_size != k:
        raise TraceError(f"{where}: column '{name}' holds lists of {arr.type.list_size}, expected top_k={k}")
    if not fixed:
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != k)
        if bad.size:
            raise TraceError(f"{where}: row {int(bad[0])}: column '{name}' has {lengths[bad[0]]} entries, expected {k}")
    values = arr.flatten()
    is_int = np.issubdtype(dtype, np.integer)
    if not (pa.types.is_integer(values.type) or (not is_int and pa.types.is_floating(values.type))):
        raise TraceError(f"{where}: column '{name}' holds {values.type}, expected lists of "
                         f"{'integers' if is_int else 'numbers'}")
    _no_nulls(values, where, name, f"{k} numbers, none null", per_row=k)
    raw = values.to_numpy(zero_copy_only=False)
    return _in_range(raw.astype(np.int64) if is_int else raw, dtype, where, name, per_row=k)


def check_trace(trace: Trace, where: str) -> None:
    """Content checks shared by every reader and writer: ranges, duplicates, NaNs, ordering of phases."""
    meta = trace.meta
    meta.validate(f"{where}: metadata")
    T = trace.num_tokens
    if T == 0:  # every consumer (stats, the simulator) needs at least one token
        raise TraceError(f"{where}: no tokens, expected at least one")
    if trace.experts.ndim != 3 or trace.experts.shape[1:] != (meta.num_layers, meta.top_k):
        raise TraceError(
            f"{where}: experts array has shape {trace.experts.shape}, expected (tokens, {meta.num_layers}, {meta.top_k})"
        )
    for name in ("weights",):
        if getattr(trace, name).shape != trace.experts.shape:
            raise TraceError(f"{where}: {name} shape {getattr(trace, name).shape} != experts shape")
    for name in ("seq_id", "position", "phase", "token_id"):
        if getattr(trace, name).shape != (T,):
            raise TraceError(f"{where}: {name} has shape {getattr(trace, name).shape}, expected ({T},)")
    limit = np.asarray(meta.num_experts)[None, :, None]
    bad = np.argwhere((trace.experts < 0) | (trace.experts >= limit))
    if bad.size:
        t, layer, k = (int(x) for x in bad[0])
        raise TraceError(
            f"{where}: token {t} layer {layer} rank {k}: field 'experts' = {int(trace.experts[t, layer, k])}, "
            f"expected an expert id in 0..{meta.num_experts[layer] - 1}"
        )
    if meta.top_k > 1:
        s = np.sort(trace.experts, axis=2)
        dup = np.argwhere((s[:, :, 1:] == s[:, :, :-1]).any(axis=2))
        if dup.size:
            t, layer = (int(x) for x in dup[0])
            raise TraceError(
                f"{where}: token {t} layer {layer}: field 'experts' = {trace.experts[t, layer].tolist()} repeats an expert; "
                "expected distinct experts in a token's top-k"
            )
    nan = np.argwhere(~np.isfinite(trace.weights))
    if nan.size:
        t, layer, k = (int(x) for x in nan[0])
        raise TraceError(f"{where}: token {t} layer {layer} rank {k}: field 'weights' is {trace.weights[t, layer, k]}, expected a finite number")
    if not np.isin(trace.phase, (PHASE_PREFILL, PHASE_DECODE)).all():
        raise TraceError(f"{where}: field 'phase' must be 0 (prefill) or 1 (decode)")
