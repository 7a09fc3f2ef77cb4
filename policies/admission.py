"""Admission of prefetches that evict: a prefetch takes a slot from a victim only if the victim is worth less
than the expert it brings, judged on one scale ("do no harm").

The eviction policy still chooses the victim (its own ranking: LRU's oldest, Belady's farthest, ...); the
admission rule only decides whether this prefetch may take that victim's slot now. A refused prefetch is not
queued (the runtime stops prefetching for that target: the remaining candidates score lower and would meet
the same victim). Keys protected for the current layer-step (being computed), keys in flight and earlier
prefetches not yet used are never candidates at all (:meth:`policies.runtime.PolicyRuntime.reserve_prefetches`).

Two scales:

- :class:`ExactAdmission`, for a clairvoyant predictor (the oracle: it has the replay's
  :class:`~policies.base.FutureIndex`): the victim's next use must come strictly after the prefetched expert's
  target layer-step. This is Cao, Felten, Karlin and Li's do-no-harm rule, which the perfect-foresight bounds
  (``replay/oracle.py``) use too.
- :class:`ScoreAdmission`, for deployable predictors: the predictor's own scores. Let ``a_k = target - now``
  be how far ahead the prefetched expert ``k`` is wanted and ``a_v`` in 1..L the number of layer-steps until
  the victim's layer computes next (``t_v = now + a_v``; L = MoE layers):

  * ``t_v < target``: refused. The victim's layer runs before the prefetched expert is needed, so the victim
    may be needed first; the prefetch can be decided again later.
  * otherwise, with ``p_k = score(a_k, k)`` (the prefetched expert's predicted probability of use at its target)
    and ``p_v = score(a_v, v)`` (the victim's at its own next chance), the swap saves ``S = p_k - p_v`` demand
    loads in expectation and costs ``1 - S`` extra copies (its own copy, ``1``, replaces a demand load of the
    prefetched expert only with probability ``p_k``, and the victim comes back with probability ``p_v``). A
    demand load stalls the run for about a copy; an extra copy does so only when the link has no idle time for
    it, about the share ``u`` of the time the link is busy (``LinkFacts.busy_share``; 1 without a link). So it
    is admitted iff ``S > u (1 - S)``, i.e. ``p_k - p_v > max(u / (1 + u), margin)``: on an idle link the
    prefetched expert must only be likelier to be used, on a saturated one by a half. ``margin`` (0.1,
    ``prefetch.admission_margin``): scores closer than that do not tell the two apart (a batch's union of
    per-token probabilities saturates near 1 for every expert at large batch sizes). With per-layer caches the two are experts of one layer and ``a_v = a_k``
    (for ``a_k <= L``), so both scores come from the one score vector the predictor gave for the target. With a
    global cache the victim may belong to a later layer (``t_v > target``: it cannot be needed before the
    prefetched expert) and its score is the predictor's for that layer.

  A prefetch into a free slot evicts nothing and is not judged here. With the oracle predictor the runtime does
  not use this scale (see :mod:`policies.clairvoyant`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import FutureIndex

ScoreOf = Callable[[int, int], float]  # (ahead, key) -> the predictor's score of key, ``ahead`` layer-steps on
# admits(victim, key, target, now, score, busy): ``busy`` is the link's busy share u (see the module docstring)


class ExactAdmission:
    """The do-no-harm rule with perfect foresight."""

    def __init__(self, future: FutureIndex):
        self.future = future

    def admits(self, victim: int, key: int, target: int, now: int, score: ScoreOf, busy: float = 1.0) -> bool:
        return self.future.next_use(victim, now + 1) > target


class ScoreAdmission:
    """The rule of the module docstring for predictors without foresight."""

    def __init__(self, num_experts: list[int], margin: float = 0.1):
        self.num_layers = len(num_experts)
        self.layer_of = np.repeat(np.arange(self.num_layers), num_experts).tolist()
        self.margin = float(margin)

    def admits(self, victim: int, key: int, target: int, now: int, score: ScoreOf, busy: float = 1.0) -> bool:
        L = self.num_layers
        a_v = (self.layer_of[victim] - now % L - 1) % L + 1  # layer-steps until the victim's layer runs next
        a_k = target - now
        if a_v < a_k:
            return False
        u = min(1.0, max(0.0, busy))
        return score(a_k, key) - score(a_v, victim) > max(u / (1.0 + u), self.margin)
