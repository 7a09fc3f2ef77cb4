"""The kernels' access stream against the simulator's: per layer-step the distinct keys in first-seen order
and their use counts (replay.prepare.step_keys), and the future (policies.base.FutureIndex)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_trace

from policies.base import FutureIndex
from policies.schedulers.fifo import FIFOScheduler
from replay.prepare import step_keys
from replay_kernels.keys import future_index, layer_step_keys, pack_stream, steps_csr


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_layer_step_keys_equal_step_keys(batch):
    trace = random_trace(tokens=150, layers=3, experts=6, top_k=3, sequences=5, seed=batch)
    meta = trace.meta
    steps = FIFOScheduler().plan(trace.seq_id, trace.phase, batch)
    needed, uses = step_keys(trace, steps, meta.layer_offsets)
    ptr, keys, counts = layer_step_keys(trace.experts, meta.layer_offsets, *steps_csr(steps), meta.total_experts)
    assert len(ptr) - 1 == len(needed)
    for i, (row, u) in enumerate(zip(needed, uses)):
        assert keys[ptr[i]:ptr[i + 1]].tolist() == row.tolist() == list(u)
        assert counts[ptr[i]:ptr[i + 1]].tolist() == list(u.values())
    if batch > 1:
        assert counts.max() > 1  # tokens of a step sharing experts: counted, not repeated

    future = FutureIndex(needed)
    s = pack_stream(ptr, keys, meta.total_experts)
    fptr, at = future_index(ptr, keys, meta.total_experts)
    head = int(s[2])
    assert np.array_equal(s[head:head + meta.total_experts + 1] - head - meta.total_experts - 1, fptr)
    assert np.array_equal(s[head + meta.total_experts + 1:], at)
    for key in range(meta.total_experts):
        assert at[fptr[key]:fptr[key + 1]].tolist() == future.uses_of(key)
