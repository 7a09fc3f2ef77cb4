"""Adaptive prefetch horizon after ExpertFlow (Shen et al. 2025), with an online correction that can switch
prefetching off (distance 0: on demand) when it cannot help, and back on when it can.

Estimates, all EWMAs with weight ``alpha`` on the newest sample (the first real sample replaces the prior):

- ``N_e``: experts per layer-step that needed a copy (``fb.experts_needed``: the demand loads plus the experts
  prefetched for it; not the experts already resident, which need no copy); prior ``min(top_k * batch_size,
  mean E)``.
- ``C_s``: copy bandwidth in bytes/s (``fb.bandwidth_bytes_per_s``, only samples > 0); prior
  ``prior_bandwidth_bytes_per_s``.
- ``T_l``: layer compute time in s (``fb.layer_compute_s``, only samples > 0); prior ``prior_layer_compute_s``.
- ``W``, ``I``: prefetches wasted and issued per feedback (``fb.prefetch_wasted``, ``fb.prefetch_issued``);
  ``H``: experts a prefetch evicted that had to be loaded again soon after (``fb.prefetch_harm``). ``W + H``
  are the copies prefetching added to what on-demand loading would have copied.
- ``P``: precision of the predictor where it matters, ``fb.predicted_used / fb.predicted`` (layer-steps with
  ``fb.predicted > 0`` only): of the experts it named one layer-step ahead that were neither resident nor in
  flight, the share that layer-step used. The runtime measures it at every distance, 0 included, so the horizon
  can tell when turning prefetching back on would pay. Prior ``prior_precision`` (0 by default), not replaced
  by the first sample: prefetching stays off until a few layer-steps of evidence say it would be used.

Base horizon (layers whose compute hides the copies one layer-step needs)::

    S = ceil(N_e * E_s / (C_s * T_l))        (E_s = ctx.expert_bytes; ceil of x - 1e-9 against rounding)

Prefetching is *off* (distance 0: on demand) while ``P < min_precision + (1 - min_precision) * B``, where ``B``
is the EWMA of ``stall_s / (stall_s + layer_compute_s)`` per layer-step, the share of time the run waits for
the link. On a link with spare time a prefetch need only be used more often than not (``min_precision``); on a
saturated one (``B`` near 1) every copy that goes unused, or that evicts an expert loaded again later, delays
every copy behind it, so what the predictor names must almost always be used. No correction of S can make a
prefetcher below that bar pay. The runtime keeps measuring ``P`` while prefetching is off, and it comes back on
once ``P`` clears the bar again.

Correction ``c`` (a real number, starts at 0), updated after each ``feedback``, in this order:

1. if ``I > 0`` and ``(W + H) / I > waste_threshold``: ``c -= step_down``   (prefetches that cost more copies
   than they save: evicted unused, or evicting experts that come back)
2. else if the stall grows with prefetching: ``stall_on > (1 + stall_tolerance) * stall_off``, the EWMAs of
   ``fb.stall_s`` over the layer-steps that ran with distance > 0 and with distance 0 (both measured):
   ``c -= step_down``
3. else if ``fb.late_hits > 0`` and ``fb.late_hits >= fb.misses``: ``c += step_up``  (late hits dominate the
   copies this layer-step waited for: prefetches start too late, look further)
4. else if ``widen_on == "any"`` and ``fb.stall_s > 0`` and ``fb.misses > 0``: ``c += step_up`` (the paper's
   rule: any stall widens). With ``widen_on="late"`` only rule 3 widens: a stall on demand misses alone is
   not a sign that prefetches start too late, and on a link-bound trace looking further only adds copies.
5. anti-windup: ``c`` is clamped to ``[min_distance - S, max_distance - S]`` with the current S, so a
   correction in either direction moves the distance at once instead of first unwinding a backlog.

``distance() = 0`` while off, else ``clamp(S + floor(c + 0.5), min_distance, max_distance)``; with
``min_distance`` 0 (the default) rules 1 and 2 also narrow all the way to on-demand loading.
"""

from __future__ import annotations

import math

from ..base import Horizon, HorizonContext, HorizonFeedback, PolicyConfigError


