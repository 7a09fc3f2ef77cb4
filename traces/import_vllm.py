"""The ``vllm-jsonl`` importer: routing logs written by common vLLM routing-logging patches.

Format (JSON lines; one file per layer, or all layers in one file)::

    {"type": "meta", "model_id": "...", "layers_logged": [0, ...], "top_k": 8, "num_experts": 64, ...}
    {"type": "route", "req_id": "r0", "token_idx": 0, "layer": 0, "topk_ids": [8 ints], "topk_weights": [8 numbers]}
    ...  one route row per (token, layer)

``num_experts`` and ``req_id`` may be absent; other meta fields (vLLM version, device, seed) are kept as
provenance in ``extra.import.source_meta``.

Passes. A forward pass (a prefill chunk or a decode step) starts where a layer's ``token_idx`` restarts at 0;
within a pass it counts 0, 1, 2, ... (anything else is refused). A log whose ``token_idx`` never restarts is
one pass, whatever the engine did: its pass boundaries are unknown.

Warm-up. Before serving, vLLM runs passes on dummy input (the profiling run, CUDA-graph captures): every row
routes to the same experts with uniform weights. The leading run of such rows of each pass -- a whole warm-up
pass, or the head of a log that never restarts -- is dropped and reported. With top-1 a weight is always
uniform, so detection is off (reported).

Alignment. Each layer's rows come from one file. All layers must have the same passes (number and sizes) and
the same warm-up rows; row i of a pass is the same token in every layer. Files whose passes differ (not the
same run) are refused, naming the files and the first pass that differs.

Sequences.

- ``req_id`` takes more than one value: a sequence per request (in order of first appearance). A request's
  rows in its first pass, and in any pass where it has more than one row, are prefill; one row per pass
  afterwards is a decode step. Positions count the request's rows.
- No request ids (``req_id`` constant or absent): the rows of a pass are in the engine's batch order, and
  which row belongs to which request is not recorded.

  - default: every kept row, in log order, as one sequence (a batch's rows interleave in it); phases are
    unknown and every token is marked decode (one token per replay step).
  - ``--batch-order B``: row i of each decode pass of B rows is sequence i's next token. The first pass of
    exactly B rows starts the decode (the passes before it are prefill of the whole batch, whose rows cannot
    be attributed: dropped). The mapping holds while the pass size stays B; where it changes (a request
    finished and the batch was compacted, or new prefill), it stops: that pass and everything after it are
    dropped, and the report says where. Needs known passes (``token_idx`` restarts).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .presets import select_layers
from .schema import PHASE_DECODE, PHASE_PREFILL, Trace, TraceError, TraceMeta
from .sources import text_lines

FORMAT = "vllm-jsonl"
UNIFORM_TOL = 1e-6  # weights of a warm-up row differ by at most this (they are 1/k, or 1/E renormalised)


@dataclass
class LayerLog:
    """One layer's route rows, in log order."""

    path: Path  # the file they came from
    layer: int  # the model's layer id
    lines: list[int] = field(default_factory=list)  # line number of each row
    req: list = field(default_factory=list)  # req_id of each row (None where absent)
    token_idx: list[int] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)  # [rows][top_k]
    weights: list[list[float]] = field(default_factory=list)  # [rows][top_k]

    def at(self, row: int) -> str:
        return f"{self.path}:{self.lines[row]}"


def _int(value, where: str, fld: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"{where}: field '{fld}' = {value!r:.60}, expected an integer")
    if minimum is not None and value < minimum:
        raise TraceError(f"{where}: field '{fld}' = {value}, expected an integer >= {minimum}")
    return value


def _read_meta(rec: dict, where: str) -> dict:
    missing = [f for f in ("model_id", "layers_logged", "top_k") if f not in rec]
    if missing:
        raise TraceError(f"{where}: meta line lacks field(s) {missing}")
    if not isinstance(rec["model_id"], str):
        raise TraceError(f"{where}: field 'model_id' = {rec['model_id']!r:.60}, expected a string")
    layers = rec["layers_logged"]
    if not isinstance(layers, list) or not layers:
        raise TraceError(f"{where}: field 'layers_logged' = {layers!r:.60}, expected a non-empty list of layer ids")
    for x in layers:
        _int(x, where, "layers_logged", 0)
    if len(set(layers)) != len(layers):
        raise TraceError(f"{where}: field 'layers_logged' = {layers} repeats a layer, expected distinct layer ids")
    _int(rec["top_k"], where, "top_k", 1)
    if rec.get("num_experts") is not None:
        _int(rec["num_experts"], where, "num_experts", 1)
    return rec


