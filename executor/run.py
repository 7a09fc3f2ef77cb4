"""One executor run from the same hydra config as the simulator: the trace's model shape scaled down by
``executor.scale``, experts in a packed file on disk, ``sum(cache capacity)`` RAM slots, real compute.
Writes ``results.json`` with the simulator's keys (``run.driver = "executor"``), measured."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sim.outputs import write_outputs
from sim.run import bounds, prepare, results_dict

from .compute import LayerCompute
from .engine import execute
from .tier import ExpertReader, StoreLayout, TierError, aligned_buffer, scaled_layout, write_store
from .transfer import TransferEngine


def store_for(layout: StoreLayout, model: str, tier_dir: Path) -> Path:
    """The packed expert file for this shape and seed, written once and reused."""
    name = f"{model}-h{layout.hidden}-i{layout.intermediate}-e{layout.total_experts}-s{layout.seed}.experts"
    path = tier_dir / name
    if not path.exists():
        write_store(path, layout)
    return path


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """Memory the kernel can give us: ``MemAvailable`` (free pages plus reclaimable page cache; after reading
    expert files most of RAM is page cache, so free pages alone can be a few hundred MB on an idle machine),
    else free pages where there is no /proc/meminfo."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(nbytes: int, avail: int | None = None) -> None:
    avail = available_memory_bytes() if avail is None else avail
    if nbytes > 0.8 * avail:
        raise TierError(
            f"executor: {nbytes / 2**30:.2f} GiB of expert slots do not fit in {avail / 2**30:.2f} GiB of available memory; "
            "raise executor.scale or lower cache.fraction"
        )


def execute_config(cfg, out_dir: Path) -> dict:
    wall0 = time.perf_counter()
    ex = cfg.executor
    backend = str(ex.get("backend", "cpu"))
    if backend not in ("cpu", "cuda"):
        raise TierError(f"executor.backend: expected cpu or cuda, got {backend!r}")
    if backend == "cuda":  # stop before any work on a machine without a GPU
        from .cuda_backend import require_cuda

        require_cuda()
    p = prepare(cfg)
    layout = scaled_layout(p.meta, int(ex.scale), int(cfg.seed))
    tier_dir = Path(str(ex.tier_dir))
    if not tier_dir.is_absolute():
        try:
            from hydra.utils import to_absolute_path

            tier_dir = Path(to_absolute_path(str(tier_dir)))
        except ValueError:
            tier_dir = tier_dir.resolve()
    path = store_for(layout, p.meta.model, tier_dir)
    n_slots = sum(p.capacity)
    gpu = None
    if backend == "cuda":  # experts in pinned host memory, GPU slots, copy streams (io_threads of them)
        from .cuda_backend import CudaBackend

        gpu = CudaBackend.build(path, layout, n_slots, int(cfg.seed), copy_streams=int(ex.io_threads))
        transfer, compute, closers = gpu.transfer, gpu.compute, [gpu.close]
        gpu.start()
    else:
        check_memory(n_slots * layout.stride_bytes)
        buf = aligned_buffer(n_slots * layout.stride_bytes)
        odirect = {"auto": None, "on": True, "off": False}[str(ex.get("odirect", "auto"))]
        reader = ExpertReader(path, direct=odirect)
        transfer = TransferEngine(reader, memoryview(buf), int(ex.io_threads))
        compute = LayerCompute(layout, memoryview(buf), int(cfg.seed), int(ex.get("compute_threads", 1)))
        closers = [transfer.close, reader.close]
    log = bool(cfg.output.get("chrome_trace", False))
    try:
        res = execute(p.steps, p.runtime, transfer, compute, p.meta.num_layers, p.uses, log=log)
    finally:
        for close in closers:
            close()
    results = results_dict(p, res, layout.stride_bytes, "executor")
    results.update(bounds(p))
    results["copy_bandwidth_bytes_per_s"] = (
        sum(r.nbytes for r in res.copy_records) / sum(r.end_s - r.start_s for r in res.copy_records)
        if res.copy_records else None
    )
    if gpu is None:
        results["tier"] = "disk-odirect" if reader.direct else "disk-buffered"
    else:
        results["tier"] = gpu.tier
        results["run"]["backend"] = "cuda"
        results["run"]["device"] = gpu.device
        results["telemetry"] = gpu.telemetry_summary
    results["run"]["scale"] = int(ex.scale)
    results["sim_wall_s"] = time.perf_counter() - wall0
    write_outputs(out_dir, results, res, p.meta.num_layers, log)
    return results
