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
        self.started_s: dict[int, float] = {}  # key -> when its copy started, while it is copying
        self.copy_time_s = model.seconds(expert_bytes)  # one copy alone on the link
        self.records: list[CopyRecord] | None = [] if log else None
        self.bytes_started = 0
        self.copies_started = 0
        self.busy_s = 0.0  # seconds copies spent on the link, summed over the copies that landed
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

    def backlog_s(self, priority: int) -> float:
        """Copy work (seconds, summed over workers) a copy submitted now at ``priority`` finds ahead of it: what
        remains of the copies in flight and every queued copy at a priority <= it (the link-time budget's fact,
        :class:`policies.link_budget.LinkFacts`)."""
        n = sum(1 for p in self.queued.values() if p <= priority)
        return n * self.copy_time_s + self.in_flight_s()

    def in_flight_s(self) -> float:
        """What remains of the copies in flight, in seconds of one copy alone (summed)."""
        now, c = self.now, self.copy_time_s
        return sum(max(0.0, c - (now - self.started_s.get(k, now))) for k in self.copying)

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
        self.started_s[key] = self.now
        self.bytes_started += self.expert_bytes
        self.copies_started += 1

    def _landed(self, key: int, prio: int, start_s: float, end: float) -> None:
        self.copying.discard(key)
        self.started_s.pop(key, None)
        self.busy_s += end - start_s
        if end > start_s:
            rate = self.expert_bytes / (end - start_s)
            self.bw_ewma_bytes_per_s = rate if not self.bw_ewma_bytes_per_s else 0.8 * self.bw_ewma_bytes_per_s + 0.2 * rate
        if self.records is not None:
            self.records.append(CopyRecord(key, prio, self.submit_s.get(key, start_s), start_s, end, self.expert_bytes))
        self.on_complete(key)
