"""What a replay produces (:class:`ReplayResult`, per-layer :class:`LayerStats`) and the public ``results.json``
schema every driver reports it in (:func:`results_dict`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .trace_source import trace_name
from .window import WindowMark, windowed

# /2: run.bandwidth_gbps became run.bandwidth_GBps and run.policy names a global cache's scope (lru/global+none);
# analysis reads /1 files through :func:`upgrade_run`
RESULTS_SCHEMA = "expertflow.results/2"


@dataclass
class LayerStats:
    requests: np.ndarray  # per layer: (token, expert) uses
    hits: np.ndarray
    late_hits: np.ndarray
    misses: np.ndarray
    stall_s: np.ndarray

    @classmethod
    def zeros(cls, num_layers: int) -> LayerStats:
        return cls(*(np.zeros(num_layers, dtype=np.int64) for _ in range(4)), np.zeros(num_layers))

    def accumulator(self) -> LayerTally:
        """A faster recorder for the driver loop (plain Python lists); merge it back with :meth:`absorb`."""
        return LayerTally(len(self.requests))

    def absorb(self, tally: LayerTally) -> None:
        for arr, vals in ((self.requests, tally.requests), (self.hits, tally.hits), (self.late_hits, tally.late),
                          (self.misses, tally.misses)):
            arr += np.asarray(vals, dtype=np.int64)
        self.stall_s += np.asarray(tally.stall_s, dtype=float)

    def record(self, layer: int, plan, stall_s: float) -> int:
        """Add one layer-step's outcomes; returns its demand loads (distinct experts that missed)."""
        self.stall_s[layer] += stall_s
        counters = {"hit": self.hits, "late": self.late_hits, "miss": self.misses}
        loads = 0
        for k in plan.needed:
            u = plan.uses[k]
            self.requests[layer] += u
            counters[plan.outcome[k]][layer] += u
            loads += plan.outcome[k] == "miss"
        return loads


class LayerTally:
    """Per-layer sums in plain Python lists, which the driver loop adds to from the use counts each
    :class:`~policies.runtime.LayerPlan` carries (the sums :meth:`LayerStats.record` makes, without a loop over
    keys or numpy scalar updates); :meth:`LayerStats.absorb` merges them."""

    def __init__(self, num_layers: int):
        self.requests = [0] * num_layers
        self.hits = [0] * num_layers
        self.late = [0] * num_layers
        self.misses = [0] * num_layers
        self.stall_s = [0.0] * num_layers


@dataclass
class ReplayResult:
    total_s: float  # time of the whole replay (simulated, or measured)
    stall_s: float  # time the compute stream waited for copies
    compute_s: float  # time the compute stream was busy
    step_s: list[float]  # duration of each step
    step_phase: list[int]  # phase of each step
    step_tokens: list[int]  # tokens in each step
    bytes_moved: int  # bytes of every copy started (a started copy always completes), preload included
    copies: int  # copies started, preload included
    demand_loads: int  # distinct experts per layer-step that had to be loaded on demand (misses)
    layers: LayerStats
    wall_s: float  # host time the replay took
    events: list = field(default_factory=list)  # compute spans for the Chrome trace (if logged)
    copy_records: list | None = None
    preload_copies: int = 0  # pinned experts (static policies) loaded before the replay: counted, not timed
    mark: WindowMark | None = None  # the totals when the measured window began (replay/window.py)


# the figures results.json also keeps for the whole replay, warm-up included, under ``whole_run``
WHOLE_RUN_KEYS = ("stall_s", "total_s", "tpot_s", "tpot_p50_s", "tpot_p90_s", "ttft_s", "tokens_per_s", "hit_rate",
                  "late_hit_rate", "miss_rate", "prefetch_precision", "prefetch_recall", "prefetch_issued",
                  "wasted_bytes", "bytes_moved", "copies", "expert_requests", "allresident_total_s", "steps",
                  "tokens", "request_tpot_s", "distinct_experts_per_layer_step")


