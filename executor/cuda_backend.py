"""The executor's CUDA backend (``executor.backend=cuda``): experts of all layers in pinned host memory, a
preallocated GPU slot tensor, copies on copy streams, SwiGLU on a compute stream. Same engine-facing API as the
CPU backend (``TransferEngine``, ``LayerCompute``), so ``executor/engine.py`` drives it unchanged.

* Host tier: the packed ``*.experts`` file (``executor/tier.py``) is read once into one pinned tensor
  ``[experts, stride / 4]`` float32; a copy moves one whole stride (as the CPU backend reads one).
* ``CudaTransferEngine``: the ordering is ``copy_schedule.CopyScheduler`` (host priority queue; a demand is
  enqueued on a stream holding fewer than ``window`` copies, a prefetch only on an idle stream, so a later
  demand waits behind at most the copy running on its stream; upgrade/cancel act on the host queue).
  ``CudaOps`` is the only part touching CUDA: ``copy_(non_blocking=True)`` on a copy
  stream between two timing events. One thread blocks on the oldest copy's event (a blocking-sync event: it
  sleeps, no spinning), retires what landed (``event.query()``) and refills the streams, so they stay busy
  while the main thread computes. ``wait(key)`` returns the seconds the caller waited.
* ``GpuLayerCompute``: the compute stream waits on the slot's copy event (``stream.wait_event``) before using
  the weights, and a copy into a slot waits on the last compute that read it. ``run_dense`` and ``run_expert``
  return after the compute stream finished, so the engine's wall-clock split of compute vs stall stays
  meaningful (copies still overlap compute).
* Copy times in ``records`` are the GPU's own (event ``elapsed_time`` from a reference event recorded when
  the engine started), on the same axis as ``now()``.
This module imports on a CPU-only machine; ``require_cuda`` stops a run before any work when there is no GPU.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .copy_schedule import CopyScheduler
from .gpu_telemetry import NvmlSampler
from .tier import ExpertReader, StoreLayout, TierError

WINDOW = 2  # demand copies enqueued per stream (the running one included); a prefetch only on an idle stream


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise TierError(
            f"executor.backend=cuda: no CUDA device (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False). Use executor.backend=cpu, or "
            "install a CUDA build of torch (make validate-gpu TORCH_SPEC=\"torch==... --index-url ...\")"
        )


def load_host(reader: ExpertReader, pin: bool = True) -> torch.Tensor:
    """Every expert of every layer, ``[total_experts, stride_bytes / 4]`` float32, pinned for async copies."""
    lay = reader.layout
    nbytes = lay.total_experts * lay.stride_bytes
    avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > 0.8 * avail:
        raise TierError(f"{reader.path}: {nbytes / 2**30:.2f} GiB of experts do not fit in pinned host memory "
                        f"({avail / 2**30:.2f} GiB free); raise executor.scale")
    try:
        host = torch.empty((lay.total_experts, lay.stride_bytes // 4), dtype=torch.float32, pin_memory=pin)
    except RuntimeError as exc:
        raise TierError(f"cannot allocate {nbytes / 2**20:.1f} MiB of pinned host memory ({exc})") from exc
    raw = memoryview(host.numpy()).cast("B")
    for key in range(lay.total_experts):
        reader.read_into(key, raw[key * lay.stride_bytes:(key + 1) * lay.stride_bytes])
    return host


class CudaOps:
    """The device side of the scheduler's ``ops``: enqueue a copy host[key] -> slots[slot] on a copy stream."""

    def __init__(self, host: torch.Tensor, slots: torch.Tensor, streams: int):
        self.host, self.slots, self.device = host, slots, slots.device
        self.streams = [torch.cuda.Stream(self.device) for _ in range(streams)]
        self.nbytes = host.shape[1] * host.element_size()
        self.copied: list[torch.cuda.Event | None] = [None] * slots.shape[0]  # slot -> end of its last copy
        self.read: list[torch.cuda.Event | None] = [None] * slots.shape[0]  # slot -> end of its last compute
        self.ref = torch.cuda.Event(enable_timing=True)
        self.ref.record(torch.cuda.current_stream(self.device))
        self.ref.synchronize()
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def issue(self, key: int, slot: int, stream: int):
        s = self.streams[stream]
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True, blocking=True)
        with torch.cuda.stream(s):
            if self.read[slot] is not None:
                s.wait_event(self.read[slot])  # do not overwrite weights a kernel may still read
            start.record(s)
            self.slots[slot].copy_(self.host[key], non_blocking=True)
            end.record(s)
        self.copied[slot] = end
        return start, end

    def done(self, handle) -> bool:
        return handle[1].query()

    def synchronize(self, handle) -> None:
        handle[1].synchronize()

    def times(self, handle) -> tuple[float, float]:
        return self.ref.elapsed_time(handle[0]) / 1e3, self.ref.elapsed_time(handle[1]) / 1e3

    # -- the compute side: the one place where a kernel reading a slot is ordered against that slot's copies --
    def wait_copy(self, slot: int, stream: torch.cuda.Stream | None = None) -> None:
        """``stream`` (default: the device's current one) waits, on the device, for the slot's last copy."""
        ev = self.copied[slot]
        if ev is not None:
            (stream or torch.cuda.current_stream(self.device)).wait_event(ev)

    def mark_read(self, slot: int, stream: torch.cuda.Stream | None = None) -> None:
        """The work enqueued on ``stream`` so far reads the slot: the next copy into it waits for that."""
        ev = torch.cuda.Event()
        ev.record(stream or torch.cuda.current_stream(self.device))
        self.read[slot] = ev

    def sync_compute(self, stream: torch.cuda.Stream | None = None) -> None:
        """Block the host until ``stream`` (default: the current one) has run everything enqueued on it."""
        (stream or torch.cuda.current_stream(self.device)).synchronize()


