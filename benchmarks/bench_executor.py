"""CPU tier bandwidth: the executor's transfer engine (I/O threads, priority queue, O_DIRECT into RAM slots)
vs a plain single-threaded O_DIRECT read loop over the same packed expert file, in one run.

Usage: python benchmarks/bench_executor.py [--scale 2] [--experts 256] [--io-threads 2]
DeepSeek-V2-Lite-shaped experts (hidden 2048, intermediate 1408) divided by --scale; the file goes to
.cache/bench (a real disk: tmpfs would refuse O_DIRECT).
"""

from __future__ import annotations

import argparse
import os
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
    args = ap.parse_args()
    layout = StoreLayout([args.experts], 2048 // args.scale, 1408 // args.scale)
    path = args.dir / f"bench-{layout.hidden}x{layout.intermediate}-{args.experts}.experts"
    if not path.exists():
        write_store(path, layout)
    n, stride = layout.total_experts, layout.stride_bytes

    reader = ExpertReader(path)
    buf = aligned_buffer(stride)
    t0 = time.perf_counter()
    for k in range(n):
        os.preadv(reader.fd, [memoryview(buf)], reader.offset(k))
    plain_s = time.perf_counter() - t0
    reader.close()

    reader = ExpertReader(path)
    slots = aligned_buffer(16 * stride)
    eng = TransferEngine(reader, memoryview(slots), args.io_threads)
    t0 = time.perf_counter()
    for k in range(n):
        eng.submit(k, k % 16, 1)
        if k >= 15:
            eng.wait(k - 15)  # keep 16 slots in flight, as a cache of 16 would
    for k in range(max(0, n - 15), n):
        eng.wait(k)
    engine_s = time.perf_counter() - t0
    eng.close()
    reader.close()
    total = n * stride
    print(f"file {path} ({total / 2**20:.0f} MiB, {n} experts of {stride / 2**20:.2f} MiB), O_DIRECT={reader.direct}")
    print(f"plain O_DIRECT loop (1 thread):       {total / plain_s / 1e9:.2f} GB/s")
    print(f"transfer engine ({args.io_threads} I/O threads):     {total / engine_s / 1e9:.2f} GB/s")
    print(f"ratio engine / plain loop: {plain_s / engine_s:.0%}  (goal: >= 90%)")


if __name__ == "__main__":
    main()
