"""Real stall of prefetching policies vs on-demand LRU, measured by the CPU executor (issue 5's second target).

Runs a DeepSeek-V2-Lite-shaped synthetic trace (26 layers x 64 experts, top-6; hidden and intermediate sizes
divided by --scale so the expert file fits this machine) through ``python -m executor``'s code path with half
the experts cached, for on-demand LRU and each prefetching policy, in interleaved rounds, and prints each
policy's real stall over on-demand LRU's (median over rounds). Goal: the best prefetching policy <= 0.3.

Usage: python benchmarks/bench_executor_stall.py [--tokens 200] [--scale 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from executor.run import execute_config
from replay.config_keys import compose_config

POLICIES = {
    "on-demand LRU": ["cache=lru", "predictor=none"],
    "on-demand LFRU": ["cache=lfru", "predictor=none"],
    "LRU + transition d=1": ["cache=lru", "predictor=transition", "horizon=fixed", "horizon.distance=1"],
    "LRU + transition, adaptive": ["cache=lru", "predictor=transition", "horizon=adaptive"],
    "on-demand LRU, global": ["cache=lru", "cache.scope=global", "predictor=none"],
    "LRU global + transition d=1": ["cache=lru", "cache.scope=global", "predictor=transition", "horizon=fixed",
                                    "horizon.distance=1"],
    "expertflow-2024": ["strategy=expertflow-2024"],
    "Belady + oracle d=2 (clairvoyant)": ["cache=belady", "predictor=oracle", "horizon=fixed", "horizon.distance=2"],
}


def run(overrides: list[str], out: Path) -> dict:
    return execute_config(compose_config(overrides), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tier-dir", type=Path, default=Path(".cache/experts"))
    args = ap.parse_args()
    common = ["trace=deepseek-synth", "cache.fraction=0.5", f"max_tokens={args.tokens}",
              f"executor.scale={args.scale}", f"paths.tier_dir={args.tier_dir.resolve()}"]
    stall: dict[str, list[float]] = {p: [] for p in POLICIES}
    hits: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, ov in POLICIES.items():
                res = run([*ov, *common], Path(tmp) / f"{r}-{len(stall[name])}-{name.replace(' ', '_')}")
                stall[name].append(res["stall_s"])
                hits[name] = res["hit_rate"]
    base = statistics.median(stall["on-demand LRU"])
    print(f"DeepSeek-V2-Lite-shaped trace / {args.scale}, {args.tokens} tokens, half the experts cached, "
          f"{args.rounds} interleaved rounds (median)")
    print(f"{'policy':<36} {'stall s':>9} {'vs on-demand LRU':>17} {'hit rate':>9}  per round (s)")
    for name, v in stall.items():
        s = statistics.median(v)
        print(f"{name:<36} {s:>9.3f} {s / base:>17.2f} {hits[name]:>9.3f}  {', '.join(f'{x:.3f}' for x in v)}")
    prefetching = {n: statistics.median(v) / base for n, v in stall.items()
                   if "clairvoyant" not in n and not n.startswith("on-demand")}
    best = min(prefetching, key=prefetching.get)
    lfru = statistics.median(stall["on-demand LFRU"]) / base
    print(f"best deployable prefetching policy: {best} at {prefetching[best]:.2f} x on-demand LRU (goal: <= 0.3); "
          f"run-to-run noise: on-demand LFRU, whose copies differ from LRU's by about 2% in the simulator, "
          f"measured {lfru:.2f} x")


if __name__ == "__main__":
    main()
