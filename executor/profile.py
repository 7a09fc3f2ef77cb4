"""``python -m executor profile``: measure this machine's tier and compute for a model shape, and write the
hardware profile that the simulator's ``hardware=profiled`` reads.

Copy time vs size: reads of 64 KiB up to the (scaled) expert stride from the packed expert file, several
times each with O_DIRECT, fitted by least squares to ``seconds = latency_s + bytes / bandwidth_bytes_per_s``.
Compute: the dense part vs batch tokens, and one expert's FFN vs tokens routed to it (medians of repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from traces import read_trace
from traces.io import atomic_path
from traces.presets import get_preset

from .compute import LayerCompute
from .tier import ALIGN, ExpertReader, aligned_buffer, scaled_layout, write_store
from .transfer import TransferEngine

TOKENS = [1, 2, 4, 8, 16, 32, 64]


def fit_alpha_beta(nbytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares latency (s) and bandwidth (bytes/s) of ``seconds = latency + bytes / bandwidth``."""
    x, y = np.asarray(nbytes, float), np.asarray(seconds, float)
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0:
        raise ValueError("copy times do not grow with size: cannot fit a bandwidth")
    return max(float(intercept), 0.0), float(1.0 / slope)


def measure_copies(reader: ExpertReader, repeats: int) -> tuple[list[int], list[float]]:
    # reads may span several (contiguous) experts, so the fit sees sizes well beyond one small expert
    stride = reader.layout.stride_bytes
    limit = reader.layout.total_experts * stride
    sizes = sorted({min(limit, s) for s in (64 << 10, 256 << 10, 1 << 20, 4 << 20, stride)})
    sizes = [-(-s // ALIGN) * ALIGN for s in sizes]
    buf = aligned_buffer(max(sizes))
    total = reader.layout.total_experts
    rng = np.random.default_rng(0)
    out_b, out_s = [], []
    for size in sizes:
        times = []
        for _ in range(repeats):
            key = int(rng.integers(max(1, total - -(-size // stride) + 1)))
            t0 = time.perf_counter()
            os.preadv(reader.fd, [memoryview(buf)[:size]], reader.offset(key))
            times.append(time.perf_counter() - t0)
        out_b.append(size)
        out_s.append(statistics.median(times))
    return out_b, out_s


def measure_engine_copies(reader: ExpertReader, io_threads: int, n: int = 64) -> tuple[int, float]:
    """Median duration of one expert copy through the transfer engine with ``io_threads`` reading at once:
    what a copy costs in a real run, where copies overlap each other."""
    stride = reader.layout.stride_bytes
    slots = aligned_buffer(16 * stride)
    eng = TransferEngine(reader, memoryview(slots), io_threads)
    try:
        total = reader.layout.total_experts
        for i in range(n):
            eng.submit(i % total, i % 16, 1)
            if i >= 15:
                eng.wait((i - 15) % total)
        for i in range(max(0, n - 15), n):
            eng.wait(i % total)
    finally:
        eng.close()
    return stride, statistics.median(r.end_s - r.start_s for r in eng.records)


def rotating(compute: LayerCompute, tokens: int, n_slots: int):
    """A callable running one expert on ``tokens`` tokens, from the next slot each call."""
    state = {"slot": 0}

    def run() -> None:
        state["slot"] = (state["slot"] + 1) % n_slots
        compute.run_expert(state["slot"], tokens)

    return run


def measure_compute(compute: LayerCompute, repeats: int, n_slots: int) -> dict:
    def med(fn) -> float:
        fn()  # warm-up
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return {
        "dense_tokens": TOKENS, "dense_s": [med(lambda n=n: compute.run_dense(n)) for n in TOKENS],
        # rotate over many slots: a real run reads each expert's weights cold from memory, not from the CPU cache
        "expert_tokens": TOKENS,
        "expert_s": [med(rotating(compute, n, n_slots)) for n in TOKENS],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, help="take the model shape from this trace's metadata")
    src.add_argument("--model-preset", help="or from a model preset (traces/presets.py)")
    ap.add_argument("--scale", type=int, default=8, help="divide hidden and intermediate sizes by this")
    ap.add_argument("--tier-dir", type=Path, default=Path(".cache/experts"), help="where the expert file lives")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--io-threads", type=int, default=2, help="as executor.io_threads: copies overlap this much")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    meta = read_trace(args.trace).meta if args.trace else get_preset(args.model_preset).meta()
    layout = scaled_layout(meta, args.scale)
    path = args.tier_dir / f"profile-{meta.model}-h{layout.hidden}-i{layout.intermediate}.experts"
    if not path.exists():
        write_store(path, layout)
    reader = ExpertReader(path)
    try:
        sizes, secs = measure_copies(reader, args.repeats)
        eng_bytes, eng_s = measure_engine_copies(reader, args.io_threads)
    finally:
        reader.close()
    latency_s, bw = fit_alpha_beta(sizes, secs)
    n_slots = max(1, min(layout.total_experts, (256 << 20) // layout.stride_bytes))
    slots = aligned_buffer(n_slots * layout.stride_bytes)
    write_view = np.frombuffer(slots, np.float32)
    write_view[:] = np.random.default_rng(0).standard_normal(write_view.size, dtype=np.float32) * 0.05
    compute = LayerCompute(layout, memoryview(slots))
    prof = {
        "schema": "expertflow.hwprofile/1", "device": "cpu", "tier": "disk-odirect" if reader.direct else "disk-buffered",
        "model": meta.model, "scale": args.scale, "expert_bytes": layout.stride_bytes,
        # the table is what one copy costs with io_threads copies in flight (the executor's case); the
        # isolated single-read fit is kept for reference and used beyond the table
        "copy": {"bytes": [eng_bytes], "seconds": [eng_s], "latency_s": latency_s, "bandwidth_bytes_per_s": bw,
                 "io_threads": args.io_threads, "isolated": {"bytes": sizes, "seconds": secs}},
        "compute": measure_compute(compute, args.repeats, n_slots),
    }
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(prof, indent=2) + "\n")
    print(f"wrote {args.output}: copy latency {latency_s * 1e6:.0f} us, bandwidth {bw / 1e9:.2f} GB/s "
          f"({prof['tier']}); one expert ({layout.stride_bytes / 2**20:.2f} MiB) on 1 token: "
          f"{prof['compute']['expert_s'][0] * 1e3:.3f} ms")
    return 0
