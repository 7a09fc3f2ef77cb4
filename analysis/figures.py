"""Comparison figures from the runs table. Each function returns a :class:`~analysis.render.Figure` (the PNG and
a caption saying what it shows), or the reason the data cannot support it. Points are means over seeds, bars the
range (min–max) over seeds; clairvoyant policies are drawn as bounds; the legend sits below the panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .plot_style import (
    _axes,
    _save,
    draw_order,
    errorbar,
    legend_below,
    log_axis,
    offsets,
    plt,
    policy_styles,
)
from .render import Figure
from .runs import per_layer
from .seeds import over_seeds


def reference_hardware(df: pd.DataFrame) -> str:
    """The hardware most runs used (a100-pcie4 on ties): figures that vary something else hold it fixed."""
    counts = df.hardware.value_counts()
    top = counts[counts == counts.max()].index.tolist()
    return "a100-pcie4" if "a100-pcie4" in top else sorted(top)[0]


def middle_capacity(sub: pd.DataFrame) -> float:
    caps = sorted(sub.capacity_fraction.dropna().unique())
    return caps[len(caps) // 2]


def panels(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One panel per trace (and per batch size, when the runs have several)."""
    multi = df.batch_size.nunique() > 1
    keys = ["trace_name", "batch_size"] if multi else ["trace_name"]
    out = []
    for k, g in df.groupby(keys, sort=True):
        k = k if isinstance(k, tuple) else (k,)
        out.append((f"{k[0]}, batch {k[1]}" if multi else str(k[0]), g))
    return out


def _seeds_note(df: pd.DataFrame) -> str:
    n = df.seed.nunique() if "seed" in df else 1
    return f"Points: mean over {n} seeds; bars: min–max over the seeds." if n > 1 else "One seed per point."


BOUND_NOTE = ("Dash-dotted grey lines marked (bound) are clairvoyant policies (Belady eviction, oracle prefetch): "
              "bounds, not deployable.")


def _bound_line(ax, agg: pd.DataFrame, x: str, metric: str, label: str, xs=None) -> None:
    """The bound of on-demand LRU's runs (those of a cache with a global scope, e.g. ExpertFlow's, differ)."""
    base = agg[agg.policy == "lru+none"] if (agg.policy == "lru+none").any() else agg
    b = base.groupby(x)[[metric, f"{metric}_min", f"{metric}_max"]].mean()
    errorbar(ax, b.index if xs is None else xs(b.index), b[metric], b[f"{metric}_min"], b[f"{metric}_max"],
             color="k", linestyle="--", marker="", label=label)


def vs_capacity(df: pd.DataFrame, out: Path, metric: str, bound: str, bound_label: str, ylabel: str,
                what: str, mult: float, log: bool) -> Figure | str:
    hw = reference_hardware(df)
    d = df[df.hardware == hw].assign(_m=df[metric] * mult, _b=df[bound] * mult)
    if d.capacity_fraction.nunique() < 2:
        return "one cache size only"
    styles = policy_styles(d)
    ps = panels(d)
    fig, axes = _axes(len(ps))
    for ax, (title, t) in zip(axes, ps):
        agg = over_seeds(t, ["_m", "_b"])
        shift = offsets(draw_order(agg), 0.6)
        for pol in draw_order(agg):
            g = agg[agg.policy == pol]
            errorbar(ax, g.capacity_fraction * 100 + shift[pol], g._m, g._m_min, g._m_max, **styles[pol])
        _bound_line(ax, agg, "capacity_fraction", "_b", bound_label, xs=lambda i: i * 100)
        ax.set_xlabel("cache size (% of all experts)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} on {hw}")
        if log and (agg._m > 0).all():
            log_axis(ax)
        ax.grid(alpha=0.3)
    legend_below(fig, axes)
    caption = (f"{what} against the cache size (share of all experts held in fast memory) on {hw}, one panel per "
               f"trace. Black dashed: {bound_label}. {BOUND_NOTE} {_seeds_note(d)}")
    return Figure(_save(fig, out), caption)


