"""Host-side ordering of expert copies onto device copy streams: the pure part of the CUDA backend.

A copy stream executes what was enqueued on it in order, and an enqueued copy cannot be taken back. So the
scheduler keeps every submitted copy in a host-side priority queue (0 = demand, prefetches >= 1, FIFO within a
priority; :mod:`policies.link_budget`) and enqueues on a stream only what may not delay a later demand: a demand
while the stream holds fewer than ``window`` copies (the one running included), a prefetch only onto an idle
stream. A demand that arrives later therefore waits behind at most the one copy running on its stream (and
earlier demands), never behind a prefetch committed to the stream after it; the price is that a stream of
prefetches idles for the host's hand-off between two of them. ``upgrade`` and ``cancel`` act on the host
queue only (a copy already on a stream runs to the end).

No torch and no threads here: the device is an injected ``ops`` object with
``issue(key, slot, stream) -> handle`` (enqueue one copy, returns at once), ``done(handle) -> bool`` (has it
landed; a non-blocking poll), ``times(handle) -> (start_s, end_s)`` (when it ran, on the ``now()`` axis) and
``nbytes`` (bytes of one copy). The caller serialises calls (the engine holds one lock).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from policies.link_budget import DEMAND

from .transfer import CopyRecord


@dataclass
class InFlight:
    key: int
    slot: int
    priority: int
    submit_s: float
    stream: int
    order: int  # issue order across all streams
    handle: object
    issued_s: float = 0.0  # clock when it was enqueued on its stream


class CopyScheduler:
    def __init__(self, ops, streams: int, window: int, clock: Callable[[], float]):
        if streams < 1 or window < 1:
            raise ValueError(f"copy streams and window must be >= 1, got streams={streams}, window={window}")
        self.ops, self.window, self.clock = ops, window, clock
        self._heap: list[tuple[int, int, int]] = []  # (priority, seq, key); stale entries are skipped
        self._queued: dict[int, tuple[int, int, float, int]] = {}  # key -> (priority, slot, submit_s, live seq)
        self._flight: list[deque[InFlight]] = [deque() for _ in range(streams)]
        self._flight_keys: dict[int, InFlight] = {}
        self._seq = self._issued = 0
        self.done: set[int] = set()
        self.errors: dict[int, BaseException] = {}
        self.records: list[CopyRecord] = []
        self._landed: list[int] = []
        self.bytes_started = self.copies_started = 0
        self.copy_ewma_s: float | None = None  # EWMA of the device-timed copy durations

    # -- the TransferEngine verbs -------------------------------------------------------------------------
    def submit(self, key: int, slot: int, priority: int) -> None:
        self.done.discard(key)
        self.errors.pop(key, None)
        self._seq += 1
        heapq.heappush(self._heap, (priority, self._seq, key))
        self._queued[key] = (priority, slot, self.clock(), self._seq)  # seq: which heap entry is live
        self.dispatch()

    def upgrade(self, key: int) -> None:
        """A queued prefetch becomes a demand copy (no effect once it is on a stream)."""
        q = self._queued.get(key)
        if q is not None and q[0] > 0:
            self._seq += 1
            self._queued[key] = (0, q[1], q[2], self._seq)
            heapq.heappush(self._heap, (0, self._seq, key))
            self.dispatch()

    def cancel(self, key: int) -> bool:
        """Drop a copy still in the host queue; False if it is already on a stream (or unknown)."""
        return self._queued.pop(key, None) is not None

    def is_queued(self, key: int) -> bool:
        return key in self._queued

    def in_flight(self, key: int) -> bool:
        return key in self._flight_keys

    def pending(self, key: int) -> bool:
        return key in self._queued or key in self._flight_keys

    def busy(self) -> bool:
        return bool(self._queued or self._flight_keys)

    def take_landed(self) -> list[int]:
        out, self._landed = self._landed, []
        return out

    # -- moving copies: host queue -> streams -> landed ---------------------------------------------------
    def depth(self, stream: int) -> int:
        return len(self._flight[stream])

    def dispatch(self) -> int:
        """Enqueue the best queued copies on the least-loaded streams while a stream has room for them: a demand
        below ``window`` copies, a prefetch only on an idle stream (see the module docstring)."""
        issued = 0
        while self._heap:
            prio, seq, key = self._heap[0]
            q = self._queued.get(key)
            if q is None or q[3] != seq:
                heapq.heappop(self._heap)
                continue  # cancelled, or superseded by an upgrade or a resubmission
            stream = min(range(len(self._flight)), key=lambda s: (len(self._flight[s]), s))
            if len(self._flight[stream]) >= (self.window if prio == DEMAND else 1):
                break
            heapq.heappop(self._heap)
            del self._queued[key]
            try:
                handle = self.ops.issue(key, q[1], stream)
            except BaseException as exc:  # surfaced to whoever waits for this key
                self.errors[key] = exc
                continue
            self._issued += 1
            f = InFlight(key, q[1], prio, q[2], stream, self._issued, handle, self.clock())
            self._flight[stream].append(f)
            self._flight_keys[key] = f
            issued += 1
        return issued

    def poll(self) -> int:
        """Retire every copy that has landed (streams are FIFO: only heads can be done). Returns how many."""
        n = 0
        for dq in self._flight:
            while dq and self.ops.done(dq[0].handle):
                self._retire(dq.popleft())
                n += 1
        return n

    def _retire(self, f: InFlight) -> None:
        del self._flight_keys[f.key]
        start, end = self.ops.times(f.handle)
        nbytes = self.ops.nbytes
        d = end - start
        if d > 0:
            self.copy_ewma_s = d if self.copy_ewma_s is None else 0.8 * self.copy_ewma_s + 0.2 * d
        self.done.add(f.key)
        self.bytes_started += nbytes
        self.copies_started += 1
        self.records.append(CopyRecord(f.key, f.slot, f.priority, f.submit_s, start, end, nbytes, f.stream))
        self._landed.append(f.key)

    def backlog_s(self, priority: int) -> float:
        """Copy work (seconds, summed over streams) ahead of a copy submitted now at ``priority``: every queued
        copy at a priority <= it and the copies on the streams (a stream's head less the time it has run)."""
        c = self.copy_ewma_s
        if c is None:
            return 0.0
        now = self.clock()
        n = sum(1 for q in self._queued.values() if q[0] <= priority)
        on_streams = sum(len(dq) * c - (min(c, max(0.0, now - dq[0].issued_s)) if dq else 0.0) for dq in self._flight)
        return n * c + on_streams

    def oldest(self) -> InFlight | None:
        """The copy issued first among those on streams (the next to wait on), or None."""
        heads = [dq[0] for dq in self._flight if dq]
        return min(heads, key=lambda f: f.order) if heads else None

    def fail_in_flight(self, exc: BaseException) -> None:
        """A device error: every copy on a stream is lost; their waiters get ``exc``."""
        for dq in self._flight:
            while dq:
                f = dq.popleft()
                del self._flight_keys[f.key]
                self.errors[f.key] = exc