def _read_route(rec: dict, where: str, meta: dict) -> tuple[int, object, int, list[int], list[float]]:
    for f in ("token_idx", "layer", "topk_ids", "topk_weights"):
        if f not in rec:
            raise TraceError(f"{where}: route row lacks field '{f}'")
    layer = _int(rec["layer"], where, "layer")
    if layer not in meta["layers_logged"]:
        raise TraceError(f"{where}: field 'layer' = {layer}, expected one of the meta line's layers_logged "
                         f"{meta['layers_logged']}")
    tidx = _int(rec["token_idx"], where, "token_idx", 0)
    req = rec.get("req_id")
    if isinstance(req, bool) or not isinstance(req, (str, int, type(None))):
        raise TraceError(f"{where}: field 'req_id' = {req!r:.60}, expected a string, an integer or null")
    k = meta["top_k"]
    ids, w = rec["topk_ids"], rec["topk_weights"]
    for name, val in (("topk_ids", ids), ("topk_weights", w)):
        if not isinstance(val, list):
            raise TraceError(f"{where}: field '{name}' = {val!r:.60}, expected a list of {k}")
        if len(val) != k:
            raise TraceError(f"{where}: field '{name}' has {len(val)} entries, expected top_k={k} (the meta line)")
    for e in ids:
        _int(e, where, "topk_ids", 0)
    if len(set(ids)) != k:
        raise TraceError(f"{where}: field 'topk_ids' = {ids} repeats an expert, expected distinct experts")
    for x in w:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise TraceError(f"{where}: field 'topk_weights' holds {x!r:.30}, expected finite numbers")
    return layer, req, tidx, ids, [float(x) for x in w]


def read_log(path: Path) -> tuple[dict, dict[int, LayerLog]]:
    """The meta line and the route rows (by layer) of one log file; every problem names its line."""
    from tqdm import tqdm

    meta, logs = None, {}
    lines = text_lines(path, "JSON lines")
    for n, line in enumerate(tqdm(lines, desc=f"reading {path.name}", unit="line", disable=len(lines) < 200_000), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc.msg})") from None
        kind = rec.get("type") if isinstance(rec, dict) else None
        if kind not in ("meta", "route"):
            got = f"field 'type' = {kind!r:.40}" if isinstance(rec, dict) else f"a JSON {type(rec).__name__}"
            raise TraceError(f"{where}: {got}, expected an object of type 'meta' or 'route'")
        if kind == "meta":
            if meta is not None:
                raise TraceError(f"{where}: a second meta line (the first is line {meta['_line']}), expected one per file")
            meta = {**_read_meta(rec, where), "_line": n}
            continue
        if meta is None:
            raise TraceError(f"{where}: a route row before the meta line, expected the meta line "
                             '{"type": "meta", "model_id", "layers_logged", "top_k", ...} first')
        layer, req, tidx, ids, w = _read_route(rec, where, meta)
        log = logs.setdefault(layer, LayerLog(path, layer))
        log.lines.append(n)
        log.req.append(req)
        log.token_idx.append(tidx)
        log.ids.append(ids)
        log.weights.append(w)
    if meta is None:
        raise TraceError(f"{path}:1: no meta line (empty input), expected "
                         '{"type": "meta", "model_id", "layers_logged", "top_k", ...} first')
    absent = [layer for layer in meta["layers_logged"] if layer not in logs]
    if absent:
        raise TraceError(f"{path}:{meta['_line']}: layers_logged names layer {absent[0]}, but the file has no "
                         "route row for it")
    return meta, logs


def passes_of(log: LayerLog) -> np.ndarray:
    """Start row of each pass (plus the end): a pass starts where token_idx restarts at 0."""
    t = np.asarray(log.token_idx, dtype=np.int64)
    if t[0] != 0:
        raise TraceError(f"{log.at(0)}: token_idx {t[0]} at layer {log.layer}'s first row, expected 0 (a pass "
                         "starts at 0)")
    bad = np.flatnonzero((t[1:] != 0) & (t[1:] != t[:-1] + 1))
    if bad.size:
        i = int(bad[0]) + 1
        raise TraceError(f"{log.at(i)}: token_idx {t[i]} after {t[i - 1]} (line {log.lines[i - 1]}) in layer "
                         f"{log.layer}, expected {t[i - 1] + 1} (the pass's next row) or 0 (a new pass)")
    return np.append(np.flatnonzero(t == 0), len(t))


