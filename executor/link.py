"""The executor's :class:`~policies.link_budget.LinkFacts`: the copy time and the backlog from the transfer
engine's own measurements (``copy_s``, ``backlog_s``), a layer-step's compute from an EWMA of the measured
layer compute times. So the link-time budget, and with it which prefetches are queued, depends on this run's
timing (unlike an on-demand cache's decisions, which match the simulator's exactly)."""

from __future__ import annotations


class MeasuredLink:
    """``transfer``: a ``TransferEngine`` or ``CudaTransferEngine`` (``channels``, ``copy_s``, ``backlog_s``,
    ``cancel``); the driver calls :meth:`observe_layer` with each layer-step's measured compute seconds."""

    ALPHA = 0.2  # EWMA weight of the newest layer time

    def __init__(self, transfer):
        self.transfer = transfer
        self.channels = transfer.channels
        self._layer_s: float | None = None

    def observe_layer(self, compute_s: float) -> None:
        if compute_s > 0:
            self._layer_s = compute_s if self._layer_s is None else (1 - self.ALPHA) * self._layer_s + self.ALPHA * compute_s

    def copy_s(self) -> float | None:
        return self.transfer.copy_s()

    def backlog_s(self, priority: int) -> float:
        return self.transfer.backlog_s(priority)

    def layer_s(self, tokens: int, experts: int) -> float | None:
        return self._layer_s

    def cancel(self, key: int) -> bool:
        return self.transfer.cancel(key)

    def busy_share(self) -> float:
        return self.transfer.busy_share()
