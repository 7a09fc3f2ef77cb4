"""The one trace format every producer and consumer uses.

On disk: a Parquet table, one row per (sequence, token position, phase, layer), with the top-k expert ids in
rank order and their gate weights; the metadata (:class:`TraceMeta`) travels as JSON in the Parquet schema
metadata under the key ``expertflow``. In memory: :class:`Trace`, dense numpy arrays indexed
``[token, layer, rank]`` for fast replay. Tokens are ordered by sequence, then phase (prefill before decode),
then position.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
META_KEY = b"expertflow"
PHASE_PREFILL = 0
PHASE_DECODE = 1
PHASES = {"prefill": PHASE_PREFILL, "decode": PHASE_DECODE}


class TraceError(ValueError):
    """Bad trace input. The message names the file, the row/line or field, and what was expected."""


@dataclass
class TraceMeta:
    """Facts about the model and the recording that every consumer needs."""

    model: str  # model name, e.g. "mixtral-8x7b"
    num_layers: int  # number of MoE layers in the trace
    num_experts: list[int]  # routed experts per MoE layer (may differ per layer)
    top_k: int  # experts chosen per token per layer
    expert_bytes: int  # bytes of one routed expert's weights (all its matrices)
    hidden_size: int  # model hidden size (width of the hidden-state sidecar)
    dtype: str = "bfloat16"  # weight dtype that expert_bytes assumes
    source: str = ""  # where the routing came from (file, importer, generator, collector)
    intermediate_size: int = 0  # expert FFN width; 0 = unknown (derived from expert_bytes when needed)
    shared_experts: int = 0  # always-active shared experts per layer (not part of the routed choices)
    model_path: str = ""  # local path of the model the trace came from, for predictors that need weights
    layer_names: list[str] = field(default_factory=list)  # optional per-layer labels, e.g. "encoder.1"
    extra: dict = field(default_factory=dict)  # free-form provenance (gap reports, generator knobs)
    schema_version: int = SCHEMA_VERSION  # format version this file was written with

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, int):
            self.num_experts = [int(self.num_experts)] * int(self.num_layers)
        self.num_experts = [int(e) for e in self.num_experts]

    def validate(self, where: str = "metadata") -> None:
        def bad(fld: str, expected: str, got: object) -> TraceError:
            return TraceError(f"{where}: field '{fld}': expected {expected}, got {got!r}")

        if self.schema_version > SCHEMA_VERSION:
            raise bad("schema_version", f"<= {SCHEMA_VERSION} (this reader)", self.schema_version)
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise bad("num_layers", "a positive integer", self.num_layers)
        if len(self.num_experts) != self.num_layers:
            raise bad("num_experts", f"one entry per layer ({self.num_layers})", self.num_experts)
        if min(self.num_experts) < 1:
            raise bad("num_experts", "positive counts", self.num_experts)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= min(self.num_experts):
            raise bad("top_k", f"an integer in 1..{min(self.num_experts)}", self.top_k)
        if not isinstance(self.expert_bytes, int) or self.expert_bytes <= 0:
            raise bad("expert_bytes", "a positive integer", self.expert_bytes)
        if not isinstance(self.hidden_size, int) or self.hidden_size < 0:
            raise bad("hidden_size", "a non-negative integer", self.hidden_size)
        # JSON can carry a lone surrogate ("\udcff"), which no UTF-8 output (a table, a plot, a report) can hold
        for name in ("model", "dtype", "source", "model_path", "layer_names"):
            value = getattr(self, name)
            if any(not _is_utf8(v) for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)):
                raise bad(name, "text that can be written as UTF-8 (no lone surrogates)", value)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "metadata") -> TraceMeta:
        try:
            raw = json.loads(text)
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
            raise TraceError(f"{where}: metadata is not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise TraceError(f"{where}: metadata is {type(raw).__name__} {raw!r:.80}, expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        required = {"model", "num_layers", "num_experts", "top_k", "expert_bytes", "hidden_size"}
        missing = sorted(required - raw.keys())
        if missing:
            raise TraceError(f"{where}: metadata is missing field(s) {missing}")
        fields = {k: v for k, v in raw.items() if k in known}
        # type-check before constructing: __post_init__ converts num_experts with int(), which would raise a
        # bare ValueError / TypeError (or silently truncate 8.5) on a foreign file
        for name, value in fields.items():
            kind = _META_TYPES[name]
            ok = _is_int(value) if kind is int else isinstance(value, kind)
            if name == "num_experts":
                ok = _is_int(value) or (isinstance(value, list) and all(_is_int(e) for e in value))
            elif name == "layer_names":
                ok = ok and all(isinstance(e, str) for e in value)
            if not ok:
                expected = _META_EXPECTED.get(name) or {int: "an integer", str: "a string"}[kind]
                raise TraceError(f"{where}: field '{name}': expected {expected}, got {value!r}")
        meta = cls(**fields)
        meta.validate(where)
        return meta

    @property
    def layer_offsets(self) -> np.ndarray:
        """Start of each layer's block in the flat expert id space (``layer_offsets[l] + expert``)."""
        return np.concatenate([[0], np.cumsum(self.num_experts)[:-1]]).astype(np.int64)

    @property
    def total_experts(self) -> int:
        return int(sum(self.num_experts))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_META_TYPES = {"model": str, "num_layers": int, "num_experts": list, "top_k": int, "expert_bytes": int,
               "hidden_size": int, "dtype": str, "source": str, "intermediate_size": int, "shared_experts": int,
               "model_path": str, "layer_names": list, "extra": dict, "schema_version": int}
