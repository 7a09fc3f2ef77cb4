"""Copy channels from the slow tier: a priority queue of copies served by one or more workers.

Demand copies (priority 0) overtake queued prefetches (priority >= 1); a prefetch still queued can be
cancelled or upgraded to demand. With ``shared_link`` all copies in flight share the link bandwidth equally
(processor sharing); with ``partial_link`` they share ``bandwidth x s(n)`` after paying their latency apart;
otherwise each of ``channels`` copies runs at the full modelled speed.

Two implementations with one driver API (``now``, ``advance``, ``wait_key``, ``wait_any``, ``has``):
:class:`CopyChannels` runs SimPy processes and handles every model; :class:`SerialChannel` is the common case
(one worker, a fixed time per copy) computed directly, step for step what the SimPy process does, without its
events: the simulator spends most of its time here otherwise. :func:`make_channels` picks one.
"""

from __future__ import annotations

import heapq
import math
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


class _CopyQueue:
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


class CopyChannels(_CopyQueue):
    """Queue + SimPy workers. ``on_complete(key)`` is called when a copy lands (the expert becomes usable)."""

    def __init__(
        self,
        env: simpy.Environment,
        model: CopyModel,
        expert_bytes: int,
        on_complete: Callable[[int], None],
        log: bool = False,
    ):
        super().__init__(model, expert_bytes, on_complete, log)
        self.env = env
        self.done: dict[int, simpy.Event] = {}  # key -> event fired when its copy lands
        self._waiters: list[simpy.Event] = []  # idle workers waiting for work
        self.any_done = env.event()  # fires (and is renewed) whenever any copy lands
        link = {"shared_link": True, "partial_link": False}.get(model.kind)  # latency on the link, or off it
        for _ in range(1 if link is not None else model.channels):
            env.process(self._link(link) if link is not None else self._worker())

    # ---------------------------------------------------------------------------------------- API
    def submit(self, key: int, priority: int) -> None:
        self._push(key, priority, self.env.now)
        self.done[key] = self.env.event()
        self._kick()

    def cancel(self, key: int) -> bool:
        """Drop a copy that has not started; False if it already started (it will land)."""
        if key not in self.queued:
            return False
        del self.queued[key]
        self.done.pop(key, None)
        return True

    def pending(self, key: int) -> simpy.Event | None:
        """The event a waiter yields on, or None if the key is not being copied."""
        return self.done.get(key)

    # ---------------------------------------------------------------------------- driver API
    @property
    def now(self) -> float:
        return self.env.now

    def has(self, key: int) -> bool:
        """``key`` is queued or being copied."""
        return key in self.done

    def advance(self, to: float) -> None:
        """Simulate the copies up to time ``to`` (nothing if the clock is already there)."""
        if to > self.env.now:
            self.env.run(until=to)

    def wait_key(self, key: int) -> None:
        """Simulate until ``key`` lands."""
        self.env.run(until=self.done[key])

    def wait_any(self) -> None:
        """Simulate until the next copy lands."""
        self.env.run(until=self.any_done)

    # ----------------------------------------------------------------------------------- internals
    def _kick(self) -> None:
        waiters, self._waiters = self._waiters, []
        for ev in waiters:
            ev.succeed()

    def _land(self, key: int, prio: int, start_s: float) -> None:
        self._landed(key, prio, start_s, self.env.now)
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

    def _link(self, latency_on_link: bool):
        """A link that up to ``channels`` copies in flight share. The ``n`` copies on the link move
        ``bandwidth x s(n)`` bytes/s together, split equally (``CopyModel.link_speedup``).

        - ``shared_link`` (processor sharing, ``latency_on_link``): s(n) = 1, and each copy's latency becomes
          ``latency_s x bandwidth`` more bytes on the link, shared like the rest.
        - ``partial_link``: each copy first pays ``latency_s`` on its own (thread hand-offs: they do not hold the
          link), then joins the link; with ``pair_speedup`` 2 this is independent channels."""
        bw = self.model.bandwidth_bytes_per_s
        lat = 0.0 if latency_on_link else self.model.latency_s
        extra_bytes = self.model.latency_s * bw if latency_on_link else 0.0
        speedup = (lambda n: 1.0) if latency_on_link else self.model.link_speedup  # shared_link ignores pair_speedup
        setup: dict[int, list] = {}  # key -> [ready_s, prio, start_s]: paying the latency
        active: dict[int, list] = {}  # key -> [remaining bytes, prio, start_s]: on the link
        while True:
            while len(setup) + len(active) < self.model.channels:
                item = self._pop()
                if item is None:
                    break
                key, prio = item
                self._start(key, prio)
                now = self.env.now
                if lat > 0:
                    setup[key] = [now + lat, prio, now]
                else:
                    active[key] = [self.expert_bytes + extra_bytes, prio, now]
            if not setup and not active:
                yield self._wait_work()
                continue
            n = len(active)
            rate = bw * speedup(n) / n if n else 0.0  # bytes/s of each copy on the link
            t0 = self.env.now
            dt = min(r[0] for r in active.values()) / rate if n else float("inf")
            if setup:
                dt = min(dt, min(r[0] for r in setup.values()) - t0)
            wake = self._wait_work() if len(setup) + n < self.model.channels else None
            if wake is None:
                yield self.env.timeout(dt)
            else:
                yield self.env.timeout(dt) | wake
            moved = (self.env.now - t0) * rate
            # done: nothing left, or so little that finishing it could not move the clock (rounding in ``moved``
            # leaves such a residue on copies of hundreds of MB; waiting on it would loop forever at one time)
            done_below = max(1e-6, 4 * math.ulp(self.env.now) * rate)
            for key in list(active):
                active[key][0] -= moved
                if active[key][0] <= done_below:
                    _, prio, start = active.pop(key)
                    self._land(key, prio, start)
            for key in list(setup):  # its latency is over (to float rounding of the timeout): onto the link
                if setup[key][0] - self.env.now <= 1e-12:
                    _, prio, start = setup.pop(key)
                    active[key] = [float(self.expert_bytes), prio, start]


class SerialChannel(_CopyQueue):
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


def make_channels(model: CopyModel, expert_bytes: int, on_complete: Callable[[int], None], log: bool = False):
    """The fast :class:`SerialChannel` when it applies (one worker at a fixed copy time), else SimPy channels."""
    if model.kind not in ("shared_link", "partial_link") and model.channels == 1:
        return SerialChannel(model, expert_bytes, on_complete, log)
    return CopyChannels(simpy.Environment(), model, expert_bytes, on_complete, log)
