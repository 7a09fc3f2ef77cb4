"""Two-level cache (ExpertFlow 2025): a high-priority tier of experts used or prefetched recently, and a
low-priority tier of the rest, which is evicted first.

A key is high priority while its last touch (a hit, or an insert: demand loads and prefetches both insert) is
within the last ``window_steps`` steps, i.e. ``window_steps x L`` layer-steps; prefetched experts are
inserted when the prefetch is decided, so "predicted within the horizon" lands in the high tier by itself.
The victim is the least frequently used low-priority candidate (ties: touched longest ago, then lowest key);
only when every candidate is high priority does it fall back to the least recently touched one. Frequency
counts survive eviction (like ``lfu``). With ``window_steps: 0`` every key is low priority (plain LFU).
"""

from __future__ import annotations

from ..base import CacheContext, PolicyConfigError
from . import TouchOnUse


class TwoLevel(TouchOnUse):
    def __init__(self, window_steps: float = 1.0) -> None:
        if window_steps < 0:
            raise PolicyConfigError(f"two_level cache: window_steps must be >= 0, got {window_steps}")
        self.window_steps = float(window_steps)
        self._window = 0.0
        self._count: dict[int, int] = {}
        self._last: dict[int, int] = {}  # layer-step of the last touch
        self._seq: dict[int, int] = {}  # hook-call order, for ties within a layer-step
        self._clock = 0

    def reset(self, ctx: CacheContext) -> None:
        self._window = self.window_steps * len(ctx.num_experts)
        self._count, self._last, self._seq, self._clock = {}, {}, {}, 0

    def _touch(self, key: int, now: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._last[key] = now
        self._clock += 1
        self._seq[key] = self._clock

    def is_high(self, key: int, now: int) -> bool:
        return now - self._last.get(key, -(10**18)) < self._window

    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        if not candidates:
            return None
        low = [k for k in candidates if not self.is_high(k, now)]
        seq = self._seq
        if low:
            count = self._count
            return min(low, key=lambda k: (count.get(k, 0), seq.get(k, 0), k))
        return min(candidates, key=lambda k: (seq.get(k, 0), k))
