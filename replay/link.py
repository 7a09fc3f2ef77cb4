"""The simulator's :class:`~policies.link_budget.LinkFacts`: copy time and compute from the hardware models,
the backlog from the copy channel's own queue (so the link-time budget is deterministic in the simulator)."""

from __future__ import annotations

from .hardware import ComputeModel


class SimLink:
    """Facts about a simulated copy channel (:class:`~replay.channels.CopyChannels` or
    :class:`~replay.serial_channel.SerialChannel`) and the compute model, for the policy runtime."""

    def __init__(self, chan, compute: ComputeModel, top_k: int):
        self.chan = chan
        model = chan.model
        # copies that move at full speed at once: a shared link moves one copy's worth however many share it
        if model.kind == "shared_link":
            self.channels = 1
        elif model.kind == "partial_link":
            self.channels = max(1, int(model.link_speedup(model.channels)))
        else:
            self.channels = model.channels
        self._copy_s = chan.copy_time_s
        self._compute = compute
        self._top_k = top_k
        self._layer_s: dict[tuple[int, int], float] = {}

    def copy_s(self) -> float:
        return self._copy_s

    def backlog_s(self, priority: int) -> float:
        return self.chan.backlog_s(priority)

    def layer_s(self, tokens: int, experts: int) -> float:
        """The dense part of ``tokens`` tokens and ``experts`` experts sharing their ``tokens x top_k`` uses
        equally, on the compute model (memoised)."""
        est = self._layer_s.get((tokens, experts))
        if est is None:
            per = max(1, round(tokens * self._top_k / max(1, experts)))
            est = self._compute.dense_time_s(tokens) + experts * self._compute.expert_time_s(per)
            self._layer_s[(tokens, experts)] = est
        return est

    def cancel(self, key: int) -> bool:
        return self.chan.cancel(key)

    def busy_share(self) -> float:
        """Landed copies' link time over the time elapsed (for several channels, over channels x time)."""
        now = self.chan.now
        return min(1.0, self.chan.busy_s / (now * self.channels)) if now > 0 else 0.0

    def observe_layer(self, compute_s: float) -> None:
        pass  # the compute model, not measurements, estimates a layer-step here
