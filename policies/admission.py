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
  * otherwise admitted iff ``score(a_k, k) > score(a_v, v)``: the prefetched expert's predicted probability of
    use at its target exceeds the victim's at its own next chance. With per-layer caches the two are experts of
    one layer and ``a_v = a_k`` (for ``a_k <= L``), so both scores come from the one score vector the predictor
    gave for the target. With a global cache the victim may belong to a later layer (``t_v > target``: it cannot
    be needed before the prefetched expert) and its score is the predictor's for that layer.

  With the oracle predictor's scores (1 for the experts the target uses, else 0) and per-layer caches this is
  the exact rule: the victim's next possible use is at ``target``, and it is refused exactly when used there.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .base import FutureIndex

ScoreOf = Callable[[int, int], float]  # (ahead, key) -> the predictor's score of key, ``ahead`` layer-steps on


class ExactAdmission:
    """The do-no-harm rule with perfect foresight."""

    def __init__(self, future: FutureIndex):
        self.future = future

    def admits(self, victim: int, key: int, target: int, now: int, score: ScoreOf) -> bool:
        return self.future.next_use(victim, now + 1) > target


class ScoreAdmission:
    """The rule of the module docstring for predictors without foresight."""

    def __init__(self, num_experts: list[int]):
        self.num_layers = len(num_experts)
        self.layer_of = np.repeat(np.arange(self.num_layers), num_experts).tolist()

    def admits(self, victim: int, key: int, target: int, now: int, score: ScoreOf) -> bool:
        L = self.num_layers
        a_v = (self.layer_of[victim] - now % L - 1) % L + 1  # layer-steps until the victim's layer runs next
        a_k = target - now
        if a_v < a_k:
            return False
        p = score(a_k, key)
        return p - score(a_v, victim) > 1.0 - p
