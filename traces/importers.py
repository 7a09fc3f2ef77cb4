"""``python -m traces import SRC... --format FMT -o OUT.parquet``: routing recorded by others, into our format.

Formats:

- ``speculative-moe-jsonl``: per-record JSON lines ``{dataset, problem_id, layer, experts, gating_probs}`` plus
  either ``token_idx`` (decode step) or ``token_pos`` (position in the vLLM batch: a prefill run 0..P-1 per
  layer, then one record at position 0 per decode step). Sequence = (dataset, problem_id). The recorder
  dropped every record whose two weights were exactly [0.5, 0.5], so layers miss a few tokens each.
  Alignment rule (recorded in the trace metadata ``extra.alignment``): ``token_idx`` records and prefill
  records are matched across layers by their key; a token missing in any layer is dropped (reported).
  Decode records of the ``token_pos`` variant carry no key: with ``--align strict`` (default) they are kept
  only if every layer has the same number of them, else dropped and reported; ``--align order`` matches them
  by order anyway, which can slip by as many positions as a layer misses (the report says how many).
- ``npy``: an integer array ``[tokens, layers, top_k]`` (what vLLM returns with
  ``--enable-return-routed-experts``), optional ``--weights`` of the same shape, optional ``--seq-ids``.
- ``long-csv``: one row per (seq, token, layer, rank, expert, weight), header
  ``seq,token,layer,rank,expert,weight`` (optional ``phase`` 0/1 or prefill/decode, ``token_id``); any order.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from .io import write_trace
from .presets import get_preset
from .schema import PHASE_DECODE, PHASE_PREFILL, Trace, TraceError, TraceMeta

FORMATS = ("speculative-moe-jsonl", "npy", "long-csv")


def _int(value, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TraceError(f"{where}: field '{field}' = {value!r}, expected an integer")
    return value


def _routing(rec: dict, where: str, k: int | None) -> tuple[list[int], list[float]]:
    for f in ("experts", "gating_probs"):
        if f not in rec:
            raise TraceError(f"{where}: missing field '{f}'")
        if not isinstance(rec[f], list):
            raise TraceError(f"{where}: field '{f}' = {rec[f]!r}, expected a list")
    ex = [_int(e, where, "experts") for e in rec["experts"]]
    w = rec["gating_probs"]
    if k is not None and len(ex) != k:
        raise TraceError(f"{where}: field 'experts' has {len(ex)} entries, expected top_k={k}")
    if len(w) != len(ex):
        raise TraceError(f"{where}: field 'gating_probs' has {len(w)} entries, expected {len(ex)} (one per expert)")
    for x in w:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise TraceError(f"{where}: field 'gating_probs' holds {x!r}, expected finite numbers")
    if len(set(ex)) != len(ex):
        raise TraceError(f"{where}: field 'experts' = {ex} repeats an expert, expected distinct experts")
    return ex, [float(x) for x in w]


def read_jsonl(paths: list[Path], k: int | None) -> list[tuple[str, int, dict]]:
    recs = []
    for path in paths:
        if not path.exists():
            raise TraceError(f"{path}: no such file")
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}: line {n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TraceError(f"{where}: not valid JSON ({exc.msg})") from exc
                if not isinstance(rec, dict):
                    raise TraceError(f"{where}: expected a JSON object")
                for fld in ("layer",):
                    if fld not in rec:
                        raise TraceError(f"{where}: missing field '{fld}'")
                    _int(rec[fld], where, fld)
                if "token_idx" not in rec and "token_pos" not in rec:
                    raise TraceError(f"{where}: missing field 'token_idx' or 'token_pos'")
                rec["_routing"] = _routing(rec, where, k)
                recs.append((where, n, rec))
    if not recs:
        raise TraceError(f"{', '.join(map(str, paths))}: no records (empty input)")
    return recs


def import_speculative_moe(paths: list[Path], meta: TraceMeta, align: str = "strict") -> tuple[Trace, dict]:
    L = meta.num_layers
    recs = read_jsonl(paths, meta.top_k)
    # token key -> layer -> routing; keys are (seq, phase, position)
    table: dict[tuple, dict[int, tuple]] = defaultdict(dict)
    decode_lists: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    seqs: dict[tuple, int] = {}
    last_pos: dict[tuple, int] = {}
    for where, _, rec in recs:
        layer = rec["layer"]
        if not 0 <= layer < L:
            raise TraceError(f"{where}: field 'layer' = {layer}, expected 0..{L - 1}")
        bad = [e for e in rec["_routing"][0] if not 0 <= e < meta.num_experts[layer]]
        if bad:
            raise TraceError(
                f"{where}: field 'experts' = {rec['_routing'][0]}: expert {bad[0]} out of range, "
                f"expected 0..{meta.num_experts[layer] - 1}"
            )
        s = seqs.setdefault((rec.get("dataset"), rec.get("problem_id")), len(seqs))
        if "token_idx" in rec:
            key = (s, PHASE_DECODE, _int(rec["token_idx"], where, "token_idx"))
        else:
            pos = _int(rec["token_pos"], where, "token_pos")
            prev = last_pos.get((s, layer), -1)
            in_prefill = pos > prev and not decode_lists[s][layer]
            last_pos[(s, layer)] = pos
            if not in_prefill:  # a decode record (position 0 after the prefill run)
                decode_lists[s][layer].append(rec["_routing"])
                continue
            key = (s, PHASE_PREFILL, pos)
        if layer in table[key]:
            raise TraceError(f"{where}: duplicate record for layer {layer} of token {key}")
        table[key][layer] = rec["_routing"]
    report = {"alignment": f"keyed records matched by key; unkeyed decode records: {align}", "dropped": {}}
    missing_per_layer = np.zeros(L, dtype=int)
    dropped = []
    for key, layers in table.items():
        if len(layers) < L:
            dropped.append(key)
            for m in set(range(L)) - set(layers):
                missing_per_layer[m] += 1
    for key in dropped:
        del table[key]
    for s, per_layer in decode_lists.items():
        counts = [len(per_layer.get(layer, [])) for layer in range(L)]
        n = max(counts)
        if min(counts) == n or align == "order":
            for i in range(min(counts)):
                table[(s, PHASE_DECODE, i)] = {layer: per_layer[layer][i] for layer in range(L)}
            report["dropped"][f"seq {s} unkeyed decode"] = n - min(counts)
        else:
            report["dropped"][f"seq {s} unkeyed decode"] = n
        if min(counts) != n:
            report[f"seq {s} decode records per layer"] = counts
    report["dropped"]["keyed tokens missing a layer"] = len(dropped)
    report["missing_records_per_layer"] = missing_per_layer.tolist()
    report["dropped_keys_sample"] = [list(map(int, k)) for k in sorted(dropped)[:20]]
    if not table:
        raise TraceError(f"{paths[0]}: no token has a record in every one of the {L} layers")
    keys = sorted(table)
    ex = np.array([[table[k][layer][0] for layer in range(L)] for k in keys], dtype=np.int64)
    w = np.array([[table[k][layer][1] for layer in range(L)] for k in keys], dtype=np.float32)
    meta.extra = {**meta.extra, "import": report}
    trace = Trace(
        meta, _check_range(ex, meta, str(paths[0])), w,
        np.array([k[0] for k in keys], np.int32), np.array([k[2] for k in keys], np.int32),
        np.array([k[1] for k in keys], np.int8), np.full(len(keys), -1, np.int32),
    )
    return trace, report


def _check_range(ex: np.ndarray, meta: TraceMeta, where: str) -> np.ndarray:
    bad = np.argwhere((ex < 0) | (ex >= np.asarray(meta.num_experts)[None, :, None]))
    if bad.size:
        t, layer, k = (int(x) for x in bad[0])
        raise TraceError(
            f"{where}: token {t} layer {layer} rank {k}: expert {int(ex[t, layer, k])} out of range, "
            f"expected 0..{meta.num_experts[layer] - 1}"
        )
    return ex.astype(np.int16)


def import_npy(path: Path, meta: TraceMeta, weights: Path | None, seq_ids: Path | None) -> Trace:
    try:
        ex = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise TraceError(f"{path}: not a readable .npy array ({exc})") from exc
    if ex.ndim != 3 or not np.issubdtype(ex.dtype, np.integer):
        raise TraceError(f"{path}: array of shape {ex.shape} and dtype {ex.dtype}, expected integers [tokens, layers, top_k]")
    if ex.shape[1:] != (meta.num_layers, meta.top_k):
        raise TraceError(f"{path}: shape {ex.shape}, expected (tokens, {meta.num_layers}, {meta.top_k}) from the metadata")
    w = np.load(weights) if weights else np.full(ex.shape, 1.0 / meta.top_k, np.float32)
    if w.shape != ex.shape:
        raise TraceError(f"{weights}: shape {w.shape}, expected {ex.shape} like the experts array")
    seq = np.load(seq_ids).astype(np.int32) if seq_ids else np.zeros(len(ex), np.int32)
    if seq.shape != (len(ex),):
        raise TraceError(f"{seq_ids}: shape {seq.shape}, expected ({len(ex)},)")
    pos = np.zeros(len(ex), np.int32)
    for s in np.unique(seq):
        pos[seq == s] = np.arange((seq == s).sum())
    return Trace(meta, _check_range(ex, meta, str(path)), w.astype(np.float32), seq, pos,
                 np.full(len(ex), PHASE_DECODE, np.int8), np.full(len(ex), -1, np.int32))


def import_long_csv(path: Path, meta: TraceMeta) -> Trace:
    need = ("seq", "token", "layer", "rank", "expert", "weight")
    rows: dict[tuple, dict] = defaultdict(dict)
    info: dict[tuple, tuple[int, int]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: line 1: header lacks column(s) {missing}; expected {','.join(need)}")
        for n, row in enumerate(reader, 2):
            where = f"{path}: line {n}"
            vals = {}
            for c in need:
                try:
                    vals[c] = float(row[c]) if c == "weight" else int(row[c])
                except (TypeError, ValueError):
                    raise TraceError(f"{where}: field '{c}' = {row[c]!r}, expected {'a number' if c == 'weight' else 'an integer'}") from None
            if not math.isfinite(vals["weight"]):
                raise TraceError(f"{where}: field 'weight' = {row['weight']}, expected a finite number")
            if not 0 <= vals["layer"] < meta.num_layers or not 0 <= vals["rank"] < meta.top_k:
                raise TraceError(f"{where}: layer {vals['layer']} / rank {vals['rank']} outside 0..{meta.num_layers - 1} / 0..{meta.top_k - 1}")
            phase = row.get("phase") or "decode"
            ph = {"0": 0, "prefill": 0, "1": 1, "decode": 1}.get(str(phase).strip())
            if ph is None:
                raise TraceError(f"{where}: field 'phase' = {phase!r}, expected prefill|decode|0|1")
            key = (vals["seq"], ph, vals["token"])
            slot = (vals["layer"], vals["rank"])
            if slot in rows[key]:
                raise TraceError(f"{where}: second row for seq {key[0]} token {key[2]} layer {slot[0]} rank {slot[1]}")
            rows[key][slot] = (vals["expert"], vals["weight"], n)
            info[key] = (int(row.get("token_id") or -1), n)
    if not rows:
        raise TraceError(f"{path}: no rows (empty input)")
    keys = sorted(rows)
    L, K = meta.num_layers, meta.top_k
    ex = np.zeros((len(keys), L, K), np.int64)
    w = np.zeros((len(keys), L, K), np.float32)
    for i, key in enumerate(keys):
        if len(rows[key]) != L * K:
            raise TraceError(f"{path}: line {info[key][1]}: seq {key[0]} token {key[2]} has {len(rows[key])} rows, expected {L} layers x {K} ranks")
        for (layer, rank), (e, wt, _) in rows[key].items():
            ex[i, layer, rank], w[i, layer, rank] = e, wt
    return Trace(meta, _check_range(ex, meta, str(path)), w, np.array([k[0] for k in keys], np.int32),
                 np.array([k[2] for k in keys], np.int32), np.array([k[1] for k in keys], np.int8),
                 np.array([info[k][0] for k in keys], np.int32))


def import_trace(sources: list[Path], fmt: str, meta: TraceMeta, align: str = "strict", weights: Path | None = None,
                 seq_ids: Path | None = None) -> Trace:
    """Python entry point: import ``sources`` of format ``fmt`` with the given metadata."""
    if fmt == "speculative-moe-jsonl":
        return import_speculative_moe(sources, meta, align)[0]
    if fmt not in FORMATS:
        raise TraceError(f"--format: expected one of {FORMATS}, got {fmt!r}")
    if len(sources) != 1:
        raise TraceError(f"--format {fmt}: expected one source file, got {len(sources)}")
    if fmt == "npy":
        return import_npy(sources[0], meta, weights, seq_ids)
    return import_long_csv(sources[0], meta)


def build_meta(args: argparse.Namespace, fmt: str) -> TraceMeta:
    meta = get_preset(args.model_preset).meta(source=f"import:{fmt}") if args.model_preset else None
    fields = {"model": args.model, "num_layers": args.num_layers, "top_k": args.top_k,
              "expert_bytes": args.expert_bytes, "hidden_size": args.hidden_size, "dtype": args.dtype}
    if meta is None:
        missing = [f"--{k.replace('_', '-')}" for k in ("model", "num_layers", "num_experts", "top_k", "expert_bytes", "hidden_size")
                   if getattr(args, k) is None]
        if missing:
            raise TraceError(f"metadata: give --model-preset or all of {missing}")
        meta = TraceMeta(model=args.model, num_layers=args.num_layers, num_experts=[args.num_experts] * args.num_layers,
                         top_k=args.top_k, expert_bytes=args.expert_bytes, hidden_size=args.hidden_size, source=f"import:{fmt}")
    for k, v in fields.items():
        if v is not None:
            setattr(meta, k, v)
    if args.num_experts is not None:
        meta.num_experts = [args.num_experts] * meta.num_layers
    meta.validate("metadata")
    return meta


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("import", help="convert routing recorded elsewhere into a trace",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", type=Path, metavar="SRC")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--model-preset", help="fill the metadata from a model preset (see traces/presets.py)")
    p.add_argument("--model")
    p.add_argument("--num-layers", type=int)
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    meta = build_meta(args, args.format)
    trace = import_trace(args.sources, args.format, meta, args.align, args.weights, args.seq_ids)
    report = trace.meta.extra.get("import")
    write_trace(trace, args.output)
    n_seq = len(np.unique(trace.seq_id))
    print(f"wrote {args.output}: {trace.num_tokens} tokens in {n_seq} sequence(s), {meta.num_layers} layers, "
          f"top-{meta.top_k} of {meta.num_experts[0]} experts "
          f"({int((trace.phase == PHASE_PREFILL).sum())} prefill, {int((trace.phase == PHASE_DECODE).sum())} decode)")
    if report:
        print(f"gap report: dropped {report['dropped']}; records missing per layer {report['missing_records_per_layer']}",
              file=sys.stderr)
        for k, v in report.items():
            if k.endswith("per layer"):
                print(f"  {k}: {v}", file=sys.stderr)
    return 0
