"""Copy channels from the slow tier: a priority queue of copies served by SimPy processes.

Demand copies (priority 0) overtake queued prefetches (priority >= 1); a prefetch still queued can be
cancelled or upgraded to demand. With ``shared_link`` all copies in flight share the link bandwidth equally
(processor sharing); otherwise each of ``channels`` copies runs at the full modelled speed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import simpy

from .hardware import CopyModel


@dataclass
class CopyRecord:
    key: int
    priority: int
    submit_s: float
    start_s: float
    end_s: float
    nbytes: int


class CopyChannels:
    """Queue + workers. ``on_complete(key)`` is called when a copy lands (the expert becomes usable)."""

    def __init__(
        self,
        env: simpy.Environment,
        model: CopyModel,
        expert_bytes: int,
        on_complete: Callable[[int], None],
        log: bool = False,
    ):
        self.env = env
        self.model = model
        self.expert_bytes = expert_bytes
        self.on_complete = on_complete
        self.queue: list[tuple[int, int, int]] = []  # (priority, seq, key); stale entries skipped on pop
        self.queued: dict[int, int] = {}  # key -> current priority, for keys waiting in the queue
        self.submit_s: dict[int, float] = {}
        self.done: dict[int, simpy.Event] = {}  # key -> event fired when its copy lands
        self.copying: set[int] = set()
        self.records: list[CopyRecord] | None = [] if log else None
        self.bytes_started = 0
        self.copies_started = 0
        self.bw_ewma_bytes_per_s = 0.0
        self._seq = 0
        self._waiters: list[simpy.Event] = []  # idle workers waiting for work
        self.any_done = env.event()  # fires (and is renewed) whenever any copy lands
        workers = 1 if model.kind == "shared_link" else model.channels
        for _ in range(workers):
            env.process(self._shared() if model.kind == "shared_link" else self._worker())

    # ---------------------------------------------------------------------------------------- API
    def submit(self, key: int, priority: int) -> None:
        self._seq += 1
        heapq.heappush(self.queue, (priority, self._seq, key))
        self.queued[key] = priority
        self.submit_s[key] = self.env.now
        self.done[key] = self.env.event()
        self._kick()

    def upgrade(self, key: int) -> None:
        """Move a queued copy to demand priority (it is needed now)."""
        if key in self.queued and self.queued[key] > 0:
            self._seq += 1
            self.queued[key] = 0
            heapq.heappush(self.queue, (0, self._seq, key))
            self._kick()

    def cancel(self, key: int) -> bool:
        """Drop a copy that has not started; False if it already started (it will land)."""
        if key not in self.queued:
            return False
        del self.queued[key]
        self.done.pop(key, None)
        return True

    def is_queued(self, key: int) -> bool:
        return key in self.queued

    def pending(self, key: int) -> simpy.Event | None:
        """The event a waiter yields on, or None if the key is not being copied."""
        return self.done.get(key)

    def busy(self) -> bool:
        return bool(self.queued) or bool(self.copying)

    # ----------------------------------------------------------------------------------- internals
    def _kick(self) -> None:
        waiters, self._waiters = self._waiters, []
        for ev in waiters:
            ev.succeed()

    def _pop(self) -> tuple[int, int] | None:
        while self.queue:
            prio, _, key = heapq.heappop(self.queue)
            if self.queued.get(key) == prio:
                del self.queued[key]
                return key, prio
        return None

    def _start(self, key: int, prio: int) -> None:
        self.copying.add(key)
        self.bytes_started += self.expert_bytes
        self.copies_started += 1

    def _land(self, key: int, prio: int, start_s: float) -> None:
        self.copying.discard(key)
        end = self.env.now
        if end > start_s:
            rate = self.expert_bytes / (end - start_s)
            self.bw_ewma_bytes_per_s = rate if not self.bw_ewma_bytes_per_s else 0.8 * self.bw_ewma_bytes_per_s + 0.2 * rate
        if self.records is not None:
            self.records.append(CopyRecord(key, prio, self.submit_s.get(key, start_s), start_s, end, self.expert_bytes))
        self.on_complete(key)
        ev = self.done.pop(key, None)
        if ev is not None:
            ev.succeed()
        fired, self.any_done = self.any_done, self.env.event()
        fired.succeed()

    def _wait_work(self) -> simpy.Event:
        ev = self.env.event()
        self._waiters.append(ev)
        return ev

    def _worker(self):
        seconds = self.model.seconds(self.expert_bytes)
        while True:
            item = self._pop()
            if item is None:
                yield self._wait_work()
                continue
            key, prio = item
            start = self.env.now
            self._start(key, prio)
            yield self.env.timeout(seconds)
            self._land(key, prio, start)

    def _shared(self):
        """Processor sharing: up to ``channels`` copies in flight split the bandwidth equally. Each copy first
        pays the latency alone (a per-copy setup cost), then drains its bytes at bandwidth / n."""
        bw = self.model.bandwidth_bytes_per_s
        active: dict[int, list] = {}  # key -> [remaining bytes, prio, start_s]
        while True:
            while len(active) < self.model.channels:
                item = self._pop()
                if item is None:
                    break
                key, prio = item
                self._start(key, prio)
                active[key] = [self.expert_bytes + self.model.latency_s * bw, prio, self.env.now]
            if not active:
                yield self._wait_work()
                continue
            n = len(active)
            rate = bw / n
            dt = min(r[0] for r in active.values()) / rate
            t0 = self.env.now
            wake = self._wait_work() if len(active) < self.model.channels else None
            if wake is None:
                yield self.env.timeout(dt)
            else:
                yield self.env.timeout(dt) | wake
            moved = (self.env.now - t0) * rate
            for key in list(active):
                active[key][0] -= moved
                if active[key][0] <= 1e-6:
                    _, prio, start = active.pop(key)
                    self._land(key, prio, start)