def stall_vs_link(df: pd.DataFrame, out_dir: Path) -> Figure | str:
    """Stall per token against the link: the link bandwidth alone where one hardware preset was swept over it
    (compute fixed); else by preset, whose compute changes with the link, so the axis names the preset."""
    hw = reference_hardware(df)
    same = df[df.hardware == hw]
    if same.bandwidth_GBps.nunique() >= 2:
        d, x, name = same, "bandwidth_GBps", "stall_vs_bandwidth"
    elif df.hardware.nunique() >= 2:
        d, x, name = df, "hardware", "stall_by_hardware"
    else:
        return "one link bandwidth and one hardware preset only"
    d = d.assign(_m=d.stall_per_token_s * 1e3, _b=d.oracle_stall_s / d.tokens * 1e3)
    order = (d.groupby("hardware").bandwidth_GBps.mean().sort_values().index.tolist() if x == "hardware" else None)
    styles = policy_styles(d)
    ps = panels(d)
    fig, axes = _axes(len(ps))
    for ax, (title, t) in zip(axes, ps):
        cap = middle_capacity(t)
        agg = over_seeds(t[t.capacity_fraction == cap], ["_m", "_b"])
        if order is not None:
            pos = {h: i for i, h in enumerate(order)}
            agg = agg.assign(_x=agg.hardware.map(pos))
            bw = t.groupby("hardware").bandwidth_GBps.mean()
            ax.set_xticks(range(len(order)), [f"{h}\n{bw[h]:g} GB/s" for h in order], fontsize=8)
        else:
            agg = agg.assign(_x=agg.bandwidth_GBps)
        shift = offsets(draw_order(agg), 0.025 if order is not None else 0.0)
        for pol in draw_order(agg):
            g = agg[agg.policy == pol].sort_values("_x")
            errorbar(ax, g._x + shift[pol], g._m, g._m_min, g._m_max, **styles[pol])
        _bound_line(ax, agg, "_x", "_b", "oracle bound (perfect foresight)")
        ax.set_xlabel("hardware preset (link bandwidth; compute differs too)" if order is not None
                      else f"link bandwidth of {hw} (GB/s; compute fixed)")
        if order is None and agg._x.max() / agg._x.min() > 10:
            log_axis(ax, "x")
        ax.set_ylabel("stall per token (ms)")
        if (agg._m > 0).all():
            log_axis(ax)
        ax.set_title(f"{title}, cache {cap:.0%}")
        ax.grid(alpha=0.3)
    legend_below(fig, axes)
    if order is not None:
        what = ("Stall per token on each hardware preset, ordered by link bandwidth, at the middle cache size. The "
                "presets differ in compute as well as in the link, so this is not a bandwidth sweep: the oracle bound "
                "(black dashed) moves with both.")
    else:
        what = (f"Stall per token against the link bandwidth of {hw} alone (its compute fixed), at the middle cache "
                "size. Black dashed: the oracle bound (perfect foresight).")
    return Figure(_save(fig, out_dir / f"{name}.png"), f"{what} {BOUND_NOTE} {_seeds_note(d)}")


