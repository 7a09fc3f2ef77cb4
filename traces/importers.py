"""``python -m traces import SRC... --format FMT -o OUT.parquet``: routing recorded by others, into our format.

Formats:

- ``speculative-moe-jsonl``: per-record JSON lines ``{dataset, problem_id, layer, experts, gating_probs}`` plus
  either ``token_idx`` (decode step) or ``token_pos`` (position in the vLLM batch: a prefill run 0..P-1 per
  layer, then one record at position 0 per decode step). Sequence = (dataset, problem_id). The recorder
  dropped every record whose two weights were exactly [0.5, 0.5], so layers miss a few tokens each.
  Alignment rule (recorded in the trace metadata ``extra.import.alignment``): prefill records are matched
  across layers by their key; a token missing in any layer is dropped (reported). Decode records carry no
  reliable key: those of the ``token_pos`` variant sit at position 0, and ``token_idx``, where it runs without
  a gap from the same first value in every layer (as in the shared Mixtral file, 0..n-1, whose layers hold 1-3
  fewer records than others), counts a layer's records rather than naming the step. With ``--align strict`` (default) such
  records are kept only if every layer has the same number of them, else dropped and reported; ``--align
  order`` matches them by order anyway, which can slip by as many positions as a layer misses (the report
  lists each sequence's records per layer). ``token_idx`` values with a gap are step keys, matched by key.
- ``npy``: an integer array ``[tokens, layers, top_k]`` (what vLLM returns with
  ``--enable-return-routed-experts``), optional ``--weights`` of the same shape, optional ``--seq-ids``.
- ``long-csv``: one row per (seq, token, layer, rank, expert, weight), header
  ``seq,token,layer,rank,expert,weight`` (optional ``phase`` 0/1 or prefill/decode, ``token_id``); any order.
- ``vllm-jsonl``: the logs of common vLLM routing-logging patches, a meta line then one ``route`` row per
  (token, layer), one file per layer or all layers in one; passes, vLLM's warm-up rows, per-layer file
  alignment and ``--batch-order``: see ``traces/import_vllm.py`` and docs/traces.md.

Metadata: ``--model-preset`` or all of the shape flags. A trace may record fewer layers than the model has
(``--num-layers N`` with a preset of more); ``--layer-ids 0,7,15`` names which model layers they are (stored
in the trace's ``layer_names``; vllm-jsonl takes them from its meta line).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from .cli import plain
from .import_vllm import import_vllm
from .io import check_trace, write_trace
from .presets import get_preset, select_layers
from .schema import PHASE_DECODE, PHASE_PREFILL, Trace, TraceError, TraceMeta
from .sources import INT32, check_expert_range, load_npy, text_lines
from .speculative_moe import import_speculative_moe, read_jsonl  # noqa: F401 - re-exported

FORMATS = ("speculative-moe-jsonl", "npy", "long-csv", "vllm-jsonl")


def import_npy(path: Path, meta: TraceMeta, weights: Path | None, seq_ids: Path | None) -> Trace:
    L, K = meta.num_layers, meta.top_k
    ex = load_npy(path, "", "iu", "integers [tokens, layers, top_k]")
    if ex.ndim != 3 or ex.shape[1:] != (L, K):
        raise TraceError(f"{path}: shape {ex.shape}, expected (tokens, {L}, {K}) from the metadata")
    if weights:
        w = load_npy(weights, "--weights", "iuf", f"gate weights, numbers of shape {ex.shape}")
        if w.shape != ex.shape:
            raise TraceError(f"--weights {weights}: shape {w.shape}, expected {ex.shape} like the experts array")
        bad = np.argwhere(~np.isfinite(w))
        if bad.size:
            i = tuple(int(x) for x in bad[0])
            raise TraceError(f"--weights {weights}: index {list(i)} = {w[i]}, expected finite gate weights")
    else:
        w = np.full(ex.shape, 1.0 / K, np.float32)
    seq = np.zeros(len(ex), np.int64)
    if seq_ids:
        seq = load_npy(seq_ids, "--seq-ids", "iu", f"integer sequence ids of shape ({len(ex)},)")
        if seq.shape != (len(ex),):
            raise TraceError(f"--seq-ids {seq_ids}: shape {seq.shape}, expected ({len(ex)},) (one per token)")
        bad = np.flatnonzero((seq < INT32.min) | (seq > INT32.max))
        if bad.size:
            raise TraceError(f"--seq-ids {seq_ids}: index {int(bad[0])} = {seq[bad[0]]}, expected a 32-bit integer")
    seq = seq.astype(np.int32)
    pos = np.zeros(len(ex), np.int32)
    for s in np.unique(seq):
        pos[seq == s] = np.arange((seq == s).sum())
    return Trace(meta, check_expert_range(ex, meta, str(path)), w.astype(np.float32), seq, pos,
                 np.full(len(ex), PHASE_DECODE, np.int8), np.full(len(ex), -1, np.int32))


CSV_COLUMNS = ("seq", "token", "layer", "rank", "expert", "weight")
PHASE_NAMES = {"0": PHASE_PREFILL, "prefill": PHASE_PREFILL, "1": PHASE_DECODE, "decode": PHASE_DECODE}


def _csv_row(row: dict, where: str, meta: TraceMeta) -> tuple[tuple, tuple, int, float, int]:
    """One CSV row, every field checked where its line is still known: (token key, (layer, rank), expert,
    weight, token_id)."""
    vals = {}
    for c in (*CSV_COLUMNS, "token_id"):
        raw = row.get(c)
        if c == "token_id" and not raw:
            vals[c] = -1  # optional column, or left empty: unknown
            continue
        try:
            vals[c] = float(raw) if c == "weight" else int(raw)
        except (TypeError, ValueError):
            raise TraceError(f"{where}: field '{c}' = {raw!r}, expected {'a number' if c == 'weight' else 'an integer'}") from None
        if c != "weight" and not INT32.min <= vals[c] <= INT32.max:
            raise TraceError(f"{where}: field '{c}' = {raw}, expected a 32-bit integer")
    if not math.isfinite(vals["weight"]):
        raise TraceError(f"{where}: field 'weight' = {row['weight']}, expected a finite number")
    layer, rank = vals["layer"], vals["rank"]
    if not 0 <= layer < meta.num_layers or not 0 <= rank < meta.top_k:
        raise TraceError(f"{where}: layer {layer} / rank {rank} outside 0..{meta.num_layers - 1} / 0..{meta.top_k - 1}")
    if not 0 <= vals["expert"] < meta.num_experts[layer]:
        raise TraceError(f"{where}: field 'expert' = {vals['expert']}, expected an expert id in 0..{meta.num_experts[layer] - 1}")
    phase = row.get("phase") or "decode"
    ph = PHASE_NAMES.get(str(phase).strip())
    if ph is None:
        raise TraceError(f"{where}: field 'phase' = {phase!r}, expected prefill|decode|0|1")
    return (vals["seq"], ph, vals["token"]), (layer, rank), vals["expert"], vals["weight"], vals["token_id"]


def import_long_csv(path: Path, meta: TraceMeta) -> Trace:
    rows: dict[tuple, dict] = defaultdict(dict)
    info: dict[tuple, tuple[int, int]] = {}
    reader = csv.DictReader(text_lines(path, "a CSV file"))
    try:
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: line 1: header lacks column(s) {missing}; expected {','.join(CSV_COLUMNS)}")
        for row in reader:
            n = reader.line_num  # the physical line: DictReader skips blank lines, so counting rows would drift
            key, slot, expert, weight, token_id = _csv_row(row, f"{path}: line {n}", meta)
            if slot in rows[key]:
                raise TraceError(f"{path}: line {n}: second row for seq {key[0]} token {key[2]} layer {slot[0]} rank {slot[1]}")
            rows[key][slot] = (expert, weight, n)
            info[key] = (token_id, n)
    except csv.Error as exc:
        raise TraceError(f"{path}: line {reader.line_num}: {exc}, expected CSV text") from None
    if not rows:
        raise TraceError(f"{path}: no rows (empty input)")
    keys = sorted(rows)
    L, K = meta.num_layers, meta.top_k
    ex = np.zeros((len(keys), L, K), np.int64)
    w = np.zeros((len(keys), L, K), np.float32)
    for i, key in enumerate(keys):
        if len(rows[key]) != L * K:
            raise TraceError(f"{path}: line {info[key][1]}: seq {key[0]} token {key[2]} has {len(rows[key])} rows, expected {L} layers x {K} ranks")
        first_line: dict[tuple, int] = {}  # (layer, expert) -> line, to name both lines of a repeated expert
        for (layer, rank), (e, wt, line) in sorted(rows[key].items()):
            if (layer, e) in first_line:
                raise TraceError(f"{path}: lines {first_line[layer, e]} and {line}: seq {key[0]} token {key[2]} layer {layer}: "
                                 f"expert {e} twice, expected distinct experts in a token's top-k")
            first_line[layer, e] = line
            ex[i, layer, rank], w[i, layer, rank] = e, wt
    return Trace(meta, check_expert_range(ex, meta, str(path)), w, np.array([k[0] for k in keys], np.int32),
                 np.array([k[2] for k in keys], np.int32), np.array([k[1] for k in keys], np.int8),
                 np.array([info[k][0] for k in keys], np.int32))


def import_trace(sources: list[Path], fmt: str, meta: TraceMeta, align: str = "strict", weights: Path | None = None,
                 seq_ids: Path | None = None, batch_order: int | None = None) -> Trace:
    """Python entry point: import ``sources`` of format ``fmt`` with the given metadata. The result passes the
    trace checks with the sources named, so a content problem is never blamed on the output file."""
    if fmt not in FORMATS:
        raise TraceError(f"--format: expected one of {FORMATS}, got {fmt!r}")
    if batch_order is not None and fmt != "vllm-jsonl":
        raise TraceError(f"--batch-order: only for --format vllm-jsonl, not {fmt}")
    if fmt == "speculative-moe-jsonl":
        trace = import_speculative_moe(sources, meta, align)[0]
    elif fmt == "vllm-jsonl":
        trace = import_vllm(sources, meta, batch_order)
    elif len(sources) != 1:
        raise TraceError(f"--format {fmt}: expected one source file, got {len(sources)}")
    elif fmt == "npy":
        trace = import_npy(sources[0], meta, weights, seq_ids)
    else:
        trace = import_long_csv(sources[0], meta)
    check_trace(trace, where=", ".join(map(str, sources)))
    return trace


def parse_layer_ids(text: str | None, num_layers: int | None) -> list[int] | None:
    """``--layer-ids 0,7,15``: which model layers the trace's layers are (distinct, increasing)."""
    if text is None:
        return None
    try:
        ids = [int(x) for x in text.split(",")]
    except ValueError:
        raise TraceError(f"--layer-ids {text!r}: expected comma-separated layer ids, e.g. 0,7,15") from None
    if min(ids) < 0 or ids != sorted(set(ids)):
        raise TraceError(f"--layer-ids {text}: expected distinct non-negative layer ids in increasing (model) order")
    if num_layers is not None and num_layers != len(ids):
        raise TraceError(f"--layer-ids {text} names {len(ids)} layer(s), but --num-layers is {num_layers}")
    return ids


