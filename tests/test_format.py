import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import random_trace

from traces import TraceError, read_trace, split_by_sequence, write_trace
from traces.schema import next_use_of


def test_round_trip_identical(tmp_path):
    tr = random_trace(tokens=123, layers=3, experts=6, top_k=2, sequences=3)
    out = write_trace(tr, tmp_path / "t.parquet")
    back = read_trace(out)
    assert back.meta == tr.meta
    for name in ("experts", "weights", "seq_id", "position", "phase", "token_id"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tr, name), err_msg=name)


def test_next_use_matches_brute_force():
    tr = random_trace(tokens=60, layers=2, experts=4, top_k=2)
    nu = tr.next_use()
    for t in range(tr.num_tokens):
        for layer in range(2):
            for k in range(2):
                e = tr.experts[t, layer, k]
                later = [u for u in range(t + 1, tr.num_tokens) if e in tr.experts[u, layer]]
                assert nu[t, layer, k] == (later[0] if later else tr.num_tokens)


def test_next_use_of_duplicates_share_next_time():
    keys = np.array([[1, 1], [2, -1], [1, 2]])
    nu = next_use_of(keys, 3)
    assert nu.tolist() == [[2, 2], [2, 3], [3, 3]]


def test_split_is_by_sequence_and_reproducible():
    tr = random_trace(tokens=400, sequences=8)
    a_train, a_test = split_by_sequence(tr, 0.25, seed=3)
    b_train, b_test = split_by_sequence(tr, 0.25, seed=3)
    np.testing.assert_array_equal(a_test.seq_id, b_test.seq_id)
    assert not set(a_train.seq_id.tolist()) & set(a_test.seq_id.tolist())
    assert a_train.num_tokens + a_test.num_tokens == tr.num_tokens


def test_foreign_parquet_is_rejected_and_named(tmp_path):
    p = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), p)
    with pytest.raises(TraceError, match=r"foreign\.parquet.*expertflow"):
        read_trace(p)


def test_truncated_parquet_is_rejected(tmp_path):
    tr = random_trace()
    out = write_trace(tr, tmp_path / "t.parquet")
    data = out.read_bytes()
    bad = tmp_path / "trunc.parquet"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=r"trunc\.parquet"):
        read_trace(bad)


def test_out_of_range_expert_rejected_and_nothing_written(tmp_path):
    tr = random_trace(experts=8)
    tr.experts[5, 1, 0] = 8
    target = tmp_path / "bad.parquet"
    with pytest.raises(TraceError, match=r"token 5 layer 1 rank 0.*0\.\.7"):
        write_trace(tr, target)
    assert list(tmp_path.iterdir()) == []


def test_missing_metadata_field(tmp_path):
    tr = random_trace()
    out = write_trace(tr, tmp_path / "t.parquet")
    table = pq.read_table(out)
    table = table.replace_schema_metadata({b"expertflow": b'{"model": "x", "num_layers": 4}'})
    pq.write_table(table, out)
    with pytest.raises(TraceError, match=r"missing field.*expert_bytes"):
        read_trace(out)


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os

    from traces.io import atomic_path

    umask = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "out.json") as tmp:
            tmp.write_text("{}")
    finally:
        os.umask(umask)
    assert oct(os.stat(tmp_path / "out.json").st_mode & 0o777) == oct(0o644)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_writes_a_temp_file_and_renames_it_only_on_success(tmp_path):
    from traces.io import atomic_path

    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == tmp_path
        tmp.write_text("half")
        assert not target.exists()  # nothing at the target while the block runs
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []  # no target, no temp file left
    with atomic_path(target) as tmp:
        assert tmp != target
        tmp.write_text("whole")
        assert not target.exists()
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]
    target.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]  # an old file is kept whole


def _with_sidecar(tmp_path, tokens=20):
    from traces.sidecar import write_hidden

    out = write_trace(random_trace(tokens=tokens, layers=4), tmp_path / "h.parquet")
    side = write_hidden(out, np.ones((tokens, 4, 8), np.float32))
    return out, side


