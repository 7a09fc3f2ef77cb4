"""Copy channels from the slow tier: a priority queue of copies served by one or more workers.

Demand copies (priority 0) overtake queued prefetches (priority >= 1); a prefetch still queued can be
cancelled or upgraded to demand. With ``shared_link`` all copies in flight share the link bandwidth equally
(processor sharing); with ``partial_link`` they share ``bandwidth x s(n)`` after paying their latency apart;
otherwise each of ``channels`` copies runs at the full modelled speed.

Two implementations with one driver API (``now``, ``advance``, ``wait_key``, ``wait_any``, ``has``):
:class:`CopyChannels` runs SimPy processes and handles every model; :class:`~replay.serial_channel.SerialChannel`
is the common case (one worker, a fixed time per copy) computed directly, step for step what the SimPy process
does, without its events. :func:`make_channels` picks one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import simpy

from .copy_queue import CopyQueue
from .hardware import CopyModel
from .serial_channel import SerialChannel


class CopyChannels(CopyQueue):
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


def make_channels(model: CopyModel, expert_bytes: int, on_complete: Callable[[int], None], log: bool = False):
    """The fast :class:`SerialChannel` when it applies (one worker at a fixed copy time), else SimPy channels."""
    if model.kind not in ("shared_link", "partial_link") and model.channels == 1:
        return SerialChannel(model, expert_bytes, on_complete, log)
    return CopyChannels(simpy.Environment(), model, expert_bytes, on_complete, log)
