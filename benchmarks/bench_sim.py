"""Simulator throughput: expert-requests simulated per second vs a bare OrderedDict LRU loop.

Replays a synthetic 26-layer x 64-expert top-6 trace of 20k tokens (DeepSeek-V2-Lite shape) with an LRU
cache and transition prefetch at a fixed horizon, and in the same run times a plain per-layer LRU loop over
the same accesses. Prints both rates and their ratio at batch size 1, and with ``--batch B`` the simulator's rate
at B tokens per step too. Usage: python benchmarks/bench_sim.py [--tokens N] [--slots S] [--batch B] [--general]
[--simpy]
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict

import numpy as np

from policies.cache import ExpertCache, capacities_for, partitions_for
from policies.eviction.lru import LRU
from policies.future import FutureIndex, step_keys
from policies.horizons.fixed import FixedHorizon
from policies.predictors.transition import TransitionPredictor
from policies.runtime import PolicyRuntime, RuntimeConfig, contexts
from policies.schedulers.fifo import FIFOScheduler
from replay.hardware import ComputeModel, CopyModel
from replay.trace_source import synth_from_settings
from sim.engine import replay
from traces import split_by_sequence


def bare_lru(experts: np.ndarray, slots: int) -> tuple[int, float]:
    """The reference loop: one OrderedDict per layer, token by token."""
    T, L, K = experts.shape
    caches = [OrderedDict() for _ in range(L)]
    hits = 0
    rows = experts.tolist()
    t0 = time.perf_counter()
    for tok in rows:
        for layer, ks in enumerate(tok):
            c = caches[layer]
            for e in ks:
                if e in c:
                    c.move_to_end(e)
                    hits += 1
                else:
                    if len(c) >= slots:
                        c.popitem(last=False)
                    c[e] = True
    return hits, time.perf_counter() - t0


def simulate(test, train, slots: int, batch: int, simpy_channels: bool = False, fused: bool = True):
    """One replay of ``test`` (LRU + transition prefetch, fixed d=1) at ``batch`` tokens per step."""
    meta = test.meta
    steps = FIFOScheduler().plan(test.seq_id, test.phase, batch)
    needed, uses = step_keys(test, steps, meta.layer_offsets)
    part = partitions_for(meta.num_experts, "per_layer")
    cap = capacities_for(meta.num_experts, "per_layer", slots, None)
    cctx, pctx, hctx = contexts(meta.num_experts, part, cap, meta.top_k, meta.expert_bytes, batch, FutureIndex(needed), train=train)
    pred = TransitionPredictor()
    pred.reset(pctx)
    hor = FixedHorizon(1)
    hor.reset(hctx)
    rt = PolicyRuntime(ExpertCache(LRU(), cctx), pred, hor, RuntimeConfig(meta.num_layers, meta.num_experts, meta.expert_bytes), test.experts, test.token_id)
    copy = CopyModel("alpha_beta", 25e9, 1e-5)
    comp = ComputeModel("analytic", meta.hidden_size, meta.intermediate_size, flops_per_s=156e12, mem_bytes_per_s=1.5e12)
    return replay(steps, rt, copy, comp, meta.expert_bytes, meta.num_layers, uses=uses, simpy_channels=simpy_channels,
                  fused=fused)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="also replay at this batch size (the goal is at batch 1)")
    ap.add_argument("--general", action="store_true", help="also replay with the general loop (the fused one off)")
    ap.add_argument("--simpy", action="store_true", help="also replay with the SimPy copy channels forced (same results)")
    args = ap.parse_args()
    full = synth_from_settings({"preset": "deepseek-v2-lite", "tokens": 2 * args.tokens, "sequences": 8, "seed": 0})
    train, test = split_by_sequence(full, 0.5, seed=0)
    test = test.select(np.arange(test.num_tokens) < args.tokens)
    meta = test.meta
    t0 = time.perf_counter()
    res = simulate(test, train, args.slots, 1)
    end_to_end_s = time.perf_counter() - t0  # + the per-layer-step keys and the predictor's training
    requests = int(res.layers.requests.sum())
    _, bare_s = bare_lru(test.experts, args.slots)
    sim_rate, bare_rate = requests / res.wall_s, requests / bare_s
    print(f"trace: {test.num_tokens} tokens x {meta.num_layers} layers x top-{meta.top_k}, {meta.num_experts[0]} experts, {args.slots} slots/layer")
    print(f"simulator, batch 1 (LRU + transition prefetch, fixed d=1): {requests:,} expert-requests in {res.wall_s:.2f} s = {sim_rate:,.0f}/s")
    print(f"bare OrderedDict LRU loop:                                  {requests:,} expert-requests in {bare_s:.2f} s = {bare_rate:,.0f}/s")
    print(f"ratio simulator / bare loop, batch 1: {sim_rate / bare_rate:.1%}  (goal: >= 1M/s or >= 20%)")
    print(f"end to end, batch 1 (+ per-layer-step keys, training the transition table): {end_to_end_s:.2f} s = "
          f"{requests / end_to_end_s:,.0f}/s  (the rates above time the replay loop only)")
    if args.general:
        rg = simulate(test, train, args.slots, 1, fused=False)
        print(f"simulator, batch 1, general loop (sim/engine.py; fused off):  {requests:,} expert-requests in {rg.wall_s:.2f} s = "
              f"{requests / rg.wall_s:,.0f}/s  (fused loop {rg.wall_s / res.wall_s:.2f}x faster, same results: "
              f"{(rg.total_s, rg.stall_s, rg.bytes_moved) == (res.total_s, res.stall_s, res.bytes_moved)})")
    if args.simpy:
        rs = simulate(test, train, args.slots, 1, simpy_channels=True)
        print(f"simulator, batch 1, SimPy copy channels forced:            {requests:,} expert-requests in {rs.wall_s:.2f} s = "
              f"{requests / rs.wall_s:,.0f}/s")
    if args.batch > 1:
        rb = simulate(test, train, args.slots, args.batch)
        rq = int(rb.layers.requests.sum())
        print(f"simulator, batch {args.batch} (not the goal's setting; fewer layer-steps per request): {rq:,} expert-requests "
              f"in {rb.wall_s:.2f} s = {rq / rb.wall_s:,.0f}/s")


if __name__ == "__main__":
    main()
