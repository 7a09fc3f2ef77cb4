"""The three backends the driver loop (:mod:`replay.driver`) runs on, declared once. A driver supplies one of
each: the simulator a virtual clock over simulated copy channels and a compute model (``sim/backends.py``); the
executor the wall clock, its transfer engine and real compute (``executor/backends.py``); model mode the same
with a transformers model's own experts (``executor/model_mode.py``)."""

from __future__ import annotations

from abc import ABC, abstractmethod


class Clock(ABC):
    """The compute stream's time in seconds since the replay started (simulated, or measured)."""

    @abstractmethod
    def now(self) -> float: ...

    @abstractmethod
    def start(self) -> None:
        """The replay starts now (time 0): after the preload, right before the first layer-step."""


class CopyBackend(ABC):
    """Copies of expert keys from the slow tier into their cache slots, demand (priority 0) before prefetches.

    A copy that lands must be marked usable in the runtime's cache (``cache.complete``) no later than the next
    :meth:`sync` or the end of a wait, and only on the driver's thread."""

    @abstractmethod
    def sync(self) -> None:
        """Bring the copies up to the clock's now (landed ones become usable): before a layer's decisions."""

    @abstractmethod
    def start(self) -> None:
        """Right before the driver submits copies at the clock's now (a simulated channel first runs up to it,
        so the copies queue at now)."""

    @abstractmethod
    def submit(self, key: int, priority: int) -> None:
        """Queue the copy of ``key`` into its slot (reserved in the cache) at ``priority`` (lower first; 0 = demand,
        :mod:`policies.link_budget`). Cancelling a queued prefetch goes through the runtime's ``LinkFacts``."""

    @abstractmethod
    def upgrade(self, key: int) -> None:
        """A queued copy of ``key`` is needed now: move it to demand priority."""

    @abstractmethod
    def begin_wait(self) -> None:
        """The compute stream starts waiting at the clock's now (for a key, see :meth:`end_wait`)."""

    @abstractmethod
    def wait_any(self, key: int) -> None:
        """Block until some copy lands, so that the deferred demand ``key`` may get a slot; an error naming
        ``key`` if no copy is queued or running (nothing could ever land: the partition is too small)."""

    @abstractmethod
    def wait_key(self, key: int) -> None:
        """Block until the copy of ``key`` (queued or running) has landed."""

    @abstractmethod
    def end_wait(self) -> float:
        """The wait since :meth:`begin_wait` is over: landed copies are usable, the clock is past them; returns
        the seconds the compute stream waited (the stall)."""

    @abstractmethod
    def bandwidth_bytes_per_s(self) -> float:
        """Recent achieved copy bandwidth (0 before any copy landed): the horizon's feedback."""

    @abstractmethod
    def preload(self, keys: list[int]) -> None:
        """Load pinned keys into their slots before the replay (counted in :meth:`totals`, not timed)."""

    @abstractmethod
    def totals(self) -> tuple[int, int, list | None]:
        """(bytes moved, copies started, copy records or None), preloaded copies included in the counts."""


class ComputeBackend(ABC):
    """The compute of a layer-step: the dense part and each needed expert (resident ones as a block)."""

    @abstractmethod
    def dense(self, ntok: int) -> float:
        """Run the dense part (attention etc.) of a layer for ``ntok`` tokens; returns its seconds."""

    @abstractmethod
    def expert(self, key: int, ntok: int) -> float:
        """Run expert ``key`` (resident: its copy landed) on the ``ntok`` tokens routed to it; returns its
        seconds."""

    @abstractmethod
    def resident(self, keys: list[int], total_uses: int, uses: dict[int, int], layer: int, events: list | None) -> float:
        """Run ``keys`` back to back (resident, nothing to wait for; ``uses[k]``: tokens of key k, ``total_uses``
        their sum); returns their seconds. With ``events``, append each one's (start_s, seconds, layer, key)."""
