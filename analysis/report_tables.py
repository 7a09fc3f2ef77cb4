"""The report's tables: readable headers with units, one number format (three significant digits, thousands
separated, percentages as whole numbers), each value the mean over seeds followed by its range (min–max) when
the seeds differ, and clairvoyant policies marked as bounds and listed after the deployable ones."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .headline import best_deployable, seed_wins
from .render import num
from .seeds import over_seeds

# (metric, header, multiplier): the per-policy table of one trace on one hardware
POLICY_COLUMNS = (
    ("stall_per_token_s", "stall per token (ms)", 1e3),
    ("stall_vs_ondemand", "stall vs on-demand LRU (×)", 1),
    ("stall_vs_oracle", "stall vs oracle bound (×)", 1),
    ("tpot_s", "TPOT (ms)", 1e3),
    ("tpot_vs_allresident", "TPOT vs all-resident (×)", 1),
    ("hit_rate", "hit rate (%)", 100),
    ("belady_hit_rate", "Belady hit rate (%)", 100),
    ("prefetch_precision", "prefetch precision (%)", 100),
    ("tokens", "tokens replayed", 1),
)
COUNTS = ("tokens",)  # whole numbers: no significant-digit rounding
BEST_COLUMNS = POLICY_COLUMNS[:3]


def with_range(row: pd.Series, metric: str, mult: float) -> str:
    """``mean (min–max)`` over seeds, or just the mean when the seeds agree to three digits (or there is one)."""
    fmt = (lambda v: "" if pd.isna(v) else f"{v:,.0f}") if metric in COUNTS else num
    mean = fmt(row[metric] * mult)
    lo, hi = fmt(row.get(f"{metric}_min", np.nan) * mult), fmt(row.get(f"{metric}_max", np.nan) * mult)
    return mean if not mean or lo == hi or not lo else f"{mean} ({lo}–{hi})"


def policy_label(row: pd.Series) -> str:
    return f"{row.policy} (bound)" if bool(row.is_bound) else str(row.policy)


def _cache(v: float) -> str:
    return "" if pd.isna(v) else f"{v:.0%}"


def policy_table(df: pd.DataFrame) -> pd.DataFrame:
    """One trace on one hardware and batch size: a row per cache size and policy (deployable ones by stall, then
    the bounds), formatted."""
    agg = over_seeds(df, [m for m, _, _ in POLICY_COLUMNS])
    agg = agg.assign(_bound=agg.is_bound.astype(bool)).sort_values(["capacity_fraction", "_bound", "stall_per_token_s"])
    rows = []
    for _, r in agg.iterrows():
        row = {"cache": _cache(r.capacity_fraction), "policy": policy_label(r)}
        row.update({head: with_range(r, m, k) for m, head, k in POLICY_COLUMNS if m in agg})
        rows.append(row)
    return pd.DataFrame(rows)


def best_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per trace, hardware, batch size and cache size: the best deployable policy and how it compares."""
    agg = over_seeds(df, [m for m, _, _ in BEST_COLUMNS] + ["stall_s"])
    best = best_deployable(agg)
    if best.empty:
        return pd.DataFrame()
    wins = seed_wins(df, best)
    seeds = int(df.seed.nunique()) if "seed" in df else 1
    multi_batch = df.batch_size.nunique() > 1
    order = [k for k in ("trace_name", "bandwidth_GBps", "hardware", "batch_size", "capacity_fraction") if k in best]
    rows = []
    for i, r in best.sort_values(order).iterrows():
        row = {"trace": r.trace_name, "hardware": r.hardware}
        if multi_batch:
            row["batch"] = int(r.batch_size)
        row.update({"cache": _cache(r.capacity_fraction), "best deployable policy": r.policy})
        row.update({head: with_range(r, m, k) for m, head, k in BEST_COLUMNS})
        if seeds > 1:
            row["lowest on seeds"] = f"{int(wins[i])} of {seeds}"
        rows.append(row)
    return pd.DataFrame(rows)
