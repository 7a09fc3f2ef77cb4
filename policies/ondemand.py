"""On-demand replay without time: the shared runtime driven layer-step by layer-step with every copy landing at
once (no prefetch). Timing never changes an on-demand cache's decisions (each demand copy lands within its
layer-step, before the next one looks), so this gives the hits the timed drivers get, faster. With the Belady
policy it is MIN at the run's capacity (``replay.bounds``); ``traces stats`` draws its hit-rate curves with it."""

from __future__ import annotations

from .base import CacheContext, EvictionPolicy, Step
from .cache import ExpertCache
from .horizons.fixed import FixedHorizon
from .predictors.none import NoPredictor
from .runtime import PolicyRuntime, RuntimeConfig


def ondemand_replay(steps: list[Step], runtime: PolicyRuntime, orders: list | None = None,
                    layer_hits: list[int] | None = None, uses: list[dict[int, int]] | None = None,
                    count_from: int = 0) -> tuple[int, int]:
    """Replay ``steps`` on demand; returns (hits, requests) of the steps from ``count_from`` on, requests counted
    as (token, expert) uses. The runtime's predictor must never predict (or its horizon be 0). If ``orders`` is a
    list, the compute order of every layer-step is appended to it; ``layer_hits`` (one int per layer) gets each
    layer's hits added (all steps); ``uses[i]`` (key -> tokens at layer-step i) may be precomputed. As in the
    driver loop, a computed key is released only while demands are deferred (else releasing only unprotects it,
    which nothing reads before the next layer-step)."""
    L = runtime.cfg.num_layers
    max_ls = len(steps) * L - 1
    cache = runtime.cache
    complete, deferred, begin_layer, release = cache.complete, runtime.deferred, runtime.begin_layer, runtime.release
    st = cache.stats
    base = (0, 0)
    for si, step in enumerate(steps):
        if si == count_from:
            base = (st.hits, st.hits + st.misses + st.late_hits)
        tokens = step.tokens
        for layer in range(L):
            plan = begin_layer(si, layer, tokens, max_ls, uses[si * L + layer] if uses else None)
            for k in plan.demand:
                complete(k)
            if orders is not None:
                orders.append(plan.order)
            if layer_hits is not None:
                layer_hits[layer] += plan.use_counts[0]
            if deferred:
                for k in plan.order:
                    for s in release(k):
                        complete(s)
    return st.hits - base[0], st.hits + st.misses + st.late_hits - base[1]


def ondemand_loads(policy: EvictionPolicy, ctx: CacheContext, cfg: RuntimeConfig, experts, token_ids,
                   steps: list[Step]) -> list[tuple[int, int, int | None]]:
    """The loads ``policy`` (a fresh instance) makes on demand over ``steps``, in order: (layer-step, key, victim
    or None). What :class:`policies.clairvoyant.ClairvoyantLoads` plans a perfect-foresight run with."""
    cache = ExpertCache(policy, ctx)
    cache.load_log = []
    ondemand_replay(steps, PolicyRuntime(cache, NoPredictor(), FixedHorizon(0), cfg, experts, token_ids))
    return cache.load_log
