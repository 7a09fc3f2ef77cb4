"""Load every run of a sweep into one table. Reads ``results.json`` + ``per_layer.parquet`` files only: no
simulator or executor code is imported here, so the analysis works on results copied from anywhere. Files of an
older schema are read in the current one's keys (:func:`replay.results.upgrade_run`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from replay.results import upgrade_run

from .errors import AnalysisError

REQUIRED = ("run", "stall_s", "total_s", "hit_rate", "belady_hit_rate", "oracle_stall_s", "bytes_moved")
RUN_FIELDS = (
    "driver", "trace_name", "trace_source", "model", "policy", "cache", "predictor", "horizon", "horizon_distance", "scheduler",
    "hardware", "bandwidth_GBps", "capacity_fraction", "capacity_slots_per_layer", "batch_size", "seed",
    "expert_bytes", "scope",
)
# metrics that must be numbers; the bounds may be null (an executor run writes null for the ones it cannot compute
# honestly, see executor/run.py)
MEASURED = ("stall_s", "total_s", "hit_rate", "bytes_moved")
NUMERIC = (
    *MEASURED, "belady_hit_rate", "belady_misses_unique", "oracle_stall_s", "oracle_aggressive_stall_s",
    "oracle_conservative_stall_s", "oracle_preloaded_stall_s", "tpot_s", "tpot_p50_s", "tpot_p90_s", "ttft_s", "tokens_per_s", "late_hit_rate",
    "miss_rate", "prefetch_precision", "prefetch_recall", "prefetch_issued", "wasted_bytes", "preload_bytes",
    "copies", "expert_requests", "allresident_total_s", "fast_memory_bytes", "all_experts_bytes", "steps",
    "distinct_experts_per_layer_step", "request_tpot_s", "scheduler_wall_s", "tokens", "sim_wall_s",
    "copy_bandwidth_bytes_per_s",
)
RUN_NUMERIC = ("horizon_distance", "bandwidth_GBps", "capacity_fraction", "capacity_slots_per_layer", "batch_size",
               "seed", "expert_bytes")


class ResultsError(AnalysisError):
    """No usable results where the user pointed."""


def find_results(root: Path) -> list[Path]:
    """Every results.json under ``root`` except in a ``report`` folder inside it (a report's own outputs);
    folders above ``root`` may have any name."""
    root = Path(root)
    return sorted(p for p in root.rglob("results.json") if "report" not in p.relative_to(root).parts)


def load_runs(root: str | Path, log=None) -> pd.DataFrame:
    """One row per finished run under ``root``; unreadable or incomplete results are reported and skipped."""
    log = log or sys.stderr
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"{root}: not a directory of runs")
    paths = find_results(root)
    rows = []
    for p in _progress(paths):
        try:
            res = json.loads(p.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            print(f"skipped {p}: not UTF-8 text ({exc})", file=log)
            continue
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipped {p}: not valid JSON ({exc})", file=log)
            continue
        if isinstance(res, dict) and isinstance(res.get("run"), dict):
            res["run"] = upgrade_run(res["run"])
        problem = _schema_problem(res)
        if problem:
            print(f"skipped {p}: {problem}", file=log)
            continue
        row = {f: res["run"].get(f) for f in RUN_FIELDS}
        row.update({k: v for k, v in res.items() if k != "run" and not isinstance(v, (dict, list))})
        row["run_dir"] = str(p.parent.relative_to(root))
        rows.append(row)
    if not rows:
        raise ResultsError(f"{root}: no usable results.json found (looked in {len(paths)} file(s))")
    df = pd.DataFrame(rows)
    for c in (*NUMERIC, *RUN_NUMERIC):  # null -> NaN, so a column of nulls still takes arithmetic
        if c in df:
            df[c] = pd.to_numeric(df[c])
    add_derived(df)
    return df.sort_values(["trace_name", "hardware", "capacity_fraction", "policy"], kind="stable").reset_index(drop=True)


# policies that use the future (Belady's eviction, the oracle predictor): bounds, not deployable policies
CLAIRVOYANT_CACHES = ("belady",)
CLAIRVOYANT_PREDICTORS = ("oracle",)


def add_derived(df: pd.DataFrame) -> None:
    """The per-run ratios and rates the report shows, added as columns (NaN where an input is missing)."""
    def ratio(a, b):
        return a / b.where(b > 0)

    for name in ("tokens", "steps", "allresident_total_s", "tpot_s", "prefetch_precision", "wasted_bytes"):
        if name not in df:  # results written before the key existed: shown blank
            df[name] = float("nan")
    col = df.__getitem__

    df["oracle_gap_s"] = df["stall_s"] - df["oracle_stall_s"]
    df["wasted_gb"] = col("wasted_bytes") / 1e9
    df["stall_vs_ondemand"] = relative_to_ondemand(df)
    df["stall_vs_oracle"] = ratio(df["stall_s"], df["oracle_stall_s"])
    df["stall_per_token_s"] = ratio(df["stall_s"], col("tokens"))
    # compute and stall per step; with every expert resident a step takes only its compute (on a decode-only
    # trace this is the all-resident TPOT)
    df["compute_per_step_s"] = ratio(col("allresident_total_s"), col("steps"))
    df["stall_per_step_s"] = ratio(df["stall_s"], col("steps"))
    df["tpot_vs_allresident"] = ratio(col("tpot_s"), df["compute_per_step_s"])
    df["is_bound"] = df["cache"].isin(CLAIRVOYANT_CACHES) | df["predictor"].isin(CLAIRVOYANT_PREDICTORS)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _schema_problem(res) -> str | None:
    """Why ``res`` is not a usable results.json (naming the key and what was expected), or None."""
    if not isinstance(res, dict):
        return f"expected a JSON object, got {type(res).__name__}"
    missing = [k for k in REQUIRED if k not in res]
    if missing:
        return f"missing key(s) {missing}"
    if not isinstance(res["run"], dict):
        return f"key 'run' is {res['run']!r}, expected an object"
    for where, d, keys in (("", res, NUMERIC), ("run.", res["run"], RUN_NUMERIC)):
        for k in keys:
            v = d.get(k)
            if v is None and (where or k not in MEASURED):
                continue
            if not _is_number(v):
                return f"key '{where}{k}' is {v!r}, expected a number{'' if k in MEASURED else ' or null'}"
    return None


def relative_to_ondemand(df: pd.DataFrame) -> pd.Series:
    """stall_s over the stall of on-demand LRU (cache lru per layer, predictor none) with the same trace, hardware,
    link bandwidth, capacity, batch size, scheduler, driver and seed; NaN where there is no such baseline run."""
    keys = ["driver", "trace_name", "hardware", "bandwidth_GBps", "capacity_fraction", "batch_size", "scheduler"]
    keys += ["seed"] if "seed" in df else []  # each seed against its own baseline (a seed may draw its own trace)
    per_layer = df["scope"].fillna("per_layer") == "per_layer" if "scope" in df else True  # not lru/global
    base = df[(df.cache == "lru") & (df.predictor == "none") & per_layer].groupby(keys, dropna=False)["stall_s"].mean()
    idx = pd.MultiIndex.from_frame(df[keys])
    ref = base.reindex(idx).to_numpy()
    return pd.Series(df["stall_s"].to_numpy() / ref, index=df.index)


def per_layer(root: str | Path, run_dir: str) -> pd.DataFrame | None:
    p = Path(root) / run_dir / "per_layer.parquet"
    return pd.read_parquet(p) if p.exists() else None


def _progress(items):
    try:
        from tqdm import tqdm

        return tqdm(items, desc="loading runs", unit="run", disable=len(items) < 50, file=sys.stderr)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return items
