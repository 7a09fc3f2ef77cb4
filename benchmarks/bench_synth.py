"""Benchmark: wall time of traces.synth.generate for a 100k-token trace of a preset (default DeepSeek-V2-Lite,
26 layers x top-6 of 64). ``python benchmarks/bench_synth.py [--preset NAME] [--tokens N] [--repeat R]``"""

from __future__ import annotations

import argparse
import time

from traces.synth import generate, preset_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--sequences", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cfg = preset_config(args.preset, tokens=args.tokens, sequences=args.sequences)
    times_s = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        trace = generate(cfg)
        times_s.append(time.perf_counter() - start)
    T, L, K = trace.experts.shape
    print(f"{args.preset}: {T} tokens x {L} layers x top-{K} of {cfg.num_experts}: "
          f"best {min(times_s):.2f} s, runs {', '.join(f'{t:.2f}' for t in times_s)} s")


if __name__ == "__main__":
    main()
