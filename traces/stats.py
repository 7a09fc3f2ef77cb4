"""Statistics of a routing trace: popularity, locality, reuse distance, cross-layer predictability, hit rates.

``python -m traces stats TRACE [--json] [--plot OUT.png]``

All statistics are per layer and overall (the mean over layers). Adjacent-token overlap and reuse distance are
measured within a sequence (pairs spanning two sequences are skipped); cache hit rates are the simulator's, computed
with its policy objects by :mod:`traces.cachesim` (continuous stream over all sequences; ``traces stats --help``
states the rule). Popularity is the most used expert's share over the uniform share (``max_over_uniform``:
``per_layer`` and ``mean``/``min``/``max``) and the share the ``n`` most used experts take (``top_share``, n = each
capacity). The synthetic presets' calibration (:mod:`traces.calibration`) reads its statistics from this JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .cachesim import POLICIES, SEMANTICS, hit_rates, layer_next_use
from .io import atomic_path, read_trace
from .schema import Trace

# Capacities from the published tables (shared/traces/README.md), always included for that expert count.
PUBLISHED_CAPACITIES = {8: [3, 4, 5, 6], 128: [8, 16, 32, 64], 512: [254]}
LABELS = {"lru": "LRU", "lfu": "LFU", "belady": "Belady"}
REUSE_BINS = [1, 2, 3, 5, 9, 17, 33, 65, 129]  # left edges in tokens: 1, 2, 3-4, 5-8, ..., 129+


def default_capacities(num_experts: int) -> list[int]:
    """Every capacity 1..E-1 when E <= 16; otherwise powers of two, fractions 10/25/50/75% of E and the
    published capacities for E, all within 1..E-1."""
    if num_experts <= 16:
        return list(range(1, num_experts))
    caps = {2**i for i in range(int(np.log2(num_experts)) + 1)}
    caps |= {max(1, round(f * num_experts)) for f in (0.1, 0.25, 0.5, 0.75)}
    caps |= set(PUBLISHED_CAPACITIES.get(num_experts, []))
    return sorted(c for c in caps if 1 <= c < num_experts)


def selection_shares(trace: Trace) -> list[np.ndarray]:
    """Per layer: each expert's share of the layer's selections, most used first."""
    return [
        np.sort(np.bincount(trace.experts[:, layer].ravel(), minlength=E) / max(trace.experts[:, layer].size, 1))[::-1]
        for layer, E in enumerate(trace.meta.num_experts)
    ]


def popularity(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: (max share / uniform share, entropy of the selection shares / log(E))."""
    max_ratio, entropy = [], []
    for share, E in zip(selection_shares(trace), trace.meta.num_experts):
        max_ratio.append(share[0] * E)
        nz = share[share > 0]
        entropy.append(float(-(nz * np.log(nz)).sum() / np.log(E)) if E > 1 else 1.0)
    return np.asarray(max_ratio), np.asarray(entropy)


def top_shares(trace: Trace, tops: list[int]) -> np.ndarray:
    """float [len(tops), L]: share of each layer's selections taken by its ``n`` most used experts, for each n
    in ``tops`` (the hit rate of a cache pinning, in hindsight, the n most popular experts of every layer)."""
    shares = selection_shares(trace)
    return np.asarray([[share[:n].sum() for share in shares] for n in tops]).reshape(len(tops), len(shares))


def adjacent_overlap(trace: Trace) -> np.ndarray:
    """Per layer: mean |E_t & E_t+1| / k over adjacent tokens of the same sequence (NaN if none)."""
    ex = np.sort(trace.experts, axis=2)
    same_seq = trace.seq_id[1:] == trace.seq_id[:-1]
    if not same_seq.any():
        return np.full(trace.meta.num_layers, np.nan)
    common = (ex[1:, :, :, None] == ex[:-1, :, None, :]).any(axis=3).sum(axis=2)  # [T-1, L]
    return common[same_seq].mean(axis=0) / trace.meta.top_k


def reuse_distances(trace: Trace) -> list[np.ndarray]:
    """Per layer: distances in tokens from each use of an expert to its next use at the same layer, within
    the same sequence (uses with no later use in their sequence are left out)."""
    nxt = layer_next_use(trace.experts)  # [T, L, K]
    T = trace.num_tokens
    t = np.arange(T)[:, None, None]
    seq_next = trace.seq_id[np.minimum(nxt, T - 1)]
    valid = (nxt < T) & (seq_next == trace.seq_id[:, None, None])
    dist = nxt - t
    return [dist[:, layer][valid[:, layer]] for layer in range(trace.meta.num_layers)]


