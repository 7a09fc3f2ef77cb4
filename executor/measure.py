"""Measurements both hardware profiles take (``executor/profile.py`` for the CPU tier, ``executor/cuda_profile.py``
for a GPU): the copy-time fit and the compute tables as a replay pays them."""

from __future__ import annotations

import statistics
import time

import numpy as np

from .compute import LayerCompute

TOKENS = [1, 2, 4, 8, 16, 32, 64]


def fit_alpha_beta(nbytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least-squares latency (s) and bandwidth (bytes/s) of ``seconds = latency + bytes / bandwidth``."""
    x, y = np.asarray(nbytes, float), np.asarray(seconds, float)
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0:
        raise ValueError("copy times do not grow with size: cannot fit a bandwidth")
    return max(float(intercept), 0.0), float(1.0 / slope)


def rotating(compute: LayerCompute, tokens: int, n_slots: int):
    """A callable running one expert on ``tokens`` tokens, from the next slot each call."""
    state = {"slot": 0}

    def run() -> None:
        state["slot"] = (state["slot"] + 1) % n_slots
        compute.run_expert(state["slot"], tokens)

    return run


def measure_isolated(compute, repeats: int, n_slots: int) -> dict:
    """Median of each call alone, repeated (the dense weights stay in the CPU cache): a lower bound."""
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
        "expert_tokens": TOKENS, "expert_s": [med(rotating(compute, n, n_slots)) for n in TOKENS],
    }


def layer_loop(compute, tokens: int, experts: int, layers: int, n_slots: int, rng) -> tuple[float, float]:
    """Mean seconds of the dense part and of one expert in an all-resident replay-like loop: per layer the
    dense part, then ``experts`` experts from random slots."""
    dense = expert = 0.0
    clock = time.perf_counter
    for _ in range(layers):
        t0 = clock()
        compute.run_dense(tokens)
        t1 = clock()
        dense += t1 - t0
        for slot in rng.integers(0, n_slots, experts).tolist():
            compute.run_expert(slot, tokens)
        expert += clock() - t1
    return dense / layers, expert / (layers * experts)


def measure_compute(compute, repeats: int, n_slots: int, experts_per_layer: int = 6) -> dict:
    """Dense and expert seconds vs tokens as a replay pays them (means inside :func:`layer_loop`), plus the
    isolated medians under ``isolated``."""
    rng = np.random.default_rng(0)
    layer_loop(compute, 1, experts_per_layer, 5, n_slots, rng)  # warm-up
    layers = max(40, 4 * repeats)
    dense, expert = [], []
    for n in TOKENS:
        d, e = layer_loop(compute, n, experts_per_layer, layers, n_slots, rng)
        dense.append(d)
        expert.append(e)
    return {"dense_tokens": TOKENS, "dense_s": dense, "expert_tokens": TOKENS, "expert_s": expert,
            "experts_per_layer": experts_per_layer, "isolated": measure_isolated(compute, repeats, n_slots)}
