"""The vllm-jsonl importer: the shared OLMoE sample, and small synthetic logs covering passes, warm-up rows,
per-layer files (aligned and misaligned), batch-order mapping and request ids, and every bad-input case."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from traces import read_trace
from traces.__main__ import main

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "traces" / "vllm-logger-olmoe" / \
    "olmoe_1b7b_gsm8k25_layer0_routes.jsonl"
K, E = 2, 8
FLAGS = ["--model", "tiny", "--num-experts", str(E), "--top-k", str(K), "--expert-bytes", "4096", "--hidden-size", "0"]


def run(sources, out, *extra, layers=1):
    return main(["import", *map(str, sources), "--format", "vllm-jsonl", "-o", str(out), *FLAGS,
                 "--num-layers", str(layers), *map(str, extra)])


def meta_line(layers=(0,), top_k=K, **extra):
    return {"type": "meta", "model_id": "tiny/moe", "vllm_version": "0.6.6", "layers_logged": list(layers),
            "top_k": top_k, "num_experts": E, **extra}


def route(layer, tidx, ids, weights, req="r0"):
    return {"type": "route", "req_id": req, "token_idx": tidx, "layer": layer, "topk_ids": list(ids),
            "topk_weights": list(weights)}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def real_row(seed):
    """A real-looking routing row: distinct experts, unequal weights; different seeds give different rows."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(E, K, replace=False).tolist()
    w = sorted(rng.dirichlet(np.ones(K)).round(4).tolist(), reverse=True)
    if w[0] == w[-1]:
        w = [0.7, 0.3]
    return ids, w


DUMMY = ([3, 1], [0.5, 0.5])  # what a warm-up row looks like: the same experts in every row, uniform weights


def passes_log(path, sizes, layer=0, warm=(), seed=0):
    """A log of passes of the given sizes (warm-up passes at the indices in ``warm``); row r of pass p has the
    routing real_row(seed + 1000 * layer + 100 * p + r). Returns the path and the routing rows in log order."""
    recs, rows = [meta_line((layer,))], []
    for p, n in enumerate(sizes):
        for r in range(n):
            ids, w = DUMMY if p in warm else real_row(seed + 1000 * layer + 100 * p + r)
            recs.append(route(layer, r, ids, w))
            rows.append((p, r, ids))
    return write(path, recs), rows


