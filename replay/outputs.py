"""Write a run's outputs atomically and as a unit: per_layer.parquet, on request chrome_trace.json, and last
results.json, whose presence marks a finished run. If any write fails (a full disk, a read-only folder), the
files this run already wrote are removed again, so a folder never holds outputs without their results.json."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd

from traces.io import atomic_path

from .errors import OutputWriteError
from .results import ReplayResult
from .window import window_layers


def write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def run_line(results: dict) -> str:
    """One line naming a finished run (trace, policy, hardware, cache size, batch, seed) and its headline
    numbers, for the log of a run or of each run of a sweep."""
    r = results["run"]

    def num(v, fmt: str, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:{fmt}}{unit}"

    tpot = results.get("tpot_s")
    return (f"{r['trace_name']} | {r['policy']} | {r['hardware']} | cache {r['capacity_fraction']:.0%} | "
            f"batch {r['batch_size']} | seed {r['seed']}: hit {num(results['hit_rate'], '.3f')} "
            f"(Belady {num(results.get('belady_hit_rate'), '.3f')}), stall {num(results['stall_s'], '.4g', ' s')} "
            f"(oracle {num(results.get('oracle_stall_s'), '.4g', ' s')}), "
            f"TPOT {num(None if tpot is None else tpot * 1e3, '.2f', ' ms')}")


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
    done = out_dir / "results.json"
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        done.unlink(missing_ok=True)  # an earlier run's marker must not vouch for files this run is rewriting
        with atomic_path(out_dir / "per_layer.parquet") as tmp:
            per_layer_frame(res).to_parquet(tmp, index=False)
        written.append(out_dir / "per_layer.parquet")
        if chrome:
            write_json(out_dir / "chrome_trace.json", chrome_trace(res))
            written.append(out_dir / "chrome_trace.json")
        write_json(done, results)  # last: its presence marks a finished run
    except OSError as exc:
        for p in written:
            with contextlib.suppress(OSError):
                p.unlink(missing_ok=True)
        raise OutputWriteError(f"{out_dir}: cannot write the run's outputs ({exc.strerror or exc}); "
                               "none of them were kept") from exc
