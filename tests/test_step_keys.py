"""The replay's per-layer-step keys and the future index, built with numpy, against straightforward loops."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_trace

from policies.future import FutureIndex, StepStream, step_keys
from policies.schedulers.fifo import FIFOScheduler
from replay_kernels.keys import layer_step_keys, steps_csr
from traces.schema import PHASE_DECODE, PHASE_PREFILL


def reference_keys(trace, steps, offsets):
    """Key by key: per layer-step, the use count of every key, and the distinct keys in first-seen order."""
    needed, uses = [], []
    for st in steps:
        ex = trace.experts[st.tokens].astype(np.int64)
        for layer in range(trace.meta.num_layers):
            u: dict[int, int] = {}
            for k in (ex[:, layer, :] + offsets[layer]).ravel().tolist():
                u[k] = u.get(k, 0) + 1
            uses.append(u)
            needed.append(list(u))
    return needed, uses


def reference_future(needed):
    out: dict[int, list[int]] = {}
    for t, keys in enumerate(needed):
        for k in keys:
            out.setdefault(k, []).append(t)
    return out


def with_prefill(trace, rng):
    """Mark the first few tokens of each sequence as prefill (multi-token steps with repeated experts)."""
    phase = np.full(trace.num_tokens, PHASE_DECODE, np.int8)
    for s in np.unique(trace.seq_id):
        idx = np.flatnonzero(trace.seq_id == s)
        phase[idx[: int(rng.integers(0, len(idx) + 1))]] = PHASE_PREFILL
    trace.phase = phase
    return trace


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("batch", [1, 3])
def test_step_keys_and_future_match_the_loops(seed, batch):
    rng = np.random.default_rng(seed)
    tr = random_trace(tokens=int(rng.integers(1, 60)), layers=int(rng.integers(1, 5)), experts=int(rng.integers(2, 9)),
                      top_k=1 + int(rng.integers(0, 2)), sequences=int(rng.integers(1, 4)), seed=seed)
    if seed % 2:
        tr = with_prefill(tr, rng)
    steps = FIFOScheduler().plan(tr.seq_id, tr.phase, batch)
    needed, uses = step_keys(tr, steps, tr.meta.layer_offsets)
    ref_needed, ref_uses = reference_keys(tr, steps, tr.meta.layer_offsets)
    assert len(needed) == len(uses) == len(steps) * tr.meta.num_layers
    assert [n.tolist() for n in needed] == ref_needed and all(n.dtype == np.int64 for n in needed)
    assert [list(u.items()) for u in uses] == [list(u.items()) for u in ref_uses]  # counts and first-seen order
    fut = FutureIndex(needed)
    ref = reference_future(ref_needed)
    num_keys = sum(tr.meta.num_experts)
    assert future_dict(fut, num_keys) == ref
    for key in range(num_keys + 1):  # next_use over every layer-step, for every key
        for now in range(fut.horizon + 1):
            later = [t for t in ref.get(key, []) if t >= now]
            assert fut.next_use(key, now) == (later[0] if later else fut.horizon)
    # the same stream as arrays: built by the compiled keys kernel (as prepare does), or from step_keys' lists
    for stream in (StepStream(*layer_step_keys(tr.experts, tr.meta.layer_offsets, *steps_csr(steps), num_keys)),
                   StepStream.from_lists(needed, uses)):
        assert [n.tolist() for n in stream.needed] == ref_needed and all(n.dtype == np.int64 for n in stream.needed)
        assert [list(u.items()) for u in stream.uses] == [list(u.items()) for u in ref_uses]
        assert stream.distinct().tolist() == [len(n) for n in ref_needed]
        assert future_dict(stream.future(), num_keys) == ref and stream.future().horizon == len(ref_needed)
        if len(ref_uses) > 1:
            assert stream.uses[-1] == ref_uses[-1] and stream.uses[1:] == ref_uses[1:]


def future_dict(fut: FutureIndex, num_keys: int) -> dict[int, list[int]]:
    """Every key's layer-steps, as :func:`reference_future` lists them."""
    return {k: fut.uses_of(k) for k in range(num_keys) if fut.uses_of(k)}


def test_stream_rows_are_built_once_on_first_access():
    tr = random_trace(tokens=20, layers=2, experts=4, top_k=2, sequences=1, seed=0)
    steps = FIFOScheduler().plan(tr.seq_id, tr.phase, 2)
    stream = StepStream(*layer_step_keys(tr.experts, tr.meta.layer_offsets, *steps_csr(steps), 8))
    assert stream.uses[3] is stream.uses[3] and stream.needed[0] is stream.needed[0]
    assert not stream.needed[0].flags.writeable  # views of the stream's keys: nobody may change them
    with pytest.raises(IndexError):
        stream.uses[len(stream.uses)]


def test_repeated_experts_in_a_one_token_step_are_counted():
    """A token whose top-k repeats an expert (traces on disk refuse it; an in-memory one may have it)."""
    tr = random_trace(tokens=3, layers=2, experts=4, top_k=2, sequences=1, seed=0)
    tr.experts[1, 0] = [3, 3]
    steps = FIFOScheduler().plan(tr.seq_id, tr.phase, 1)
    needed, uses = step_keys(tr, steps, tr.meta.layer_offsets)
    assert uses[2] == {3: 2} and needed[2].tolist() == [3]
    assert [n.tolist() for n in needed] == reference_keys(tr, steps, tr.meta.layer_offsets)[0]


def test_empty_future():
    fut = FutureIndex([np.zeros(0, np.int64), np.zeros(0, np.int64)])
    assert fut.next_use(5, 0) == fut.horizon == 2


def test_future_index_with_keys_beyond_16_bits():
    rng = np.random.default_rng(1)
    needed = [np.unique(rng.integers(0, 70_000, 5)) for _ in range(200)]
    fut = FutureIndex(needed)
    assert future_dict(fut, 70_000) == reference_future([n.tolist() for n in needed])


def test_a_step_with_no_tokens_has_no_keys():
    from policies.base import Step

    tr = random_trace(tokens=4, layers=2, experts=4, top_k=2, sequences=1, seed=0)
    steps = [Step([0], 1, np.zeros(1)), Step([], 1, np.zeros(0)), Step([1, 2], 1, np.zeros(2))]
    needed, uses = step_keys(tr, steps, tr.meta.layer_offsets)
    assert uses[2] == uses[3] == {} and needed[2].tolist() == []
    assert [n.tolist() for n in needed] == reference_keys(tr, steps, tr.meta.layer_offsets)[0]
