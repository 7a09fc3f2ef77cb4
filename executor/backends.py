"""The executor's backends of the driver loop (:mod:`replay.driver`): the wall clock, a transfer engine's copies
(:class:`~executor.transfer.TransferEngine`, or the CUDA backend's, or a test's fake with the same API) and real
compute (:class:`~executor.compute.LayerCompute` or the GPU's)."""

from __future__ import annotations

import time

from policies.cache import ExpertCache
from replay.backends import Clock, ComputeBackend, CopyBackend


class WallClock(Clock):
    """Seconds since :meth:`start` on the host's performance counter."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def start(self) -> None:
        self.t0 = time.perf_counter()


class TransferCopies(CopyBackend):
    """Copies on a transfer engine's I/O threads (or copy streams) into each key's cache slot. Copies land on
    those threads; this marks them usable in the cache only on the driver's thread (:meth:`sync`, and after
    every wait), so the cache is only ever touched by that thread."""

    def __init__(self, transfer, cache: ExpertCache):
        self.transfer, self.cache = transfer, cache
        self.waited = 0.0
        self.first_record = 0  # copy records before this one are the preload's

    def sync(self) -> None:
        cache = self.cache
        for k in self.transfer.landed():
            if cache.is_inflight(k):
                cache.complete(k)

    def start(self) -> None:
        pass  # real copies queue whenever they are submitted

    def submit(self, key: int, priority: int) -> None:
        self.transfer.submit(key, self.cache.slot_of[key], priority)

    def upgrade(self, key: int) -> None:
        self.transfer.upgrade(key)

    def begin_wait(self) -> None:
        self.waited = 0.0

    def wait_any(self, key: int) -> None:
        self.waited += self.transfer.wait_any()
        self.sync()  # a landed copy may free the slot ``key`` waits for

    def wait_key(self, key: int) -> None:
        self.waited += self.transfer.wait(key)

    def end_wait(self) -> float:
        self.sync()
        return self.waited

    def bandwidth_bytes_per_s(self) -> float:
        return self.transfer.bandwidth_bytes_per_s()

    def preload(self, keys: list[int]) -> None:
        """Copy pinned experts into their slots before the replay, as the simulator assumes: their copies count
        in the bytes moved, not in the timed run."""
        for k in keys:
            self.submit(k, 0)
        for k in keys:
            self.transfer.wait(k)
        self.transfer.landed()  # pinned keys were never in flight in the cache: nothing to mark
        self.first_record = len(self.transfer.records)

    def totals(self) -> tuple[int, int, list | None]:
        tr = self.transfer
        return tr.bytes_started, tr.copies_started, tr.records[self.first_record:]


class EngineCompute(ComputeBackend):
    """Real compute, timed on the wall clock: ``engine.run_dense(tokens)``, ``engine.run_expert(slot, tokens)``
    (reading the expert's weights from its cache slot)."""

    def __init__(self, engine, cache: ExpertCache, clock: WallClock):
        self.engine, self.cache, self.clock = engine, cache, clock

    def dense(self, ntok: int) -> float:
        t0 = time.perf_counter()
        self.engine.run_dense(ntok)
        return time.perf_counter() - t0

    def expert(self, key: int, ntok: int) -> float:
        slot = self.cache.slot_of[key]
        t0 = time.perf_counter()
        self.engine.run_expert(slot, ntok)
        return time.perf_counter() - t0

    def resident(self, keys: list[int], total_uses: int, uses: dict[int, int], layer: int, events: list | None) -> float:
        total = 0.0
        for k in keys:
            start = self.clock.now() if events is not None else 0.0
            et = self.expert(k, uses[k])
            if events is not None:
                events.append((start, et, layer, k))
            total += et
        return total
