"""Runs that differ only in their seed (a seed draws its own train/test split, and for a synthetic trace its own
routing), summarised as the mean over seeds and the range from the smallest to the largest seed's value: what
the report's tables and headline quote and its figures draw as error bars."""

from __future__ import annotations

import pandas as pd

# what makes two runs the same configuration (every run key but the seed)
CONFIG = ("driver", "trace_name", "hardware", "bandwidth_GBps", "batch_size", "scheduler", "capacity_fraction",
          "policy")
# descriptive columns that are the same for every seed of a configuration
SAME = ("cache", "predictor", "horizon", "is_bound")


def config_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in CONFIG if k in df]


def over_seeds(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per configuration: each metric's mean over seeds, its ``_min`` and ``_max``, and ``seeds`` (how
    many runs); NaN metrics are left out of the mean and range."""
    keys = config_keys(df)
    metrics = [m for m in metrics if m in df]
    g = df.groupby(keys, dropna=False, sort=True)
    parts = [g[metrics].mean(), g[metrics].min().add_suffix("_min"), g[metrics].max().add_suffix("_max"),
             g.size().rename("seeds"), g[[c for c in SAME if c in df]].first()]
    return pd.concat(parts, axis=1).reset_index()


def seeds_in(df: pd.DataFrame) -> list[int]:
    return sorted(int(s) for s in df["seed"].dropna().unique()) if "seed" in df else []
