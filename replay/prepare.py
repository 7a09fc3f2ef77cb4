"""A configured run made ready to replay, for either driver: validate the config, load and split the trace, plan
the steps, key every layer-step, build the policies, the runtime and the hardware models (:func:`prepare`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from policies.cache import ExpertCache, capacities_for, partitions_for
from policies.clairvoyant import ClairvoyantLoads
from policies.future import FutureIndex, StepStream, step_keys
from policies.ondemand import ondemand_loads
from policies.runtime import PolicyRuntime, RuntimeConfig, contexts
from traces import Trace, TraceError, split_by_sequence

from .config_keys import normalise
from .errors import RunConfigError
from .hardware import build_models
from .trace_source import resolve_trace
from .window import warmup_steps


def instantiate(node, what: str):
    """Instantiate ``node.policy`` with hydra, turning failures into a clear configuration error."""
    from hydra.utils import instantiate as hy_instantiate

    try:
        return hy_instantiate(node["policy"])
    except Exception as exc:
        raise RunConfigError(f"{what}.policy: cannot instantiate {node['policy'].get('_target_')!r}: {exc}") from exc


@dataclass
class Prepared:
    """Everything a driver (simulator or executor) needs for one configured run."""

    cfg: object
    meta: object  # traces.TraceMeta of the replayed trace
    train: Trace
    test: Trace
    steps: list
    uses: Sequence[dict[int, int]]  # per layer-step: key -> tokens using it
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
    warmup_tokens: int = 0  # tokens replayed first but not counted (replay/window.py)
    warmup_steps: int = 0  # the steps they fill: the measured window starts at this step
    stream: StepStream | None = None  # the keys and use counts of every layer-step as arrays (``uses`` reads them)

    @property
    def copy_bytes(self) -> int:
        """Bytes of one expert copy: the trace's, or the scaled size a measured profile was taken at."""
        return self.copy_model.expert_bytes or self.meta.expert_bytes


