"""The CUDA counterpart of ``executor/profile.py``'s measurements, for ``hardware=profiled`` runs that model a
GPU: pinned host -> GPU copy time vs size (CUDA event timing, fitted like the disk tier), one expert's copy
through ``CudaTransferEngine`` with ``copy_streams`` streams, and ``GpuLayerCompute``'s dense and expert times.

``profile_cuda(...)`` returns the ``device``, ``tier``, ``copy`` and ``compute`` fields of the profile JSON that
``python -m executor profile`` writes; wiring it to a ``--backend cuda`` option there is left to that module.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .cuda_backend import CudaOps, CudaTransferEngine, GpuLayerCompute, load_host, require_cuda
from .measure import fit_alpha_beta, measure_compute
from .tier import ExpertReader, StoreLayout


def time_copy(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True, blocking=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        dst.copy_(src, non_blocking=True)
        end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def profile_cuda(path: Path, layout: StoreLayout, repeats: int = 15, copy_streams: int = 2) -> dict:
    require_cuda()
    reader = ExpertReader(path, direct=False)
    try:
        host = load_host(reader, pin=True)
    finally:
        reader.close()
    dev = torch.device("cuda", torch.cuda.current_device())
    flat = host.view(-1)
    sizes = sorted({min(flat.numel() * 4, s) for s in (64 << 10, 256 << 10, 1 << 20, 4 << 20, layout.stride_bytes)})
    buf = torch.empty(max(sizes) // 4, dtype=torch.float32, device=dev)
    stream = torch.cuda.Stream(dev)
    secs = []
    for size in sizes:
        time_copy(buf[:size // 4], flat[:size // 4], stream)  # warm-up
        secs.append(statistics.median(time_copy(buf[:size // 4], flat[:size // 4], stream) for _ in range(repeats)))
    latency_s, bw = fit_alpha_beta(sizes, secs)

    n_slots = max(1, min(layout.total_experts, (256 << 20) // layout.stride_bytes))
    slots = torch.empty((n_slots, layout.stride_bytes // 4), dtype=torch.float32, device=dev)
    ops = CudaOps(host, slots, copy_streams)
    eng = CudaTransferEngine(ops, copy_streams)
    ring, n = min(16, n_slots), 64
    try:
        for i in range(n):
            eng.submit(i % layout.total_experts, i % ring, 1)
            if i >= ring - 1:
                eng.wait((i - ring + 1) % layout.total_experts)
        for i in range(max(0, n - ring + 1), n):
            eng.wait(i % layout.total_experts)
    finally:
        eng.close()
    eng_s = statistics.median(r.end_s - r.start_s for r in eng.records)
    for s in range(n_slots):
        slots[s].copy_(host[s % layout.total_experts])
    torch.cuda.synchronize(dev)
    compute = GpuLayerCompute(layout, ops)
    return {
        "device": torch.cuda.get_device_name(dev), "tier": "host-pinned",
        "copy": {"bytes": [layout.stride_bytes], "seconds": [eng_s], "latency_s": latency_s,
                 "bandwidth_bytes_per_s": bw, "io_threads": copy_streams, "isolated": {"bytes": sizes, "seconds": secs}},
        "compute": measure_compute(compute, repeats, n_slots),
    }