class AdaptiveHorizon(Horizon):
    def __init__(
        self,
        min_distance: int = 0,
        max_distance: int = 4,
        prior_bandwidth_bytes_per_s: float = 25e9,
        prior_layer_compute_s: float = 1e-3,
        alpha: float = 0.2,
        step_up: float = 1.0,
        step_down: float = 0.5,
        waste_threshold: float = 0.5,
        widen_on: str = "any",
        min_precision: float = 0.5,
        stall_tolerance: float = 0.05,
        prior_precision: float = 0.0,
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
        if not 0.0 <= float(min_precision) <= 1.0:
            raise PolicyConfigError(f"adaptive horizon: min_precision expected in [0, 1], got {min_precision}")
        self.min_precision = float(min_precision)
        if not float(stall_tolerance) >= 0:
            raise PolicyConfigError(f"adaptive horizon: stall_tolerance expected >= 0, got {stall_tolerance}")
        self.stall_tolerance = float(stall_tolerance)
        if not 0.0 <= float(prior_precision) <= 1.0:
            raise PolicyConfigError(f"adaptive horizon: prior_precision expected in [0, 1], got {prior_precision}")
        self.prior_precision = float(prior_precision)
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
        self._measured_bw = self._measured_compute = self._measured_needed = False
        self.wasted = self.issued = 0.0
        self.precision = self.prior_precision
        self.stall_on: float | None = None  # EWMA of the stall per layer-step with prefetching on / off
        self.stall_off: float | None = None
        self.link_bound = 0.0  # EWMA of the share of a layer-step's time spent waiting for copies
        self.correction = 0.0

    def base_distance(self) -> int:
        """S = ceil(N_e * E_s / (C_s * T_l)) from the current estimates."""
        x = self.experts_per_layer * self.expert_bytes / (self.bandwidth_bytes_per_s * self.layer_compute_s)
        return max(0, math.ceil(x - 1e-9))

    def required_precision(self) -> float:
        """The precision below which prefetching is off (see the module docstring)."""
        return self.min_precision + (1.0 - self.min_precision) * self.link_bound

    def distance(self) -> int:
        if self.precision < self.required_precision():
            return 0
        d = self.base_distance() + math.floor(self.correction + 0.5)
        return int(min(self.max_distance, max(self.min_distance, d)))

    def _ewma(self, old: float, new: float) -> float:
        return (1.0 - self.alpha) * old + self.alpha * new

    def feedback(self, fb: HorizonFeedback) -> None:
        on = self.distance() > 0  # the distance the layer-step just finished ran with
        stall = float(fb.stall_s)
        if on:
            self.stall_on = stall if self.stall_on is None else self._ewma(self.stall_on, stall)
        else:
            self.stall_off = stall if self.stall_off is None else self._ewma(self.stall_off, stall)
        busy = stall + max(0.0, float(fb.layer_compute_s))
        if busy > 0:
            self.link_bound = self._ewma(self.link_bound, stall / busy)
        n = float(fb.experts_needed)
        self.experts_per_layer = self._ewma(self.experts_per_layer, n) if self._measured_needed else n
        self._measured_needed = True
        if fb.bandwidth_bytes_per_s > 0:
            bw = float(fb.bandwidth_bytes_per_s)
            self.bandwidth_bytes_per_s = self._ewma(self.bandwidth_bytes_per_s, bw) if self._measured_bw else bw
            self._measured_bw = True
        if fb.layer_compute_s > 0:
            tl = float(fb.layer_compute_s)
            self.layer_compute_s = self._ewma(self.layer_compute_s, tl) if self._measured_compute else tl
            self._measured_compute = True
        self.wasted = self._ewma(self.wasted, float(fb.prefetch_wasted + fb.prefetch_harm))
        self.issued = self._ewma(self.issued, float(fb.prefetch_issued))
        if fb.predicted > 0:
            self.precision = self._ewma(self.precision, fb.predicted_used / fb.predicted)
        grows = (self.stall_on is not None and self.stall_off is not None
                 and self.stall_on > (1.0 + self.stall_tolerance) * self.stall_off)
        if self.issued > 0 and self.wasted / self.issued > self.waste_threshold:
            self.correction -= self.step_down
        elif grows:
            self.correction -= self.step_down
        elif fb.late_hits > 0 and fb.late_hits >= fb.misses:
            self.correction += self.step_up
        elif self.widen_on == "any" and fb.stall_s > 0 and fb.misses > 0:
            self.correction += self.step_up
        s = self.base_distance()
        self.correction = min(self.max_distance - s, max(self.min_distance - s, self.correction))
