"""``python -m executor.cuda_bandwidth -o FILE``: the host-to-device link's peak and what the CUDA backend's copy
engine gets of it.

* ``peak``: one large copy (``--peak-mib``, default 256 MiB) from pinned host memory to the GPU, timed by CUDA
  events, median of ``--repeats``: the link's practical peak.
* ``engine``: ``--copies`` copies of ``--expert-mib`` each through :class:`~executor.cuda_backend.CudaTransferEngine`
  (the replay's and model mode's engine: host priority queue, ``--streams`` copy streams, ``window`` copies
  enqueued per stream ahead), a ring of slots refilled as copies land, as a replay streams experts: achieved =
  bytes over the span from the first copy's start to the last one's end; ``per_copy`` = the median copy's own rate.
* ``engine_vs_peak``: achieved / peak.

Copies of real experts are usually far smaller than these, and pay a fixed cost each: the check reports the
replays' and model mode's own rates beside these (``scripts/gpu_check.py``). Without CUDA: exit 2 before any work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from .cuda_backend import WINDOW, CudaOps, CudaTransferEngine, require_cuda
from .cuda_profile import time_copy
from .tier import TierError


def peak_h2d(nbytes: int, repeats: int) -> dict:
    dev = torch.device("cuda", torch.cuda.current_device())
    src = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True)
    src.fill_(1.0)
    dst = torch.empty_like(src, device=dev)
    stream = torch.cuda.Stream(dev)
    time_copy(dst, src, stream)  # warm-up
    secs = [time_copy(dst, src, stream) for _ in range(repeats)]
    med = statistics.median(secs)
    return {"bytes": nbytes, "repeats": repeats, "seconds_median": med, "seconds_min": min(secs),
            "bandwidth_bytes_per_s": nbytes / med}


def engine_h2d(expert_bytes: int, copies: int, streams: int, slots: int = 8, window: int = WINDOW) -> dict:
    """``copies`` copies through the engine into a ring of ``slots`` slots (copy i waits for copy i - slots)."""
    dev = torch.device("cuda", torch.cuda.current_device())
    keys = 2 * slots  # a key is resubmitted only long after its previous copy landed
    host = torch.empty((keys, expert_bytes // 4), dtype=torch.float32, pin_memory=True)
    host.fill_(1.0)
    ring = torch.empty((slots, expert_bytes // 4), dtype=torch.float32, device=dev)
    eng = CudaTransferEngine(CudaOps(host, ring, streams), streams, window)
    try:
        for i in range(copies):
            if i >= slots:
                eng.wait((i - slots) % keys)
            eng.submit(i % keys, i % slots, 1)
        for i in range(max(0, copies - slots), copies):
            eng.wait(i % keys)
        recs = list(eng.records)
    finally:
        eng.close()
    span = max(r.end_s for r in recs) - min(r.start_s for r in recs)
    total = sum(r.nbytes for r in recs)
    return {"expert_bytes": expert_bytes, "copies": len(recs), "streams": streams, "window": window, "slots": slots,
            "span_s": span, "bandwidth_bytes_per_s": total / span,
            "per_copy_bytes_per_s": statistics.median(r.nbytes / (r.end_s - r.start_s) for r in recs)}


def measure(peak_mib: int = 256, expert_mib: int = 16, copies: int = 128, streams: int = 2, repeats: int = 10) -> dict:
    require_cuda()
    peak = peak_h2d(peak_mib << 20, repeats)
    engine = engine_h2d(expert_mib << 20, copies, streams)
    return {"device": torch.cuda.get_device_name(torch.cuda.current_device()), "peak": peak, "engine": engine,
            "engine_vs_peak": engine["bandwidth_bytes_per_s"] / peak["bandwidth_bytes_per_s"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor.cuda_bandwidth", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--peak-mib", type=int, default=256, help="size of the peak copy (MiB)")
    ap.add_argument("--expert-mib", type=int, default=16, help="size of each engine copy (MiB)")
    ap.add_argument("--copies", type=int, default=128, help="copies through the engine")
    ap.add_argument("--streams", type=int, default=2, help="copy streams of the engine")
    ap.add_argument("--repeats", type=int, default=10, help="repeats of the peak copy")
    args = ap.parse_args(argv)
    for flag in ("peak_mib", "expert_mib", "copies", "streams", "repeats"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')}: expected >= 1, got {getattr(args, flag)}", file=sys.stderr)
            return 2
    try:
        res = measure(args.peak_mib, args.expert_mib, args.copies, args.streams, args.repeats)
    except TierError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from traces.io import atomic_path

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(res, indent=2) + "\n")
    p, e = res["peak"], res["engine"]
    print(f"{res['device']}: peak {p['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({p['bytes'] >> 20} MiB copies); engine "
          f"{e['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({e['expert_bytes'] >> 20} MiB x {e['copies']}, "
          f"{e['streams']} streams) = {res['engine_vs_peak']:.0%} of peak -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
