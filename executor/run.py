"""One executor run from the same hydra config as the simulator: the trace's model shape scaled down by
``executor.scale``, experts in a packed file on disk, ``sum(cache capacity)`` RAM slots, real compute.
Writes ``results.json`` with the simulator's keys (``run.driver = "executor"``), measured.

The bounds are the core's (:mod:`replay.bounds`), on a model of the hardware. Belady's hit rate does not depend on time, so it is
always reported. The perfect-foresight stalls are only honest on a model of what this run read and computed: a
profile (``hardware=profiled``, copies and compute) of this tier taken at this run's expert size. Otherwise the
configured preset models full-size experts on another machine (a "lower bound" 44x the measured stall was
seen), so they are null, and ``run.hardware`` names the tier the run used (``local-<tier>``) with no modelled
``bandwidth_GBps`` or ``copy_model``."""

from __future__ import annotations

import os
import time
from pathlib import Path

from replay.bounds import add_bounds, belady_bounds, bounds
from replay.config_keys import normalise
from replay.hardware import load_profile
from replay.outputs import write_outputs
from replay.prepare import prepare
from replay.results import results_dict
from replay.trace_source import project_path
from traces.io import safe_name

from .compute import LayerCompute
from .engine import execute
from .tier import ExpertReader, StoreLayout, TierError, aligned_buffer, ensure_store, scaled_layout
from .transfer import TransferEngine


def store_for(layout: StoreLayout, model: str, tier_dir: Path) -> Path:
    """The packed expert file for this shape and seed, written once and reused. ``model`` is the trace's model
    field (data): made a safe file name, so the file stays in ``tier_dir`` whatever the trace says."""
    name = f"{safe_name(model)}-h{layout.hidden}-i{layout.intermediate}-e{layout.total_experts}-s{layout.seed}.experts"
    return ensure_store(tier_dir / name, layout)


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


ORACLE_KEYS = ("oracle_stall_s", "oracle_aggressive_stall_s", "oracle_conservative_stall_s", "oracle_preloaded_stall_s")


def models_this_run(hw, expert_bytes: int, tier: str) -> bool:
    """Whether the hardware config ``hw`` models this run: copies and compute from a profile of ``tier`` taken
    at ``expert_bytes`` per expert."""
    if hw.get("bandwidth", {}).get("source") != "profile" or hw.get("compute", {}).get("source") != "profile":
        return False
    prof = load_profile(hw.profile_path)
    return prof.get("expert_bytes") == expert_bytes and prof.get("tier") == tier


ODIRECT = {"auto": None, "on": True, "off": False}


class ReplayProgress(list):
    """The replay's steps, with a progress bar on stderr (shown after 2 s) that the first walk through them
    advances: the replay loop walks them once, in order, at the pace of the real copies and compute. Later walks
    (reading the steps' phases) are plain."""

    def __init__(self, steps, file=None, delay_s: float = 2.0):
        super().__init__(steps)
        self._walked = False
        self._file, self._delay_s = file, delay_s  # where the bar goes (None: stderr), and after how long

    def __iter__(self):
        if self._walked:
            return super().__iter__()
        self._walked = True
        return self._walk()

    def _walk(self):
        from tqdm import tqdm

        with tqdm(total=len(self), desc="executor: replaying", unit="step", delay=self._delay_s, file=self._file,
                  leave=False) as bar:
            for st in super().__iter__():
                yield st
                bar.update()


def check_executor_config(ex) -> None:
    """The ``executor.*`` values, checked before any work (the expert file is written before they are used)."""
    backend = str(ex.get("backend", "cpu"))
    if backend not in ("cpu", "cuda"):
        raise TierError(f"executor.backend: expected cpu or cuda, got {backend!r}")
    odirect = str(ex.get("odirect", "auto"))
    if odirect not in ODIRECT:
        raise TierError(f"executor.odirect: expected one of {list(ODIRECT)}, got {odirect!r}")
    for key, default in (("scale", 8), ("io_threads", 2), ("compute_threads", 1)):
        v = ex.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TierError(f"executor.{key}: expected an integer >= 1, got {v!r}")


def execute_config(cfg, out_dir: Path) -> dict:
    wall0 = time.perf_counter()
    normalise(cfg)  # old config keys mapped (prepare does it too, but executor.* and paths.* are read first)
    ex = cfg.executor
    check_executor_config(ex)
    backend = str(ex.get("backend", "cpu"))
    if backend == "cuda":  # stop before any work on a machine without a GPU
        from .cuda_backend import require_cuda

        require_cuda()
    p = prepare(cfg)
    layout = scaled_layout(p.meta, int(ex.scale), int(cfg.seed))
    path = store_for(layout, p.meta.model, project_path(str(cfg.paths.tier_dir)))
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
        odirect = ODIRECT[str(ex.get("odirect", "auto"))]
        reader = ExpertReader(path, direct=odirect)
        transfer = TransferEngine(reader, memoryview(buf), int(ex.io_threads))
        compute = LayerCompute(layout, memoryview(buf), int(cfg.seed), int(ex.get("compute_threads", 1)))
        closers = [transfer.close, reader.close]
    log = bool(cfg.output.get("chrome_trace", False))
    try:
        res = execute(ReplayProgress(p.steps), p.runtime, transfer, compute, p.meta.num_layers, p.uses, log=log,
                      warmup_steps=p.warmup_steps)
    finally:
        for close in closers:
            close()
    results = results_dict(p, res, layout.stride_bytes, "executor")
    results["copy_bandwidth_bytes_per_s"] = (
        sum(r.nbytes for r in res.copy_records) / sum(r.end_s - r.start_s for r in res.copy_records)
        if res.copy_records else None
    )
    results["tier"] = ("disk-odirect" if reader.direct else "disk-buffered") if gpu is None else gpu.tier
    if models_this_run(cfg.hardware, layout.stride_bytes, results["tier"]):
        add_bounds(results, bounds(p))
    else:
        add_bounds(results, {**belady_bounds(p), **dict.fromkeys(ORACLE_KEYS)})
        results["whole_run"].update(dict.fromkeys(ORACLE_KEYS))
        results["run"].update(hardware=f"local-{results['tier']}", bandwidth_GBps=None, copy_model=None)
    if gpu is not None:
        results["run"]["backend"] = "cuda"
        results["run"]["device"] = gpu.device
        results["telemetry"] = gpu.telemetry_summary
    # the shape the tier ran at: the requested scale, or (a trace without a hidden size) the smallest width
    results["run"].update(scale=int(ex.scale), scaled_hidden=layout.hidden, scaled_intermediate=layout.intermediate)
    results["sim_wall_s"] = time.perf_counter() - wall0
    write_outputs(out_dir, results, res, p.meta.num_layers, log)
    return results
