"""Compiled kernels' throughput on the simulator's bench trace, against a bare OrderedDict LRU loop in the same run.

The trace of ``bench_sim.py`` (DeepSeek-V2-Lite shape: 26 layers x 64 experts x top-6, 20k tokens, batch 1,
32 slots per layer). Prints: the on-demand LRU replay kernel's rate (expert-requests/s) with its ratio to the
bare loop; MIN and both perfect-foresight schedules; the cache curves of ``traces stats`` (cache requests/s per
policy and capacity); a whole ``python -m sim`` run of the same trace (on-demand LRU, hardware ``h100-pcie5``:
prepare with the trace read and keyed, the compiled replay, results, the compiled bounds, the files written) with
its parts; the JIT warm-up, cold (empty compile cache) and warm (cached), each in a fresh process. ``--check`` also
replays on demand with the Python simulator and says whether every result is identical.
Usage: python benchmarks/bench_kernel.py [--tokens N] [--slots S] [--check] [--no-warmup] [--no-whole]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import replay_kernels  # noqa: E402
from replay_kernels import cache as kc  # noqa: E402
from replay_kernels.decide import decide  # noqa: E402
from replay_kernels.keys import layer_step_keys, pack_stream, steps_csr  # noqa: E402
from replay_kernels.oracle import oracle_stall  # noqa: E402
from replay_kernels.replay import replay_ondemand  # noqa: E402

# A first call of every kernel on a tiny stream, in a fresh process: the warm-up a run pays.
WARMUP = """
import time
t0 = time.perf_counter()
import numpy as np
from replay_kernels import cache as kc, decide, keys as kk, oracle, replay
t1 = time.perf_counter()
ex = np.array([[[0, 1], [2, 3]], [[1, 2], [0, 3]]])
ptr, keys, counts = kk.layer_step_keys(ex, np.array([0, 4]), np.arange(3), np.arange(2), 8)
s = kk.pack_stream(ptr, keys, 8)
part = np.repeat(np.arange(2), 4)
c = kc.new_cache("belady", part, [2, 2], s, num_layers=2, log_loads=True)
_, orders, _ = decide.decide(c, counts, 2, True)
replay.replay_ondemand(kc.new_cache("lru", part, [2, 2], s), counts, [1, 1], [1e-4, 1e-4], [0.0, 1e-4], 2, 2, 1e-3,
                       mark_step=1)
for sched in ("aggressive", "conservative"):
    oracle.oracle_stall(s, counts, part, [2, 2], [1e-4, 1e-4], [0.0, 1e-4], 2, 1e-3, sched, c.loads, orders,
                        window_from=1, preload=sched == "aggressive")
t2 = time.perf_counter()
"""


def warmup_s(cache_dir: str) -> tuple[float, float]:
    """(import s, first calls s) of every kernel in a fresh process whose compile cache is ``cache_dir``."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", WARMUP + "print(t1 - t0, t2 - t1)"], env=env, capture_output=True,
                         text=True, check=True)
    imp, calls = out.stdout.split()
    return float(imp), float(calls)


def bench_trace(tokens: int):
    from replay.trace_source import synth_from_settings
    from traces import split_by_sequence

    full = synth_from_settings({"preset": "deepseek-v2-lite", "tokens": 2 * tokens, "sequences": 8, "seed": 0})
    train, test = split_by_sequence(full, 0.5, seed=0)
    return train, test.select(np.arange(test.num_tokens) < tokens)


def python_replay(test, train, slots: int):
    """The Python simulator's on-demand LRU replay of the same run (the kernel's specification)."""
    from policies.base import FutureIndex
    from policies.cache import ExpertCache, capacities_for, partitions_for
    from policies.eviction.lru import LRU
    from policies.horizons.fixed import FixedHorizon
    from policies.predictors.none import NoPredictor
    from policies.runtime import PolicyRuntime, RuntimeConfig, contexts
    from policies.schedulers.fifo import FIFOScheduler
    from replay.prepare import step_keys
    from sim.engine import replay

    meta = test.meta
    steps = FIFOScheduler().plan(test.seq_id, test.phase, 1)
    needed, uses = step_keys(test, steps, meta.layer_offsets)
    part = partitions_for(meta.num_experts, "per_layer")
    cap = capacities_for(meta.num_experts, "per_layer", slots, None)
    cctx, _, _ = contexts(meta.num_experts, part, cap, meta.top_k, meta.expert_bytes, 1, FutureIndex(needed), train=train)
    rt = PolicyRuntime(ExpertCache(LRU(), cctx), NoPredictor(), FixedHorizon(0),
                       RuntimeConfig(meta.num_layers, meta.num_experts, meta.expert_bytes), test.experts, test.token_id)
    res = replay(steps, rt, *models(meta), meta.expert_bytes, meta.num_layers, uses=uses)
    return res, rt.cache.stats


