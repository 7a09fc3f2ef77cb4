"""One simulator run from a composed config: load the trace, build policies and hardware, replay, bound,
write ``results.json`` (+ ``per_layer.parquet``, optional ``chrome_trace.json``) atomically."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from policies.base import FutureIndex, steps_by_size
from policies.cache import ExpertCache, capacities_for, partitions_for
from policies.runtime import PolicyRuntime, RuntimeConfig, contexts
from traces import Trace, TraceError, split_by_sequence

from .bounds import ondemand_replay, oracle_stall
from .engine import ReplayResult, gc_paused, replay
from .hardware import build_models
from .outputs import write_outputs
from .trace_source import resolve_trace, trace_name

RESULTS_SCHEMA = "expertflow.results/1"


class SimConfigError(ValueError):
    """A configuration value the simulator cannot run with; raised before any replay work."""


def instantiate(node, what: str):
    """Instantiate ``node.policy`` with hydra, turning failures into a clear configuration error."""
    from hydra.utils import instantiate as hy_instantiate

    try:
        return hy_instantiate(node["policy"])
    except Exception as exc:
        raise SimConfigError(f"{what}.policy: cannot instantiate {node['policy'].get('_target_')!r}: {exc}") from exc


def step_keys(trace: Trace, steps, offsets: np.ndarray) -> tuple[list[np.ndarray], list[dict[int, int]]]:
    """Per layer-step of the replay: the distinct keys (first-seen order) and their use counts.

    Steps with the same number of tokens are keyed in one numpy call. When each row's keys are distinct
    (one token per step: a token's top-k experts are distinct), the use counts are ``dict.fromkeys(row, 1)``
    and the distinct keys are the row itself (a view), so nothing runs per key in Python; other rows count
    their keys one by one."""
    with gc_paused():  # hundreds of thousands of small lists and dicts
        return _step_keys(trace, steps, offsets)


def _step_keys(trace: Trace, steps, offsets: np.ndarray) -> tuple[list[np.ndarray], list[dict[int, int]]]:
    L = trace.meta.num_layers
    K = trace.experts.shape[2]
    needed: list = [None] * (len(steps) * L)
    uses: list = [None] * (len(steps) * L)
    off = np.asarray(offsets, dtype=np.int64)[:L]
    for ntok, idx, tokens in steps_by_size(steps):
        # [steps, L, ntok * K]: per layer, token by token, each token's experts in trace order
        keys = trace.experts[tokens].astype(np.int64).transpose(0, 2, 1, 3).reshape(len(idx), L, ntok * K)
        rows = (keys + off[None, :, None]).reshape(len(idx) * L, ntok * K)
        rows.flags.writeable = False  # its rows are handed out as views
        srt = np.sort(rows, axis=1)
        distinct = (srt[:, 1:] != srt[:, :-1]).all(axis=1) if rows.shape[1] > 1 else np.ones(len(rows), bool)
        pos = (np.asarray(idx, dtype=np.int64)[:, None] * L + np.arange(L)).ravel().tolist()
        lists = rows.tolist()
        if distinct.all():  # the common case, in C: one dict and one view per row
            for p, u, view in zip(pos, map(dict.fromkeys, lists, repeat(1)), rows):
                uses[p] = u
                needed[p] = view
            continue
        for p, row, once, view in zip(pos, lists, distinct.tolist(), rows):
            if once:
                uses[p] = dict.fromkeys(row, 1)
                needed[p] = view
            else:
                u: dict[int, int] = {}
                for k in row:
                    u[k] = u.get(k, 0) + 1
                uses[p] = u
                needed[p] = np.fromiter(u.keys(), dtype=np.int64, count=len(u))
    return needed, uses


def load_run_trace(cfg) -> Trace:
    return resolve_trace(cfg.trace)


@dataclass
class Prepared:
    """Everything a driver (simulator or executor) needs for one configured run."""

    cfg: object
    meta: object  # traces.TraceMeta of the replayed trace
    train: Trace
    test: Trace
    steps: list
    uses: list[dict[int, int]]  # per layer-step: key -> tokens using it
    future: FutureIndex
    scope: str
    partition_of: np.ndarray
    capacity: list[int]
    cctx: object
    rcfg: RuntimeConfig
    runtime: PolicyRuntime
    copy_model: object
    compute: object
    plan_wall_s: float

    @property
    def copy_bytes(self) -> int:
        """Bytes of one expert copy: the trace's, or the scaled size a measured profile was taken at."""
        return self.copy_model.expert_bytes or self.meta.expert_bytes


def prepare(cfg) -> Prepared:
    """Validate the config, load the trace, build the policies and models. Raises before any replay work."""
    if int(cfg.batch_size) < 1:
        raise SimConfigError(f"batch_size: expected >= 1, got {cfg.batch_size}")
    full = load_run_trace(cfg)
    meta = full.meta
    copy_model, compute = build_models(_plain(cfg.hardware), meta)
    scope = str(cfg.cache.get("scope", "per_layer"))
    partition_of = partitions_for(meta.num_experts, scope)
    capacity = capacities_for(meta.num_experts, scope, cfg.cache.get("slots"), cfg.cache.get("fraction"))
    frac = cfg.split.test_fraction
    if cfg.trace.get("train_path"):  # a separate training split (e.g. the reference model's): replay all of path
        train, test = resolve_trace({"path": cfg.trace.train_path, "name": "train"}), full
    else:
        train, test = split_by_sequence(full, float(frac), seed=int(cfg.seed)) if frac else (full, full)
    if cfg.get("max_tokens"):
        test = test.select(np.arange(test.num_tokens) < int(cfg.max_tokens))
    if test.num_tokens == 0:
        raise TraceError(f"{cfg.trace.get('path') or cfg.trace.name}: no tokens to replay after the split")

    eviction = instantiate(cfg.cache, "cache")
    predictor = instantiate(cfg.predictor, "predictor")
    horizon = instantiate(cfg.horizon, "horizon")
    scheduler = instantiate(cfg.scheduler, "scheduler")
    routes = None
    if getattr(scheduler, "needs_routes", False):
        routes = predicted_routes(test, str(cfg.scheduler.policy.get("route_source", "last_token")))
    t_plan = time.perf_counter()
    steps = scheduler.plan(test.seq_id, test.phase, int(cfg.batch_size), routes)
    plan_wall_s = time.perf_counter() - t_plan
    needed, uses = step_keys(test, steps, meta.layer_offsets)
    future = FutureIndex(needed)
    popularity = np.bincount(train.flat_ids().ravel(), minlength=meta.total_experts).astype(float)
    cctx, pctx, hctx = contexts(
        meta.num_experts, partition_of, capacity, meta.top_k, meta.expert_bytes, int(cfg.batch_size), future,
        train=train, popularity=popularity, model_path=meta.model_path,
    )
    rcfg = RuntimeConfig(
        meta.num_layers, meta.num_experts, meta.expert_bytes,
        min_score=float(cfg.predictor.get("min_score", 0.05)), max_per_layer=cfg.predictor.get("max_per_layer"),
    )
    predictor.reset(pctx)
    horizon.reset(hctx)
    hidden = test.hidden_states() if getattr(predictor, "needs_hidden", False) else None
    runtime = PolicyRuntime(ExpertCache(eviction, cctx), predictor, horizon, rcfg, test.experts, test.token_id, hidden,
                            test.seq_id)
    return Prepared(cfg, meta, train, test, steps, uses, future, scope, partition_of, capacity, cctx, rcfg,
                    runtime, copy_model, compute, plan_wall_s)


def bounds(p: Prepared) -> dict:
    """Belady's MIN and the perfect-foresight oracle on the same access stream, capacity and models; shared
    by the runs of a sweep through ``bounds.cache_dir`` (see :mod:`sim.bounds_cache`)."""
    from .bounds_cache import cached_bounds
    from .trace_source import project_path

    cache_dir = (p.cfg.get("bounds") or {}).get("cache_dir")
    return cached_bounds(p, lambda: compute_bounds(p), project_path(str(cache_dir)) if cache_dir else None)


def min_replay(p: Prepared) -> tuple[float, ExpertCache, list[list[int]]]:
    """Belady's MIN, on demand, at the run's capacity (timing-free): its hit rate, its cache (``stats.inserts``
    are the loads MIN needs; ``load_log`` lists them) and each layer-step's compute order."""
    from policies.eviction.belady import Belady
    from policies.horizons.fixed import FixedHorizon
    from policies.predictors.none import NoPredictor

    b_cache = ExpertCache(Belady(), p.cctx)
    b_rt = PolicyRuntime(b_cache, NoPredictor(), FixedHorizon(0), p.rcfg, p.test.experts, p.test.token_id)
    b_cache.load_log = []
    orders: list[list[int]] = []
    hits, requests = ondemand_replay(p.steps, b_rt, orders)
    return hits / requests, b_cache, orders


def compute_bounds(p: Prepared) -> dict:
    """:func:`bounds`, always computed."""
    meta = p.meta
    b_rate, b_cache, min_orders = min_replay(p)
    args = (p.steps, p.future, p.uses, p.partition_of, p.capacity, p.copy_model, p.compute, p.copy_bytes,
            meta.num_layers)
    o_aggr = oracle_stall(*args, schedule="aggressive")
    o_cons = oracle_stall(*args, schedule="conservative", min_loads=b_cache.load_log, orders=min_orders)
    return {
        "belady_hit_rate": b_rate,
        "belady_misses_unique": b_cache.stats.inserts,  # expert loads MIN needs at this capacity
        "oracle_stall_s": min(o_aggr, o_cons),
        "oracle_aggressive_stall_s": o_aggr,
        "oracle_conservative_stall_s": o_cons,
    }


def results_dict(p: Prepared, res: ReplayResult, expert_bytes: int, driver: str) -> dict:
    """The metrics every driver reports (the public results.json schema), from a replay's result."""
    from traces.schema import PHASE_DECODE, PHASE_PREFILL

    st = p.runtime.cache.stats
    requests = int(res.layers.requests.sum())
    decode = [s for s, ph in zip(res.step_s, res.step_phase) if ph == PHASE_DECODE]
    prefill = [s for s, ph in zip(res.step_s, res.step_phase) if ph == PHASE_PREFILL]
    decode_tokens = sum(n for n, ph in zip(res.step_tokens, res.step_phase) if ph == PHASE_DECODE)
    info = run_info(p.cfg, p.meta, p.capacity, p.scope, p.copy_model)
    info.update(driver=driver, expert_bytes=expert_bytes)
    return {
        "schema": RESULTS_SCHEMA,
        "run": info,
        "stall_s": res.stall_s,
        "total_s": res.total_s,
        "tpot_s": float(np.mean(decode)) if decode else None,
        "tpot_p50_s": float(np.percentile(decode, 50)) if decode else None,
        "tpot_p90_s": float(np.percentile(decode, 90)) if decode else None,
        "ttft_s": float(np.mean(prefill)) if prefill else None,
        "tokens_per_s": decode_tokens / res.total_s if res.total_s > 0 else None,
        "hit_rate": st.hits / requests,
        "late_hit_rate": st.late_hits / requests,
        "miss_rate": st.misses / requests,
        "prefetch_precision": st.prefetch_used / st.prefetch_inserts if st.prefetch_inserts else None,
        "prefetch_recall": (
            st.prefetch_used / (st.prefetch_used + res.demand_loads) if st.prefetch_inserts else None
        ),
        "prefetch_issued": st.prefetch_inserts,
        "wasted_bytes": st.prefetch_wasted * expert_bytes,
        "bytes_moved": res.bytes_moved,
        "preload_bytes": res.preload_copies * expert_bytes,  # of bytes_moved: pinned experts loaded before the run
        "copies": res.copies,
        "expert_requests": requests,
        "allresident_total_s": res.compute_s,
        "fast_memory_bytes": int(sum(p.capacity)) * expert_bytes,  # expert slots in fast memory
        "all_experts_bytes": int(p.meta.total_experts) * expert_bytes,  # what holding every expert would take
        "steps": len(p.steps),
        "distinct_experts_per_layer_step": float(np.mean([len(u) for u in p.uses])),
        "request_tpot_s": request_tpot(p.steps, res.step_s),
        "scheduler_wall_s": p.plan_wall_s,
        "tokens": int(sum(res.step_tokens)),
        # policy-specific counters (e.g. the expertflow cache's mispredictions); {} for most policies
        "policy_stats": dict(getattr(p.runtime.cache.policy, "policy_stats", dict)()),
    }


def simulate(cfg, out_dir: Path) -> dict:
    """Run one configuration in the simulator; returns the results dict (also written to ``out_dir``)."""
    wall0 = time.perf_counter()
    p = prepare(cfg)
    log = bool(cfg.output.get("chrome_trace", False))
    res = replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers, log=log, uses=p.uses)
    results = results_dict(p, res, p.copy_bytes, "sim")
    results.update(bounds(p))
    results["sim_wall_s"] = time.perf_counter() - wall0
    write_outputs(out_dir, results, res, p.meta.num_layers, log)
    return results


