"""The copy queue both copy-channel implementations share (same code, so the same pop order): priorities,
cancels and upgrades, the started-copy counters and the achieved-bandwidth estimate."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

from .hardware import CopyModel


@dataclass
class CopyRecord:
    key: int
    priority: int
    submit_s: float
    start_s: float
    end_s: float
    nbytes: int


class CopyQueue:
    """The priority queue and the counters both implementations share (same code, so same pop order)."""

    def __init__(self, model: CopyModel, expert_bytes: int, on_complete: Callable[[int], None], log: bool):
        self.model = model
        self.expert_bytes = expert_bytes
        self.on_complete = on_complete
        self.queue: list[tuple[int, int, int]] = []  # (priority, seq, key); stale entries skipped on pop
        self.queued: dict[int, int] = {}  # key -> current priority, for keys waiting in the queue
        self.entry: dict[int, int] = {}  # key -> seq of its live heap entry (a cancelled one's stays stale)
        self.submit_s: dict[int, float] = {}
        self.copying: set[int] = set()
        self.records: list[CopyRecord] | None = [] if log else None
        self.bytes_started = 0
        self.copies_started = 0
        self.bw_ewma_bytes_per_s = 0.0
        self._seq = 0

    def _push(self, key: int, priority: int, now: float) -> None:
        self._seq += 1
        heapq.heappush(self.queue, (priority, self._seq, key))
        self.queued[key] = priority
        self.entry[key] = self._seq
        self.submit_s[key] = now

    def upgrade(self, key: int) -> None:
        """Move a queued copy to demand priority (it is needed now)."""
        if key in self.queued and self.queued[key] > 0:
            self._seq += 1
            self.queued[key] = 0
            self.entry[key] = self._seq
            heapq.heappush(self.queue, (0, self._seq, key))
            self._kick()

    def is_queued(self, key: int) -> bool:
        return key in self.queued

    def busy(self) -> bool:
        return bool(self.queued) or bool(self.copying)

    def _kick(self) -> None:
        raise NotImplementedError

    def _pop(self) -> tuple[int, int] | None:
        while self.queue:
            prio, seq, key = heapq.heappop(self.queue)
            if self.queued.get(key) == prio and self.entry[key] == seq:
                del self.queued[key]
                return key, prio
        return None

    def _start(self, key: int, prio: int) -> None:
        self.copying.add(key)
        self.bytes_started += self.expert_bytes
        self.copies_started += 1

    def _landed(self, key: int, prio: int, start_s: float, end: float) -> None:
        self.copying.discard(key)
        if end > start_s:
            rate = self.expert_bytes / (end - start_s)
            self.bw_ewma_bytes_per_s = rate if not self.bw_ewma_bytes_per_s else 0.8 * self.bw_ewma_bytes_per_s + 0.2 * rate
        if self.records is not None:
            self.records.append(CopyRecord(key, prio, self.submit_s.get(key, start_s), start_s, end, self.expert_bytes))
        self.on_complete(key)