def test_selection_of_a_selection_reads_its_own_hidden_rows(tmp_path):
    """The split then ``max_tokens``: the rows of the sidecar are those of the tokens finally selected."""
    from traces.sidecar import write_hidden

    out = write_trace(random_trace(tokens=20, layers=4), tmp_path / "h.parquet")
    write_hidden(out, np.arange(20, dtype=np.float32)[:, None, None] * np.ones((20, 4, 8), np.float32))
    sub = read_trace(out).select(np.arange(20) >= 7).select(np.arange(13) < 3)
    assert sub.hidden_states()[:, 0, 0].tolist() == [7.0, 8.0, 9.0]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_sidecar_is_a_trace_error_naming_it(tmp_path, damage):
    out, side = _with_sidecar(tmp_path)
    data = side.read_bytes()
    side.write_bytes(b"\x00garbage" * 4 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(TraceError, match=r"h\.hidden\.safetensors: not a readable safetensors file"):
        read_trace(out).hidden_states()


def test_short_sidecar_is_a_trace_error_for_a_selection(tmp_path):
    from traces.sidecar import write_hidden

    out, _ = _with_sidecar(tmp_path)
    write_hidden(out, np.ones((5, 4, 8), np.float32))  # 5 of the trace's 20 tokens
    tr = read_trace(out)
    with pytest.raises(TraceError, match=r"h\.hidden\.safetensors: hidden has 5 tokens.*token 19 is selected"):
        tr.select(np.arange(20) >= 10).hidden_states()
    with pytest.raises(TraceError, match=r"h\.hidden\.safetensors: hidden has 5 tokens, expected 20"):
        tr.hidden_states()
    assert tr.select(np.arange(20) < 5).hidden_states().shape == (5, 4, 8)


def _set(table, name, values, typ=None):
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, typ))


def _meta(table, **fields):
    import json

    meta = json.loads(table.schema.metadata[b"expertflow"])
    return table.replace_schema_metadata({b"expertflow": json.dumps({**meta, **fields}).encode()})


def _null_at(values, i, inner=None):
    values = list(values)
    if inner is None:
        values[i] = None
    else:
        values[i] = [None if j == inner else v for j, v in enumerate(values[i])]
    return values


BAD_TABLES = [
    (lambda t: _set(t, "seq_id", [str(x) for x in t["seq_id"].to_pylist()]), r"column 'seq_id' has type string, expected integers"),
    (lambda t: _set(t, "layer", [str(x) for x in t["layer"].to_pylist()]), r"column 'layer' has type string, expected integers"),
    (lambda t: _set(t, "experts", [[str(e) for e in x] for x in t["experts"].to_pylist()]),
     r"column 'experts' holds string, expected lists of integers"),
    (lambda t: _set(t, "phase", _null_at(t["phase"].to_pylist(), 5), pa.int8()), r"row 5: field 'phase' is null, expected an integer"),
    (lambda t: _set(t, "experts", _null_at(t["experts"].to_pylist(), 6, inner=1), pa.list_(pa.int16())),
     r"row 6: field 'experts' holds a null, expected 2 numbers"),
    (lambda t: _set(t, "experts", _null_at(t["experts"].to_pylist(), 7), pa.list_(pa.int16())),
     r"row 7: field 'experts' is null, expected a list of 2 numbers"),
    (lambda t: _set(t, "weights", _null_at(t["weights"].to_pylist(), 2, inner=0), pa.list_(pa.float32())),
     r"row 2: field 'weights' holds a null"),
    (lambda t: _set(t, "experts", [[65536 + x[0], x[1]] for x in t["experts"].to_pylist()], pa.list_(pa.int32())),
     r"row 0: field 'experts' = 6553\d, expected an integer in -32768..32767"),
    (lambda t: _meta(t, num_experts="abc"), r"metadata: field 'num_experts': expected an integer or a list.*got 'abc'"),
    (lambda t: _meta(t, num_experts=None), r"metadata: field 'num_experts': expected an integer or a list.*got None"),
    (lambda t: _meta(t, num_layers="4"), r"metadata: field 'num_layers': expected an integer, got '4'"),
    (lambda t: _meta(t, extra=[1]), r"metadata: field 'extra': expected a JSON object, got \[1\]"),
    (lambda t: _meta(t, model_path=None), r"metadata: field 'model_path': expected a string, got None"),
    (lambda t: t.replace_schema_metadata({b"expertflow": b"[1, 2]"}), r"metadata is list \[1, 2\], expected a JSON object"),
    (lambda t: t.replace_schema_metadata({b"expertflow": b"\xff\xfe"}), r"metadata is not valid JSON"),
    (lambda t: t.slice(0, 0), r"no rows, expected at least one token"),
    (lambda t: t.take([0, 1, 2, 3, 4, 6, 5, *range(7, t.num_rows)]),  # token 1's layers 1 and 2 swapped
     r"row 5: field 'layer' = 2, expected 1 \(rows grouped by token\)"),
]


