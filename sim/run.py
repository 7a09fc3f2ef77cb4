"""One simulator run from a composed config: prepare it (:mod:`replay.prepare`), replay it on the virtual clock
(:mod:`sim.engine`), bound it (:mod:`replay.bounds`), write ``results.json`` (+ ``per_layer.parquet``, optional
``chrome_trace.json``) atomically."""

from __future__ import annotations

import time
from pathlib import Path

from replay.bounds import add_bounds, bounds
from replay.outputs import write_outputs
from replay.prepare import prepare
from replay.results import results_dict

from .engine import replay


def simulate(cfg, out_dir: Path) -> dict:
    """Run one configuration in the simulator; returns the results dict (also written to ``out_dir``)."""
    wall0 = time.perf_counter()
    p = prepare(cfg)  # maps old config keys first (replay.config_keys)
    log = bool(cfg.output.get("chrome_trace", False))
    res = replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers, log=log, uses=p.uses,
                 warmup_steps=p.warmup_steps)
    results = results_dict(p, res, p.copy_bytes, "sim")
    add_bounds(results, bounds(p))
    results["sim_wall_s"] = time.perf_counter() - wall0
    write_outputs(out_dir, results, res, p.meta.num_layers, log)
    return results
