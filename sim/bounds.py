"""Lower bounds every result is compared with.

- :func:`ondemand_replay`: a timing-free on-demand replay through the shared runtime (no prefetch). With the
  Belady policy it gives MIN's hit rate at the same capacity (``belady_hit_rate``).
- :func:`oracle_stall`: the stall of an integrated prefetch-and-cache schedule with perfect foresight, after
  Cao, Felten, Karlin and Li (1995), "aggressive": whenever a copy channel is free, fetch the next expert
  that will be needed and is not resident, evicting the resident expert whose next use is farthest, but
  only if that victim is needed later than the expert fetched. Same hardware and compute models as the run.
"""

from __future__ import annotations

import numpy as np
import simpy

from policies.base import FutureIndex, Step
from policies.runtime import PolicyRuntime

from .channels import CopyChannels
from .hardware import ComputeModel, CopyModel


def ondemand_replay(steps: list[Step], runtime: PolicyRuntime) -> tuple[int, int]:
    """Replay without time or prefetch; returns (hits, requests). The runtime's horizon must be 0."""
    L = runtime.cfg.num_layers
    max_ls = len(steps) * L - 1
    for si, step in enumerate(steps):
        for layer in range(L):
            plan = runtime.begin_layer(si, layer, step.tokens, max_ls)
            for k in plan.demand:
                runtime.cache.complete(k)
            for k in plan.order:
                for s in runtime.release(k):
                    runtime.cache.complete(s)
    st = runtime.cache.stats
    return st.hits, st.hits + st.misses + st.late_hits


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
    window: int | None = None,
) -> float:
    """Stall of the aggressive perfect-foresight schedule. ``uses[i]`` maps key -> tokens at layer-step i.
    ``window`` bounds how many layer-steps ahead the schedule looks (default: 4 steps' worth of layers)."""
    env = simpy.Environment()
    L = num_layers
    window = window or 4 * L
    resident: list[set[int]] = [set() for _ in capacity]
    inflight: set[int] = set()
    protected: set[int] = set()
    now_ref = [0]

    def landed(key: int) -> None:
        inflight.discard(key)
        fetch_more()

    chan = CopyChannels(env, copy_model, expert_bytes, landed)
    max_inflight = copy_model.channels

    def fetch_more() -> None:
        """While a channel is free, fetch the earliest-needed missing expert, unless the best victim is needed
        before it (then wait: that is the aggressive rule's only reason to hold back)."""
        now = now_ref[0]
        end = min(future.horizon, now + window)
        i = now
        while len(inflight) < max_inflight:
            found = None
            while i < end and found is None:
                for key in future.needed[i].tolist():
                    if i == now and key not in protected:
                        continue  # already computed in this layer
                    if key not in resident[int(partition_of[key])]:
                        found = key
                        break
                else:
                    i += 1
            if found is None:
                return
            part = int(partition_of[found])
            res = resident[part]
            if len(res) >= capacity[part]:
                cands = res - protected - inflight
                if not cands:
                    return
                # next use strictly after now: experts of this layer already computed are done with
                victim = max(cands, key=lambda k: (future.next_use(k, now + 1), k))
                if future.next_use(victim, now + 1) <= i:
                    return
                res.discard(victim)
            res.add(found)
            inflight.add(found)
            chan.submit(found, 0)

    t = 0.0
    stall = 0.0
    dense_memo: dict[int, float] = {}
    for si, step in enumerate(steps):
        n = len(step.tokens)
        dense = dense_memo.setdefault(n, compute.dense_time_s(n))
        for layer in range(L):
            i = si * L + layer
            t += dense
            if t > env.now:
                env.run(until=t)
            now_ref[0] = i
            protected.clear()
            protected.update(uses[i])
            fetch_more()
            remaining = set(uses[i])
            while remaining:
                if t > env.now:
                    env.run(until=t)
                ready = [k for k in remaining if k not in inflight and k in resident[int(partition_of[k])]]
                if not ready:  # the oracle computes whatever expert is resident first, then waits
                    fetch_more()
                    if not inflight:
                        raise RuntimeError("oracle: cannot make room for a needed expert")
                    env.run(until=chan.any_done)
                    if env.now > t:
                        stall += env.now - t
                        t = env.now
                    continue
                key = min(ready)
                t += compute.expert_time_s(uses[i][key])
                remaining.discard(key)
                protected.discard(key)
    return stall