def prepare(cfg) -> Prepared:
    """Validate the config (its old keys mapped: :func:`~replay.config_keys.normalise`), load the trace, build the
    policies and models. Raises before any replay work."""
    normalise(cfg)
    if int(cfg.batch_size) < 1:
        raise RunConfigError(f"batch_size: expected >= 1, got {cfg.batch_size}")
    check_replay_span(cfg.get("max_tokens"), cfg.split.test_fraction)
    traces_dir = cfg.paths.traces_dir
    if not traces_dir:
        raise RunConfigError(f"paths.traces_dir: expected a folder for the generated and imported traces, got {traces_dir!r}")
    full = resolve_trace(cfg.trace, traces_dir)
    meta = full.meta
    copy_model, compute = build_models(_plain(cfg.hardware), meta)
    scope = str(cfg.cache.get("scope", "per_layer"))
    partition_of = partitions_for(meta.num_experts, scope)
    capacity = capacities_for(meta.num_experts, scope, cfg.cache.get("slots"), cfg.cache.get("fraction"))
    frac = cfg.split.test_fraction
    if cfg.trace.get("train_path"):  # a separate training split (e.g. the reference model's): replay all of path
        train, test = resolve_trace({"path": cfg.trace.train_path, "name": "train"}, traces_dir), full
    else:
        train, test = split_by_sequence(full, float(frac), seed=int(cfg.seed)) if frac is not None else (full, full)
    if cfg.get("max_tokens") is not None:
        test = test.select(np.arange(test.num_tokens) < int(cfg.max_tokens))
    if test.num_tokens == 0:
        raise TraceError(f"{cfg.trace.get('path') or cfg.trace.name}: no tokens to replay after the split")

    eviction = instantiate(cfg.cache, "cache")
    predictor = instantiate(cfg.predictor, "predictor")
    horizon = instantiate(cfg.horizon, "horizon")
    scheduler = instantiate(cfg.scheduler, "scheduler")
    routes = None
    if scheduler.needs_routes:
        routes = predicted_routes(test, str(cfg.scheduler.policy.get("route_source", "last_token")))
    t_plan = time.perf_counter()
    steps = scheduler.plan(test.seq_id, test.phase, int(cfg.batch_size), routes)
    plan_wall_s = time.perf_counter() - t_plan
    warm_tokens, warm_steps = warmup_steps(steps, cfg.get("warmup_tokens"))
    stream = step_stream(test, steps, meta.layer_offsets, meta.total_experts)
    uses, future = stream.uses, stream.future()
    popularity = np.bincount(train.flat_ids().ravel(), minlength=meta.total_experts).astype(float)
    cctx, pctx, hctx = contexts(
        meta.num_experts, partition_of, capacity, meta.top_k, meta.expert_bytes, int(cfg.batch_size), future,
        train=train, popularity=popularity, model_path=meta.model_path,
    )
    pf = cfg.prefetch
    rcfg = RuntimeConfig(
        meta.num_layers, meta.num_experts, meta.expert_bytes,
        min_score=float(cfg.prefetch.min_score), max_per_layer=cfg.prefetch.max_per_layer,
        admission=bool(pf.admission), link_budget=bool(pf.link_budget), speculative_below=float(pf.speculative_below),
        admission_margin=float(pf.admission_margin),
    )
    predictor.reset(pctx)
    horizon.reset(hctx)
    hidden = test.hidden_states() if predictor.needs_hidden else None
    runtime = PolicyRuntime(ExpertCache(eviction, cctx), predictor, horizon, rcfg, test.experts, test.token_id, hidden,
                            test.seq_id, future=future)
    if runtime.clairvoyant and rcfg.admission:  # perfect foresight of the eviction policy's own loads
        loads = ondemand_loads(instantiate(cfg.cache, "cache"), cctx, rcfg, test.experts, test.token_id, steps)
        runtime.use_loads(ClairvoyantLoads(loads, future))
    return Prepared(cfg, meta, train, test, steps, uses, future, scope, partition_of, capacity, cctx, rcfg,
                    runtime, copy_model, compute, plan_wall_s, warm_tokens, warm_steps, stream)


def step_stream(trace: Trace, steps: list, offsets, num_keys: int) -> StepStream:
    """The replay's per-layer-step keys and use counts (:func:`policies.future.step_keys`' lists): by the
    compiled keys kernel when numba is there (its dicts are then built only where a Python loop reads them; pinned
    equal by ``tests/test_kernel_keys.py``), else by ``step_keys``."""
    import replay_kernels

    if replay_kernels.available():
        from replay_kernels.keys import layer_step_keys, steps_csr

        return StepStream(*layer_step_keys(trace.experts, offsets, *steps_csr(steps), int(num_keys)))
    return StepStream.from_lists(*step_keys(trace, steps, offsets))


def check_replay_span(max_tokens, test_fraction) -> None:
    """``max_tokens`` (null: all) and ``split.test_fraction`` (null: replay every sequence and fit on them too),
    refused when they would silently mean something else (0 used to mean "all")."""
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise RunConfigError(f"max_tokens: expected an integer >= 1 (or null: replay every token), got {max_tokens!r}")
    if test_fraction is not None and (isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float))
                                      or not 0 < test_fraction < 1):
        raise RunConfigError(f"split.test_fraction: expected a share of the sequences in (0, 1), or null to replay every "
                             f"sequence and fit learned policies on them too, got {test_fraction!r}")


def predicted_routes(trace: Trace, source: str) -> np.ndarray:
    """Routes a scheduler may plan with: the true ones (``oracle``), or each token's predecessor's in its
    sequence (``last_token``; -1 for a sequence's first token)."""
    if source == "oracle":
        return trace.experts.astype(np.int64)
    routes = np.full(trace.experts.shape, -1, dtype=np.int64)
    same = trace.seq_id[1:] == trace.seq_id[:-1]
    routes[1:][same] = trace.experts[:-1][same]
    return routes


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node