def build_meta(args: argparse.Namespace, fmt: str) -> TraceMeta:
    meta = get_preset(args.model_preset).meta(source=f"import:{fmt}") if args.model_preset else None
    layer_ids = parse_layer_ids(getattr(args, "layer_ids", None), args.num_layers)
    num_layers = len(layer_ids) if layer_ids else args.num_layers
    fields = {"model": args.model, "top_k": args.top_k,
              "expert_bytes": args.expert_bytes, "hidden_size": args.hidden_size, "dtype": args.dtype}
    if meta is None:
        missing = [f"--{k.replace('_', '-')}" for k in ("model", "num_experts", "top_k", "expert_bytes", "hidden_size")
                   if getattr(args, k) is None] + ([] if num_layers else ["--num-layers"])
        if missing:
            raise TraceError(f"metadata: give --model-preset or all of {missing}")
        meta = TraceMeta(model=args.model, num_layers=num_layers, num_experts=[args.num_experts] * num_layers,
                         top_k=args.top_k, expert_bytes=args.expert_bytes, hidden_size=args.hidden_size,
                         source=f"import:{fmt}", layer_names=[str(x) for x in layer_ids or []])
    elif layer_ids:
        meta = select_layers(meta, layer_ids, f"--layer-ids (--model-preset {args.model_preset})")
    elif num_layers is not None and num_layers != meta.num_layers:  # a subset of the model's layers, unnamed
        if not 1 <= num_layers <= meta.num_layers:
            raise TraceError(f"--num-layers {num_layers}: the preset {args.model_preset} has {meta.num_layers} MoE "
                             f"layers; a trace of it records 1..{meta.num_layers} of them")
        meta.num_layers, meta.num_experts = num_layers, meta.num_experts[:num_layers]
    for k, v in fields.items():
        if v is not None:
            setattr(meta, k, v)
    if args.num_experts is not None:
        meta.num_experts = [args.num_experts] * meta.num_layers
    meta.validate("metadata")
    return meta


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import", help="convert routing recorded elsewhere into a trace",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path, metavar="SRC")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--model-preset", help="fill the metadata from a model preset (see traces/presets.py)")
    p.add_argument("--model")
    p.add_argument("--num-layers", type=int, help="MoE layers in the trace (may be fewer than the preset's)")
    p.add_argument("--layer-ids", help="which model layers the trace's layers are, e.g. 0,7,15 (stored as layer_names)")
    p.add_argument("--num-experts", type=int, help="routed experts per layer")
    p.add_argument("--top-k", type=int)
    p.add_argument("--expert-bytes", type=int)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--dtype")
    p.add_argument("--weights", type=Path, help="npy: gate weights array, same shape as the experts")
    p.add_argument("--seq-ids", type=Path, help="npy: sequence id per token")
    p.add_argument("--align", choices=("strict", "order"), default="strict",
                   help="speculative-moe-jsonl: unkeyed decode records with differing counts per layer are dropped "
                        "(strict) or matched by order (may slip)")
    p.add_argument("--batch-order", type=int, metavar="B",
                   help="vllm-jsonl without request ids: row i of each decode pass of B rows is sequence i (stops "
                        "where the pass size changes; reported)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    meta = build_meta(args, args.format)
    trace = import_trace(args.sources, args.format, meta, args.align, args.weights, args.seq_ids, args.batch_order)
    report = trace.meta.extra.get("import")
    write_trace(trace, args.output)
    n_seq = len(np.unique(trace.seq_id))
    print(f"wrote {args.output}: {trace.num_tokens} tokens in {n_seq} sequence(s), {trace.meta.num_layers} layers, "
          f"top-{trace.meta.top_k} of {trace.meta.num_experts[0]} experts "
          f"({int((trace.phase == PHASE_PREFILL).sum())} prefill, {int((trace.phase == PHASE_DECODE).sum())} decode)")
    if report and args.format == "vllm-jsonl":
        print_vllm_report(report)
    elif report:
        print(f"gap report: dropped {report['dropped']}; records missing per layer {report['missing_records_per_layer']}",
              file=sys.stderr)
        for k, v in report.items():
            if k.endswith("per layer"):
                print(f"  {k}: {v}", file=sys.stderr)
    return 0


def print_vllm_report(rep: dict) -> None:
    """What the vllm-jsonl importer did, in a few lines on stderr (the whole report is in the trace metadata)."""
    wu = rep["warmup"]
    print(f"read {rep['rows_per_layer']} rows per layer (layers {rep['layers_logged']}) in {rep['passes']} pass(es); "
          f"pass boundaries: {rep['pass_boundaries']}", file=sys.stderr)
    print(f"warm-up ({wu['detection']}): dropped {wu['rows_dropped_per_layer']} rows per layer, "
          f"{wu['whole_passes_dropped']} whole pass(es)", file=sys.stderr)
    print(f"sequences: {rep['mode']}", file=sys.stderr)
    bo = rep.get("batch_order")
    if bo:
        where = (f"stopped at pass {bo['stopped_at_pass']} ({bo['stopped_at_line']}): {bo['stopped_because']}"
                 if bo["stopped_at_pass"] else "ran to the end of the log")
        print(f"batch order: {bo['decode_passes_mapped']} decode passes of {bo['batch']} rows mapped from pass "
              f"{bo['first_decode_pass']}; {where}; dropped {bo['prefill_rows_dropped']} prefill rows before it and "
              f"{bo['rows_dropped_after_stop']} rows after the stop", file=sys.stderr)