def uniform_rows(w: np.ndarray) -> np.ndarray:
    """Rows whose top-k weights are all equal (never flagged with top-1, where one weight is always uniform)."""
    return ((w.max(axis=1) - w.min(axis=1)) <= UNIFORM_TOL) & (w.shape[1] > 1)


def warmup_rows(ids: np.ndarray, w: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The number of warm-up (dummy input) rows at the head of each pass: rows with uniform weights and the
    same experts as the pass's first row, when they fill the pass or run for at least 2 rows (a lone real row
    that happens to have uniform weights is not taken for a warm-up)."""
    first = np.repeat(bounds[:-1], np.diff(bounds))
    dummy = uniform_rows(w) & (ids == ids[first]).all(axis=1)
    runs = np.zeros(len(bounds) - 1, dtype=np.int64)
    for p, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        not_dummy = np.flatnonzero(~dummy[s:e])
        run = not_dummy[0] if not_dummy.size else e - s
        runs[p] = run if run == e - s or run >= 2 else 0
    return runs


def _check_same_run(metas: list[tuple[Path, dict]]) -> None:
    p0, m0 = metas[0]
    for path, m in metas[1:]:
        for f in ("model_id", "top_k", "num_experts"):
            if m.get(f) != m0.get(f):
                raise TraceError(f"{path}:{m['_line']}: field '{f}' = {m.get(f)!r}, but {p0}:{m0['_line']} has "
                                 f"{m0.get(f)!r}: the files must come from the same run")


def _align(logs: list[LayerLog], bounds: dict[int, np.ndarray], warm: dict[int, np.ndarray]) -> None:
    """Refuse layers whose passes (count, sizes, warm-up rows, request ids) differ from the first layer's."""
    ref = logs[0]
    rb, rw = bounds[ref.layer], warm[ref.layer]
    for log in logs[1:]:
        b, w = bounds[log.layer], warm[log.layer]
        sizes, rsizes = np.diff(b), np.diff(rb)
        n = min(len(sizes), len(rsizes))
        diff = np.flatnonzero((sizes[:n] != rsizes[:n]) | (w[:n] != rw[:n]))
        if diff.size:
            p = int(diff[0])
            what = "rows" if sizes[p] != rsizes[p] else "warm-up rows"
            mine, theirs = (sizes[p], rsizes[p]) if what == "rows" else (w[p], rw[p])
            raise TraceError(f"{log.at(b[p])}: pass {p + 1} of layer {log.layer} has {mine} {what}, but pass {p + 1} "
                             f"of layer {ref.layer} ({ref.at(rb[p])}) has {theirs}: {log.path} and {ref.path} are not "
                             "from the same run (their passes differ), refusing to align them")
        if len(sizes) != len(rsizes):
            short, long_, lb = (log, ref, rb) if len(sizes) < len(rsizes) else (ref, log, b)
            raise TraceError(f"{long_.at(lb[n])}: pass {n + 1} of layer {long_.layer} has no counterpart in layer "
                             f"{short.layer} ({short.path} ends after {n} passes): {log.path} and {ref.path} are not "
                             "from the same run, refusing to align them")
        bad = next((i for i, (a, r) in enumerate(zip(log.req, ref.req)) if a != r), None)
        if bad is not None:
            raise TraceError(f"{log.at(bad)}: req_id {log.req[bad]!r} where layer {ref.layer} has {ref.req[bad]!r} "
                             f"({ref.at(bad)}): {log.path} and {ref.path} are not from the same run")


def _check_experts(log: LayerLog, ids: np.ndarray, num_experts: int) -> None:
    bad = np.argwhere(ids >= num_experts)
    if bad.size:
        r = int(bad[0][0])
        raise TraceError(f"{log.at(r)}: field 'topk_ids' = {ids[r].tolist()}: expert {int(ids[r, bad[0][1]])} out of "
                         f"range, expected 0..{num_experts - 1} (layer {log.layer})")