class CudaTransferEngine:
    """``TransferEngine``'s interface over a ``CopyScheduler`` and a device ``ops`` (``CudaOps`` or a test fake
    with ``synchronize(handle)`` and ``now()`` besides the scheduler's needs)."""

    def __init__(self, ops, streams: int = 1, window: int = WINDOW):
        if streams < 1:
            raise TierError(f"executor.io_threads (copy streams with backend=cuda): expected >= 1, got {streams}")
        self.ops = ops
        self.channels = streams  # copies that run at once (LinkFacts)
        self.sched = CopyScheduler(ops, streams, window, self.now)
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._pump, daemon=True, name="expert-copies")
        self._thread.start()

    def now(self) -> float:
        return self.ops.now()

    @property
    def records(self):
        return self.sched.records

    @property
    def bytes_started(self) -> int:
        return self.sched.bytes_started

    @property
    def copies_started(self) -> int:
        return self.sched.copies_started

    def submit(self, key: int, slot: int, priority: int) -> None:
        with self._cv:
            self.sched.submit(key, slot, priority)
            self._cv.notify_all()

    def upgrade(self, key: int) -> None:
        with self._cv:
            self.sched.upgrade(key)
            self._cv.notify_all()

    def cancel(self, key: int) -> bool:
        with self._cv:
            return self.sched.cancel(key)

    def is_queued(self, key: int) -> bool:
        with self._cv:
            return self.sched.is_queued(key)

    def busy(self) -> bool:
        with self._cv:
            return self.sched.busy()

    def wait(self, key: int, timeout_s: float = 120.0) -> float:
        """Block until ``key`` has landed (its copy event completed); returns the seconds waited."""
        start = time.perf_counter()
        with self._cv:
            while key not in self.sched.done:
                if key in self.sched.errors:
                    raise self.sched.errors[key]
                if not self.sched.pending(key):
                    raise TierError(f"wait for expert {key}: no copy of it is queued or running")
                if not self._cv.wait(timeout=timeout_s):
                    raise TierError(f"wait for expert {key}: no progress in {timeout_s} s")
        return time.perf_counter() - start

    def landed(self) -> list[int]:
        """Keys whose copies landed since the last call (polled with ``event.query()``)."""
        with self._cv:
            if self._progress():
                self._cv.notify_all()
            return self.sched.take_landed()

    def wait_any(self, timeout_s: float = 120.0) -> float:
        start = time.perf_counter()
        with self._cv:
            n, e = len(self.sched.records), len(self.sched.errors)
            while len(self.sched.records) == n and len(self.sched.errors) == e:
                if not self.sched.busy():
                    raise TierError("wait for any copy: none is queued or running")
                if not self._cv.wait(timeout=timeout_s):
                    raise TierError(f"wait for any copy: no progress in {timeout_s} s")
            if len(self.sched.errors) > e:
                raise next(reversed(self.sched.errors.values()))
        return time.perf_counter() - start

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    def copy_s(self) -> float | None:
        """EWMA of the device-timed copy durations (None before the first copy landed)."""
        return self.sched.copy_ewma_s

    def backlog_s(self, priority: int) -> float:
        with self._cv:
            return self.sched.backlog_s(priority)

    def busy_share(self) -> float:
        """The device-timed copies' duration over the time elapsed and the streams (0..1)."""
        with self._cv:
            busy = sum(r.end_s - r.start_s for r in self.sched.records)
        now = self.now()
        return min(1.0, busy / (now * self.channels)) if now > 0 else 0.0

    def bandwidth_bytes_per_s(self, last: int = 8) -> float:
        recs = self.sched.records[-last:]
        busy = sum(r.end_s - r.start_s for r in recs)
        return sum(r.nbytes for r in recs) / busy if busy > 0 else 0.0

    def _progress(self) -> int:
        """Retire landed copies and refill the streams (lock held). A device error fails the copies in flight."""
        try:
            n = self.sched.poll()
        except BaseException as exc:
            self.sched.fail_in_flight(exc)
            return 1
        return n + self.sched.dispatch()

    def _pump(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stop:
                        return
                    if self._progress():
                        self._cv.notify_all()
                    head = self.sched.oldest()
                    if head is not None:
                        break
                    self._cv.wait()
            try:
                self.ops.synchronize(head.handle)  # sleeps outside the lock; submits go on meanwhile
            except BaseException as exc:
                with self._cv:
                    self.sched.fail_in_flight(exc)
                    self._cv.notify_all()


class GpuLayerCompute:
    """``LayerCompute`` on the GPU: the same dense stand-in and SwiGLU experts (same weights, same tokens),
    float32, on a compute stream of its own, reading each expert in place from its GPU slot."""

    def __init__(self, layout: StoreLayout, ops: CudaOps, seed: int = 0):
        self.h, self.i = layout.hidden, layout.intermediate
        self.ops, self.slots, self.device = ops, ops.slots, ops.slots.device
        self.stream = torch.cuda.Stream(self.device)
        g = torch.Generator().manual_seed(seed)
        with torch.cuda.stream(self.stream):
            self.dense = (torch.randn(4, self.h, self.h, generator=g) / np.sqrt(self.h)).to(self.device)
        self.stream.synchronize()
        self.x_cache: dict[int, torch.Tensor] = {}

    def tokens(self, n: int) -> torch.Tensor:
        x = self.x_cache.get(n)
        if x is None:
            with torch.cuda.stream(self.stream):
                x = torch.randn(n, self.h, generator=torch.Generator().manual_seed(n)).to(self.device)
            self.x_cache[n] = x
        return x

    def run_dense(self, n_tokens: int) -> torch.Tensor:
        x = self.tokens(n_tokens)
        with torch.cuda.stream(self.stream):
            for w in self.dense:
                x = torch.tanh(x @ w)
        self.stream.synchronize()
        return x

    def expert_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hi = self.h * self.i
        w = self.slots[slot]
        return w[:hi].view(self.i, self.h), w[hi:2 * hi].view(self.i, self.h), w[2 * hi:3 * hi].view(self.h, self.i)

    def run_expert(self, slot: int, n_tokens: int) -> torch.Tensor:
        x = self.tokens(n_tokens)
        w1, w3, w2 = self.expert_weights(slot)
        with torch.cuda.stream(self.stream):
            self.ops.wait_copy(slot, self.stream)  # the weights are there once the slot's copy event fired
            y = (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T
            self.ops.mark_read(slot, self.stream)
        self.ops.sync_compute(self.stream)
        return y


@dataclass
class CudaBackend:
    """What ``executor/run.py`` needs: the engine-facing pair, telemetry, and the name of the tier."""

    transfer: CudaTransferEngine
    compute: GpuLayerCompute
    telemetry: NvmlSampler
    tier: str = "host-pinned"
    device: str = ""
    telemetry_summary: dict = field(default_factory=dict)

    @classmethod
    def build(cls, path: Path, layout: StoreLayout, n_slots: int, seed: int, copy_streams: int,
              window: int = WINDOW) -> CudaBackend:
        require_cuda()
        dev = torch.device("cuda", torch.cuda.current_device())
        free, _ = torch.cuda.mem_get_info(dev)
        need = n_slots * layout.stride_bytes
        if need > 0.9 * free:
            raise TierError(f"executor: {need / 2**30:.2f} GiB of GPU expert slots do not fit in {free / 2**30:.2f} GiB "
                            f"free on {torch.cuda.get_device_name(dev)}; raise executor.scale or lower cache.fraction")
        reader = ExpertReader(path, direct=False)  # read once into pinned memory: not the measured tier
        try:
            host = load_host(reader, pin=True)
        finally:
            reader.close()
        slots = torch.zeros((n_slots, layout.stride_bytes // 4), dtype=torch.float32, device=dev)
        ops = CudaOps(host, slots, copy_streams)
        props = torch.cuda.get_device_properties(dev)
        uuid = getattr(props, "uuid", None)
        sampler = NvmlSampler(dev.index or 0, uuid=f"GPU-{uuid}" if uuid is not None else None)
        compute = GpuLayerCompute(layout, ops, seed)
        return cls(CudaTransferEngine(ops, copy_streams, window), compute, sampler, device=torch.cuda.get_device_name(dev))

    def start(self) -> None:
        self.telemetry.start()

    def close(self) -> None:
        self.transfer.close()
        self.telemetry_summary = self.telemetry.stop()
        self.telemetry_summary.setdefault("device", self.device)
