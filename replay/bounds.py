"""The bounds every run is compared with, on the run's own access stream, capacity and models: Belady's MIN
(an on-demand replay with the Belady policy: its hit rate and the loads it needs) and the perfect-foresight
prefetch schedules of :mod:`replay.oracle`. A sweep's runs share them through :mod:`replay.bounds_cache`."""

from __future__ import annotations

from collections.abc import Callable

from policies.cache import ExpertCache
from policies.ondemand import ondemand_replay
from policies.runtime import PolicyRuntime

from .oracle import oracle_stall
from .prepare import Prepared


def bounds(p: Prepared, compute: Callable[[], dict] | None = None) -> dict:
    """Belady's MIN and the perfect-foresight oracle on the same access stream, capacity and models; shared
    by the runs of a sweep through ``paths.bounds_dir`` (see :mod:`replay.bounds_cache`). ``compute``: what
    computes them when the cache does not hold them (default :func:`compute_bounds`; the simulator passes the
    compiled one where it applies: the same numbers)."""
    from .bounds_cache import cached_bounds
    from .trace_source import project_path

    cache_dir = p.cfg.paths.bounds_dir
    return cached_bounds(p, compute or (lambda: compute_bounds(p)),
                         project_path(str(cache_dir)) if cache_dir else None)


def min_replay(p: Prepared) -> tuple[tuple[float, float], ExpertCache, list[list[int]]]:
    """Belady's MIN, on demand, at the run's capacity (timing-free): its hit rate (over the measured window, and
    over the whole replay), its cache (``stats.inserts`` are the loads MIN needs; ``load_log`` lists them) and
    each layer-step's compute order."""
    from policies.eviction.belady import Belady
    from policies.horizons.fixed import FixedHorizon
    from policies.predictors.none import NoPredictor

    b_cache = ExpertCache(Belady(), p.cctx)
    b_rt = PolicyRuntime(b_cache, NoPredictor(), FixedHorizon(0), p.rcfg, p.test.experts, p.test.token_id)
    b_cache.load_log = []
    orders: list[list[int]] = []
    hits, requests = ondemand_replay(p.steps, b_rt, orders, count_from=p.warmup_steps)
    st = b_cache.stats
    return (hits / requests, st.hits / (st.hits + st.misses + st.late_hits)), b_cache, orders


def belady_bounds(p: Prepared) -> dict:
    """The time-free half of :func:`bounds`: MIN's hit rate and loads at the run's capacity."""
    rates, cache, _ = min_replay(p)
    return _belady(p, rates, cache)


def _belady(p: Prepared, rates: tuple[float, float], cache: ExpertCache) -> dict:
    first = p.warmup_steps * p.meta.num_layers
    return belady_dict(rates, sum(1 for now, _, _ in cache.load_log if now >= first), cache.stats.inserts)


def belady_dict(rates: tuple[float, float], loads_window: int, loads_whole: int) -> dict:
    """MIN's bounds as :func:`bounds` reports them: its hit rate and loads (in the measured window, and over the
    whole replay)."""
    return {
        "belady_hit_rate": rates[0],
        "belady_misses_unique": loads_window,  # MIN's loads in the window
        "whole_run": {"belady_hit_rate": rates[1], "belady_misses_unique": loads_whole},
    }


def add_oracle(out: dict, o_aggr: tuple[float, float], o_cons: tuple[float, float], o_pre: tuple[float, float]) -> None:
    """Add the perfect-foresight stalls (each schedule's (whole replay, window), as :func:`oracle_stall` returns
    them) to MIN's bounds ``out`` (:func:`belady_dict`): the bound is the best of the three schedules."""
    for i, block in ((1, out), (0, out["whole_run"])):  # the window's, the whole replay's
        block.update({
            "oracle_stall_s": min(o_aggr[i], o_cons[i], o_pre[i]),
            "oracle_aggressive_stall_s": o_aggr[i],
            "oracle_conservative_stall_s": o_cons[i],
            "oracle_preloaded_stall_s": o_pre[i],
        })


def compute_bounds(p: Prepared) -> dict:
    """:func:`bounds`, always computed: the measured window's at the top level, the whole replay's under
    ``whole_run`` (merge them into a results dict with :func:`add_bounds`). ``sim/kernel_bridge.py`` computes the
    same numbers compiled."""
    meta = p.meta
    rates, b_cache, min_orders = min_replay(p)
    args = (p.steps, p.future, p.uses, p.partition_of, p.capacity, p.copy_model, p.compute, p.copy_bytes,
            meta.num_layers)
    first = p.warmup_steps * meta.num_layers
    o_aggr = oracle_stall(*args, schedule="aggressive", window_from=first)
    o_cons = oracle_stall(*args, schedule="conservative", min_loads=b_cache.load_log, orders=min_orders,
                          window_from=first)
    o_pre = oracle_stall(*args, schedule="aggressive", window_from=first, preload=True)
    out = _belady(p, rates, b_cache)
    add_oracle(out, o_aggr, o_cons, o_pre)
    return out


def add_bounds(results: dict, b: dict) -> None:
    """Merge bounds (:func:`bounds`, :func:`belady_bounds`) into a results dict, the whole replay's included."""
    b = dict(b)
    results.setdefault("whole_run", {}).update(b.pop("whole_run", {}))
    results.update(b)