def predicted_routes(trace: Trace, source: str) -> np.ndarray:
    """Routes a scheduler may plan with: the true ones (``oracle``), or each token's predecessor's in its
    sequence (``last_token``; -1 for a sequence's first token)."""
    if source == "oracle":
        return trace.experts.astype(np.int64)
    routes = np.full(trace.experts.shape, -1, dtype=np.int64)
    same = trace.seq_id[1:] == trace.seq_id[:-1]
    routes[1:][same] = trace.experts[:-1][same]
    return routes


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


def run_info(cfg, meta, capacity: list[int], scope: str, copy_model) -> dict:
    slots_per_layer = float(np.mean(capacity)) if scope == "per_layer" else capacity[0] / meta.num_layers
    hname = str(cfg.horizon.name)
    dist = cfg.horizon.get("distance")
    policy = f"{cfg.cache.name}+{cfg.predictor.name}"
    if str(cfg.predictor.name) != "none":
        policy += f"+{hname}{dist if hname == 'fixed' else ''}"
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
        "bandwidth_gbps": copy_model.bandwidth_bytes_per_s / 1e9,
        "copy_model": copy_model.kind,
        "scope": scope,
        "capacity_slots_per_layer": slots_per_layer,
        "capacity_fraction": sum(capacity) / meta.total_experts if scope == "global" else slots_per_layer / float(np.mean(meta.num_experts)),
        "expert_bytes": meta.expert_bytes,
        "batch_size": int(cfg.batch_size),
        "seed": int(cfg.seed),
    }


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node


def dump_json(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