def summarise_distances(dist: np.ndarray, uses: int) -> dict:
    """Quantiles, mean, the share of uses never reused in their sequence, and a log2-binned histogram."""
    edges = REUSE_BINS + [np.iinfo(np.int64).max]
    hist = np.histogram(dist, bins=edges)[0] if dist.size else np.zeros(len(REUSE_BINS), int)
    labels = [f"{lo}" if hi - lo == 1 else f"{lo}-{hi - 1}" for lo, hi in zip(REUSE_BINS, edges[1:-1])]
    labels.append(f"{REUSE_BINS[-1]}+")
    q = np.quantile(dist, [0.1, 0.25, 0.5, 0.75, 0.9]) if dist.size else [np.nan] * 5
    return {
        "quantiles": {f"p{p}": float(v) for p, v in zip((10, 25, 50, 75, 90), q)},
        "mean": float(dist.mean()) if dist.size else float("nan"),
        "never_reused": float(1 - dist.size / uses) if uses else float("nan"),
        "histogram": dict(zip(labels, (int(h) for h in hist))),
    }


def cross_layer_recall(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Per layer pair (l, l+1): (recall, baseline recall), both fitted IN-SAMPLE on this trace.

    Fit P(e' at l+1 | e at l) from co-occurrence counts over all tokens; for each token score every layer
    l+1 expert by the sum over its layer-l experts e of P(e' | e), predict the top-k scores, and report
    |predicted & actual| / k averaged over tokens. The baseline predicts the k most popular layer-(l+1)
    experts for every token; the gap between the two is what expert ids at layer l add."""
    T, L, K = trace.experts.shape
    recall, base = np.full(L - 1, np.nan), np.full(L - 1, np.nan)
    rows = np.arange(T)[:, None]
    for layer in range(L - 1):
        E0, E1 = trace.meta.num_experts[layer], trace.meta.num_experts[layer + 1]
        a, b = trace.experts[:, layer].astype(np.int64), trace.experts[:, layer + 1].astype(np.int64)
        co = np.zeros((E0, E1))
        np.add.at(co, (np.repeat(a, K, axis=1).ravel(), np.tile(b, (1, K)).ravel()), 1.0)
        cond = co / np.maximum(co.sum(axis=1, keepdims=True), 1.0)
        score = cond[a].sum(axis=1)  # [T, E1]
        pred = np.argsort(-score, axis=1, kind="stable")[:, :K]
        actual = np.zeros((T, E1), dtype=bool)
        actual[rows, b] = True
        recall[layer] = actual[rows, pred].sum() / (T * K)
        top = np.argsort(-np.bincount(b.ravel(), minlength=E1), kind="stable")[:K]
        base[layer] = actual[:, top].sum() / (T * K)
    return recall, base


def compute_stats(
    trace: Trace, capacities: list[int] | None = None, policies: tuple[str, ...] = POLICIES,
    moe_trace_semantics: bool = False,
) -> dict:
    """Every statistic as one JSON-ready dict (see the module docstring and ``--json``). Overall values are
    means over layers (every layer has the same number of accesses). ``policies``: the cache policies to
    simulate; ``moe_trace_semantics``: the cache variant of :func:`traces.cachesim.hit_rates` (published
    Qwen3 numbers only)."""
    meta = trace.meta
    L, K, T = meta.num_layers, meta.top_k, trace.num_tokens
    caps = capacities or default_capacities(min(meta.num_experts))
    rates = hit_rates(trace, caps, policies, moe_trace_semantics)  # {policy: [C, L]}, equal accesses per layer
    max_ratio, entropy = popularity(trace)
    tops = top_shares(trace, caps)  # [C, L]
    overlap = adjacent_overlap(trace)
    dists = reuse_distances(trace)
    recall, base = cross_layer_recall(trace) if L > 1 else (np.array([]), np.array([]))
    uses = T * K
    per_layer = []
    for layer in range(L):
        per_layer.append({
            "layer": layer,
            "num_experts": meta.num_experts[layer],
            "adjacent_overlap": _num(overlap[layer]),
            "max_over_uniform": _num(max_ratio[layer]),
            "top_share": {str(c): _num(tops[i, layer]) for i, c in enumerate(caps)},
            "normalised_entropy": _num(entropy[layer]),
            "reuse_distance": summarise_distances(dists[layer], uses),
            "cross_layer_recall": _num(recall[layer]) if layer < L - 1 else None,
            "cross_layer_baseline_recall": _num(base[layer]) if layer < L - 1 else None,
            "hit_rate": {p: {str(c): _num(r[i, layer]) for i, c in enumerate(caps)} for p, r in rates.items()},
        })
    uniform = len(set(meta.num_experts)) == 1
    return {
        "model": meta.model,
        "source": meta.source,
        "num_layers": L,
        "num_experts": meta.num_experts[0] if uniform else meta.num_experts,
        "top_k": K,
        "num_tokens": T,
        "num_sequences": int(np.unique(trace.seq_id).size),
        "adjacent_overlap": _num(np.nanmean(overlap)),
        # popularity: the most used expert's share of a layer's selections over the uniform share 1/E
        "max_over_uniform": {"mean": _num(max_ratio.mean()), "min": _num(max_ratio.min()), "max": _num(max_ratio.max()),
                             "per_layer": [_num(x) for x in max_ratio]},
        "top_share": {str(c): _num(tops[i].mean()) for i, c in enumerate(caps)},
        "normalised_entropy": _num(entropy.mean()),
        "reuse_distance": summarise_distances(np.concatenate(dists), uses * L),
        "cross_layer_recall": _num(recall.mean()) if recall.size else None,
        "cross_layer_baseline_recall": _num(base.mean()) if base.size else None,
        "cross_layer_fit": "in-sample",
        "capacities": caps,
        "cache_semantics": "moe-trace" if moe_trace_semantics else "continuous",
        "hit_rate": {p: {str(c): _num(r[i].mean()) for i, c in enumerate(caps)} for p, r in rates.items()},
        "per_layer": per_layer,
    }


def _num(x: float) -> float | None:
    x = float(x)
    return None if np.isnan(x) else round(x, 6)


def _pct(x: float | None) -> str:
    return "   -" if x is None else f"{100 * x:5.1f}"


def format_table(stats: dict, name: str) -> str:
    """Readable per-layer and overall tables."""
    caps, policies = stats["capacities"], list(stats["hit_rate"])
    shown = [c for c in caps if c in PUBLISHED_CAPACITIES.get(stats["num_experts"], [])] or caps[:: max(1, len(caps) // 4)][:4]
    lines = [
        f"{name}: {stats['model']}, {stats['num_tokens']} tokens in {stats['num_sequences']} sequence(s), "
        f"{stats['num_layers']} layers, top-{stats['top_k']} of {stats['num_experts']} experts",
        f"source: {stats['source'] or '(not recorded)'}",
        f"adjacent overlap {_pct(stats['adjacent_overlap'])}%  max/uniform share {stats['max_over_uniform']['mean']:.2f}"
        f"  entropy {stats['normalised_entropy']:.3f}  reuse distance p50 {stats['reuse_distance']['quantiles']['p50']:.0f}"
        f"  cross-layer recall {_pct(stats['cross_layer_recall'])}% (popularity baseline"
        f" {_pct(stats['cross_layer_baseline_recall'])}%, in-sample)",
        "",
        "layer overlap% max/unif entropy reuse_p50 xlayer%  " + "  ".join(f"{LABELS[p]}@{c}" for p in policies for c in shown),
    ]
    for row in stats["per_layer"]:
        hits = "  ".join(f"{_pct(row['hit_rate'][p][str(c)]):>{len(p) + len(str(c)) + 1}}" for p in policies for c in shown)
        p50 = row["reuse_distance"]["quantiles"]["p50"]
        lines.append(
            f"{row['layer']:5d} {_pct(row['adjacent_overlap']):>8} {row['max_over_uniform']:9.2f} "
            f"{row['normalised_entropy']:7.3f} {p50:9.0f} {_pct(row['cross_layer_recall']):>7}  {hits}"
        )
    lines += ["", "overall hit rate (% of accesses, per-layer caches)",
              "slots/layer  " + "  ".join(f"{LABELS[p]:>5}" for p in policies)]
    for c in caps:
        lines.append(f"{c:11d}  " + "  ".join(f"{_pct(stats['hit_rate'][p][str(c)]):>5}" for p in policies))
    return "\n".join(lines)


def plot_hit_rates(stats: dict, name: str, out: Path) -> Path:
    """Hit rate vs slots per layer, one line per policy, written atomically to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = stats["capacities"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy, marker in zip(stats["hit_rate"], "osD"):
        ax.plot(caps, [100 * stats["hit_rate"][policy][str(c)] for c in caps], marker=marker, label=LABELS[policy])
    ax.set_xlabel(f"cache slots per layer (experts, of {stats['num_experts']})")
    ax.set_ylabel("hit rate (% of expert accesses)")
    ax.set_title(f"{name}: {stats['model']}, {stats['num_tokens']} tokens, top-{stats['top_k']}")
    if len(caps) > 8 and caps[-1] / caps[0] > 16:
        ax.set_xscale("log", base=2)
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(title="eviction policy")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``stats`` subcommand."""
    p = subparsers.add_parser("stats", help="popularity, locality, reuse, cross-layer and cache hit-rate statistics",
                              description=SEMANTICS, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="trace file (.parquet)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table (no plot)")
    p.add_argument("--plot", type=Path, help="hit-rate plot path (default: <trace stem>.stats.png beside the trace)")
    p.add_argument("--capacities", type=lambda s: [int(x) for x in s.split(",")], help="slots per layer, e.g. 1,2,4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    trace = read_trace(args.trace)
    stats = compute_stats(trace, args.capacities)
    name = args.trace.name
    if args.json:
        print(json.dumps(stats))
        if args.plot:
            plot_hit_rates(stats, name, args.plot)
        return 0
    print(format_table(stats, name))
    out = plot_hit_rates(stats, name, args.plot or args.trace.with_name(f"{args.trace.stem}.stats.png"))
    print(f"\nplot: {out}")
    return 0
