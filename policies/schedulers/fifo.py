"""FIFO continuous batching: sequences start in trace order, at most ``batch_size`` decode together.

A sequence that joins runs its prefill tokens (if the trace has them) as one step of its own, then
contributes one decode token to every following step until it has none left; a finished sequence's place
goes to the next waiting one. This is what vLLM-style servers do without chunked prefill.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ..base import Scheduler, Step

PHASE_PREFILL, PHASE_DECODE = 0, 1


def sequence_queues(seq_id: np.ndarray, phase: np.ndarray) -> tuple[list[int], dict[int, np.ndarray], dict[int, deque]]:
    """Sequences in first-appearance order, each one's prefill token indices and a queue of decode indices."""
    order: list[int] = list(dict.fromkeys(seq_id.tolist()))
    prefill: dict[int, np.ndarray] = {}
    decode: dict[int, deque] = {}
    for s in order:
        idx = np.flatnonzero(seq_id == s)
        prefill[s] = idx[phase[idx] == PHASE_PREFILL]
        decode[s] = deque(idx[phase[idx] == PHASE_DECODE].tolist())
    return order, prefill, decode


def admit(waiting: deque, active: list[int], limit: int, prefill: dict, decode: dict, steps: list[Step]) -> None:
    """Move sequences from ``waiting`` into ``active`` up to ``limit``, each joining with its prefill step."""
    while waiting and len(active) < limit:
        s = waiting.popleft()
        if prefill[s].size:
            steps.append(Step(prefill[s], PHASE_PREFILL, np.array([s])))
        if decode[s]:
            active.append(s)


class FIFOScheduler(Scheduler):
    """Continuous batching in arrival order."""

    def plan(self, seq_id: np.ndarray, phase: np.ndarray, batch_size: int, routes: np.ndarray | None = None) -> list[Step]:
        if batch_size < 1:
            raise ValueError(f"scheduler: batch_size must be >= 1, got {batch_size}")
        order, prefill, decode = sequence_queues(seq_id, phase)
        waiting = deque(order)
        active: list[int] = []
        steps: list[Step] = []
        while waiting or active:
            admit(waiting, active, batch_size, prefill, decode, steps)
            if not active:
                continue
            toks = [decode[s].popleft() for s in active]
            steps.append(Step(np.array(toks, dtype=np.int64), PHASE_DECODE, np.array(active)))
            active = [s for s in active if decode[s]]
        return steps
