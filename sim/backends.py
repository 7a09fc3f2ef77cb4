"""The simulator's backends of the driver loop (:mod:`replay.driver`): a virtual clock, the simulated copy
channels run on it, and compute times from the hardware's compute model."""

from __future__ import annotations

from replay.backends import Clock, ComputeBackend, CopyBackend
from replay.hardware import ComputeModel


class VirtualClock(Clock):
    """Simulated seconds; the compute backend adds compute, the copy backend's waits move it to a landing."""

    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t

    def start(self) -> None:
        self.t = 0.0


class ChannelCopies(CopyBackend):
    """Copies on simulated channels (:class:`~replay.serial_channel.SerialChannel` or SimPy's
    :class:`~replay.channels.CopyChannels`), which mark a landed copy usable in the cache themselves
    (``on_complete``). The channels run up to the clock only when needed: before a layer's decisions if a copy is
    queued or running, and before new copies are queued or a wait begins (SimPy's event order depends on it)."""

    def __init__(self, chan, clock: VirtualClock, expert_bytes: int):
        self.chan, self.clock, self.expert_bytes = chan, clock, expert_bytes
        self.preloaded = 0
        # the channel's own methods, called straight (once per copy; these shadow the delegating ones below)
        self.submit, self.upgrade = chan.submit, chan.upgrade

    def sync(self) -> None:
        chan = self.chan
        if chan.queued or chan.copying:
            chan.advance(self.clock.t)

    def start(self) -> None:
        self.chan.advance(self.clock.t)

    def submit(self, key: int, priority: int) -> None:
        self.chan.submit(key, priority)

    def upgrade(self, key: int) -> None:
        self.chan.upgrade(key)

    def begin_wait(self) -> None:
        self.chan.advance(self.clock.t)

    def wait_any(self, key: int) -> None:
        if not self.chan.busy():
            raise RuntimeError(f"deadlock: expert key {key} can never get a slot (capacity too small)")
        self.chan.wait_any()

    def wait_key(self, key: int) -> None:
        self.chan.wait_key(key)

    def end_wait(self) -> float:
        clock, t, now = self.clock, self.clock.t, self.chan.now
        if now > t:
            clock.t = now
            return now - t
        return 0.0

    def bandwidth_bytes_per_s(self) -> float:
        return self.chan.bw_ewma_bytes_per_s

    def preload(self, keys: list[int]) -> None:
        self.preloaded = len(keys)  # resident before the run: counted, not simulated

    def totals(self) -> tuple[int, int, list | None]:
        chan, n = self.chan, self.preloaded
        return chan.bytes_started + n * self.expert_bytes, chan.copies_started + n, chan.records


def expert_times_s(compute: ComputeModel, steps) -> list[float]:
    """Expert compute time by the number of tokens using the expert, 0 to the largest step's token count (a
    list: the loops index it once per expert computed)."""
    return [0.0] + [compute.expert_time_s(n) for n in range(1, max((len(s.tokens) for s in steps), default=0) + 1)]


def hits_compute_s(hits: list[int], hit_uses: int, uses: dict[int, int], expert_s: list[float]) -> float:
    """Compute time of a layer's resident experts (``hits``, ``hit_uses`` uses in all): they run back to back
    with nothing to wait for, so the clock takes it as one block, computed this way (by both loops)."""
    if hit_uses == len(hits):  # every one used by one token (always at batch size 1)
        return expert_s[1] * hit_uses if hit_uses else 0.0
    return sum([expert_s[uses[k]] for k in hits])


class ModelCompute(ComputeBackend):
    """Compute times from the hardware's compute model, added to the virtual clock."""

    def __init__(self, compute: ComputeModel, clock: VirtualClock, steps):
        self.model, self.clock = compute, clock
        self.expert_s = expert_times_s(compute, steps)
        self._dense: dict[int, float] = {}

    def dense(self, ntok: int) -> float:
        d = self._dense.get(ntok)
        if d is None:
            d = self._dense[ntok] = self.model.dense_time_s(ntok)
        self.clock.t += d
        return d

    def expert(self, key: int, ntok: int) -> float:
        et = self.expert_s[ntok]
        self.clock.t += et
        return et

    def resident(self, keys: list[int], total_uses: int, uses: dict[int, int], layer: int, events: list | None) -> float:
        block = hits_compute_s(keys, total_uses, uses, self.expert_s)
        if events is not None:
            start, expert_s = self.clock.t, self.expert_s
            for k in keys:
                et = expert_s[uses[k]]
                events.append((start, et, layer, k))
                start += et
        self.clock.t += block
        return block
