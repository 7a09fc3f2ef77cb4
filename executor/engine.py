"""The executor's replay: the driver loop (:mod:`replay.driver`) with real copies and real compute on the wall
clock (:mod:`executor.backends`). Same calls into the same policy runtime in the same order as the simulator."""

from __future__ import annotations

from policies.base import Step
from policies.runtime import PolicyRuntime
from replay.driver import replay_steps
from replay.results import ReplayResult

from .backends import EngineCompute, TransferCopies, WallClock
from .link import MeasuredLink


def execute(
    steps: list[Step],
    runtime: PolicyRuntime,
    transfer,
    compute,
    num_layers: int,
    uses: list[dict[int, int]],
    log: bool = False,
    phases: dict[str, float] | None = None,
    warmup_steps: int = 0,
) -> ReplayResult:
    """Replay ``steps`` with ``transfer`` (a :class:`~executor.transfer.TransferEngine` or one with its API) and
    ``compute`` (``run_dense(tokens)``, ``run_expert(slot, tokens)``). With ``phases`` (a dict), also add there the
    wall seconds the loop spent in each of its parts (see :class:`replay.driver.LayerDriver`; instrumentation
    only, the decisions are the same with or without it); ``total_s - sum(parts)`` is loop overhead not in any
    part. The result's ``mark`` holds the totals when step ``warmup_steps`` (the first measured one,
    :mod:`replay.window`) began."""
    runtime.set_schedule(steps)  # a stateless predictor scored a block of steps per call: the same decisions
    clock = WallClock()
    copies = TransferCopies(transfer, runtime.cache)
    return replay_steps(steps, runtime, clock, copies, EngineCompute(compute, runtime.cache, clock),
                        MeasuredLink(transfer), num_layers, uses, log, phases, warmup_steps)
