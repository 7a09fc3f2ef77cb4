"""The report's opening: per trace and hardware, which deployable policy wins, by how much against on-demand LRU
and how far from the oracle bound; then the most striking findings (where prefetching raises stall, how much of
a token is waiting, what perfect foresight would buy), in plain sentences. Every number is the mean over seeds
(ranges where several cache sizes or seeds are summarised); nothing here reads anything but the runs table."""

from __future__ import annotations

import pandas as pd

from .render import num
from .seeds import over_seeds

METRICS = ["stall_s", "stall_per_token_s", "stall_vs_ondemand", "stall_vs_oracle", "tpot_s", "tpot_vs_allresident",
           "stall_per_step_s", "compute_per_step_s", "prefetch_precision", "hit_rate", "oracle_stall_s", "tokens"]
POINT = ["trace_name", "hardware", "batch_size", "capacity_fraction"]


def _pct(v: float) -> str:
    return f"{v:.0%}"


def _span(values, fmt) -> str:
    """``a`` or ``a–b`` over the values (NaN left out); empty if there are none."""
    v = pd.Series(values, dtype=float).dropna()
    if v.empty:
        return ""
    lo, hi = fmt(v.min()), fmt(v.max())
    return lo if lo == hi else f"{lo}–{hi}"


def _x(v: float) -> str:
    return f"{num(v)}×"


def best_deployable(agg: pd.DataFrame) -> pd.DataFrame:
    """Per trace, hardware, batch size and cache size: the deployable policy with the lowest mean stall."""
    real = agg[~agg.is_bound.astype(bool)].dropna(subset=["stall_s"])
    if real.empty:
        return real
    keys = [k for k in POINT if k in real]
    return real.loc[real.groupby(keys, dropna=False)["stall_s"].idxmin()].reset_index(drop=True)


def seed_wins(df: pd.DataFrame, best: pd.DataFrame) -> pd.Series:
    """For each row of ``best``: on how many seeds its policy had the lowest stall of the deployable ones."""
    real = df[~df.is_bound.astype(bool)]
    keys = [k for k in POINT if k in real]
    if "seed" not in real:
        return pd.Series(1, index=best.index)
    winners = real.loc[real.groupby([*keys, "seed"], dropna=False)["stall_s"].idxmin(), [*keys, "policy"]]
    wins = winners.groupby([*keys, "policy"], dropna=False).size()
    return pd.Series([int(wins.get(tuple(r[k] for k in [*keys, "policy"]), 0)) for _, r in best.iterrows()],
                     index=best.index)


def where(hw: str, batch, batches: int) -> str:
    return f"on {hw}" + (f" at batch {batch}" if batches > 1 else "")


def winner_sentence(rows: pd.DataFrame, wins: pd.Series, seeds: int, place: str) -> str:
    """One sentence for one trace on one hardware (and batch size): ``rows`` = its best policy per cache size."""
    rows = rows.sort_values("capacity_fraction")
    caps = ", ".join(_pct(c) for c in rows.capacity_fraction)
    names = rows.policy.unique().tolist()
    vs_lru = rows.stall_vs_ondemand
    seed_note = ""
    if seeds > 1:
        low = int(wins.loc[rows.index].min())
        seed_note = (f" (lowest on all {seeds} seeds everywhere)" if low == seeds
                     else f" (lowest on as few as {low} of {seeds} seeds at some cache size: a close call)")
    oracle = _span(rows.stall_vs_oracle, _x)
    oracle = f"{oracle} the oracle bound" if oracle else "no oracle bound recorded"
    sizes = f"every cache size ({caps})" if len(rows) > 1 else f"its one cache size ({caps})"
    if len(names) == 1:
        pol = names[0]
        if pol == "lru+none":
            return (f"{place.capitalize()}: no deployable policy beats on-demand LRU at {sizes}; it stalls {oracle}"
                    f"{seed_note}.")
        less = _span(1 - vs_lru, _pct)
        if less and (1 - vs_lru).max() < 0.03:
            less = f"within {_pct((1 - vs_lru).max())} of on-demand LRU (a near tie)"
        elif less:
            less = f"{less} less than on-demand LRU"
        return (f"{place.capitalize()}: **{pol}** stalls least at {sizes}" + (f", {less}" if less else "")
                + f", and {oracle}{seed_note}.")
    parts = []
    for _, r in rows.iterrows():
        vs = [f"{_x(r.stall_vs_ondemand)} on-demand LRU"] if pd.notna(r.stall_vs_ondemand) else []
        vs += [f"{_x(r.stall_vs_oracle)} the oracle bound"] if pd.notna(r.stall_vs_oracle) else []
        parts.append(f"{_pct(r.capacity_fraction)}: **{r.policy}**" + (f" ({', '.join(vs)})" if vs else ""))
    return f"{place.capitalize()}: the best deployable policy depends on the cache size: " + "; ".join(parts) + f"{seed_note}."