@pytest.mark.parametrize("mutate, message", BAD_TABLES)
def test_bad_columns_and_metadata_are_named(tmp_path, mutate, message):
    out = write_trace(random_trace(tokens=10, layers=4), tmp_path / "t.parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(mutate(pq.read_table(out)), bad)
    with pytest.raises(TraceError, match=rf"bad\.parquet: .*{message}"):
        read_trace(bad)


BAD_CONTENT = {
    "duplicate": (lambda tr: tr.experts.__setitem__((3, 1), [5, 5]),
                  r"token 3 layer 1: field 'experts' = \[5, 5\] repeats an expert; expected distinct experts"),
    "nan": (lambda tr: tr.weights.__setitem__((4, 2, 1), np.nan),
            r"token 4 layer 2 rank 1: field 'weights' is nan, expected a finite number"),
    "phase": (lambda tr: tr.phase.__setitem__(6, 2), r"field 'phase' must be 0 \(prefill\) or 1 \(decode\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENT))
def test_bad_content_is_refused_by_the_writer_and_the_reader(tmp_path, capsys, case):
    """A repeated expert in a token's top-k, a NaN gate weight, a phase other than 0/1: the writer writes
    nothing, and a file that has one anyway (written around the writer) is refused by the reader."""
    from traces.__main__ import main
    from traces.io import trace_to_table

    damage, message = BAD_CONTENT[case]
    tr = random_trace(tokens=10, layers=4, experts=8, top_k=2)
    damage(tr)
    with pytest.raises(TraceError, match=rf"bad\.parquet: {message}"):
        write_trace(tr, tmp_path / "bad.parquet")
    assert list(tmp_path.iterdir()) == []
    pq.write_table(trace_to_table(tr), tmp_path / "bad.parquet")
    with pytest.raises(TraceError, match=rf"bad\.parquet: {message}"):
        read_trace(tmp_path / "bad.parquet")
    assert main(["stats", str(tmp_path / "bad.parquet")]) == 2  # nothing written beside it either
    assert re.search(message, capsys.readouterr().err) and [p.name for p in tmp_path.iterdir()] == ["bad.parquet"]


def test_stats_on_an_empty_trace_is_a_one_line_error(tmp_path, capsys):
    from traces.__main__ import main

    out = write_trace(random_trace(tokens=10), tmp_path / "t.parquet")
    pq.write_table(pq.read_table(out).slice(0, 0), out)
    assert main(["stats", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t.parquet: no rows" in err
    tr = random_trace(tokens=10)
    with pytest.raises(TraceError, match=r"empty\.parquet: no tokens"):  # the writer refuses one too
        write_trace(tr.select(np.zeros(10, bool)), tmp_path / "empty.parquet")
