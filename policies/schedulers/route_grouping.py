"""Route-grouping token scheduler (ExpertFlow 2024): regroup decoding sequences so that each batch touches few
experts.

Up to ``pool_factor x batch_size`` (pool_factor 1 or 2) sequences decode at once. For every pair of steps the pool is split into two
batches of at most ``batch_size`` that minimise the sum over both batches of the experts their next tokens
are predicted to touch (the union of predicted routes). The split starts from the two most dissimilar
sequences (similarity 1 - Hamming(r_i, r_j) / (L x E) on the route bit-vectors, as in the paper), adds the
others one by one to the batch whose union grows least, then improves by pairwise swaps while the total
shrinks. Each sequence still gets one token per pair of steps, so tokens per step stay ``batch_size``; the
price is per-request latency, which the run reports (``request_tpot_s``).

Predicted routes come from the caller (``routes`` [T, L, K], -1 where unknown); the simulator supplies the
previous token's routes of the same sequence (``route_source: last_token``) or the true ones (``oracle``).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from ..base import PolicyConfigError, Scheduler, Step
from .fifo import PHASE_DECODE, admit, sequence_queues


def route_bits(routes: np.ndarray, num_experts: int) -> np.ndarray:
    """bool [T, L * E] bit-vectors of routes [T, L, K] (-1 entries set nothing)."""
    T, L, _ = routes.shape
    bits = np.zeros((T, L * num_experts), dtype=bool)
    t_idx, l_idx, k_idx = np.nonzero(routes >= 0)
    bits[t_idx, l_idx * num_experts + routes[t_idx, l_idx, k_idx]] = True
    return bits


def split_two(bits: np.ndarray, cap: int, max_swaps: int = 64) -> tuple[list[int], list[int]]:
    """Split rows of ``bits`` into two groups of at most ``cap`` rows minimising |OR(group a)| + |OR(group b)|."""
    n = len(bits)
    if n <= cap:
        return list(range(n)), []
    ham = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    i, j = np.unravel_index(int(np.argmax(ham)), ham.shape)
    groups = [[int(i)], [int(j)]]
    unions = [bits[i].copy(), bits[j].copy()]
    rest = [r for r in range(n) if r not in (i, j)]
    # most decided first: rows whose cost differs most between the groups
    for r in sorted(rest, key=lambda r: -abs(int((bits[r] & ~unions[0]).sum()) - int((bits[r] & ~unions[1]).sum()))):
        grow = [int((bits[r] & ~u).sum()) for u in unions]
        g = int(np.argmin(grow)) if len(groups[0]) < cap and len(groups[1]) < cap else (0 if len(groups[0]) < cap else 1)
        groups[g].append(r)
        unions[g] |= bits[r]

    def cost(a, b):
        return int(np.any(bits[a], axis=0).sum()) + (int(np.any(bits[b], axis=0).sum()) if b else 0)

    best = cost(groups[0], groups[1])
    for _ in range(max_swaps):
        improved = False
        for x in range(len(groups[0])):
            for y in range(len(groups[1])):
                a, b = groups[0][:], groups[1][:]
                a[x], b[y] = b[y], a[x]
                c = cost(a, b)
                if c < best:
                    best, groups, improved = c, [a, b], True
        if not improved:
            break
    return sorted(groups[0]), sorted(groups[1])


class RouteGroupingScheduler(Scheduler):
    needs_routes = True  # the driver passes predicted routes to plan()

    def __init__(self, pool_factor: int = 2, route_source: str = "last_token") -> None:
        if pool_factor not in (1, 2):
            raise PolicyConfigError(f"route_grouping scheduler: pool_factor must be 1 or 2, got {pool_factor}")
        if route_source not in ("last_token", "oracle"):
            raise PolicyConfigError(f"route_grouping scheduler: route_source must be last_token|oracle, got {route_source!r}")
        self.pool_factor = int(pool_factor)
        self.route_source = route_source

    def plan(self, seq_id: np.ndarray, phase: np.ndarray, batch_size: int, routes: np.ndarray | None) -> list[Step]:
        if batch_size < 1:
            raise PolicyConfigError(f"scheduler: batch_size must be >= 1, got {batch_size}")
        if routes is None:
            raise PolicyConfigError("route_grouping scheduler: needs predicted routes; the driver gave none")
        bits = route_bits(routes, int(routes.max()) + 1 if routes.size else 1)
        order, prefill, decode = sequence_queues(seq_id, phase)
        waiting = deque(order)
        active: list[int] = []
        steps: list[Step] = []
        pool = self.pool_factor * batch_size
        while waiting or active:
            admit(waiting, active, pool, prefill, decode, steps)
            if not active:
                continue
            nxt = [decode[s][0] for s in active]
            groups = split_two(bits[nxt], batch_size) if len(active) > batch_size else (list(range(len(active))), [])
            for g in groups:
                if g:
                    seqs = [active[i] for i in g]
                    steps.append(Step(np.array([decode[s].popleft() for s in seqs]), PHASE_DECODE, np.array(seqs)))
            active = [s for s in active if decode[s]]
        return steps
