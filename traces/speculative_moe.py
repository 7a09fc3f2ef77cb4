"""The ``speculative-moe-jsonl`` importer (format and alignment rule: see :mod:`traces.importers`)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .schema import PHASE_DECODE, PHASE_PREFILL, Trace, TraceError, TraceMeta
from .sources import INT32, check_expert_range, text_lines


def _int(value, where: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not INT32.min <= value <= INT32.max:
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
        for n, line in enumerate(text_lines(path, "JSON lines"), 1):
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
            for fld in ("dataset", "problem_id"):  # together they name the sequence, so must be hashable scalars
                if isinstance(rec.get(fld), bool) or not isinstance(rec.get(fld), (str, int, type(None))):
                    raise TraceError(f"{where}: field '{fld}' = {rec[fld]!r}, expected a string or an integer")
            if "token_idx" not in rec and "token_pos" not in rec:
                raise TraceError(f"{where}: missing field 'token_idx' or 'token_pos'")
            rec["_routing"] = _routing(rec, where, k)
            recs.append((where, n, rec))
    if not recs:
        raise TraceError(f"{', '.join(map(str, paths))}: no records (empty input)")
    return recs


def _place_token_idx(idx_lists: dict, table: dict, decode_lists: dict, L: int) -> list[int]:
    """Put each sequence's ``token_idx`` records where they belong; returns the sequences read as counters.

    In the shared Mixtral decode file ``token_idx`` runs 0..n-1 in every layer with no gap, while the layers
    hold different numbers of records (the recorder dropped some): it counts a layer's records, it is not the
    decode step, so matching it across layers would slip silently after a layer's first dropped record. Such
    contiguous indices are therefore unkeyed decode records (``--align`` decides). Indices with a gap somewhere
    do name steps, and are matched by key."""
    counters = []
    for s, per_layer in idx_lists.items():
        for layer, recs in per_layer.items():
            recs.sort(key=lambda r: r[0])
            for a, b in zip(recs, recs[1:]):
                if a[0] == b[0]:
                    raise TraceError(f"{b[1]}: duplicate record for layer {layer} of token_idx {b[0]} (first: {a[1]})")
        starts = {recs[0][0] for recs in per_layer.values()}  # a counter may start at 0 or 1: the same in every layer
        contiguous = len(starts) == 1 and all([r[0] for r in recs] == list(range(recs[0][0], recs[0][0] + len(recs)))
                                              for recs in per_layer.values())
        if contiguous and len(per_layer) == L and s in decode_lists:
            raise TraceError(f"{next(iter(per_layer.values()))[0][1]}: sequence {s} mixes token_idx and token_pos records")
        if contiguous and len(per_layer) == L:
            counters.append(s)
            for layer, recs in per_layer.items():
                decode_lists[s][layer] = [r[2] for r in recs]
        else:
            for layer, recs in per_layer.items():
                for idx, _, routing in recs:
                    table[(s, PHASE_DECODE, idx)][layer] = routing
    return counters


def import_speculative_moe(paths: list[Path], meta: TraceMeta, align: str = "strict") -> tuple[Trace, dict]:
    L = meta.num_layers
    recs = read_jsonl(paths, meta.top_k)
    # token key -> layer -> routing; keys are (seq, phase, position)
    table: dict[tuple, dict[int, tuple]] = defaultdict(dict)
    decode_lists: dict[tuple, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    idx_lists: dict[int, dict[int, list]] = defaultdict(lambda: defaultdict(list))  # seq -> layer -> records
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
            idx_lists[s][layer].append((_int(rec["token_idx"], where, "token_idx"), where, rec["_routing"]))
            continue
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
    counters = _place_token_idx(idx_lists, table, decode_lists, L)
    report = {"alignment": f"prefill records and gapped token_idx matched by key; unkeyed decode records "
                           f"(token_pos decode, and token_idx counters: sequences {counters}): {align}", "dropped": {}}
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
            missing_per_layer += n - np.asarray(counts)  # the layer with most records taken as complete
    report["dropped"]["keyed tokens missing a layer"] = len(dropped)
    report["missing_records_per_layer"] = missing_per_layer.tolist()
    report["dropped_keys_sample"] = [list(map(int, k)) for k in sorted(dropped)[:20]]
    if not table:
        hint = ("; the decode records of every sequence differ in number between layers, so --align strict drops "
                "them all: --align order matches them by order (may slip, reported)") if decode_lists else ""
        raise TraceError(f"{paths[0]}: no token has a record in every one of the {L} layers{hint}")
    keys = sorted(table)
    ex = np.array([[table[k][layer][0] for layer in range(L)] for k in keys], dtype=np.int64)
    w = np.array([[table[k][layer][1] for layer in range(L)] for k in keys], dtype=np.float32)
    meta.extra = {**meta.extra, "import": report}
    trace = Trace(
        meta, check_expert_range(ex, meta, str(paths[0])), w,
        np.array([k[0] for k in keys], np.int32), np.array([k[2] for k in keys], np.int32),
        np.array([k[1] for k in keys], np.int8), np.full(len(keys), -1, np.int32),
    )
    return trace, report