def models(meta):
    from replay.hardware import ComputeModel, CopyModel

    return (CopyModel("alpha_beta", 25e9, 1e-5),
            ComputeModel("analytic", meta.hidden_size, meta.intermediate_size, flops_per_s=156e12, mem_bytes_per_s=1.5e12))


def whole_run(test, slots: int, bare_rate: float) -> None:
    """A whole simulator run (``sim.run.simulate``, in this process: start-up and JIT warm-up excluded) of ``test``
    on demand with the compiled paths, then its parts timed one by one."""
    from hydra import compose, initialize_config_dir

    from replay.bounds import add_bounds
    from replay.prepare import prepare
    from replay.results import results_dict
    from sim import kernel_bridge as kb
    from sim.engine import replay
    from sim.run import simulate
    from traces import write_trace

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.parquet"
        write_trace(test, path)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[f"trace.path={path}", "trace.name=bench", "split.test_fraction=null",
                                               "cache=lru", f"cache.slots={slots}", "cache.fraction=null",
                                               "hardware=h100-pcie5", "paths.bounds_dir=null"])
        t0 = time.perf_counter()
        res = simulate(cfg, Path(tmp) / "run")
        whole_s = time.perf_counter() - t0
        n = res["whole_run"]["expert_requests"]
        assert res["run"]["replay_path"] == res["run"]["bounds_path"] == "compiled", res["run"]
        rate = n / whole_s
        print(f"whole run (python -m sim in process, on demand LRU, compiled replay and bounds): {n:,} expert-requests "
              f"in {whole_s:.2f} s = {rate / 1e6:.2f}M/s, {rate / bare_rate:.2f}x the bare loop  (goal: >= 3M/s)")
        t = [time.perf_counter()]
        p = prepare(cfg)
        t.append(time.perf_counter())
        r = replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers,
                   warmup_steps=p.warmup_steps, compiled=True, keys=p.stream)
        t.append(time.perf_counter())
        out = results_dict(p, r, p.copy_bytes, "sim")
        t.append(time.perf_counter())
        add_bounds(out, kb.compute_bounds_kernel(p))
        t.append(time.perf_counter())
        parts = dict(zip(("prepare (trace read, split, keys, policies)", "replay", "results", "bounds (MIN + 3 schedules)"),
                         np.diff(t)))
        print("  its parts, timed again: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()) +
              f"; replay + bounds {n / (t[2] - t[1] + t[4] - t[3]) / 1e6:.1f}M/s")


