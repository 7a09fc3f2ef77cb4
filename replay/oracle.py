"""The perfect-foresight schedules every result is compared with (:mod:`replay.bounds` runs them).

- :func:`oracle_stall`: the stall of integrated prefetch-and-cache schedules with perfect foresight, after
  Cao, Felten, Karlin and Li (1995), on the same hardware and compute models as the run:

  * ``aggressive``: whenever a copy channel is free, fetch the earliest-needed expert that is not resident,
    evicting the resident expert whose next use is farthest, but only if that victim is needed later than
    the expert fetched (per partition; a partition that must wait does not hold up the others).
  * ``conservative``: make exactly MIN's loads and evictions, in MIN's order, each as early as possible: as
    soon as a channel is free and the victim is not needed before the load's use.

  * ``preloaded``: ``aggressive`` from a cache filled before the clock starts with each partition's first-used
    experts (untimed, as a static policy's pinned experts are loaded).

  Aggressive wins when copies are cheap relative to compute (it starts early); conservative wins when the
  link is the bottleneck (it never copies more than MIN); preloaded covers runs whose cache starts warm (a
  static policy's pinned experts: on a short replay that head start alone beat both cold schedules). The
  bound ``oracle_stall_s`` is the best of the three: the stall a perfectly informed prefetcher achieves. It is a
  reference schedule, not a proven optimum; the tests check it against every policy on random traces.

Within a layer the oracle computes whichever needed expert is resident first.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import simpy

from policies.base import Step
from policies.future import FarthestNextUse, FutureIndex

from .channels import CopyChannels, make_channels
from .hardware import ComputeModel, CopyModel


class _OracleState:
    """Residency and timing shared by both schedules."""

    def __init__(self, future: FutureIndex, partition_of: np.ndarray, capacity: list[int], channels: int):
        self.future = future
        self.partition_of = partition_of
        self.capacity = capacity
        self.resident: list[set[int]] = [set() for _ in capacity]
        self.inflight: set[int] = set()
        self.protected: set[int] = set()  # experts the current layer has still to compute
        self.now = 0
        self.channels = channels
        self.submit: Callable[[int], None] = lambda key: None
        # per partition, resident keys by next use (touched when loaded and when computed)
        self.order = [FarthestNextUse(future, high_key_first=True) for _ in capacity]

    def victim(self, part: int) -> int | None:
        """The resident key of ``part`` used farthest after now (strictly: computed experts are done), ties to
        the highest key, among those neither protected nor in flight; None if there is none."""
        protected, inflight = self.protected, self.inflight
        return self.order[part].farthest(lambda k: k not in protected and k not in inflight)

    def load(self, key: int, victim: int | None) -> None:
        part = int(self.partition_of[key])
        if victim is not None:
            self.resident[part].discard(victim)
            self.order[part].remove(victim)
        self.resident[part].add(key)
        self.order[part].touch(key, self.now)
        self.inflight.add(key)
        self.submit(key)

    def computed(self, key: int, i: int) -> None:
        """``key`` was used at layer-step ``i``."""
        self.order[int(self.partition_of[key])].touch(key, i)


def _aggressive(st: _OracleState, window: int, resume: bool = True) -> Callable[[], None]:
    """Scan the next ``window`` layer-steps' keys in use order and fetch the first not resident (see the
    module docstring). ``resume``: start where the last scan met its first key that was neither resident nor
    computed, instead of at ``now``; the same decisions, because the keys skipped stay resident. The only
    evictions are this scan's, and its victim is never used before the key it makes room for (which is at or
    after that point); the driver's on-demand load never evicts here, as it runs only when this scan found
    nothing to load, i.e. in a partition with a free slot (a full one with no victim is an error)."""
    scan = [0, 0]  # (layer-step, index): every key from ``now`` up to here is resident or already computed

    def fetch_more() -> None:
        now, fut = st.now, st.future
        end = min(fut.horizon, now + window)
        blocked: set[int] = set()
        i, j = scan if resume and scan[0] >= now else (now, 0)
        clean = resume  # still in the prefix of resident (or computed) keys: move ``scan`` along
        while len(st.inflight) < st.channels and i < end:
            keys = fut.needed[i]
            if j >= len(keys):
                i, j = i + 1, 0
                if clean:
                    scan[:] = i, 0
                continue
            key = int(keys[j])
            j += 1
            part = int(st.partition_of[key])
            if (i == now and key not in st.protected) or key in st.resident[part]:
                if clean:
                    scan[:] = i, j
                continue
            clean = False
            if part in blocked:
                continue
            victim = None
            if len(st.resident[part]) >= st.capacity[part]:
                victim = st.victim(part)
                if victim is None or fut.next_use(victim, now + 1) <= i:
                    blocked.add(part)
                    continue
            st.load(key, victim)

    return fetch_more


def _conservative(st: _OracleState, min_loads: list[tuple[int, int, int | None]]) -> Callable[[], None]:
    pos = [0]

    def fetch_more() -> None:
        while len(st.inflight) < st.channels and pos[0] < len(min_loads):
            need_at, key, victim = min_loads[pos[0]]
            part = int(st.partition_of[key])
            if key in st.resident[part]:
                pos[0] += 1
                continue
            if victim is not None and victim in st.resident[part]:
                if victim in st.protected or victim in st.inflight or st.future.next_use(victim, st.now + 1) <= need_at:
                    return  # the victim is still needed before this load's use: wait
            elif len(st.resident[part]) >= st.capacity[part]:
                return  # MIN had a free slot here that this schedule has not freed yet
            else:
                victim = None
            st.load(key, victim)
            pos[0] += 1

    return fetch_more


def oracle_stall(
    steps: list[Step],
    future: FutureIndex,
    uses: list[dict[int, int]],
    partition_of: np.ndarray,
    capacity: list[int],
    copy_model: CopyModel,
    compute: ComputeModel,
    expert_bytes: int,
    num_layers: int,
    schedule: str = "aggressive",
    min_loads: list[tuple[int, int, int | None]] | None = None,
    orders: list[list[int]] | None = None,
    window: int | None = None,
    simpy_channels: bool = False,
    resume_scan: bool = True,
    window_from: int | None = None,
    preload: bool = False,
) -> float | tuple[float, float]:
    """Stall of one perfect-foresight schedule. ``uses[i]`` maps key -> tokens at layer-step i;
    ``min_loads`` (for ``conservative``) lists MIN's (layer-step, key, victim) in order, and ``orders`` MIN's
    compute order per layer-step, which the schedule then follows (so it only ever moves MIN's loads
    earlier); ``window`` bounds
    how far ahead ``aggressive`` looks (default: 4 steps' worth of layers). The copies run on the direct
    :class:`~replay.serial_channel.SerialChannel` where it applies (``simpy_channels`` forces SimPy's: same result);
    ``resume_scan=False`` rescans the aggressive window from ``now`` every time (same result, slower). With
    ``window_from`` (a layer-step) it returns (the whole replay's stall, the stall from that layer-step on).
    ``preload``: every partition starts full, untimed, with its first-used keys (what a static policy's pinned
    experts get: a preload before the clock starts), instead of empty."""
    L = num_layers
    st = _OracleState(future, partition_of, capacity, copy_model.channels)
    if schedule == "aggressive":
        fetch_more = _aggressive(st, window or 4 * L, resume_scan)
    elif schedule == "conservative":
        if min_loads is None:
            raise ValueError("oracle_stall: the conservative schedule needs MIN's loads (min_loads)")
        fetch_more = _conservative(st, min_loads)
    else:
        raise ValueError(f"oracle_stall: schedule must be 'aggressive' or 'conservative', got {schedule!r}")

    def landed(key: int) -> None:
        st.inflight.discard(key)
        fetch_more()

    if simpy_channels:
        chan = CopyChannels(simpy.Environment(), copy_model, expert_bytes, landed)
    else:
        chan = make_channels(copy_model, expert_bytes, landed)
    st.submit = lambda key: chan.submit(key, 0)
    if preload:
        for keys in future.needed:
            for key in np.asarray(keys).tolist():
                part = int(partition_of[key])
                if key not in st.resident[part] and len(st.resident[part]) < capacity[part]:
                    st.resident[part].add(key)
                    st.order[part].touch(key, -1)
            if all(len(r) >= c for r, c in zip(st.resident, capacity)):
                break
    t = stall = 0.0
    stall_before = 0.0  # the stall when layer-step ``window_from`` began
    dense_memo: dict[int, float] = {}
    for si, step in enumerate(steps):
        n = len(step.tokens)
        dense = dense_memo.setdefault(n, compute.dense_time_s(n))
        for layer in range(L):
            i = si * L + layer
            if i == window_from:
                stall_before = stall
            t += dense
            st.now = i
            st.protected = set(uses[i])
            remaining = set(uses[i])
            while remaining:
                chan.advance(t)
                fetch_more()
                if orders is not None:  # fixed order: the next expert or nothing
                    nxt = next(k for k in orders[i] if k in remaining)
                    ready = [nxt] if nxt not in st.inflight and nxt in st.resident[int(partition_of[nxt])] else []
                else:
                    ready = [k for k in remaining if k not in st.inflight and k in st.resident[int(partition_of[k])]]
                if not ready:
                    if not st.inflight:  # off the schedule's plan (it deviated earlier): load on demand
                        key = next(k for k in orders[i] if k in remaining) if orders is not None else min(remaining)
                        part = int(partition_of[key])
                        full = len(st.resident[part]) >= capacity[part]
                        victim = st.victim(part) if full else None
                        if full and victim is None:
                            raise RuntimeError(f"oracle ({schedule}): no slot for a needed expert at layer-step {i}")
                        st.load(key, victim)
                    chan.wait_any()
                    if chan.now > t:
                        stall += chan.now - t
                        t = chan.now
                    continue
                key = min(ready)
                t += compute.expert_time_s(uses[i][key])
                remaining.discard(key)
                st.protected.discard(key)
                st.computed(key, i)
    return stall if window_from is None else (stall, stall - stall_before)
