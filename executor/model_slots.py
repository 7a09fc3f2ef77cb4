"""Model mode's fast side: where the offloaded experts' slots live and what fills them (``--backend``).

* :class:`DiskSlots` (``cpu``): ``S`` RAM slots per MoE layer, filled from the packed expert file by the I/O
  threads of :class:`~executor.transfer.TransferEngine` (O_DIRECT reads), demand copies before prefetches.
* :class:`GpuSlots` (``cuda``): every routed expert of every layer in pinned host memory (read once from the
  packed file), ``S`` GPU slots per layer, filled by ``non_blocking`` copies on copy streams in the order of
  :class:`~executor.copy_schedule.CopyScheduler` (demand before prefetch, at most ``window`` copies per stream
  ahead). Before an expert reads its slot the model's compute stream waits, on the device, for that slot's copy
  event; after it, an event is recorded that the next copy into the slot waits for (``CudaOps.wait_copy`` /
  ``mark_read``). Its copy backend (:class:`GpuCopies`) drains the compute stream before the driver loop waits
  for a copy, so the wait measured is the time the GPU sat idle for it (the stall), not the host running ahead.

Both hand the driver loop (:class:`replay.driver.LayerDriver`) their copy backend and the expert compute their
``slots``: flat float32, slot ``s`` at ``[s * stride_f, (s + 1) * stride_f)``. Only ``CudaOps`` and
:meth:`GpuSlots.build` touch CUDA; the tests inject a device (``make_ops``) that copies on the CPU, so the
scheduling (copies, events, waits) runs on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from policies.cache import ExpertCache

from .backends import TransferCopies
from .cuda_backend import WINDOW, CudaOps, CudaTransferEngine, load_host, require_cuda
from .tier import ExpertReader, StoreLayout, TierError, aligned_buffer
from .transfer import TransferEngine


class DiskSlots:
    """RAM slots filled by I/O threads from the packed file (owns the reader and closes it)."""

    def __init__(self, reader: ExpertReader, n_slots: int, io_threads: int = 1):
        stride = reader.layout.stride_bytes
        self.reader = reader
        self._buf = aligned_buffer(n_slots * stride)
        self.slots = torch.frombuffer(memoryview(self._buf), dtype=torch.float32)
        self.transfer = TransferEngine(reader, memoryview(self._buf), io_threads)
        self.tier = "disk-odirect" if reader.direct else "disk-buffered"
        self.device = "cpu"

    def copies(self, cache: ExpertCache) -> TransferCopies:
        return TransferCopies(self.transfer, cache)

    def before_expert(self, slot: int) -> None:
        pass  # the driver waited for the copy on the host: the slot holds the weights

    def after_expert(self, slot: int) -> None:
        pass  # CPU compute is synchronous: the slot is free to be overwritten

    def close(self) -> None:
        try:
            self.transfer.close()
        finally:
            self.reader.close()


class GpuCopies(TransferCopies):
    """The CUDA transfer engine's copies for the driver loop; a wait starts once the compute stream is idle."""

    def __init__(self, transfer: CudaTransferEngine, cache: ExpertCache, ops):
        super().__init__(transfer, cache)
        self.ops = ops

    def begin_wait(self) -> None:
        self.ops.sync_compute()  # the kernels enqueued before the wait run first: they are compute, not stall
        super().begin_wait()


class GpuSlots:
    """Pinned host tier, GPU slots and copy streams (``ops``: :class:`CudaOps`, or a test's device)."""

    def __init__(self, ops, n_streams: int, window: int = WINDOW, device: str = ""):
        self.ops = ops
        self.slots = ops.slots.view(-1)
        self.transfer = CudaTransferEngine(ops, n_streams, window)
        self.tier = "host-pinned"
        self.device = device

    @classmethod
    def build(cls, path: Path, layout: StoreLayout, n_slots: int, n_streams: int = 1, window: int = WINDOW,
              make_ops: Callable | None = None) -> GpuSlots:
        """Read every expert of ``path`` into (pinned) host memory and allocate ``n_slots`` slots on the current
        CUDA device. ``make_ops(host, slots, n_streams)`` replaces :class:`CudaOps` (tests: slots on the CPU)."""
        if n_streams < 1:
            raise TierError(f"copy streams (--io-threads with --backend cuda): expected >= 1, got {n_streams}")
        real = make_ops is None
        if real:
            require_cuda()
            dev = torch.device("cuda", torch.cuda.current_device())
            free, _ = torch.cuda.mem_get_info(dev)
            need = n_slots * layout.stride_bytes
            if need > 0.9 * free:
                raise TierError(f"{need / 2**30:.2f} GiB of GPU expert slots do not fit in {free / 2**30:.2f} GiB "
                                f"free on {torch.cuda.get_device_name(dev)}; lower --slots-per-layer")
        reader = ExpertReader(path, direct=False)  # read once into host memory: not the measured tier
        try:
            host = load_host(reader, pin=real)
        finally:
            reader.close()
        if real:
            slots = torch.zeros((n_slots, layout.stride_bytes // 4), dtype=torch.float32, device=dev)
            return cls(CudaOps(host, slots, n_streams), n_streams, device=torch.cuda.get_device_name(dev))
        slots = torch.zeros((n_slots, layout.stride_bytes // 4), dtype=torch.float32)
        return cls(make_ops(host, slots, n_streams), n_streams, device="injected")

    def copies(self, cache: ExpertCache) -> GpuCopies:
        return GpuCopies(self.transfer, cache, self.ops)

    def before_expert(self, slot: int) -> None:
        self.ops.wait_copy(slot)

    def after_expert(self, slot: int) -> None:
        self.ops.mark_read(slot)
        self.ops.sync_compute()  # the expert's seconds are the GPU's, as for the trace executor's GPU compute

    def close(self) -> None:
        self.transfer.close()