def results_dict(p, res: ReplayResult, expert_bytes: int, driver: str) -> dict:
    """The metrics every driver reports (the public results.json schema), from a prepared run ``p``
    (:class:`~replay.prepare.Prepared`) and its replay's result: the measured window (after the warm-up,
    :mod:`replay.window`) at the top level, the whole replay under ``whole_run``."""
    stats = p.runtime.cache.stats
    win_res, win_stats = windowed(res, stats, res.mark)
    first = res.mark.step if res.mark is not None else 0
    out = _metrics(p, win_res, win_stats, expert_bytes, first)
    whole = _metrics(p, res, stats, expert_bytes, 0)
    info = run_info(p.cfg, p.meta, p.capacity, p.scope, p.copy_model)
    info.update(driver=driver, expert_bytes=expert_bytes)
    out.update({
        "schema": RESULTS_SCHEMA,
        "run": info,
        "warmup_tokens": p.warmup_tokens,  # replayed first, not counted in the top-level figures
        "warmup_steps": first,
        "whole_run": {k: whole[k] for k in WHOLE_RUN_KEYS},
        "preload_bytes": res.preload_copies * expert_bytes,  # of whole_run.bytes_moved: pinned experts loaded first
        "fast_memory_bytes": int(sum(p.capacity)) * expert_bytes,  # expert slots in fast memory
        "all_experts_bytes": int(p.meta.total_experts) * expert_bytes,  # what holding every expert would take
        "scheduler_wall_s": p.plan_wall_s,
        # policy-specific counters (e.g. the expertflow cache's mispredictions); {} for most policies
        "policy_stats": dict(p.runtime.cache.policy.policy_stats()),
        # the prefetch distance over the run, run-length encoded: [layer-step, distance] at every change, then
        # [layer-steps replayed, last distance] (null on demand: nothing is predicted)
        "horizon_trajectory": trajectory(p.runtime.horizon_trajectory, len(p.steps) * p.meta.num_layers)
        if not p.runtime.silent else None,
    })
    return out


def _metrics(p, res: ReplayResult, st, expert_bytes: int, first_step: int) -> dict:
    """The figures of ``res`` and the cache counters ``st`` over the steps from ``first_step`` on."""
    from traces.schema import PHASE_DECODE, PHASE_PREFILL

    requests = int(res.layers.requests.sum())
    decode = [s for s, ph in zip(res.step_s, res.step_phase) if ph == PHASE_DECODE]
    prefill = [s for s, ph in zip(res.step_s, res.step_phase) if ph == PHASE_PREFILL]
    decode_tokens = sum(n for n, ph in zip(res.step_tokens, res.step_phase) if ph == PHASE_DECODE)
    L = p.meta.num_layers
    return {
        "stall_s": res.stall_s,
        "total_s": res.total_s,
        "tpot_s": float(np.mean(decode)) if decode else None,
        "tpot_p50_s": float(np.percentile(decode, 50)) if decode else None,
        "tpot_p90_s": float(np.percentile(decode, 90)) if decode else None,
        "ttft_s": float(np.mean(prefill)) if prefill else None,
        "tokens_per_s": decode_tokens / res.total_s if res.total_s > 0 else None,
        "hit_rate": st.hits / requests if requests else None,
        "late_hit_rate": st.late_hits / requests if requests else None,
        "miss_rate": st.misses / requests if requests else None,
        "prefetch_precision": st.prefetch_used / st.prefetch_inserts if st.prefetch_inserts > 0 else None,
        "prefetch_recall": (
            st.prefetch_used / (st.prefetch_used + res.demand_loads) if st.prefetch_inserts > 0 else None
        ),
        "prefetch_issued": st.prefetch_inserts,
        "wasted_bytes": st.prefetch_wasted * expert_bytes,
        "bytes_moved": res.bytes_moved,
        "copies": res.copies,
        "expert_requests": requests,
        "allresident_total_s": res.compute_s,
        "steps": len(res.step_s),
        "distinct_experts_per_layer_step": float(np.mean(p.stream.distinct()[first_step * L:])),
        "request_tpot_s": request_tpot(p.steps[first_step:], res.step_s),
        "tokens": int(sum(res.step_tokens)),
    }


