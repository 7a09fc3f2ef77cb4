"""One figure per claim of ``python -m analysis paper`` (PNG, matplotlib Agg). Each function returns the path it
wrote, or a string saying why it could not draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .claims import deployable, horizon_label
from .plot_style import _axes, _colors, _save, plt


def horizon(df: pd.DataFrame, out: Path) -> Path | str:
    df = df[df.sweep == "horizon"]
    if df.empty:
        return "no horizon sweep"
    df = df.assign(label=horizon_label(df))
    traces = sorted(df.trace_name.unique())
    fig, axes = plt.subplots(2, len(traces), figsize=(4.6 * len(traces), 7.6), squeeze=False)
    labels = sorted(df.label.unique())
    colors = _colors(labels)
    for j, tr in enumerate(traces):
        g = df[df.trace_name == tr]
        p = g.pivot_table(index=["capacity_fraction", "bandwidth_GBps"], columns="label", values="stall_s")
        fixed = [c for c in p.columns if c != "adaptive"]
        ratio = ((p["adaptive"] + 1e-12) / (p[fixed].min(axis=1) + 1e-12)).unstack("bandwidth_GBps")
        ax = axes[0, j]
        im = ax.imshow(ratio.values, cmap="RdYlGn_r", vmin=0.5, vmax=1.5, origin="lower", aspect="auto")
        for (r, c), v in np.ndenumerate(ratio.values):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(ratio.shape[1]), [f"{b:g}" for b in ratio.columns])
        ax.set_yticks(range(ratio.shape[0]), [f"{f:.0%}" for f in ratio.index])
        ax.set_xlabel("link bandwidth (GB/s)")
        ax.set_ylabel("cache size (share of experts)")
        ax.set_title(f"{tr}: adaptive stall / best fixed")
        fig.colorbar(im, ax=ax, fraction=0.046)
        mid = sorted(g.capacity_fraction.unique())[len(g.capacity_fraction.unique()) // 2]
        ax = axes[1, j]
        for lab, h in g[g.capacity_fraction == mid].groupby("label"):
            s = h.groupby("bandwidth_GBps").tpot_s.mean()
            ax.plot(s.index, s.values * 1e3, "o-" if lab == "adaptive" else ".--", color=colors[lab], label=lab,
                    lw=2.5 if lab == "adaptive" else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        bws = sorted(g.bandwidth_GBps.unique())
        ax.set_xticks(bws, [f"{b:g}" for b in bws])
        ax.minorticks_off()
        ax.set_xlabel("link bandwidth (GB/s)")
        ax.set_ylabel("TPOT (ms)")
        ax.set_title(f"{tr}: TPOT at {mid:.0%} cached")
        ax.legend(fontsize=8)
    return _save(fig, out / "claim1_horizon.png")


def predictors(recall: pd.DataFrame | None, out: Path) -> Path | str:
    if recall is None or recall.empty:
        return "no recall table"
    t = recall.groupby(["predictor", "distance"])["recall"].mean().unstack("distance")
    fig, (ax,) = _axes(1, 6.0, 4.2)
    colors = _colors(t.index.tolist())
    for name, row in t.iterrows():
        ax.plot(row.index, row.values, "o-", label=name, color=colors[name], lw=2.5 if name == "hybrid" else 1.3)
    ax.set_xticks(t.columns.tolist())
    ax.set_xlabel("layers ahead (d)")
    ax.set_ylabel("recall@k (share of true experts predicted)")
    ax.set_ylim(0, 1)
    ax.set_title("Predictor quality on the reference model (test split)")
    ax.legend(fontsize=8)
    return _save(fig, out / "claim2_predictors.png")


def stall(df: pd.DataFrame, out: Path) -> Path | str:
    df = df[(df.sweep == "stall") & df.stall_vs_ondemand.notna()]
    if df.empty:
        return "no stall sweep with an on-demand LRU baseline"
    traces = sorted(df.trace_name.unique())
    fig, axes = _axes(len(traces), 4.8, 4.0)
    for ax, tr in zip(axes, traces):
        g = df[df.trace_name == tr]
        p = g.pivot_table(index="policy", columns="hardware", values="stall_vs_ondemand")
        b = g.assign(bound=g.oracle_stall_s / (g.stall_s / g.stall_vs_ondemand)).groupby("hardware").bound.min()
        p.loc["oracle bound"] = b
        hw = sorted(p.columns, key=lambda h: float(g[g.hardware == h].bandwidth_GBps.iloc[0]))
        p = p[hw]
        v = np.log10(np.clip(p.values.astype(float), 1e-4, None))
        im = ax.imshow(v, cmap="viridis", vmin=-4, vmax=0.5, aspect="auto")
        for (r, c), x in np.ndenumerate(p.values):
            ax.text(c, r, f"{x:.3g}", ha="center", va="center", fontsize=7, color="w" if v[r, c] < -1.5 else "k")
        ax.set_xticks(range(len(hw)), hw, rotation=30, ha="right")
        ax.set_yticks(range(len(p.index)), p.index, fontsize=7)
        ax.set_title(f"{tr}: stall / on-demand LRU")
        fig.colorbar(im, ax=ax, fraction=0.046, label="log10 ratio")
    return _save(fig, out / "claim3_stall.png")


def memory(df: pd.DataFrame, out: Path) -> Path | str:
    df = df[df.sweep == "memory"]
    if df.empty:
        return "no memory sweep"
    df = df.assign(slowdown=df.total_s / df.allresident_total_s)
    traces = sorted(df.trace_name.unique())
    fig, axes = _axes(len(traces), 4.6, 3.9)
    colors = _colors(sorted(df.policy.unique()))
    for ax, tr in zip(axes, traces):
        g = df[df.trace_name == tr]
        for pol, h in g.groupby("policy"):
            s = h.groupby("capacity_fraction").slowdown.mean()
            ax.plot(s.index * 100, s.values, "o-" if deployable(h).all() else "x:", color=colors[pol], label=pol)
        ax.axhline(1.1, color="k", ls="--", lw=1, label="10% over all-resident")
        ax.set_yscale("log")
        ax.set_xlabel("experts in fast memory (%)")
        ax.set_ylabel("time / all-resident time")
        ax.set_title(tr)
        ax.legend(fontsize=6)
    return _save(fig, out / "claim4_memory.png")


def scheduling(df: pd.DataFrame, out: Path) -> Path | str:
    df = df[df.sweep == "sched"]
    if df.empty:
        return "no scheduling sweep"
    fig, (a1, a2) = _axes(2, 5.2, 3.9)
    for (tr, sch), g in df.groupby(["trace_name", "scheduler"]):
        g = g.sort_values("batch_size")
        style = "o-" if sch == "route_grouping" else "s--"
        a1.plot(g.batch_size, g.distinct_experts_per_layer_step, style, label=f"{tr} {sch}")
        a2.plot(g.batch_size, g.tokens_per_s, style, label=f"{tr} {sch}")
    for ax, y in ((a1, "distinct experts per layer-step"), (a2, "throughput (tokens/s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences)")
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    a1.set_title("Experts a batch touches")
    a2.set_title("Decode throughput")
    return _save(fig, out / "claim5_scheduling.png")


def all_figures(df: pd.DataFrame, recall: pd.DataFrame | None, out: Path) -> dict[str, Path | str]:
    return {"horizon": horizon(df, out), "predictors": predictors(recall, out), "stall": stall(df, out),
            "memory": memory(df, out), "sched": scheduling(df, out)}
