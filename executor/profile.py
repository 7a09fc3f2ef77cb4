"""``python -m executor profile``: measure this machine's tier and compute for a model shape, and write the
hardware profile that the simulator's ``hardware=profiled`` reads. Everything is measured the way the executor
really runs it (``executor/engine.py``), because that is the time the simulator has to predict:

- ``compute``: mean time of the dense part and of one expert's FFN vs tokens, inside an all-resident layer
  loop (dense, then ``top_k`` experts from rotating slots), so each expert's weights come cold from memory and
  evict the dense weights as in a replay. Means, not medians: a replay pays every slow call. The isolated
  medians of each call alone (the old profile, 1.5-2x faster) are kept under ``compute.isolated``.
- ``copy``: one expert's copy through the transfer engine (``io_threads`` I/O threads) while the main thread
  computes and submits/waits like the replay loop does, as ``seconds`` = pick-up (submit to start, median) +
  read (mean) + wake-up (landed to the waiter running, median). ``copy.main_thread_s`` is what each copy costs the main thread
  (queueing it, waking an I/O thread, the GIL and the second core it shares with the I/O threads): layers
  with copies minus layers without, per copy. The isolated single-read fit ``seconds = latency_s + bytes /
  bandwidth_bytes_per_s`` (no concurrency) is kept for reference and extrapolates beyond the table.
  ``copy.replay.read_alone_s`` / ``read_pair_s`` / ``pair_speedup``: the read of a copy alone vs the span of two
  at once (this machine's disk: about 1, two reads split one link), from which the simulator picks its tier model.
- ``python -m executor profile loop -o LOOP.json [--profile PROFILE.json] [hydra overrides]``: the per-layer
  cost of one policy's decision loop as the executor runs it (``begin_layer``, cancels, submissions,
  ``release``, ``end_layer``, stats): the executor's own loop replays the configured trace and policy with no
  compute and copies that land at once. ``layer_overhead_s`` = that loop's seconds per layer-step + the
  copies it issued per layer-step x the profile's ``copy.main_thread_s``. ``python -m sim hardware=profiled
  hardware.compute.layer_overhead_s=X`` adds it to every layer (``analysis validate`` does this per policy).

``--backend cuda`` profiles a GPU instead (``executor.cuda_profile.profile_cuda``: pinned host -> GPU copies on
``--io-threads`` copy streams, GPU compute); without a CUDA device it stops with an error before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from traces import TraceError, read_trace
from traces.cli import plain
from traces.io import atomic_path, safe_name
from traces.presets import get_preset

from .compute import LayerCompute
from .measure import fit_alpha_beta, measure_compute
from .profile_loop import InstantTransfer, NullCompute, measure_loop_overhead  # noqa: F401  (moved; still importable here)
from .tier import ALIGN, ExpertReader, TierError, aligned_buffer, ensure_store, scaled_layout
from .transfer import TransferEngine


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


def measure_loop_copies(reader: ExpertReader, compute, io_threads: int, n_slots: int, experts: int = 6,
                        layers: int = 480) -> dict:
    """Copies as the replay loop gets them: per layer the dense part, then 0-2 copies submitted (mean 1, like an
    on-demand cache at half capacity), the resident experts computed, each copy waited for and its expert
    computed. Layers alternate between with and without copies, so both see the same machine load.
    Returns a copy's pick-up (submit to start) and wake-up (landed to the waiter running) medians, its mean read
    seconds, and the main thread's extra seconds per copy."""
    stride = reader.layout.stride_bytes
    ring = 16
    buf = aligned_buffer(ring * stride)
    eng = TransferEngine(reader, memoryview(buf), io_threads)
    rng = np.random.default_rng(1)
    clock = time.perf_counter
    busy = {0: 0.0, 1: 0.0}  # main-thread seconds outside waits, layers without / with copies
    nlay = {0: 0, 1: 0}
    wakes: list[float] = []
    total = reader.layout.total_experts
    nxt = 0
    groups: list[list] = []  # per measured layer with copies: the records of the copies submitted together
    try:
        for i in range(layers + 4):
            with_copies = i % 2
            m = int(rng.choice([0, 1, 1, 2])) if with_copies else 0
            t0 = clock()
            compute.run_dense(1)
            keys, first = [], len(eng.records)
            for _ in range(m):
                key = nxt % total
                eng.submit(key, nxt % ring, 0)
                keys.append(key)
                nxt += 1
            for slot in rng.integers(0, n_slots, experts - m).tolist():
                compute.run_expert(slot, 1)
            waited = 0.0
            for key in keys:
                w0 = eng.now()
                waited += eng.wait(key)
                back = eng.now()
                rec = next(r for r in reversed(eng.records) if r.key == key)
                if rec.end_s > w0:  # the wait blocked: landed-to-running latency
                    wakes.append(back - rec.end_s)
                eng.landed()
                compute.run_expert(int(rng.integers(0, n_slots)), 1)
            if i >= 4:  # skip warm-up layers
                busy[with_copies] += clock() - t0 - waited
                nlay[with_copies] += 1
                if with_copies:
                    nlay["copies"] = nlay.get("copies", 0) + m
                    if m:  # every copy of the layer landed (waited for) before the next layer submits
                        groups.append(eng.records[first:])
    finally:
        eng.close()
    recs = eng.records[4:]
    copies = max(1, nlay.get("copies", 0))
    per_layer = {k: busy[k] / max(1, nlay[k]) for k in (0, 1)}
    main_thread = max(0.0, (per_layer[1] - per_layer[0]) * nlay[1] / copies)
    return {
        # hand-offs: medians (their tail is the machine's other load, and queueing is the simulator's job);
        # the read itself: the mean, as a replay pays it
        "pickup_s": statistics.median(r.start_s - r.submit_s for r in recs),
        "read_s": statistics.mean(r.end_s - r.start_s for r in recs),
        "wake_s": statistics.median(wakes) if wakes else 0.0,
        "main_thread_s": main_thread,
        "copies": len(recs),
        **tier_concurrency(groups),
    }


