"""LFRU: frequency weighted by recency (an exponentially decayed use count).

Each key carries a score ``s`` and the layer-step ``t`` of its last touch. A touch (``on_hit`` /
``on_insert``) at layer-step ``now`` sets::

    s <- s * 2 ** (-(now - t) / h) + 1,   t <- now,   h = half_life_steps * num_layers

so a use counts 1 and halves every ``half_life_steps`` batch steps (h in layer-steps). The victim is the
candidate with the lowest decayed score ``s * 2 ** (-(now - t) / h)``; ties go to the least recently touched
(hook-call order), then the lowest key. Scores survive eviction (they decay away on their own), so an expert
that was popular recently re-enters with credit. ``half_life_steps -> inf`` gives LFU with persistent counts;
a small half-life approaches LRU.
"""

from __future__ import annotations

from ..base import CacheContext, PolicyConfigError
from . import TouchOnUse


class LFRU(TouchOnUse):
    def __init__(self, half_life_steps: float = 4.0) -> None:
        if not float(half_life_steps) > 0:
            raise PolicyConfigError(f"lfru.half_life_steps: expected a positive number, got {half_life_steps}")
        self.half_life_steps = float(half_life_steps)
        self._h = self.half_life_steps
        self._score: dict[int, float] = {}
        self._last: dict[int, int] = {}
        self._seq: dict[int, int] = {}
        self._clock = 0

    def reset(self, ctx: CacheContext) -> None:
        self._h = self.half_life_steps * max(1, len(ctx.num_experts))
        self._score, self._last, self._seq = {}, {}, {}
        self._clock = 0

    def decayed(self, key: int, now: int) -> float:
        """Score of ``key`` at layer-step ``now`` (0 if never touched)."""
        s = self._score.get(key)
        if s is None:
            return 0.0
        return s * 2.0 ** (-(now - self._last[key]) / self._h)

    def _touch(self, key: int, now: int) -> None:
        self._score[key] = self.decayed(key, now) + 1.0
        self._last[key] = now
        self._clock += 1
        self._seq[key] = self._clock

    def victim(self, partition: int, candidates: set[int], now: int) -> int | None:
        if not candidates:
            return None
        seq = self._seq
        return min(candidates, key=lambda k: (self.decayed(k, now), seq.get(k, 0), k))