def main() -> None:
    from bench_sim import bare_lru

    from policies.schedulers.fifo import FIFOScheduler
    from sim.backends import expert_times_s

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--check", action="store_true", help="also replay with the Python simulator and compare")
    ap.add_argument("--no-warmup", action="store_true", help="skip the cold/warm JIT warm-up measurement")
    ap.add_argument("--no-whole", action="store_true", help="skip the whole python -m sim run")
    args = ap.parse_args()
    if not replay_kernels.available():
        sys.exit(f"bench_kernel: the kernels are not compiled: {replay_kernels.unavailable_reason()}")
    if not args.no_warmup:
        with tempfile.TemporaryDirectory() as tmp:
            cold, warm = warmup_s(tmp), warmup_s(tmp)
        print(f"JIT warm-up (import + first call of every kernel, fresh process): cold {cold[0]:.1f} + {cold[1]:.1f} s "
              f"(empty cache: compiles), warm {warm[0]:.1f} + {warm[1]:.2f} s (cached)")
    exec(WARMUP, {})  # compile (or load) every kernel here too, so the rates below time no compilation
    train, test = bench_trace(args.tokens)
    meta = test.meta
    L, K, N = meta.num_layers, meta.top_k, meta.total_experts
    part = np.repeat(np.arange(L), meta.num_experts)
    caps = [args.slots] * L
    copy, comp = models(meta)
    print(f"trace: {test.num_tokens} tokens x {L} layers x top-{K}, {meta.num_experts[0]} experts, "
          f"{args.slots} slots/layer")

    t0 = time.perf_counter()
    steps = FIFOScheduler().plan(test.seq_id, test.phase, 1)
    step_ptr, step_tokens = steps_csr(steps)
    ptr, keys, counts = layer_step_keys(test.experts, meta.layer_offsets, step_ptr, step_tokens, N)
    keys_s = time.perf_counter() - t0
    requests = int(counts.sum())
    ntok = np.diff(step_ptr)
    dense = np.full(len(steps), comp.dense_time_s(1))
    expert_s = expert_times_s(comp, steps)
    copy_s = copy.seconds(meta.expert_bytes)

    cache = kc.new_cache("lru", part, caps, pack_stream(ptr, keys), num_layers=L)
    t0 = time.perf_counter()
    res = replay_ondemand(cache, counts, ntok, dense, expert_s, L, K, copy_s)
    replay_s = time.perf_counter() - t0
    _, bare_s = bare_lru(test.experts, args.slots)
    rate, bare = requests / replay_s, requests / bare_s
    print(f"on-demand LRU replay kernel: {requests:,} expert-requests in {replay_s:.3f} s = {rate / 1e6:.1f}M/s")
    print(f"bare OrderedDict LRU loop:   {requests:,} expert-requests in {bare_s:.3f} s = {bare / 1e6:.1f}M/s")
    print(f"ratio kernel / bare loop: {rate / bare:.2f}x  (goal: >= 10M/s and >= 2x)")
    print(f"keys (scheduler steps + per-layer-step keys) {keys_s:.2f} s; keys + replay = "
          f"{requests / (keys_s + replay_s) / 1e6:.1f}M/s")

    t0 = time.perf_counter()
    stream_s = pack_stream(ptr, keys, N)  # with the future: the layer-steps using each key
    t1 = time.perf_counter()
    mc = kc.new_cache("belady", part, caps, stream_s, num_layers=L, log_loads=True)
    _, orders, _ = decide(mc, counts, L, record_orders=True)
    t2 = time.perf_counter()
    oargs = (stream_s, counts, part, caps, dense, expert_s, L, copy_s)
    aggr = oracle_stall(*oargs, "aggressive")
    t3 = time.perf_counter()
    cons = oracle_stall(*oargs, "conservative", mc.loads, orders)
    t4 = time.perf_counter()
    pre = oracle_stall(*oargs, "aggressive", preload=True)
    t5 = time.perf_counter()
    print(f"bounds: future {t1 - t0:.3f} s, MIN {t2 - t1:.3f} s (hit rate {mc.stats['hits'] / requests:.4f}), "
          f"aggressive {t3 - t2:.3f} s, conservative {t4 - t3:.3f} s, preloaded {t5 - t4:.3f} s; all five "
          f"{requests / (t5 - t0) / 1e6:.1f}M expert-requests/s (oracle stall {min(aggr, cons, pre):.4f} s vs LRU's "
          f"{res.stall_s:.4f} s)")

    capacities = [1, 2, 4, 6, 8, 16, 32, 48]
    print("cache curves (traces stats semantics: one token per step, per-layer caches), hit rate @ cache requests/s "
          "of each policy and capacity (the stream and its future built once, as hit_curves does):")
    for policy in ("lru", "lfu", "belady"):
        cells = []
        for c in capacities:
            curve = kc.new_cache(policy, part, [c] * L, stream_s, num_layers=L)
            t0 = time.perf_counter()
            decide(curve, counts, L)
            cells.append(f"{c}: {curve.stats['hits'] / requests:.4f} @ {requests / (time.perf_counter() - t0) / 1e6:.1f}M")
        print(f"  {policy:6s} " + ", ".join(cells))

    if not args.no_whole:
        whole_run(test, args.slots, bare)

    if args.check:
        t0 = time.perf_counter()
        py, stats = python_replay(test, train, args.slots)
        same = ((py.total_s, py.stall_s, py.compute_s, py.demand_loads) ==
                (res.total_s, res.stall_s, res.compute_s, res.demand_loads)
                and py.step_s == res.step_s.tolist() and np.array_equal(py.layers.misses, res.misses)
                and np.array_equal(py.layers.stall_s, res.layer_stall_s) and stats.hits == cache.stats["hits"]
                and stats.evictions == cache.stats["evictions"])
        print(f"python on-demand replay: {requests / py.wall_s / 1e6:.2f}M/s ({time.perf_counter() - t0:.1f} s with keys); "
              f"kernel identical: {same}")


if __name__ == "__main__":
    main()