@pytest.mark.skipif(not SAMPLE.exists(), reason="the shared vLLM sample ../shared/traces/vllm-logger-olmoe is absent")
def test_shared_olmoe_sample(tmp_path, capsys):
    """6,519 rows of layer 0 whose token_idx never restarts (one pass): the first 2,048 are the warm-up; the
    rest become one sequence in row order (no request ids); batch order is refused (passes unknown)."""
    out = tmp_path / "olmoe.parquet"
    assert main(["import", str(SAMPLE), "--format", "vllm-jsonl", "--model-preset", "olmoe-1b-7b", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "dropped 2048 rows per layer" in err and "never restarts" in err
    tr = read_trace(out)
    assert tr.experts.shape == (4471, 1, 8) and tr.meta.layer_names == ["0"] and tr.meta.num_experts == [64]
    assert (tr.seq_id == 0).all() and (tr.phase == 1).all() and tr.position.tolist() == list(range(4471))
    rep = tr.meta.extra["import"]
    assert rep["rows_per_layer"] == 6519 and rep["passes"] == 1 and rep["warmup"]["rows_dropped_per_layer"] == 2048
    assert rep["source_meta"]["model_id"] == "allenai/OLMoE-1B-7B-0924"
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[1:]]
    for t in (0, 1, 2000, 4470):  # token t is the (2048 + t)-th route row
        assert tr.experts[t, 0].tolist() == rows[2048 + t]["topk_ids"]
        np.testing.assert_allclose(tr.weights[t, 0], rows[2048 + t]["topk_weights"], rtol=1e-6)
    bad = tmp_path / "b.parquet"
    assert main(["import", str(SAMPLE), "--format", "vllm-jsonl", "--model-preset", "olmoe-1b-7b", "--batch-order",
                 "25", "-o", str(bad)]) == 2
    assert "token_idx never restarts" in capsys.readouterr().err and not bad.exists()


def test_passes_and_warmup_rows(tmp_path, capsys):
    """Restarts split passes; whole warm-up passes are dropped, a real row with uniform weights is kept."""
    path, rows = passes_log(tmp_path / "l0.jsonl", [6, 1, 5, 3, 3, 3], warm={0, 1})
    lines = path.read_text().splitlines()
    rec = json.loads(lines[1 + 6 + 1 + 5 + 1])  # pass 4, row 1: uniform weights, experts unlike its pass's first
    rec["topk_ids"], rec["topk_weights"] = [6, 7], [0.5, 0.5]
    lines[1 + 6 + 1 + 5 + 1] = json.dumps(rec)
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.parquet"
    assert run([path], out) == 0
    assert "dropped 7 rows per layer, 2 whole pass(es)" in capsys.readouterr().err
    tr = read_trace(out)
    real = [ids for p, _, ids in rows if p >= 2]
    real[6] = [6, 7]
    assert tr.experts[:, 0].tolist() == real and (tr.seq_id == 0).all()
    rep = tr.meta.extra["import"]
    assert rep["passes"] == 6 and rep["warmup"]["passes_with_warmup"] == [1, 2]
    assert rep["warmup"]["uniform_weight_rows_kept"] == 1


def test_warmup_head_of_a_log_without_restarts(tmp_path):
    """As in the shared sample: the warm-up rows open the one pass, token_idx running on into the real rows."""
    recs = [meta_line()] + [route(0, i, *DUMMY) for i in range(4)] + [route(0, 4 + i, *real_row(i)) for i in range(5)]
    tr_path = write(tmp_path / "l.jsonl", recs)
    assert run([tr_path], tmp_path / "o.parquet") == 0
    tr = read_trace(tmp_path / "o.parquet")
    assert tr.experts[:, 0].tolist() == [real_row(i)[0] for i in range(5)]
    assert tr.meta.extra["import"]["warmup"]["rows_dropped_per_layer"] == 4


def test_per_layer_files_align_and_equal_one_file_of_all_layers(tmp_path):
    sizes, warm = [4, 5, 2, 2, 2], {0}
    p0, rows0 = passes_log(tmp_path / "layer0.jsonl", sizes, layer=0, warm=warm)
    p1, rows1 = passes_log(tmp_path / "layer1.jsonl", sizes, layer=1, warm=warm)
    out = tmp_path / "split.parquet"
    assert run([p1, p0], out, layers=2) == 0  # file order does not matter: layers are sorted
    tr = read_trace(out)
    assert tr.meta.layer_names == ["0", "1"] and tr.num_tokens == 11
    assert tr.experts[:, 0].tolist() == [ids for p, _, ids in rows0 if p not in warm]
    assert tr.experts[:, 1].tolist() == [ids for p, _, ids in rows1 if p not in warm]
    # the same rows in one file, layer-major within each pass (as a forward pass logs them)
    recs = [meta_line((0, 1))]
    for p in range(len(sizes)):
        for layer, rows in ((0, rows0), (1, rows1)):
            for _, r, ids in [x for x in rows if x[0] == p]:
                src = json.loads((tmp_path / f"layer{layer}.jsonl").read_text().splitlines()[1 + sum(sizes[:p]) + r])
                recs.append(route(layer, r, ids, src["topk_weights"]))
    one = tmp_path / "one.parquet"
    assert run([write(tmp_path / "all.jsonl", recs)], one, layers=2) == 0
    both = read_trace(one)
    np.testing.assert_array_equal(both.experts, tr.experts)
    np.testing.assert_array_equal(both.weights, tr.weights)


@pytest.mark.parametrize("sizes1, message", [
    ([4, 5, 2, 1, 2], r"layer1\.jsonl:\d+: pass 4 of layer 1 has 1 rows, but pass 4 of layer 0 \(.*layer0\.jsonl:\d+\) has 2"),
    ([4, 5, 2, 2], r"layer0\.jsonl:\d+: pass 5 of layer 0 has no counterpart in layer 1 \(.*layer1\.jsonl ends after 4"),
])
def test_misaligned_per_layer_files_are_refused(tmp_path, capsys, sizes1, message):
    p0, _ = passes_log(tmp_path / "layer0.jsonl", [4, 5, 2, 2, 2], layer=0, warm={0})
    p1, _ = passes_log(tmp_path / "layer1.jsonl", sizes1, layer=1, warm={0})
    out = tmp_path / "o.parquet"
    assert run([p0, p1], out, layers=2) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not from the same run" in err
    assert re.search(message, err), err
    assert not out.exists() and list(tmp_path.glob("*.parquet*")) == []


def test_batch_order_maps_rows_to_sequences_until_the_pass_size_changes(tmp_path, capsys):
    # warm-up, prefill of 3 prompts (7 rows), 4 decode passes of 3, then a request finishes: passes of 2
    sizes = [6, 7, 3, 3, 3, 3, 2, 2]
    path, rows = passes_log(tmp_path / "l.jsonl", sizes, warm={0})
    out = tmp_path / "o.parquet"
    assert run([path], out, "--batch-order", 3) == 0
    err = capsys.readouterr().err
    stop_line = 1 + sum(sizes[:6]) + 1
    assert f"stopped at pass 7 ({path}:{stop_line}): the pass has 2 rows, not 3" in err
    assert "dropped 7 prefill rows before it and 4 rows after the stop" in err
    tr = read_trace(out)
    assert tr.num_tokens == 12 and np.bincount(tr.seq_id).tolist() == [4, 4, 4] and (tr.phase == 1).all()
    for t in range(tr.num_tokens):  # sequence i's step s is row i of decode pass s (pass index 2 + s)
        s, i = int(tr.position[t]), int(tr.seq_id[t])
        assert tr.experts[t, 0].tolist() == next(ids for p, r, ids in rows if p == 2 + s and r == i)
    bo = tr.meta.extra["import"]["batch_order"]
    assert bo["first_decode_pass"] == 3 and bo["decode_passes_mapped"] == 4 and bo["stopped_at_pass"] == 7
    # without a change of size the mapping runs to the end
    path2, _ = passes_log(tmp_path / "l2.jsonl", [7, 3, 3], warm=set())
    assert run([path2], tmp_path / "o2.parquet", "--batch-order", 3) == 0
    assert "ran to the end of the log" in capsys.readouterr().err
    assert read_trace(tmp_path / "o2.parquet").meta.extra["import"]["batch_order"]["stopped_at_pass"] is None
    # no pass of that size: refused, listing the sizes
    assert run([path], tmp_path / "o3.parquet", "--batch-order", 4) == 2
    assert "no pass of 4 rows (layer 0's passes after the warm-up have 7, 3, 3, 3, 3, 2, 2 rows)" in capsys.readouterr().err


def test_request_ids_name_sequences_and_phases(tmp_path):
    recs = [meta_line()]
    recs += [route(0, i, *real_row(i), req="a") for i in range(3)] + [route(0, 3 + i, *real_row(10 + i), req="b") for i in range(2)]
    for step in range(3):
        recs += [route(0, 0, *real_row(20 + step), req="a"), route(0, 1, *real_row(30 + step), req="b")]
    out = tmp_path / "o.parquet"
    assert run([write(tmp_path / "l.jsonl", recs)], out) == 0
    tr = read_trace(out)
    assert tr.seq_id.tolist() == [0] * 6 + [1] * 5
    assert tr.phase.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 1] and tr.position.tolist() == [*range(6), *range(5)]
    assert tr.experts[3, 0].tolist() == real_row(20)[0] and tr.experts[6, 0].tolist() == real_row(10)[0]
    assert run([tmp_path / "l.jsonl"], tmp_path / "b.parquet", "--batch-order", 2) == 2


