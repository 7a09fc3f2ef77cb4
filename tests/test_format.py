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


def _with_sidecar(tmp_path, tokens=20):
    from traces.sidecar import write_hidden

    out = write_trace(random_trace(tokens=tokens, layers=4), tmp_path / "h.parquet")
    side = write_hidden(out, np.ones((tokens, 4, 8), np.float32))
    return out, side


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