def _by_request(req: list, pass_of: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sequence, phase, position) of each row when req_id names the request (see the module docstring)."""
    seq_of: dict = {}
    first_pass: dict = {}
    count: dict = {}
    rows_in_pass: dict = {}
    for r, p in zip(req, pass_of.tolist()):
        rows_in_pass[(r, p)] = rows_in_pass.get((r, p), 0) + 1
    seq, phase, pos = (np.zeros(len(req), np.int32) for _ in range(3))
    for i, (r, p) in enumerate(zip(req, pass_of.tolist())):
        seq[i] = seq_of.setdefault(r, len(seq_of))
        first_pass.setdefault(r, p)
        phase[i] = PHASE_PREFILL if p == first_pass[r] or rows_in_pass[(r, p)] > 1 else PHASE_DECODE
        pos[i] = count.get(r, 0)
        count[r] = pos[i] + 1
    return seq, phase, pos


def import_vllm(paths: list[Path], meta: TraceMeta, batch_order: int | None = None) -> Trace:
    """Import vLLM routing logs (see the module docstring); the report lands in ``meta.extra['import']``."""
    metas, by_layer = [], {}
    for path in paths:
        m, logs = read_log(path)
        metas.append((path, m))
        for layer, log in logs.items():
            if layer in by_layer:
                other = by_layer[layer].path
                raise TraceError(f"{path}:{log.lines[0]}: layer {layer} is also logged in {other}; each layer's "
                                 "rows must come from one file")
            by_layer[layer] = log
    _check_same_run(metas)
    first_path, m0 = metas[0]
    K = m0["top_k"]
    if K != meta.top_k:
        raise TraceError(f"{first_path}:{m0['_line']}: top_k {K}, but the trace metadata (--model-preset / "
                         f"--top-k) has top_k {meta.top_k}")
    layers = sorted(by_layer)
    meta = _trace_layers(meta, layers, f"{first_path}:{m0['_line']}")
    logs = [by_layer[layer] for layer in layers]
    ids = {log.layer: np.asarray(log.ids, dtype=np.int64).reshape(-1, K) for log in logs}
    w = {log.layer: np.asarray(log.weights, dtype=np.float64).reshape(-1, K) for log in logs}
    if m0.get("num_experts") is not None and m0["num_experts"] != max(meta.num_experts):
        raise TraceError(f"{first_path}:{m0['_line']}: num_experts {m0['num_experts']}, but the trace metadata "
                         f"(--model-preset / --num-experts) has {max(meta.num_experts)} experts per layer")
    for t, log in enumerate(logs):
        _check_experts(log, ids[log.layer], meta.num_experts[t])
    bounds = {log.layer: passes_of(log) for log in logs}
    warm = {log.layer: warmup_rows(ids[log.layer], w[log.layer], bounds[log.layer]) for log in logs}
    _align(logs, bounds, warm)

    ref = logs[0]
    b, wu = bounds[ref.layer], warm[ref.layer]
    sizes = np.diff(b)
    n_rows = int(b[-1])
    pass_of = np.repeat(np.arange(len(sizes)), sizes)
    keep = np.ones(n_rows, bool)
    for s, n in zip(b[:-1], wu):
        keep[s:s + n] = False
    kept_sizes = sizes - wu
    report = {
        "format": FORMAT, "files": [str(p) for p in paths], "layers_logged": layers,
        "source_meta": {k: v for k, v in m0.items() if k not in ("type", "_line")},
        "rows_per_layer": n_rows, "passes": len(sizes),
        "pass_boundaries": "token_idx restarts" if len(sizes) > 1 else "unknown (token_idx never restarts: one pass)",
        "warmup": {"detection": "on" if K > 1 else "off (top-1: a lone weight is always uniform)",
                   "rows_dropped_per_layer": int(wu.sum()), "whole_passes_dropped": int((kept_sizes == 0).sum()),
                   "passes_with_warmup": [int(p) + 1 for p in np.flatnonzero(wu)][:20],
                   "uniform_weight_rows_kept": int((uniform_rows(w[ref.layer]) & keep).sum())},
    }
    reqs = {r for r, k in zip(ref.req, keep) if k}
    if not keep.any():
        raise TraceError(f"{ref.path}: all {n_rows} rows of layer {ref.layer} are warm-up (dummy) rows: nothing to import")
    if len(reqs) > 1:
        if batch_order is not None:
            raise TraceError(f"--batch-order: {ref.path} has request ids ({len(reqs)} distinct req_id values), which "
                             "name each row's sequence; --batch-order is for logs without them")
        rows = np.flatnonzero(keep)
        seq, phase, pos = _by_request([ref.req[i] for i in rows], pass_of[rows])
        report["mode"] = f"request ids: a sequence per req_id ({len(reqs)})"
    elif batch_order is None:
        rows = np.flatnonzero(keep)
        seq, phase, pos = np.zeros(len(rows), np.int32), np.full(len(rows), PHASE_DECODE, np.int32), np.arange(len(rows))
        report["mode"] = ("row order: no request ids (req_id " + (f"constant {next(iter(reqs))!r}" if reqs != {None} else
                          "absent") + "), so every kept row, in log order, is one sequence; a batch's rows interleave "
                          "in it; phases unknown, every token marked decode")
    else:
        rows, seq, pos, report["batch_order"] = _batch_order(ref, b, wu, batch_order)
        phase = np.full(len(rows), PHASE_DECODE, np.int32)
        report["mode"] = f"batch order: row i of each decode pass of {batch_order} rows is sequence i"
    order = np.lexsort((pos, phase, seq))
    rows, seq, phase, pos = rows[order], seq[order], phase[order], pos[order]
    ex = np.stack([ids[log.layer][rows] for log in logs], axis=1)
    wt = np.stack([w[log.layer][rows] for log in logs], axis=1).astype(np.float32)
    report.update(tokens=len(rows), sequences=len(np.unique(seq)), rows_dropped_other=int(keep.sum()) - len(rows))
    meta.extra = {**meta.extra, "import": report}
    return Trace(meta, ex.astype(np.int16), wt, seq.astype(np.int32), pos.astype(np.int32), phase.astype(np.int8),
                 np.full(len(rows), -1, np.int32))


def _batch_order(ref: LayerLog, b: np.ndarray, wu: np.ndarray, batch: int) -> tuple:
    """Rows, sequences, positions and the report of the ``--batch-order`` mapping (see the module docstring)."""
    if batch < 1:
        raise TraceError(f"--batch-order {batch}: expected a positive number of sequences decoded together")
    kept = np.diff(b) - wu
    real = np.flatnonzero(kept > 0)  # passes left after the warm-up
    if len(b) == 2:
        raise TraceError(f"--batch-order {batch}: {ref.path}: token_idx never restarts, so the log is one pass of "
                         f"{kept[0]} rows and its decode passes are unknown; import it without --batch-order (one "
                         "sequence in row order)")
    start = next((p for p in real if kept[p] == batch and wu[p] == 0), None)
    if start is None:
        shown = ", ".join(str(int(kept[p])) for p in real[:12]) + (" ..." if len(real) > 12 else "")
        raise TraceError(f"--batch-order {batch}: {ref.path}: no pass of {batch} rows (layer {ref.layer}'s passes after "
                         f"the warm-up have {shown} rows)")
    end = start
    while end < len(kept) and kept[end] == batch and wu[end] == 0:
        end += 1
    steps = end - start
    rows = b[start] + np.arange(steps * batch)
    rep = {"batch": batch, "first_decode_pass": int(start) + 1, "first_decode_line": ref.at(b[start]),
           "decode_passes_mapped": int(steps), "prefill_rows_dropped": int(kept[real[real < start]].sum())}
    if end < len(kept):
        rep["stopped_at_pass"] = int(end) + 1
        rep["stopped_at_line"] = ref.at(b[end])
        rep["stopped_because"] = f"the pass has {int(kept[end])} rows, not {batch}"
        rep["rows_dropped_after_stop"] = int(kept[end:].sum())
    else:
        rep["stopped_at_pass"] = None
        rep["stopped_because"] = "end of the log"
        rep["rows_dropped_after_stop"] = 0
    return rows, np.tile(np.arange(batch), steps), np.repeat(np.arange(steps), batch), rep


def _trace_layers(meta: TraceMeta, layers: list[int], where: str) -> TraceMeta:
    """The trace's metadata for the logged model layers: a whole model's metadata (a preset) is restricted to
    them; metadata of exactly that many layers just gets their names; ``--layer-ids`` must name them."""
    names = [str(x) for x in layers]
    if meta.layer_names:
        if meta.layer_names != names:
            raise TraceError(f"{where}: the logs hold model layers {layers}, but --layer-ids names {meta.layer_names}")
        return meta
    if meta.num_layers == len(layers):
        meta.layer_names = names
        return meta
    if layers[-1] < meta.num_layers:
        return select_layers(meta, layers, where)
    raise TraceError(f"{where}: layers_logged {layers}: layer {layers[-1]} is beyond the metadata's "
                     f"{meta.num_layers} layers (--model-preset / --num-layers)")