def tier_concurrency(groups: list[list]) -> dict:
    """How the tier serves two copies at once, from groups of copy records submitted together: the mean read
    of a copy submitted alone vs the mean span (first start to last landing, robust to staggered pick-ups) of
    two submitted together. ``pair_speedup = 2 x alone / pair``: 2 when two reads go as fast as one
    (independent channels), 1 when they split one link's bandwidth; None without both kinds."""
    alone_reads = [g[0].end_s - g[0].start_s for g in groups if len(g) == 1]
    full = [max(r.end_s for r in g) - min(r.start_s for r in g) for g in groups if len(g) == 2]
    alone = statistics.mean(alone_reads) if alone_reads else None
    pair = statistics.mean(full) if full else None
    return {"read_alone_s": alone, "read_pair_s": pair,
            "pair_speedup": 2 * alone / pair if alone and pair else None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["loop"]:
        from .profile_loop import loop_main

        return loop_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m executor profile", description=plain(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, help="take the model shape from this trace's metadata")
    src.add_argument("--model-preset", help="or from a model preset (traces/presets.py)")
    ap.add_argument("--scale", type=int, default=8, help="divide hidden and intermediate sizes by this")
    ap.add_argument("--tier-dir", type=Path, default=Path(".cache/experts"), help="where the expert file lives")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--io-threads", type=int, default=2,
                    help="as executor.io_threads: copies overlap this much (cuda: copy streams)")
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: disk tier -> RAM (default); cuda: pinned host -> GPU (needs a CUDA device)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        for flag, v in (("--scale", args.scale), ("--repeats", args.repeats), ("--io-threads", args.io_threads)):
            if v < 1:
                raise TierError(f"{flag}: expected an integer >= 1, got {v}")
        prof = profile(args)
    except (TierError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(prof, indent=2) + "\n")
    c = prof["copy"]
    print(f"wrote {args.output} ({prof['device']}, {prof['tier']}): copy latency {c['latency_s'] * 1e6:.0f} us, "
          f"bandwidth {c['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s isolated; one expert "
          f"({prof['expert_bytes'] / 2**20:.2f} MiB) {c['seconds'][0] * 1e3:.3f} ms in a replay, "
          f"{c.get('main_thread_s', 0.0) * 1e6:.0f} us of main thread per copy; expert on 1 token: "
          f"{prof['compute']['expert_s'][0] * 1e3:.3f} ms")
    return 0


def profile(args: argparse.Namespace) -> dict:
    if args.backend == "cuda":  # stop before writing any expert file on a machine without a GPU
        from .cuda_backend import require_cuda

        require_cuda()
    meta = read_trace(args.trace).meta if args.trace else get_preset(args.model_preset).meta()
    layout = scaled_layout(meta, args.scale)
    path = args.tier_dir / f"profile-{safe_name(meta.model)}-h{layout.hidden}-i{layout.intermediate}.experts"
    ensure_store(path, layout)
    head = {"schema": "expertflow.hwprofile/1", "model": meta.model, "scale": args.scale,
            "expert_bytes": layout.stride_bytes}
    if args.backend == "cuda":
        from .cuda_profile import profile_cuda

        return {**head, **profile_cuda(path, layout, args.repeats, args.io_threads)}
    n_slots = max(1, min(layout.total_experts, (256 << 20) // layout.stride_bytes))
    slots = aligned_buffer(n_slots * layout.stride_bytes)
    write_view = np.frombuffer(slots, np.float32)
    write_view[:] = np.random.default_rng(0).standard_normal(write_view.size, dtype=np.float32) * 0.05
    compute = LayerCompute(layout, memoryview(slots))
    k = int(meta.top_k) or 6
    reader = ExpertReader(path)
    try:
        sizes, secs = measure_copies(reader, args.repeats)
        loop = measure_loop_copies(reader, compute, args.io_threads, n_slots, k)
        direct = reader.direct
    finally:
        reader.close()
    latency_s, bw = fit_alpha_beta(sizes, secs)
    seconds = loop["pickup_s"] + loop["read_s"] + loop["wake_s"]
    return {
        **head, "device": "cpu", "tier": "disk-odirect" if direct else "disk-buffered",
        # the table is what one copy takes in a replay (io_threads copies may overlap, the main thread computes);
        # the isolated single-read fit is kept for reference and used beyond the table
        "copy": {"bytes": [layout.stride_bytes], "seconds": [seconds], "latency_s": latency_s,
                 "bandwidth_bytes_per_s": bw, "io_threads": args.io_threads, "main_thread_s": loop["main_thread_s"],
                 "replay": loop, "isolated": {"bytes": sizes, "seconds": secs}},
        "compute": measure_compute(compute, args.repeats, n_slots, k),
    }
