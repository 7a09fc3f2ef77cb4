"""Write a run's outputs atomically: results.json, per_layer.parquet, and on request chrome_trace.json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from traces.io import atomic_path

from .results import ReplayResult
from .window import window_layers


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def per_layer_frame(res: ReplayResult) -> pd.DataFrame:
    """Per-layer figures of the measured window (after the warm-up, as results.json's top level)."""
    ls = window_layers(res)
    df = pd.DataFrame(
        {
            "layer": range(len(ls.requests)),
            "requests": ls.requests,
            "hits": ls.hits,
            "late_hits": ls.late_hits,
            "misses": ls.misses,
            "stall_s": ls.stall_s,
        }
    )
    df["hit_rate"] = df.hits / df.requests.where(df.requests > 0)
    return df


def chrome_trace(res: ReplayResult) -> dict:
    """Compute spans on one track, copies on another (Perfetto / chrome://tracing; times in microseconds)."""
    ev = [
        {"name": f"L{layer} e{key}", "cat": "compute", "ph": "X", "ts": t * 1e6, "dur": d * 1e6, "pid": 0, "tid": 0}
        for t, d, layer, key in res.events
    ]
    for r in res.copy_records or []:
        ev.append(
            {
                "name": f"copy {r.key}", "cat": "demand" if r.priority == 0 else "prefetch", "ph": "X",
                "ts": r.start_s * 1e6, "dur": (r.end_s - r.start_s) * 1e6, "pid": 0, "tid": 1,
                "args": {"key": r.key, "priority": r.priority, "queued_us": (r.start_s - r.submit_s) * 1e6},
            }
        )
    meta = [
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "compute"}},
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1, "args": {"name": "copies"}},
    ]
    return {"traceEvents": meta + ev, "displayTimeUnit": "ms"}


def write_outputs(out_dir: Path, results: dict, res: ReplayResult, num_layers: int, chrome: bool) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "per_layer.parquet") as tmp:
        per_layer_frame(res).to_parquet(tmp, index=False)
    if chrome:
        write_json(out_dir / "chrome_trace.json", chrome_trace(res))
    write_json(out_dir / "results.json", results)  # last: its presence marks a finished run
