"""A fixed prefetch distance: always ``distance`` layers ahead (0 = no prefetch, on-demand only)."""

from __future__ import annotations

from ..base import Horizon, HorizonContext, HorizonFeedback, PolicyConfigError


class FixedHorizon(Horizon):
    ignores_feedback = True  # lets the runtime skip building HorizonFeedback

    def __init__(self, distance: int = 1) -> None:
        if isinstance(distance, bool) or int(distance) != distance or int(distance) < 0:
            raise PolicyConfigError(f"horizon.distance: expected an integer >= 0, got {distance!r}")
        self._distance = int(distance)
        self.min_distance = self.max_distance = self._distance

    def reset(self, ctx: HorizonContext) -> None:
        pass

    def distance(self) -> int:
        return self._distance

    def feedback(self, fb: HorizonFeedback) -> None:
        pass
