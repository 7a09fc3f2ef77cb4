"""Copy priorities and the link-time budget: what a prefetch may put on the link, and in which order.

Every driver (the simulator, the CPU executor, the CUDA backend) has a priority queue of copies in front of its
copy channel(s). The runtime decides the priorities and whether a prefetch is queued at all; the driver only
supplies facts about its link and clock through :class:`LinkFacts`. The rules, in one place:

**Priorities** (lower is served first; :func:`prefetch_priority`):

- ``DEMAND`` (0): an expert the current layer-step needs now. A demand never waits behind a queued prefetch,
  only behind copies already in flight on its channel (and earlier demands).
- a *confident* prefetch: ``1 + target``, the target layer-step's absolute index, so prefetches are served
  nearest target first (FIFO within one target).
- a *speculative* prefetch (predicted score below ``speculative_below``): ``SPECULATIVE + target``, behind every
  confident prefetch. ExpertFlow 2024's correction queue: it is cancelled as soon as it can no longer land
  before its target (:func:`lands_in_time`, checked at every layer-step while it is queued).

**The link-time budget.** A prefetch for layer-step ``target`` decided at layer-step ``now`` is queued only if
it can land before ``target`` starts, up to an allowed lateness ``slack`` that grows with its confidence::

    backlog_s(priority) / channels + (extra copies decided now at a priority <= it) * copy_s / channels
        + copy_s  <=  (target - now) * layer_s + slack(p) * copy_s

where ``backlog_s`` is the copy work already queued ahead of it (what remains of the copies in flight, every
queued demand and every queued prefetch of a nearer or equal target) and ``layer_s`` the driver's estimate of
one layer-step's compute (dense part and experts). The current layer-step's experts and the layers in between
compute while the copy moves, so ``(target - now)`` layer-steps of compute are available (or more: the current
layer-step also waits for its own demand copies, which are ahead in the queue). Prefetches that do
not fit are not queued: they are reconsidered at the next layer-step while the target is within the horizon
(the link may have drained), else dropped; the expert then loads on demand if it is used.

``slack(p) = max(0, (2p - 1) / p)`` (:func:`late_allowance`; ``p``: the predictor's score, 1 for the oracle) is
where queuing a copy that lands ``delta`` after its target starts stops paying on a saturated link: used
(probability ``p``) it saves about ``copy_s - delta`` of stall against the demand load it replaces; unused it
costs ``copy_s`` of link time that every later copy waits for. ``p (copy_s - delta) > (1 - p) copy_s`` gives
``delta < slack(p) copy_s``. So a prefetch scoring 0.5 or less must land in time (on a link with spare time
before the target a wasted copy delays no demand), and a certain one (the oracle) may be late by up to one copy:
it only has to start before its target starts; one that could not even start by then gains nothing over the
demand load it would become.

A driver that cannot tell yet (``copy_s`` or ``layer_s`` None: nothing measured so far) gets no limit.
"""

from __future__ import annotations

from typing import Protocol

DEMAND = 0  # priority of a demand copy
SPECULATIVE = 1 << 40  # priority base of the speculative class: behind every confident prefetch


def prefetch_priority(target: int, speculative: bool) -> int:
    """The queue priority of a prefetch for layer-step ``target`` (see the module docstring)."""
    return (SPECULATIVE if speculative else 1) + target


def is_speculative(priority: int) -> bool:
    return priority >= SPECULATIVE


def prefetch_target(priority: int) -> int:
    """The target layer-step of a prefetch queued at ``priority`` (the inverse of :func:`prefetch_priority`)."""
    return priority - (SPECULATIVE if priority >= SPECULATIVE else 1)


class LinkFacts(Protocol):
    """What a driver tells the runtime about its copies and its clock, in seconds of its own clock: the
    simulator from its hardware model and channel queue (deterministic), the executor from measurements."""

    channels: int  # copies that can be in flight at once

    def copy_s(self) -> float | None:
        """Seconds one expert copy takes on one channel (None: not known yet)."""
        ...

    def backlog_s(self, priority: int) -> float:
        """Seconds of copy work, summed over channels, that a copy submitted now at ``priority`` would find ahead
        of it: what remains of the copies in flight plus every queued copy at a priority <= ``priority``."""
        ...

    def layer_s(self, tokens: int, experts: int) -> float | None:
        """Estimated compute seconds (dense part and experts, no stall) of one layer-step of ``tokens`` tokens
        that uses ``experts`` distinct experts (None: not known yet)."""
        ...

    def cancel(self, key: int) -> bool:
        """Drop ``key``'s queued copy; False if it has started (it will land) or is not queued."""
        ...

    def busy_share(self) -> float:
        """The share of the run so far the link spent copying (0..1; 0 before any copy)."""
        ...

    def observe_layer(self, compute_s: float) -> None:
        """The driver's measured compute seconds of the layer-step just ended (a model-based link ignores it)."""
        ...


def late_allowance(p: float) -> float:
    """How late (in copies) a prefetch of predicted probability ``p`` may land after its target starts."""
    return max(0.0, (2.0 * p - 1.0) / p) if p > 0 else 0.0


def lands_in_time(link: LinkFacts, priority: int, now: int, target: int, demand_copies: int, extra_copies: int,
                  tokens: int, experts: int, queued: bool = False, p: float = 0.0) -> bool:
    """The budget rule of the module docstring: whether a copy at ``priority`` submitted at layer-step ``now``
    lands before layer-step ``target`` starts, or within its allowed lateness (``p``: its predicted probability
    of use), on ``link``. Ahead of it: the link's backlog, ``demand_copies`` demand copies of the current
    layer-step and ``extra_copies`` prefetches at a priority <= it, decided now and not yet submitted.
    ``tokens`` and ``experts`` describe the current layer-step (the estimate of a layer-step's compute).
    ``queued``: the copy is already in the queue (its own time is part of the backlog).

    The current layer-step cannot end before its own demand copies have landed, so the target starts no
    earlier than ``max((target - now) * layer_s, demands_s + (target - now - 1) * layer_s)``."""
    copy_s = link.copy_s()
    layer_s = link.layer_s(tokens, experts)
    if copy_s is None or layer_s is None:
        return True
    ch = max(1, link.channels)
    ahead = link.backlog_s(priority) + (demand_copies + extra_copies) * copy_s - (copy_s if queued else 0.0)
    finish = max(0.0, ahead) / ch + copy_s
    demands_s = (link.backlog_s(DEMAND) + demand_copies * copy_s) / ch
    until = max(target - now, 0) * layer_s
    if demands_s > layer_s:
        until = max(until, demands_s + (target - now - 1) * layer_s)
    return finish <= until + late_allowance(p) * copy_s
