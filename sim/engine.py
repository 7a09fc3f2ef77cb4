"""The simulator's replay: the driver loop (:mod:`replay.driver`) on a virtual clock, with the copies on simulated
channels and compute times from the hardware's compute model (:mod:`sim.backends`).

The compute stream is sequential, so the clock is a float the loop advances layer by layer; the copy channels
(the direct :class:`~replay.serial_channel.SerialChannel`, or SimPy processes) are run up to it between compute
events. Per layer: the dense part runs (attention etc.), the router's choice is handed to the policy runtime
(demand copies, prefetches), then the needed experts compute one by one (resident ones first), each waiting
for its copy if needed. The wait is the stall. Common configurations take the fused fast path
(:mod:`sim.fused`), pinned equal to the loop; on-demand runs the compiled kernel when asked
(:mod:`sim.kernel_bridge`, ``compiled=True``; ``sim/run.py`` asks where it covers the run), pinned equal too.
"""

from __future__ import annotations

import simpy

from policies.base import Step
from policies.future import StepStream, gc_paused
from policies.runtime import PolicyRuntime
from replay.channels import CopyChannels, make_channels
from replay.driver import replay_steps
from replay.hardware import ComputeModel, CopyModel
from replay.link import SimLink
from replay.results import ReplayResult

from .backends import ChannelCopies, ModelCompute, VirtualClock
from .fused import fused_applies, replay_fused


def replay(
    steps: list[Step],
    runtime: PolicyRuntime,
    copy_model: CopyModel,
    compute: ComputeModel,
    expert_bytes: int,
    num_layers: int,
    log: bool = False,
    uses: list[dict[int, int]] | None = None,
    simpy_channels: bool = False,
    fused: bool = True,
    warmup_steps: int = 0,
    compiled: bool = False,
    keys: StepStream | None = None,
) -> ReplayResult:
    """Replay ``steps`` through ``runtime``; ``uses[i]`` (key -> tokens at layer-step i) may be precomputed.
    ``simpy_channels`` forces the SimPy copy channels even where the direct :class:`SerialChannel` applies
    (the two give identical results, float for float); ``fused=False`` forces the driver loop where
    :mod:`sim.fused`'s would apply (identical results too); ``compiled`` takes the compiled on-demand kernel
    (:mod:`sim.kernel_bridge`; a ValueError where ``ondemand_unsupported`` gives a reason; identical results too),
    over ``keys`` (the steps' stream as arrays) if given.
    The result's ``mark`` holds the totals when step ``warmup_steps`` (the first measured one,
    :mod:`replay.window`) began."""
    if compiled:
        from .kernel_bridge import replay_kernel  # imports numba: only when asked

        return replay_kernel(steps, runtime, copy_model, compute, expert_bytes, num_layers, warmup_steps, keys)
    with gc_paused():
        cache = runtime.cache
        if simpy_channels:
            chan = CopyChannels(simpy.Environment(), copy_model, expert_bytes, cache.complete, log=log)
        else:
            chan = make_channels(copy_model, expert_bytes, cache.complete, log=log)
        clock = VirtualClock()
        copies = ChannelCopies(chan, clock, expert_bytes)
        comp = ModelCompute(compute, clock, steps)
        link = SimLink(chan, compute, int(runtime.experts.shape[2]))
        runtime.set_schedule(steps)  # lets a stateless predictor score many layer-steps per call
        if uses is not None and fused and fused_applies(runtime, chan, log):
            return replay_fused(steps, runtime, copies, comp, link, num_layers, uses, warmup_steps)
        return replay_steps(steps, runtime, clock, copies, comp, link, num_layers, uses, log,
                            warmup_steps=warmup_steps)
