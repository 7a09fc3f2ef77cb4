"""One simulator run from a composed config: prepare it (:mod:`replay.prepare`), replay it on the virtual clock
(:mod:`sim.engine`: the compiled kernel where it covers the run, else the Python loops), bound it
(:mod:`replay.bounds`, compiled likewise), write ``results.json`` (+ ``per_layer.parquet``, optional
``chrome_trace.json``) atomically."""

from __future__ import annotations

import time
from pathlib import Path

from replay.bounds import add_bounds, bounds, compute_bounds
from replay.errors import RunConfigError
from replay.outputs import write_outputs
from replay.prepare import prepare
from replay.results import results_dict

from . import kernel_bridge as kb
from .engine import replay

NOT_ASKED = "sim.compiled is false"  # the fallback reason when the config turns the compiled path off


def compiled_wanted(cfg) -> bool:
    """``sim.compiled`` (default true): take the compiled kernels where they cover the run."""
    value = (cfg.get("sim") or {}).get("compiled", True)
    if not isinstance(value, bool):
        raise RunConfigError(f"sim.compiled: expected true or false, got {value!r}")
    return value


def simulate(cfg, out_dir: Path) -> dict:
    """Run one configuration in the simulator; returns the results dict (also written to ``out_dir``)."""
    wall0 = time.perf_counter()
    compiled = compiled_wanted(cfg)
    p = prepare(cfg)  # maps old config keys first (replay.config_keys)
    log = bool(cfg.output.get("chrome_trace", False))
    replay_fallback = kb.ondemand_unsupported(p.runtime, p.copy_model, log) if compiled else NOT_ASKED
    res = replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers, log=log, uses=p.uses,
                 warmup_steps=p.warmup_steps, compiled=replay_fallback is None, keys=p.stream)
    results = results_dict(p, res, p.copy_bytes, "sim")
    bounds_fallback = kb.bounds_unsupported(p) if compiled else NOT_ASKED
    compute = (lambda: kb.compute_bounds_kernel(p)) if bounds_fallback is None else (lambda: compute_bounds(p))
    add_bounds(results, bounds(p, compute))
    results["run"].update({
        "replay_path": "python" if replay_fallback else "compiled",
        "replay_fallback": replay_fallback,  # why the Python loops replayed the run (null: compiled)
        # the path that computes the bounds where paths.bounds_dir does not hold them yet (an entry there holds
        # the same numbers either way, so a run's results.json does not depend on what the cache held)
        "bounds_path": "python" if bounds_fallback else "compiled",
        "bounds_fallback": bounds_fallback,
    })
    results["sim_wall_s"] = time.perf_counter() - wall0
    write_outputs(out_dir, results, res, p.meta.num_layers, log)
    return results