_META_EXPECTED = {"num_experts": "an integer or a list of integers (one per layer)",
                  "layer_names": "a list of strings", "extra": "a JSON object"}


@dataclass
class Trace:
    """Dense in-memory routing trace. T tokens, L layers, K = top_k."""

    meta: TraceMeta
    experts: np.ndarray  # int16 [T, L, K], expert ids in rank order
    weights: np.ndarray  # float32 [T, L, K], gate weights (NaN-free; 0 where the source had none)
    seq_id: np.ndarray  # int32 [T], sequence each token belongs to
    position: np.ndarray  # int32 [T], token position within its sequence (per phase as recorded)
    phase: np.ndarray  # int8 [T], PHASE_PREFILL or PHASE_DECODE
    token_id: np.ndarray  # int32 [T], input token id, -1 where unknown
    path: Path | None = None  # file it was loaded from, for the lazy hidden-state sidecar

    def __post_init__(self) -> None:
        self._next_use: np.ndarray | None = None
        self._hidden = None

    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def sequences(self) -> np.ndarray:
        """Distinct sequence ids in file order."""
        _, first = np.unique(self.seq_id, return_index=True)
        return self.seq_id[np.sort(first)]

    def flat_ids(self) -> np.ndarray:
        """int64 [T, L, K]: experts as ids unique across layers (``layer_offsets[l] + expert``)."""
        return self.experts.astype(np.int64) + self.meta.layer_offsets[None, :, None]

    def next_use(self) -> np.ndarray:
        """int64 [T, L, K]: next token index (same sequence order as the file) at which the same expert of the
        same layer is used again, or T if never. Computed once and cached: Belady and the oracle read it."""
        if self._next_use is None:
            self._next_use = next_use_of(self.flat_ids().reshape(self.num_tokens, -1), self.num_tokens).reshape(
                self.experts.shape
            )
        return self._next_use

    def select(self, token_mask: np.ndarray) -> Trace:
        """A new trace holding only the tokens where ``token_mask`` is true (hidden states stay reachable)."""
        idx = np.flatnonzero(token_mask)
        sub = Trace(
            self.meta,
            self.experts[idx],
            self.weights[idx],
            self.seq_id[idx],
            self.position[idx],
            self.phase[idx],
            self.token_id[idx],
            self.path,
        )
        parent = getattr(self, "_parent_index", None)  # a selection of a selection: rows of the first parent
        sub._parent_index = idx if parent is None else parent[idx]  # rows of the hidden-state sidecar
        return sub

    def hidden_states(self):
        """The input hidden state of every MoE layer, float tensor [T, L, H], loaded lazily from the sidecar
        ``<trace>.hidden.safetensors``. Raises TraceError if the trace has none."""
        if self._hidden is None:
            self._hidden = load_hidden(self)
        return self._hidden

    def has_hidden_states(self) -> bool:
        return self.path is not None and sidecar_path(self.path).exists()


SIDECAR_SUFFIX = ".hidden.safetensors"


def sidecar_path(trace_path: str | Path) -> Path:
    """The hidden-state sidecar of the trace file ``trace_path`` (see :mod:`traces.sidecar`)."""
    p = Path(trace_path)
    return p.with_name(p.name.removesuffix(".parquet") + SIDECAR_SUFFIX)


def load_hidden(trace: Trace) -> np.ndarray:
    """The sidecar's hidden states of ``trace``'s tokens (rows of its parent file's sidecar for a selection)."""
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


def next_use_of(keys_by_time: np.ndarray, horizon: int) -> np.ndarray:
    """For a [T, M] array of keys (M keys used at each time step, -1 = no key), return for each entry the next
    time step > t at which the same key appears, or ``horizon`` if never. Vectorised: sort by (key, time)."""
    T, M = keys_by_time.shape
    flat = keys_by_time.reshape(-1)
    times = np.repeat(np.arange(T, dtype=np.int64), M)
    order = np.lexsort((times, flat))
    k_sorted, t_sorted = flat[order], times[order]
    nxt = np.full(flat.shape, horizon, dtype=np.int64)
    # Within a key's run, the next occurrence at a strictly later time. Entries of the same key at the same
    # time (duplicates) share the next later time: walk back over equal times.
    same_key = k_sorted[1:] == k_sorted[:-1]
    cand = np.where(same_key, t_sorted[1:], horizon)
    res = np.append(cand, horizon)
    # fix runs of equal (key, time): propagate from the last element of the run
    eq = np.append((k_sorted[1:] == k_sorted[:-1]) & (t_sorted[1:] == t_sorted[:-1]), False)
    for i in range(len(res) - 2, -1, -1) if eq.any() else ():
        if eq[i]:
            res[i] = res[i + 1]
    nxt[order] = res
    nxt[flat < 0] = horizon
    return nxt.reshape(T, M)
