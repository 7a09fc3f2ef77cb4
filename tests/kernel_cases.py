"""Runs for the kernels' differential tests: small traces with a model shape, every eviction policy the
kernels cover (with parameter variants), both cache scopes, batch sizes and links; built with the policies'
and the simulator's public API, so the Python implementation (the specification) and the kernel replay the
same run."""

from __future__ import annotations

import dataclasses

import numpy as np
from conftest import random_trace

from policies.base import FutureIndex
from policies.cache import ExpertCache, capacities_for, partitions_for
from policies.eviction.belady import Belady
from policies.eviction.lfru import LFRU
from policies.eviction.lfu import LFU
from policies.eviction.lru import LRU
from policies.eviction.static import Static
from policies.eviction.two_level import TwoLevel
from policies.horizons.fixed import FixedHorizon
from policies.predictors.none import NoPredictor
from policies.runtime import PolicyRuntime, RuntimeConfig, contexts
from policies.schedulers.fifo import FIFOScheduler
from replay.hardware import ComputeModel, CopyModel
from replay.prepare import step_keys

# policy family -> (class, parameters)
POLICIES = {
    "lru": (LRU, {}),
    "lfu": (LFU, {}),
    "lfu-in-cache": (LFU, {"keep_counts": False}),
    "lfru": (LFRU, {}),
    "lfru-short": (LFRU, {"half_life_steps": 0.5}),
    "static": (Static, {}),
    "static-half": (Static, {"pin_share": 0.5}),
    "belady": (Belady, {}),
    "belady-no-defer": (Belady, {"defer": False}),
    "two_level": (TwoLevel, {}),
    "two_level-lfu": (TwoLevel, {"window_steps": 0.0}),
}
# link -> (copy model, per-layer slots): a fast link (copies shorter than compute: little stall), a slow one
# (queues of demand copies, stalls), a tiny cache (a layer-step needs more experts than its partition holds:
# demands deferred until protected keys are computed and released)
LINKS = {
    "fast": (CopyModel("alpha_beta", 25e9, 1e-5), 3),
    "slow": (CopyModel("constant", 1.9e9), 3),
    "tiny": (CopyModel("alpha_beta", 12e9, 1e-5), 1),
}
COMPUTE = ComputeModel("analytic", 1024, 512, flops_per_s=32.5e12, mem_bytes_per_s=256e9)


def model_trace(tokens: int = 160, seed: int = 5, experts: int = 8, top_k: int = 2, layers: int = 4):
    """A random trace with a model's shape, so that experts take time to compute and copy."""
    tr = random_trace(tokens=tokens, layers=layers, experts=experts, top_k=top_k, sequences=4, seed=seed)
    tr.meta = dataclasses.replace(tr.meta, hidden_size=1024, intermediate_size=512, expert_bytes=3 * 1024 * 512 * 2)
    return tr


def on_demand_run(trace, policy: str, scope: str, slots: int, batch: int, steps=None):
    """(steps, uses, runtime) of an on-demand replay of ``trace`` (``slots`` per layer; in total when global) in
    ``steps`` (default: FIFO batches of ``batch``)."""
    meta = trace.meta
    steps = FIFOScheduler().plan(trace.seq_id, trace.phase, batch) if steps is None else steps
    needed, uses = step_keys(trace, steps, meta.layer_offsets)
    part = partitions_for(meta.num_experts, scope)
    cap = capacities_for(meta.num_experts, scope, slots if scope == "per_layer" else slots * meta.num_layers, None)
    popularity = np.bincount(trace.flat_ids().ravel()[::3], minlength=meta.total_experts).astype(float)
    cctx, pctx, hctx = contexts(meta.num_experts, part, cap, meta.top_k, meta.expert_bytes, batch,
                                FutureIndex(needed), train=trace, popularity=popularity)
    cls, params = POLICIES[policy]
    predictor, horizon = NoPredictor(), FixedHorizon(0)
    predictor.reset(pctx)
    horizon.reset(hctx)
    rt = PolicyRuntime(ExpertCache(cls(**params), cctx), predictor, horizon,
                       RuntimeConfig(meta.num_layers, meta.num_experts, meta.expert_bytes), trace.experts,
                       trace.token_id)
    return steps, uses, rt