def test_layer_ids_and_preset_subset(tmp_path, capsys):
    """A preset's whole model is restricted to the logged layers; --layer-ids must name those layers."""
    recs = [meta_line((3,), top_k=8, num_experts=64)] + [route(3, i, list(range(i, i + 8)), [0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])
                                                         for i in range(4)]
    path = write(tmp_path / "l3.jsonl", recs)
    out = tmp_path / "o.parquet"
    assert main(["import", str(path), "--format", "vllm-jsonl", "--model-preset", "olmoe-1b-7b", "-o", str(out)]) == 0
    assert read_trace(out).meta.layer_names == ["3"]
    assert main(["import", str(path), "--format", "vllm-jsonl", "--model-preset", "olmoe-1b-7b", "--layer-ids", "4",
                 "-o", str(tmp_path / "x.parquet")]) == 2
    assert "the logs hold model layers [3], but --layer-ids names ['4']" in capsys.readouterr().err


META = json.dumps(meta_line())
OK = [json.dumps(route(0, i, *real_row(i))) for i in range(3)]


@pytest.mark.parametrize("lines, line_no, message", [
    ([OK[0], META], 1, "a route row before the meta line"),
    ([], 1, "no meta line (empty input)"),
    ([META, OK[0], '{"type": "route", "token_idx": 1,'], 3, "not valid JSON"),
    ([META, OK[0], OK[1].replace('"token_idx": 1', '"token_idx": "1"')], 3, "field 'token_idx' = '1', expected an integer"),
    ([META, OK[0], OK[1].replace('"layer": 0', '"layer": 2')], 3, "field 'layer' = 2, expected one of the meta line's layers_logged [0]"),
    ([META, json.dumps(route(0, 0, [1, 2, 3], [0.5, 0.3, 0.2]))], 2, "field 'topk_ids' has 3 entries, expected top_k=2 (the meta line)"),
    ([META, json.dumps(route(0, 0, [1, 2], [0.5, "x"]))], 2, "field 'topk_weights' holds 'x', expected finite numbers"),
    ([META, json.dumps(route(0, 0, [1.0, 2], [0.5, 0.5]))], 2, "field 'topk_ids' = 1.0, expected an integer"),
    ([META, json.dumps(route(0, 0, [1, 2], [0.5, 0.5], req=[1]))], 2, "field 'req_id' = [1], expected a string"),
    ([META, json.dumps(route(0, 0, [1, 9], [0.5, 0.4]))], 2, "expert 9 out of range, expected 0..7"),
    ([META, json.dumps(route(0, 0, [1, 1], [0.5, 0.4]))], 2, "repeats an expert"),
    ([META, OK[0], OK[2]], 3, "token_idx 2 after 0 (line 2) in layer 0, expected 1 (the pass's next row) or 0"),
    ([META, OK[0], META], 3, "a second meta line (the first is line 1)"),
    ([json.dumps({"type": "meta", "model_id": "m", "top_k": 2}), OK[0]], 1, "meta line lacks field(s) ['layers_logged']"),
    ([json.dumps(meta_line(top_k=3)), json.dumps(route(0, 0, [1, 2, 3], [0.5, 0.3, 0.2]))], 1, "top_k 3, but the trace metadata (--model-preset / --top-k) has top_k 2"),
    ([json.dumps(meta_line((0, 1))), OK[0]], 1, "layers_logged names layer 1, but the file has no route row for it"),
    ([META, json.dumps({"type": "summary"})], 2, "field 'type' = 'summary', expected an object of type 'meta' or 'route'"),
])
def test_bad_input_names_file_and_line(tmp_path, capsys, lines, line_no, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(x + "\n" for x in lines))
    out = tmp_path / "o.parquet"
    assert run([path], out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:{line_no}: ") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == [path]
