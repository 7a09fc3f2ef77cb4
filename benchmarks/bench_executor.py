"""CPU tier bandwidth: the executor's transfer engine (I/O threads, priority queue, O_DIRECT into RAM slots)
vs a plain single-threaded O_DIRECT read loop over the same packed expert file, in one run.

Usage: python benchmarks/bench_executor.py [--scale 2] [--experts 256] [--io-threads 2] [--rounds 5]
DeepSeek-V2-Lite-shaped experts (hidden 2048, intermediate 1408) divided by --scale; the file goes to
.cache/bench (a real disk: tmpfs would refuse O_DIRECT).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from executor.tier import ExpertReader, StoreLayout, aligned_buffer, write_store
from executor.transfer import TransferEngine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each loop; medians are reported")
    args = ap.parse_args()
    layout = StoreLayout([args.experts], 2048 // args.scale, 1408 // args.scale)
    path = args.dir / f"bench-{layout.hidden}x{layout.intermediate}-{args.experts}.experts"
    if not path.exists():
        write_store(path, layout)
    n, stride = layout.total_experts, layout.stride_bytes

    total = n * stride
    plain, engine = [], []
    for r in range(args.rounds):  # interleaved, order alternating, so neither loop always reads after the other
        if r % 2:
            engine.append(engine_loop(path, n, stride, args.io_threads))
            plain.append(plain_loop(path, n, stride))
        else:
            plain.append(plain_loop(path, n, stride))
            engine.append(engine_loop(path, n, stride, args.io_threads))
    ratios = [p / e for p, e in zip(plain, engine)]
    reader = ExpertReader(path)
    direct = reader.direct
    reader.close()
    print(f"file {path} ({total / 2**20:.0f} MiB, {n} experts of {stride / 2**20:.2f} MiB), O_DIRECT={direct}")
    print(f"plain O_DIRECT loop (1 thread), median of {args.rounds}:   {total / statistics.median(plain) / 1e9:.2f} GB/s")
    print(f"transfer engine ({args.io_threads} I/O threads), median of {args.rounds}: {total / statistics.median(engine) / 1e9:.2f} GB/s")
    print("ratio engine / plain loop per round: " + ", ".join(f"{r:.0%}" for r in ratios))
    print(f"median ratio: {statistics.median(ratios):.0%}  (goal: >= 90%)")


def plain_loop(path: Path, n: int, stride: int) -> float:
    reader = ExpertReader(path)
    buf = aligned_buffer(stride)
    t0 = time.perf_counter()
    for k in range(n):
        os.preadv(reader.fd, [memoryview(buf)], reader.offset(k))
    dt = time.perf_counter() - t0
    reader.close()
    return dt


def engine_loop(path: Path, n: int, stride: int, io_threads: int) -> float:
    reader = ExpertReader(path)
    slots = aligned_buffer(16 * stride)
    eng = TransferEngine(reader, memoryview(slots), io_threads)
    t0 = time.perf_counter()
    for k in range(n):
        eng.submit(k, k % 16, 1)
        if k >= 15:
            eng.wait(k - 15)  # keep 16 slots in flight, as a cache of 16 would
    for k in range(max(0, n - 15), n):
        eng.wait(k)
    dt = time.perf_counter() - t0
    eng.close()
    reader.close()
    return dt

if __name__ == "__main__":
    main()
