"""Comparison figures from the runs table (matplotlib, Agg). Each function returns the PNG path it wrote, or
None with a reason when the data cannot support that figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from traces.io import atomic_path  # noqa: E402

from .runs import per_layer  # noqa: E402


def reference_hardware(df: pd.DataFrame) -> str:
    """The hardware most runs used (a100-pcie4 on ties): figures that vary something else hold it fixed."""
    counts = df.hardware.value_counts()
    top = counts[counts == counts.max()].index.tolist()
    return "a100-pcie4" if "a100-pcie4" in top else sorted(top)[0]


def middle_capacity(sub: pd.DataFrame) -> float:
    caps = sorted(sub.capacity_fraction.dropna().unique())
    return caps[len(caps) // 2]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _axes(n: int, width: float = 5.2, height: float = 3.8):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def _policies(df: pd.DataFrame) -> list[str]:
    return sorted(df.policy.unique())


def _colors(policies: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(policies) <= 10 else "tab20")
    return {p: cmap(i % cmap.N) for i, p in enumerate(policies)}


def _lines(ax, t: pd.DataFrame, x: str, metric: str, bound: str, bound_label: str, colors: dict, xscale: float = 1.0):
    """One line per policy of ``metric`` against ``x``, and the bound dashed."""
    for pol, g in t.groupby("policy"):
        g = g.groupby(x)[metric].mean()
        ax.plot(g.index * xscale, g.values, "o-", label=pol, color=colors[pol])
    b = t.groupby(x)[bound].mean()
    ax.plot(b.index * xscale, b.values, "k--", lw=2, label=bound_label)


def vs_capacity(
    df: pd.DataFrame, out: Path, metric: str, bound: str, bound_label: str, ylabel: str, title: str, log: bool
) -> Path | str:
    hw = reference_hardware(df)
    d = df[df.hardware == hw]
    if d.capacity_fraction.nunique() < 2:
        return "one cache size only"
    traces = sorted(d.trace_name.unique())
    colors = _colors(_policies(d))
    fig, axes = _axes(len(traces))
    for ax, tr in zip(axes, traces):
        t = d[d.trace_name == tr]
        _lines(ax, t, "capacity_fraction", metric, bound, bound_label, colors, xscale=100)
        ax.set_xlabel("cache size (% of all experts)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{tr} on {hw}")
        if log and (t[metric] > 0).all():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="best")
    fig.suptitle(title)
    return _save(fig, out)


def stall_vs_bandwidth(df: pd.DataFrame, out: Path) -> Path | str:
    if df.bandwidth_gbps.nunique() < 2:
        return "one bandwidth only"
    traces = sorted(df.trace_name.unique())
    colors = _colors(_policies(df))
    fig, axes = _axes(len(traces))
    for ax, tr in zip(axes, traces):
        t = df[df.trace_name == tr]
        cap = middle_capacity(t)
        t = t[t.capacity_fraction == cap]
        _lines(ax, t, "bandwidth_gbps", "stall_s", "oracle_stall_s", "oracle (perfect foresight)", colors)
        ax.set_xlabel("slow-tier bandwidth (GB/s)")
        ax.set_ylabel("stall (s)")
        ax.set_title(f"{tr}, cache {cap:.0%} of experts")
        if t.bandwidth_gbps.max() / t.bandwidth_gbps.min() > 10:
            ax.set_xscale("log")
        if (t.stall_s > 0).all():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.suptitle("Stall vs bandwidth")
    return _save(fig, out)


def per_layer_hits(df: pd.DataFrame, root: Path, out: Path) -> Path | str:
    hw = reference_hardware(df)
    traces = sorted(df.trace_name.unique())
    fig, axes = _axes(len(traces))
    colors = _colors(_policies(df))
    drawn = False
    for ax, tr in zip(axes, traces):
        t = df[(df.trace_name == tr) & (df.hardware == hw)]
        cap = middle_capacity(t)
        for _, row in t[t.capacity_fraction == cap].drop_duplicates("policy").iterrows():
            pl = per_layer(root, row.run_dir)
            if pl is None:
                continue
            ax.plot(pl.layer, pl.hit_rate * 100, ".-", label=row.policy, color=colors[row.policy])
            drawn = True
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("hit rate (%)")
        ax.set_title(f"{tr} on {hw}, cache {cap:.0%}")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return "no per_layer.parquet files"
    axes[-1].legend(fontsize=7)
    fig.suptitle("Per-layer hit rate")
    return _save(fig, out)


def tpot_bars(df: pd.DataFrame, out: Path) -> Path | str:
    if df.tpot_s.isna().all():
        return "no decode steps"
    hw = reference_hardware(df)
    traces = sorted(df.trace_name.unique())
    fig, axes = _axes(len(traces), width=5.6, height=4.2)
    for ax, tr in zip(axes, traces):
        t = df[(df.trace_name == tr) & (df.hardware == hw)]
        cap = middle_capacity(t)
        t = t[t.capacity_fraction == cap].groupby("policy")[["tpot_s", "allresident_total_s", "total_s"]].mean()
        y = np.arange(len(t))
        ax.barh(y, t.tpot_s * 1e3, color="tab:blue")
        ax.set_yticks(y, t.index, fontsize=7)
        ax.set_xlabel("time per output token (ms)")
        ax.set_title(f"{tr} on {hw}, cache {cap:.0%}")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("TPOT per policy")
    return _save(fig, out)


def all_figures(df: pd.DataFrame, root: Path, out_dir: Path) -> dict[str, Path | str]:
    """Every figure the data supports: name -> PNG path, or the reason it was skipped."""
    return {
        "stall_vs_cache": vs_capacity(df, out_dir / "stall_vs_cache.png", "stall_s", "oracle_stall_s", "oracle (perfect foresight)", "stall (s)",
                                      "Stall vs cache size (dashed: perfect-foresight oracle)", True),
        "hit_vs_cache": vs_capacity(df.assign(hit_pct=df.hit_rate * 100, belady_pct=df.belady_hit_rate * 100),
                                    out_dir / "hit_vs_cache.png", "hit_pct", "belady_pct", "Belady MIN", "hit rate (%)",
                                    "Hit rate vs cache size (dashed: Belady MIN)", False),
        "stall_vs_bandwidth": stall_vs_bandwidth(df, out_dir / "stall_vs_bandwidth.png"),
        "per_layer_hits": per_layer_hits(df, root, out_dir / "per_layer_hits.png"),
        "tpot": tpot_bars(df, out_dir / "tpot.png"),
    }