def tpot_split(df: pd.DataFrame, out: Path) -> Figure | str:
    if df.tpot_s.isna().all() or df.compute_per_step_s.isna().all():
        return "no decode steps"
    hw = reference_hardware(df)
    d = df[df.hardware == hw]
    ps = panels(d)
    fig, axes = _axes(len(ps), width=6.0, height=0.35 * d.policy.nunique() + 1.8)
    for i, (ax, (title, t)) in enumerate(zip(axes, ps)):
        cap = middle_capacity(t)
        agg = over_seeds(t[t.capacity_fraction == cap], ["compute_per_step_s", "stall_per_step_s", "tpot_s"])
        agg = agg.sort_values("tpot_s", ascending=False)
        y = np.arange(len(agg))
        comp, stall = agg.compute_per_step_s * 1e3, agg.stall_per_step_s * 1e3
        ax.barh(y, comp, color="tab:green", label="compute" if i == 0 else None)
        hatch = ["//" if b else "" for b in agg.is_bound.astype(bool)]
        ax.barh(y, stall, left=comp, color="tab:red", alpha=0.8, hatch=hatch, label="stall (waiting for experts)")
        err = [(agg.tpot_s - agg.tpot_s_min) * 1e3, (agg.tpot_s_max - agg.tpot_s) * 1e3]
        ax.errorbar(agg.tpot_s * 1e3, y, xerr=err, fmt="k|", capsize=3, ms=10, label="TPOT (min–max over seeds)")
        ax.axvline(comp.mean(), color="k", ls="--", lw=1.2, label="all-resident TPOT (compute only)")
        ax.set_yticks(y, [f"{p} (bound)" if b else p for p, b in zip(agg.policy, agg.is_bound.astype(bool))], fontsize=7)
        ax.set_xlabel("time per output token (ms)")
        ax.set_title(f"{title} on {hw}, cache {cap:.0%}")
        ax.grid(axis="x", alpha=0.3)
    legend_below(fig, axes)
    caption = (f"Time per output token split into compute (green) and stall (red) for each policy on {hw} at the "
               "middle cache size, slowest first; the dashed line is the all-resident TPOT (every expert in fast "
               "memory: compute only). Hatched bars are clairvoyant bounds. " + _seeds_note(d).replace("Points", "Bars")
               .replace("bars: min–max", "whiskers: the TPOT's min–max"))
    return Figure(_save(fig, out), caption)


def per_layer_hits(df: pd.DataFrame, root: Path, out: Path) -> Figure | str:
    hw = reference_hardware(df)
    d = df[df.hardware == hw]
    styles = policy_styles(d)
    ps = panels(d)
    fig, axes = _axes(len(ps))
    drawn = False
    for ax, (title, t) in zip(axes, ps):
        cap = middle_capacity(t)
        at = t[t.capacity_fraction == cap]
        for pol in draw_order(at):
            g = at[at.policy == pol]
            frames = [f for f in (per_layer(root, r) for r in g.run_dir) if f is not None]
            if not frames:
                continue
            hit = pd.concat(frames).groupby("layer").hit_rate
            errorbar(ax, hit.mean().index, hit.mean() * 100, hit.min() * 100, hit.max() * 100, **styles[pol])
            drawn = True
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("hit rate (%)")
        ax.set_title(f"{title} on {hw}, cache {cap:.0%}")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return "no per_layer.parquet files"
    legend_below(fig, axes)
    caption = (f"Hit rate of each MoE layer on {hw} at the middle cache size. {BOUND_NOTE} {_seeds_note(d)}")
    return Figure(_save(fig, out), caption)


def all_figures(df: pd.DataFrame, root: Path, out_dir: Path) -> dict[str, Figure | str]:
    """Every figure the data supports: name -> Figure, or the reason it was skipped."""
    df = df.assign(_hit=df.hit_rate, _belady=df.belady_hit_rate, _oracle_per_token=df.oracle_stall_s / df.tokens)
    return {
        "stall_vs_cache": vs_capacity(df, out_dir / "stall_vs_cache.png", "stall_per_token_s", "_oracle_per_token",
                                      "oracle bound (perfect foresight)", "stall per token (ms)",
                                      "Stall per token (log scale)", 1e3, True),
        "hit_vs_cache": vs_capacity(df, out_dir / "hit_vs_cache.png", "_hit", "_belady",
                                    "Belady MIN (the most hits any eviction can get)", "hit rate (%)", "Hit rate", 100,
                                    False),
        "stall_vs_link": stall_vs_link(df, out_dir),
        "tpot": tpot_split(df, out_dir / "tpot.png"),
        "per_layer_hits": per_layer_hits(df, root, out_dir / "per_layer_hits.png"),
    }
