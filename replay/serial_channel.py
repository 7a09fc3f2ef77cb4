"""One copy worker at a fixed time per copy, computed directly: what :class:`~replay.channels.CopyChannels`
simulates with SimPy for such a model (every hardware preset), without its events. The simulator spends most of
its time here otherwise."""

from __future__ import annotations

import heapq
from collections.abc import Callable

from .copy_queue import CopyQueue
from .hardware import CopyModel


class SerialChannel(CopyQueue):
    """One worker, every copy takes ``model.seconds(expert_bytes)``: what :class:`CopyChannels` simulates for
    such a model, computed without SimPy. It reproduces SimPy's ordering exactly: the worker looks at the
    queue when the driver next runs the clock after a submit to an idle worker (at the submit's time, so it
    sees everything submitted, upgraded or cancelled in between) and right after each landing; a run until
    time ``to`` stops at ``now + (to - now)`` (SimPy's float arithmetic) and leaves a copy landing exactly
    then for the next run."""

    def __init__(self, model: CopyModel, expert_bytes: int, on_complete: Callable[[int], None], log: bool = False):
        super().__init__(model, expert_bytes, on_complete, log)
        self.now = 0.0
        self._seconds = model.seconds(expert_bytes)
        self._pending: set[int] = set()  # queued or copying (SimPy: keys with a ``done`` event)
        self._cur: tuple[int, int, float] | None = None  # (key, prio, start) of the copy in flight
        self._end = 0.0  # when it lands
        self._wake = True  # the idle worker looks at the queue at the next run (SimPy: process start at 0)

    def submit(self, key: int, priority: int) -> None:
        self._seq += 1  # _push and _kick, inlined: this runs for every copy
        heapq.heappush(self.queue, (priority, self._seq, key))
        self.queued[key] = priority
        self.entry[key] = self._seq
        if self.records is not None:  # only a copy record reads it
            self.submit_s[key] = self.now
        self._pending.add(key)
        if self._cur is None:
            self._wake = True

    def cancel(self, key: int) -> bool:
        if key not in self.queued:
            return False
        del self.queued[key]
        self._pending.discard(key)
        return True

    def has(self, key: int) -> bool:
        return key in self._pending

    def advance(self, to: float) -> None:
        now = self.now
        if not to > now:
            return
        at = now + (to - now)  # SimPy schedules its stop event at now + delay
        if self._wake:
            self._serve(now)
        while self._cur is not None and self._end < at:  # a landing exactly at ``at`` waits (stop is URGENT)
            self._land_current()
        self.now = at

    def wait_key(self, key: int) -> None:
        if self._wake:
            self._serve(self.now)
        while key in self._pending:
            if self._cur is None:
                raise RuntimeError(f"no copy in flight while waiting for expert key {key}")
            self._land_current()

    def wait_until_landed(self, key: int, t: float) -> float:
        """``advance(t)`` then ``wait_key(key)`` in one call (the fused loop's wait for a demand or late copy);
        returns when ``key`` is usable: ``t`` or its landing, whichever is later."""
        if t > self.now:
            self.advance(t)
        self.wait_key(key)
        return self.now if self.now > t else t

    def in_flight_s(self) -> float:
        return self._end - self.now if self._cur is not None and self._end > self.now else 0.0

    def wait_any(self) -> None:
        if self._wake:
            self._serve(self.now)
        if self._cur is None:
            raise RuntimeError("no copy in flight to wait for")
        self._land_current()

    def _kick(self) -> None:
        if self._cur is None:  # only an idle worker is waiting to be woken
            self._wake = True

    def _serve(self, t: float) -> None:
        """The worker takes the best queued copy at time ``t``, or goes idle."""
        self._wake = False
        queue, queued, entry = self.queue, self.queued, self.entry
        while queue:  # _pop and _start, inlined
            prio, seq, key = heapq.heappop(queue)
            if queued.get(key) == prio and entry[key] == seq:
                del queued[key]
                self.copying.add(key)
                self.bytes_started += self.expert_bytes
                self.copies_started += 1
                self._cur = (key, prio, t)
                self._end = t + self._seconds
                return

    def _land_current(self) -> None:
        key, prio, start = self._cur
        self._cur = None
        self.now = end = self._end
        self._landed(key, prio, start, end)
        self._pending.discard(key)
        if self.queue:
            self._serve(end)
        else:  # what _serve does on an empty queue
            self._wake = False