def findings(agg: pd.DataFrame, best: pd.DataFrame) -> list[str]:
    """The striking facts of one trace (all its hardware and cache sizes), in plain sentences."""
    out = []
    n_points = len(best)
    pref = agg[(~agg.is_bound.astype(bool)) & (agg.predictor != "none") & agg.stall_vs_ondemand.notna()]
    raised, helped = [], []
    for pol, g in pref.groupby("policy"):
        worse = g[g.stall_vs_ondemand > 1.02]
        if len(worse):
            prec = _span(worse.prefetch_precision, _pct)
            raised.append(f"**{pol}** {_span(worse.stall_vs_ondemand, _x)} at {len(worse)} of {len(g)} points"
                          + (f" (prefetch precision {prec})" if prec else ""))
        better = g[g.stall_vs_ondemand < 0.98]
        if len(better):
            helped.append(f"**{pol}** {_span(better.stall_vs_ondemand, _x)} at {len(better)} of {len(g)} points")
    if raised:
        out.append("Prefetching raised stall above on-demand LRU's (hardware × cache points): " + "; ".join(raised)
                   + ". A prefetch that is not used still occupies the link and evicts an expert.")
    if helped:
        out.append("Prefetching lowered stall below on-demand LRU's: " + "; ".join(helped) + ".")
    if n_points and best.stall_per_step_s.notna().any():
        share = best.stall_per_step_s / (best.stall_per_step_s + best.compute_per_step_s)
        out.append(f"Even the best deployable policy spends {_span(share, _pct)} of each step waiting for experts; "
                   f"its TPOT is {_span(best.tpot_vs_allresident, _x)} the all-resident TPOT.")
    lru = agg[(agg.policy == "lru+none") & agg.oracle_stall_s.notna()]
    if len(lru):
        cut = 1 - lru.oracle_stall_s / lru.stall_s.where(lru.stall_s > 0)
        out.append(f"Perfect foresight (the oracle bound) would cut stall {_span(cut, _pct)} below on-demand LRU; "
                   f"the best deployable policy achieves {_span(1 - best.stall_vs_ondemand, _pct)}.")
    return out


def headline(df: pd.DataFrame) -> dict[str, list[str]]:
    """Per trace: its sentences (one per hardware and batch size, then the findings)."""
    agg = over_seeds(df, METRICS)
    best = best_deployable(agg)
    if best.empty:
        return {}
    wins = seed_wins(df, best)
    seeds = int(df.seed.nunique()) if "seed" in df else 1
    batches = int(df.batch_size.nunique()) if "batch_size" in df else 1
    order = [k for k in ("trace_name", "bandwidth_GBps", "hardware", "batch_size", "capacity_fraction") if k in best]
    best = best.sort_values(order)  # hardware from the slowest link up
    out: dict[str, list[str]] = {}
    for tr, b in best.groupby("trace_name", sort=True):
        lines = [winner_sentence(rows, wins, seeds, where(hw, batch, batches))
                 for (hw, batch), rows in b.groupby(["hardware", "batch_size"], sort=False)]
        out[str(tr)] = lines + findings(agg[agg.trace_name == tr], b)
    return out