def trajectory(changes: list[tuple[int, int]], end: int) -> list[list[int]]:
    """The horizon's (layer-step, distance) changes, closed with (``end``, the last distance)."""
    out = [[int(t), int(d)] for t, d in changes]
    return out + [[int(end), out[-1][1]]] if out else out


def request_tpot(steps, step_s: list[float]) -> float | None:
    """Mean over sequences of the time between their consecutive decode tokens (what a user waits per token)."""
    from traces.schema import PHASE_DECODE

    ends = np.cumsum(step_s)
    times: dict[int, list[float]] = {}
    for st, end in zip(steps, ends):
        if st.phase == PHASE_DECODE:
            for s in st.sequences.tolist():
                times.setdefault(s, []).append(float(end))
    gaps = [np.mean(np.diff(v)) for v in times.values() if len(v) > 1]
    return float(np.mean(gaps)) if gaps else None


def policy_label(cache: str, scope: str | None, predictor: str, horizon: str, distance) -> str:
    """The policy as results, tables and plots name it: ``cache[/global]+predictor[+horizon[distance]]``, e.g.
    ``lru+none``, ``lru/global+none``, ``lru+transition+fixed1``, ``expertflow/global+transition+fixed2``. A
    cache shared by all layers says so, since it behaves unlike the same policy per layer."""
    label = f"{cache}{'/global' if scope == 'global' else ''}+{predictor}"
    if predictor != "none":
        label += f"+{horizon}{distance if horizon == 'fixed' else ''}"
    return label


def upgrade_run(run: dict) -> dict:
    """A ``run`` object of a results.json in the current schema's keys (older files: ``bandwidth_gbps`` is
    ``bandwidth_GBps``; a global cache's ``policy`` label gains its scope). Returns a new dict."""
    run = dict(run)
    if "bandwidth_gbps" in run and "bandwidth_GBps" not in run:
        run["bandwidth_GBps"] = run.pop("bandwidth_gbps")
    policy, cache = run.get("policy"), run.get("cache")
    if (run.get("scope") == "global" and isinstance(policy, str) and isinstance(cache, str)
            and policy.startswith(f"{cache}+")):
        run["policy"] = f"{cache}/global{policy[len(cache):]}"
    return run


def run_info(cfg, meta, capacity: list[int], scope: str, copy_model) -> dict:
    slots_per_layer = float(np.mean(capacity)) if scope == "per_layer" else capacity[0] / meta.num_layers
    hname = str(cfg.horizon.name)
    dist = cfg.horizon.get("distance")
    policy = policy_label(str(cfg.cache.name), scope, str(cfg.predictor.name), hname, dist)
    return {
        "driver": "sim",
        "trace": str(cfg.trace.get("path") or ""),
        "trace_name": trace_name(cfg.trace),
        "trace_source": meta.source,  # what the routing is (e.g. a synthetic preset: whose statistics it matches)
        "model": meta.model,
        "cache": str(cfg.cache.name),
        "predictor": str(cfg.predictor.name),
        "horizon": hname,
        "horizon_distance": dist,
        "scheduler": str(cfg.scheduler.name),
        "policy": policy,
        "hardware": str(cfg.hardware.name),
        "bandwidth_GBps": copy_model.bandwidth_bytes_per_s / 1e9,
        "copy_model": copy_model.kind,
        "scope": scope,
        "capacity_slots_per_layer": slots_per_layer,
        "capacity_fraction": sum(capacity) / meta.total_experts if scope == "global" else slots_per_layer / float(np.mean(meta.num_experts)),
        "expert_bytes": meta.expert_bytes,
        "num_layers": int(meta.num_layers),
        "batch_size": int(cfg.batch_size),
        "seed": int(cfg.seed),
    }
