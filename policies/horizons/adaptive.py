"""Adaptive prefetch horizon after ExpertFlow (Shen et al. 2025), with an online correction.

Estimates, all EWMAs with weight ``alpha`` on the newest sample (the first real sample replaces the prior):

- ``N_e``: experts needed per layer (``fb.experts_needed``); prior ``min(top_k * batch_size, mean E)``.
- ``C_s``: copy bandwidth in bytes/s (``fb.bandwidth_bytes_per_s``, only samples > 0); prior
  ``prior_bandwidth_bytes_per_s``.
- ``T_l``: layer compute time in s (``fb.layer_compute_s``, only samples > 0); prior ``prior_layer_compute_s``.
- ``W``, ``I``: prefetches wasted and issued per feedback (``fb.prefetch_wasted``, ``fb.prefetch_issued``).

Base horizon (layers whose compute hides the copies one layer needs)::

    S = ceil(N_e * E_s / (C_s * T_l))        (E_s = ctx.expert_bytes; ceil of x - 1e-9 against rounding)

Correction ``c`` (a real number, starts at 0), updated after each ``feedback``, in this order:

1. if ``I > 0`` and ``W / I > waste_threshold``: ``c -= step_down``   (prefetches go unused: look less far)
2. else if ``fb.stall_s > 0`` or ``fb.late_hits > 0``: ``c += step_up``  (copies arrive late: look further).
   With ``widen_on="late"`` only ``fb.late_hits > 0`` counts: a stall on demand misses alone (nothing was
   prefetched for them) is not a sign that prefetches start too late, and on a link-bound trace looking
   further only adds copies ahead of those demands. ``"any"`` (the default) is the paper's rule.
3. anti-windup: ``c`` is clamped to ``[min_distance - S, max_distance - S]`` with the current S, so a
   correction in either direction moves the distance at once instead of first unwinding a backlog.

``distance() = clamp(S + floor(c + 0.5), min_distance, max_distance)``.
"""

from __future__ import annotations

import math

from ..base import Horizon, HorizonContext, HorizonFeedback, PolicyConfigError


class AdaptiveHorizon(Horizon):
    def __init__(
        self,
        min_distance: int = 1,
        max_distance: int = 4,
        prior_bandwidth_bytes_per_s: float = 25e9,
        prior_layer_compute_s: float = 1e-3,
        alpha: float = 0.2,
        step_up: float = 1.0,
        step_down: float = 0.5,
        waste_threshold: float = 0.5,
        widen_on: str = "any",
    ) -> None:
        if not 0 <= int(min_distance) <= int(max_distance):
            raise PolicyConfigError(
                f"adaptive horizon: expected 0 <= min_distance <= max_distance, got {min_distance}, {max_distance}"
            )
        if not 0.0 < float(alpha) <= 1.0:
            raise PolicyConfigError(f"adaptive horizon: alpha expected in (0, 1], got {alpha}")
        if float(prior_bandwidth_bytes_per_s) <= 0 or float(prior_layer_compute_s) <= 0:
            raise PolicyConfigError("adaptive horizon: priors for bandwidth and layer compute time must be > 0")
        if float(step_up) < 0 or float(step_down) < 0 or not 0.0 <= float(waste_threshold) <= 1.0:
            raise PolicyConfigError("adaptive horizon: steps must be >= 0 and waste_threshold in [0, 1]")
        if widen_on not in ("any", "late"):
            raise PolicyConfigError(f"adaptive horizon: widen_on expected 'any' or 'late', got {widen_on!r}")
        self.widen_on = widen_on
        self.min_distance = int(min_distance)
        self.max_distance = int(max_distance)
        self.prior_bandwidth_bytes_per_s = float(prior_bandwidth_bytes_per_s)
        self.prior_layer_compute_s = float(prior_layer_compute_s)
        self.alpha = float(alpha)
        self.step_up = float(step_up)
        self.step_down = float(step_down)
        self.waste_threshold = float(waste_threshold)
        self.reset(HorizonContext(num_layers=1, top_k=1, expert_bytes=1, batch_size=1, num_experts=[1]))

    def reset(self, ctx: HorizonContext) -> None:
        self.expert_bytes = int(ctx.expert_bytes)
        mean_e = sum(ctx.num_experts) / len(ctx.num_experts) if ctx.num_experts else float(ctx.top_k)
        self.experts_per_layer = float(min(ctx.top_k * ctx.batch_size, mean_e))
        self.bandwidth_bytes_per_s = self.prior_bandwidth_bytes_per_s
        self.layer_compute_s = self.prior_layer_compute_s
        self._measured_bw = self._measured_compute = False
        self.wasted = self.issued = 0.0
        self.correction = 0.0

    def base_distance(self) -> int:
        """S = ceil(N_e * E_s / (C_s * T_l)) from the current estimates."""
        x = self.experts_per_layer * self.expert_bytes / (self.bandwidth_bytes_per_s * self.layer_compute_s)
        return max(0, math.ceil(x - 1e-9))

    def distance(self) -> int:
        d = self.base_distance() + math.floor(self.correction + 0.5)
        return int(min(self.max_distance, max(self.min_distance, d)))

    def _ewma(self, old: float, new: float) -> float:
        return (1.0 - self.alpha) * old + self.alpha * new

    def feedback(self, fb: HorizonFeedback) -> None:
        self.experts_per_layer = self._ewma(self.experts_per_layer, float(fb.experts_needed))
        if fb.bandwidth_bytes_per_s > 0:
            bw = float(fb.bandwidth_bytes_per_s)
            self.bandwidth_bytes_per_s = self._ewma(self.bandwidth_bytes_per_s, bw) if self._measured_bw else bw
            self._measured_bw = True
        if fb.layer_compute_s > 0:
            tl = float(fb.layer_compute_s)
            self.layer_compute_s = self._ewma(self.layer_compute_s, tl) if self._measured_compute else tl
            self._measured_compute = True
        self.wasted = self._ewma(self.wasted, float(fb.prefetch_wasted))
        self.issued = self._ewma(self.issued, float(fb.prefetch_issued))
        if self.issued > 0 and self.wasted / self.issued > self.waste_threshold:
            self.correction -= self.step_down
        elif fb.late_hits > 0 or (fb.stall_s > 0 and self.widen_on == "any"):
            self.correction += self.step_up
        s = self.base_distance()
        self.correction = min(self.max_distance - s, max(self.min_distance - s, self.correction))
