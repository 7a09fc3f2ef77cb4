"""Train/test split by sequence, reproducible from a seed."""

from __future__ import annotations

import numpy as np

from .schema import Trace, TraceError


def split_by_sequence(trace: Trace, test_fraction: float = 0.25, seed: int = 0) -> tuple[Trace, Trace]:
    """Assign whole sequences to train or test. With a single sequence, split it in time (first part train)
    so that a one-sequence trace (e.g. one long generation) still yields both splits."""
    if not 0.0 < test_fraction < 1.0:
        raise TraceError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    seqs = trace.sequences
    if len(seqs) >= 2:
        rng = np.random.default_rng(seed)
        n_test = min(len(seqs) - 1, max(1, int(round(len(seqs) * test_fraction))))
        test_seqs = rng.choice(seqs, size=n_test, replace=False)
        is_test = np.isin(trace.seq_id, test_seqs)
    else:
        cut = int(round(trace.num_tokens * (1 - test_fraction)))
        is_test = np.arange(trace.num_tokens) >= cut
    return trace.select(~is_test), trace.select(is_test)
