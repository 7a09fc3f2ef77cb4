"""I/O threads that copy experts from the tier into RAM slots, demand loads before prefetches.

``submit(key, slot, priority)`` queues a copy (0 = demand; prefetches use >= 1); ``upgrade`` moves a queued
copy to demand; ``cancel`` drops one that has not started; ``wait(key)`` blocks until it has landed and
returns the seconds waited. A failed read is raised to whoever waits for that key, and ``close`` stops the
threads (also on error), so nothing hangs.
"""

from __future__ import annotations

import heapq
import threading
import time
from dataclasses import dataclass

from .tier import ExpertReader, TierError


@dataclass
class CopyRecord:
    key: int
    slot: int
    priority: int
    submit_s: float
    start_s: float
    end_s: float
    nbytes: int
    thread: int


class TransferEngine:
    def __init__(self, reader: ExpertReader, slots: memoryview, io_threads: int = 2):
        if io_threads < 1:
            raise TierError(f"executor.io_threads: expected >= 1, got {io_threads}")
        self.reader = reader
        self.stride = reader.layout.stride_bytes
        self.slots = slots
        self.t0 = time.perf_counter()
        self._cv = threading.Condition()
        self._queue: list[tuple[int, int, int]] = []  # (priority, seq, key)
        self._queued: dict[int, tuple[int, int, float, int]] = {}  # key -> (priority, slot, submit_s, live seq)
        self._copying: dict[int, float] = {}  # key -> when its read started
        self._done: set[int] = set()
        self._copy_ewma_s: float | None = None  # EWMA of measured copy durations (the link budget's copy time)
        self.channels = io_threads  # reads in flight at once
        self._errors: dict[int, BaseException] = {}
        self._seq = 0
        self._stop = False
        self.records: list[CopyRecord] = []
        self._landed: list[int] = []  # keys landed since the driver last asked
        self.bytes_started = 0
        self.copies_started = 0
        self._threads = [threading.Thread(target=self._work, args=(i,), daemon=True, name=f"expert-io-{i}")
                         for i in range(io_threads)]
        for t in self._threads:
            t.start()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def submit(self, key: int, slot: int, priority: int) -> None:
        with self._cv:
            self._done.discard(key)
            self._seq += 1
            heapq.heappush(self._queue, (priority, self._seq, key))
            self._queued[key] = (priority, slot, self.now(), self._seq)  # seq: which heap entry is live
            self._cv.notify()

    def upgrade(self, key: int) -> None:
        with self._cv:
            q = self._queued.get(key)
            if q is not None and q[0] > 0:
                self._seq += 1
                self._queued[key] = (0, q[1], q[2], self._seq)
                heapq.heappush(self._queue, (0, self._seq, key))
                self._cv.notify()

    def cancel(self, key: int) -> bool:
        with self._cv:
            return self._queued.pop(key, None) is not None

    def is_queued(self, key: int) -> bool:
        with self._cv:
            return key in self._queued

    def busy(self) -> bool:
        with self._cv:
            return bool(self._queued or self._copying)

    def wait(self, key: int, timeout_s: float = 120.0) -> float:
        """Block until ``key`` has landed; returns the seconds waited."""
        start = time.perf_counter()
        with self._cv:
            while key not in self._done:
                if key in self._errors:
                    raise self._errors[key]
                if key not in self._queued and key not in self._copying:
                    raise TierError(f"wait for expert {key}: no copy of it is queued or running")
                if not self._cv.wait(timeout=timeout_s):
                    raise TierError(f"wait for expert {key}: no progress in {timeout_s} s")
        return time.perf_counter() - start

    def landed(self) -> list[int]:
        """Keys whose copies landed since the last call (the driver marks them resident in its cache)."""
        with self._cv:
            out, self._landed = self._landed, []
            return out

    def wait_any(self, timeout_s: float = 120.0) -> float:
        """Block until some copy lands (or fails); returns the seconds waited."""
        start = time.perf_counter()
        with self._cv:
            n, e = len(self.records), len(self._errors)
            while len(self.records) == n and len(self._errors) == e:
                if not self._queued and not self._copying:
                    raise TierError("wait for any copy: none is queued or running")
                if not self._cv.wait(timeout=timeout_s):
                    raise TierError(f"wait for any copy: no progress in {timeout_s} s")
            if len(self._errors) > e:
                raise next(reversed(self._errors.values()))
        return time.perf_counter() - start

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=10)

    def _work(self, tid: int) -> None:
        while True:
            with self._cv:
                item = None
                while item is None:
                    if self._stop:
                        return
                    while self._queue:
                        prio, seq, key = heapq.heappop(self._queue)
                        q = self._queued.get(key)
                        if q is not None and q[3] == seq:  # else cancelled, upgraded or resubmitted since
                            item = (key, q[0], q[1], q[2])
                            del self._queued[key]
                            self._copying[key] = self.now()
                            break
                    if item is None:
                        self._cv.wait()
            key, prio, slot, submit_s = item
            start = self.now()
            try:
                n = self.reader.read_into(key, self.slots[slot * self.stride:(slot + 1) * self.stride])
                err = None
            except BaseException as exc:  # surfaced to the waiter, never swallowed
                n, err = 0, exc
            end = self.now()
            with self._cv:
                self._copying.pop(key, None)
                if err is None:
                    d = end - start
                    self._copy_ewma_s = d if self._copy_ewma_s is None else 0.8 * self._copy_ewma_s + 0.2 * d
                    self._done.add(key)
                    self.bytes_started += n
                    self.copies_started += 1
                    self.records.append(CopyRecord(key, slot, prio, submit_s, start, end, n, tid))
                    self._landed.append(key)
                else:
                    self._errors[key] = err
                self._cv.notify_all()

    def copy_s(self) -> float | None:
        """EWMA of the measured copy durations (None before the first copy landed)."""
        return self._copy_ewma_s

    def backlog_s(self, priority: int) -> float:
        """Copy work (seconds, summed over threads) ahead of a copy submitted now at ``priority``: the rest of
        the reads in progress and every queued copy at a priority <= it, at the measured copy time."""
        c = self._copy_ewma_s
        if c is None:
            return 0.0
        with self._cv:
            now = self.now()
            n = sum(1 for q in self._queued.values() if q[0] <= priority)
            return n * c + sum(max(0.0, c - (now - s)) for s in self._copying.values())

    def busy_share(self) -> float:
        """The measured copies' duration over the time elapsed and the threads (0..1)."""
        with self._cv:
            now = self.now()
            busy = sum(r.end_s - r.start_s for r in self.records)
        return min(1.0, busy / (now * self.channels)) if now > 0 else 0.0

    def bandwidth_bytes_per_s(self, last: int = 8) -> float:
        """Achieved bandwidth over the most recent copies (bytes over their summed durations)."""
        recs = self.records[-last:]
        busy = sum(r.end_s - r.start_s for r in recs)
        return sum(r.nbytes for r in recs) / busy if busy > 0 else 0.0
