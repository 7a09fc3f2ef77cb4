"""Importers: the real shared Mixtral files, npy and long-csv round trips, and every bad-input case."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import random_trace

from traces import TraceError, read_trace
from traces.__main__ import main

DECODE = "speculative-moe/mixtral8x7b_fp8_humaneval_2problems_routing.jsonl"
RAW = "speculative-moe/mixtral8x7b_humaneval_p0_routing_raw.jsonl"
META = ["--num-layers", "4", "--num-experts", "8", "--top-k", "2", "--expert-bytes", "1048576", "--hidden-size", "0", "--model", "random"]


def run(args):
    return main(["import", *map(str, args)])


def test_real_decode_file(shared_traces, tmp_path, capsys):
    """Its token_idx counts each layer's records (0..n-1 with no gap, n differing by layer), so it is not a
    key: strict refuses the file, naming --align order; order matches by order and reports the counts."""
    out = tmp_path / "real.parquet"
    args = [shared_traces / DECODE, "--format", "speculative-moe-jsonl", "--model-preset", "mixtral-8x7b", "-o", out]
    assert run(args) == 2
    assert "--align order" in capsys.readouterr().err and not out.exists()
    assert run([*args, "--align", "order"]) == 0
    tr = read_trace(out)
    assert tr.experts.shape == (333, 32, 2)
    assert tr.meta.num_experts == [8] * 32 and (tr.phase == 1).all()
    assert np.bincount(tr.seq_id).tolist() == [81, 252]  # 83 and 255 decode records at most, 2 + 3 dropped
    err = capsys.readouterr().err
    assert "'seq 0 unkeyed decode': 2, 'seq 1 unkeyed decode': 3" in err
    rep = tr.meta.extra["import"]
    assert rep["seq 0 decode records per layer"][13] == 81 and "token_idx counters: sequences [0, 1]" in rep["alignment"]
    assert rep["missing_records_per_layer"][27] == 4 and sum(rep["missing_records_per_layer"]) == 37
    # alignment: spot-check tokens against the source records
    recs = {}
    for line in open(shared_traces / DECODE):
        r = json.loads(line)
        recs[(r["problem_id"], r["layer"], r["token_idx"])] = r["experts"]
    for t in (0, 40, 80, 81, 200, 332):
        s, pos = int(tr.seq_id[t]), int(tr.position[t])
        for layer in (0, 13, 31):
            assert tr.experts[t, layer].tolist() == recs[(s, layer, pos)]


def test_real_raw_file_prefill_and_decode_alignment(shared_traces, tmp_path, capsys):
    strict = tmp_path / "strict.parquet"
    assert run([shared_traces / RAW, "--format", "speculative-moe-jsonl", "--model-preset", "mixtral-8x7b", "-o", strict]) == 0
    tr = read_trace(strict)
    assert tr.experts.shape == (59, 32, 2) and (tr.phase == 0).all()  # decode counts differ by layer: dropped
    assert "'seq 0 unkeyed decode': 83" in capsys.readouterr().err
    order = tmp_path / "order.parquet"
    assert run([shared_traces / RAW, "--format", "speculative-moe-jsonl", "--model-preset", "mixtral-8x7b",
                "--align", "order", "-o", order]) == 0
    tr2 = read_trace(order)
    assert (tr2.phase == 1).sum() == 77 and (tr2.phase == 0).sum() == 59


def test_output_that_is_a_directory(tmp_path, capsys):
    tr = random_trace(tokens=10, layers=4, experts=8, top_k=2, sequences=1)
    np.save(tmp_path / "e.npy", tr.experts.astype(np.int32))
    (tmp_path / "out").mkdir()
    assert run([tmp_path / "e.npy", "--format", "npy", "-o", tmp_path / "out", *META]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out: is a directory; expected the path of a trace file" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_npy_round_trip(tmp_path):
    tr = random_trace(tokens=50, layers=4, experts=8, top_k=2, sequences=2)
    np.save(tmp_path / "e.npy", tr.experts.astype(np.int32))
    np.save(tmp_path / "w.npy", tr.weights)
    np.save(tmp_path / "s.npy", tr.seq_id)
    out = tmp_path / "o.parquet"
    assert run([tmp_path / "e.npy", "--format", "npy", "--weights", tmp_path / "w.npy", "--seq-ids", tmp_path / "s.npy", "-o", out, *META]) == 0
    back = read_trace(out)
    np.testing.assert_array_equal(back.experts, tr.experts)
    np.testing.assert_array_equal(back.weights, tr.weights)
    np.testing.assert_array_equal(back.position, tr.position)


def write_csv(path, tr, rows=None, header="seq,token,layer,rank,expert,weight"):
    lines = [header]
    for t in range(tr.num_tokens):
        for layer in range(tr.meta.num_layers):
            for k in range(tr.meta.top_k):
                lines.append(f"{tr.seq_id[t]},{tr.position[t]},{layer},{k},{tr.experts[t, layer, k]},{float(tr.weights[t, layer, k])!r}")
    if rows:
        lines = rows(lines)
    path.write_text("\n".join(lines) + "\n")


def test_long_csv_round_trip_any_order(tmp_path):
    tr = random_trace(tokens=30, layers=4, experts=8, top_k=2, sequences=3)
    src = tmp_path / "r.csv"
    write_csv(src, tr, rows=lambda ls: [ls[0], *reversed(ls[1:])])
    out = tmp_path / "o.parquet"
    assert run([src, "--format", "long-csv", "-o", out, *META]) == 0
    back = read_trace(out)
    np.testing.assert_array_equal(back.experts, tr.experts)
    np.testing.assert_allclose(back.weights, tr.weights)


GOOD = {"dataset": "d", "problem_id": 0, "layer": 0, "token_idx": 0, "experts": [1, 2], "gating_probs": [0.6, 0.4]}


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", r"line 2: not valid JSON"),
        (json.dumps({**GOOD, "layer": "0"}), r"line 2: field 'layer' = '0', expected an integer"),
        (json.dumps({**GOOD, "experts": [1, 9]}), r"line 2: field 'experts' = \[1, 9\]: expert 9 out of range, expected 0..7"),
        (json.dumps({**GOOD, "experts": [3, 3]}), r"line 2: field 'experts' = \[3, 3\] repeats an expert"),
        (json.dumps({**GOOD, "experts": [1, 2, 3], "gating_probs": [0.3, 0.3, 0.4]}), r"line 2: field 'experts' has 3 entries, expected top_k=2"),
        (json.dumps({**GOOD, "gating_probs": [float("nan"), 0.4]}), r"line 2: field 'gating_probs' holds nan"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "experts"}), r"line 2: missing field 'experts'"),
    ],
)
def test_bad_jsonl_lines(tmp_path, bad, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(GOOD) + "\n" + bad + "\n")
    out = tmp_path / "o.parquet"
    with pytest.raises(TraceError, match=rf"bad\.jsonl.*{message}"):
        from traces.importers import import_speculative_moe
        from traces.presets import get_preset

        import_speculative_moe([src], get_preset("mixtral-8x7b").meta())
    assert run([src, "--format", "speculative-moe-jsonl", "--model-preset", "mixtral-8x7b", "-o", out]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_token_idx_with_gaps_is_a_key_and_duplicates_stop(tmp_path):
    """token_idx with a gap names decode steps: tokens matched by key, the one missing a layer dropped; a
    repeated token_idx in a layer stops the import naming both lines."""
    from traces.importers import import_speculative_moe
    from traces.presets import get_preset

    rows = [{**GOOD, "layer": layer, "token_idx": t, "experts": [t % 8, (t + layer % 7 + 1) % 8]}
            for layer in range(32) for t in (0, 1, 2, 5) if not (layer == 7 and t == 1)]
    src = tmp_path / "gap.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tr, rep = import_speculative_moe([src], get_preset("mixtral-8x7b").meta())
    assert tr.position.tolist() == [0, 2, 5]  # step 1 lacks layer 7
    assert tr.experts[1, 9].tolist() == [2, 5] and tr.experts[2, 31].tolist() == [5, 1]
    assert rep["dropped"]["keyed tokens missing a layer"] == 1
    src.write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[3]]))
    with pytest.raises(TraceError, match=r"line \d+: duplicate record for layer 0 of token_idx 5 \(first: .*line 4\)"):
        import_speculative_moe([src], get_preset("mixtral-8x7b").meta())


def test_a_one_based_gapless_token_idx_is_a_counter_too(tmp_path):
    """Counting from 1 instead of 0 changes nothing: gapless in every layer, with counts differing by layer,
    token_idx is matched by order (--align order) or the sequence refused (strict), never by key."""
    from traces.importers import import_speculative_moe
    from traces.presets import get_preset

    rows = [{**GOOD, "layer": layer, "token_idx": t, "experts": [t % 8, (t + layer % 7 + 1) % 8]}
            for layer in range(32) for t in range(1, 5 if layer == 3 else 6)]  # layer 3 lacks a record
    src = tmp_path / "one.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TraceError, match="--align order"):
        import_speculative_moe([src], get_preset("mixtral-8x7b").meta())
    tr, rep = import_speculative_moe([src], get_preset("mixtral-8x7b").meta(), align="order")
    assert tr.num_tokens == 4 and rep["seq 0 decode records per layer"][3] == 4


def test_empty_input_and_missing_metadata(tmp_path, capsys):
    src = tmp_path / "empty.jsonl"
    src.write_text("")
    assert run([src, "--format", "speculative-moe-jsonl", "--model-preset", "mixtral-8x7b", "-o", tmp_path / "o.parquet"]) == 2
    assert "empty input" in capsys.readouterr().err
    assert run([src, "--format", "npy", "-o", tmp_path / "o.parquet", "--num-layers", "4"]) == 2
    assert "--expert-bytes" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ls: ls[:1] + [",".join(["0", "0", "0", "x", *ls[1].split(",")[4:]])] + ls[2:], r"line 2: field 'rank' = 'x', expected an integer"),
        (lambda ls: ls[:-1], r"has 7 rows, expected 4 layers x 2 ranks"),
        (lambda ls: ls + [ls[1]], r"second row for seq"),
        (lambda ls: ls[:1] + [ls[1].rsplit(",", 1)[0] + ",nan"] + ls[2:], r"line 2: field 'weight' = nan"),
    ],
)
def test_bad_csv(tmp_path, mutate, message):
    tr = random_trace(tokens=3, layers=4, experts=8, top_k=2, sequences=1)
    src = tmp_path / "bad.csv"
    write_csv(src, tr, rows=mutate)
    out = tmp_path / "o.parquet"
    from traces.importers import import_long_csv

    with pytest.raises(TraceError, match=rf"bad\.csv.*{message}"):
        import_long_csv(src, random_trace(tokens=1).meta)
    assert run([src, "--format", "long-csv", "-o", out, *META]) == 2
    assert not out.exists()


def test_npy_wrong_shape(tmp_path, capsys):
    np.save(tmp_path / "e.npy", np.zeros((5, 3, 2), np.int32))
    assert run([tmp_path / "e.npy", "--format", "npy", "-o", tmp_path / "o.parquet", *META]) == 2
    assert f"{tmp_path / 'e.npy'}: shape (5, 3, 2), expected (tokens, 4, 2) from the metadata" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def _csv_set(lines, line, field, value):
    """The CSV lines with column ``field`` of file line ``line`` (1 = the header) set to ``value``."""
    i = line - 1
    cols = lines[0].split(",")
    row = lines[i].split(",")
    row[cols.index(field)] = str(value)
    return [*lines[:i], ",".join(row), *lines[i + 1:]]


@pytest.mark.parametrize(
    "mutate, message",
    [
        # the same expert at both ranks of token 0 layer 0 (lines 2 and 3): was blamed on the output file
        (lambda ls: _csv_set(ls, 3, "expert", ls[1].split(",")[4]), r"lines 2 and 3: seq 0 token 0 layer 0: expert \d twice"),
        # out of range: the CSV line, not a token index
        (lambda ls: _csv_set(ls, 6, "expert", 8), r"line 6: field 'expert' = 8, expected an expert id in 0..7"),
        (lambda ls: _csv_set([ls[0] + ",token_id", *(x + ",5" for x in ls[1:])], 4, "token_id", "abc"),
         r"line 4: field 'token_id' = 'abc', expected an integer"),
        (lambda ls: _csv_set(ls, 2, "seq", 2**40), r"line 2: field 'seq' = 1099511627776, expected a 32-bit integer"),
        # blank lines are skipped by the csv reader: the line named is still the file's line
        (lambda ls: _csv_set([ls[0], "", "", *ls[1:]], 5, "expert", -1), r"line 5: field 'expert' = -1"),
    ],
)
def test_bad_csv_content_names_the_csv_line(tmp_path, capsys, mutate, message):
    tr = random_trace(tokens=3, layers=4, experts=8, top_k=2, sequences=1)
    src = tmp_path / "bad.csv"
    write_csv(src, tr, rows=mutate)
    out = tmp_path / "o.parquet"
    assert run([src, "--format", "long-csv", "-o", out, *META]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "o.parquet" not in err
    assert re.search(rf"bad\.csv: {message}", err), err
    assert not out.exists()


def _npy_inputs(tmp_path):
    tr = random_trace(tokens=6, layers=4, experts=8, top_k=2, sequences=2)
    np.save(tmp_path / "e.npy", tr.experts.astype(np.int32))
    return tr


@pytest.mark.parametrize(
    "case, message",
    [
        ("csv-missing", r"nope\.csv: no such file"),
        ("csv-dir", r"srcdir: not a regular file \(a directory\)"),
        ("csv-binary", r"bin\.csv: line 1: not UTF-8 text .*expected a CSV file"),
        ("jsonl-dir", r"srcdir: not a regular file"),
        ("jsonl-binary", r"bin\.jsonl: line 1: not UTF-8 text .*expected JSON lines"),
        ("jsonl-dataset-list", r"ds\.jsonl: line 1: field 'dataset' = \['x'\], expected a string or an integer"),
        ("npy-missing-weights", r"--weights .*nope\.npy: no such file"),
        ("npy-missing-seq-ids", r"--seq-ids .*nope\.npy: no such file"),
        ("npy-object-weights", r"--weights .*obj\.npy: not a readable \.npy array"),
        ("npy-float-seq-ids", r"--seq-ids .*s\.npy: array of dtype float64, expected integer sequence ids"),
        ("npy-nan-weights", r"--weights .*w\.npy: index \[1, 2, 1\] = nan, expected finite gate weights"),
        ("npy-duplicate", r"e\.npy: token 1 layer 3: field 'experts' = \[2, 2\] repeats an expert"),
    ],
)
def test_bad_sources_are_one_line_errors_naming_the_source(tmp_path, capsys, case, message):
    (tmp_path / "srcdir").mkdir()
    (tmp_path / "bin.csv").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "bin.jsonl").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "ds.jsonl").write_text(json.dumps({**GOOD, "dataset": ["x"]}) + "\n")
    tr = _npy_inputs(tmp_path)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "s.npy", np.zeros(6))
    w = np.full(tr.experts.shape, 0.5, np.float32)
    w[1, 2, 1] = np.nan
    np.save(tmp_path / "w.npy", w)
    if case == "npy-duplicate":
        ex = tr.experts.astype(np.int32)
        ex[1, 3] = [2, 2]
        np.save(tmp_path / "e.npy", ex)
    fmt, _, what = case.partition("-")
    fmt = {"jsonl": "speculative-moe-jsonl"}.get(fmt, fmt if fmt == "npy" else "long-csv")
    src = {"missing": tmp_path / "nope.csv", "dir": tmp_path / "srcdir", "binary": tmp_path / f"bin.{case.split('-')[0]}",
           "dataset-list": tmp_path / "ds.jsonl"}.get(what, tmp_path / "e.npy")
    extra = {"missing-weights": ["--weights", tmp_path / "nope.npy"], "missing-seq-ids": ["--seq-ids", tmp_path / "nope.npy"],
             "object-weights": ["--weights", tmp_path / "obj.npy"], "float-seq-ids": ["--seq-ids", tmp_path / "s.npy"],
             "nan-weights": ["--weights", tmp_path / "w.npy"]}.get(what, [])
    out = tmp_path / "o.parquet"
    assert run([src, "--format", fmt, *extra, "-o", out, *META]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "o.parquet" not in err and re.search(message, err), err
    assert not out.exists()


def test_preset_with_fewer_layers_recorded_and_layer_ids(tmp_path, capsys):
    """Loggers often record a subset of a model's layers: --num-layers below the preset's works (the layers
    unnamed), --layer-ids names them (layer_names) and implies their number; bad ids are one-line errors."""
    tr = random_trace(tokens=20, layers=3, experts=64, top_k=8, sequences=1)
    np.save(tmp_path / "e.npy", tr.experts.astype(np.int32))
    base = [tmp_path / "e.npy", "--format", "npy", "--model-preset", "olmoe-1b-7b"]
    out = tmp_path / "o.parquet"
    assert run([*base, "--num-layers", "3", "-o", out]) == 0
    got = read_trace(out)
    assert got.meta.num_layers == 3 and got.meta.num_experts == [64] * 3 and got.meta.layer_names == []
    np.testing.assert_array_equal(got.experts, tr.experts)
    assert run([*base, "--layer-ids", "0,7,15", "-o", out]) == 0
    assert read_trace(out).meta.layer_names == ["0", "7", "15"] and read_trace(out).meta.num_layers == 3
    for extra, message in [
        (["--num-layers", "20"], "--num-layers 20: the preset olmoe-1b-7b has 16 MoE layers"),
        (["--layer-ids", "0,7,16"], "layer 16 is outside the model's layers 0..15"),
        (["--layer-ids", "7,0,1"], "expected distinct non-negative layer ids in increasing (model) order"),
        (["--layer-ids", "0,7", "--num-layers", "3"], "--layer-ids 0,7 names 2 layer(s), but --num-layers is 3"),
        (["--layer-ids", "x"], "--layer-ids 'x': expected comma-separated layer ids"),
    ]:
        assert run([*base, *extra, "-o", tmp_path / "bad.parquet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad.parquet").exists()
    # without a preset, --layer-ids gives the number of layers
    assert run([tmp_path / "e.npy", "--format", "npy", *META[2:], "--layer-ids", "1,2,5", "--num-experts", "64",
                "--top-k", "8", "-o", out]) == 0
    assert read_trace(out).meta.layer_names == ["1", "2", "5"]
