"""What every figure shares: matplotlib (Agg), one style per policy (colour, marker and line style, so policies
with close results such as LRU and LFRU stay apart; clairvoyant bounds dashed in greys), a legend below the
panels where it cannot cover data, error bars from the spread over seeds, and atomic PNG writes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from traces.io import atomic_path  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "*", "p")
BOUND_COLORS = ("0.25", "0.5", "0.65")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")  # tight: keeps a legend outside the axes
    plt.close(fig)
    return path


def _axes(n: int, width: float = 5.2, height: float = 3.8):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def _colors(policies: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(policies) <= 10 else "tab20")
    return {p: cmap(i % cmap.N) for i, p in enumerate(policies)}


def policy_styles(df: pd.DataFrame) -> dict[str, dict]:
    """Per policy: matplotlib line keywords. Deployable policies: solid, a colour and a marker each;
    clairvoyant ones (``is_bound``): dash-dotted greys, hollow markers, "(bound)" in the label."""
    bound = df.groupby("policy")["is_bound"].first() if "is_bound" in df else pd.Series(dtype=bool)
    real = sorted(p for p in df.policy.unique() if not bound.get(p, False))
    bounds = sorted(p for p in df.policy.unique() if bound.get(p, False))
    colors = _colors(real)
    out = {p: dict(color=colors[p], marker=MARKERS[i % len(MARKERS)], linestyle="-", label=p)
           for i, p in enumerate(real)}
    for i, p in enumerate(bounds):
        out[p] = dict(color=BOUND_COLORS[i % len(BOUND_COLORS)], marker=MARKERS[(len(real) + i) % len(MARKERS)],
                      linestyle="-.", markerfacecolor="white", label=f"{p} (bound)")
    return out


def draw_order(df: pd.DataFrame) -> list[str]:
    """Policies in legend order: deployable ones, then the bounds (each group by name)."""
    bound = df.groupby("policy")["is_bound"].first().astype(bool)
    return sorted(bound.index, key=lambda p: (bool(bound[p]), p))


def offsets(policies: list[str], step: float) -> dict[str, float]:
    """A small x shift per policy, so lines and bars of policies with equal values stay visible side by side."""
    return {p: (i - (len(policies) - 1) / 2) * step for i, p in enumerate(policies)}


def legend_below(fig, axes) -> None:
    """One legend for the whole figure, below the panels (never over data), without repeated entries."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(labels)),
                   fontsize=8, frameon=False)


def log_axis(ax, which: str = "y") -> None:
    """A log scale labelled with plain numbers (30, not 3×10¹)."""
    from matplotlib.ticker import FuncFormatter

    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # minor ticks: label only 2x and 5x a power of ten, so a short axis has labels and a long one no clutter
    axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))


def errorbar(ax, x, mean, lo, hi, **style):
    """Points at the mean over seeds joined by lines, with bars from the smallest to the largest seed's value."""
    yerr = [(mean - lo).clip(lower=0), (hi - mean).clip(lower=0)]
    return ax.errorbar(x, mean, yerr=yerr, capsize=3, lw=1.4, ms=5, **style)
