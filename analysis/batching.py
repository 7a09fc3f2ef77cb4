"""``python -m analysis batching``: stall against batch size for the main strategies, with the oracle bound.

It runs one hydra sweep of the simulator per trace (``python -m sim -m ...`` in a subprocess, as ``analysis
paper`` does: this module reads their ``results.json`` only), then writes ``batching.json`` (one row per run),
``batching.md`` (tables: stall per decoded token against batch size, per trace and cache size) and two figures:
``stall_vs_batch.png`` and ``horizon_trajectory.png`` (the adaptive horizon's distance over a run, from the
``horizon_trajectory`` of its results). A sweep finished before with the same overrides is reused.

The synthetic traces are generated with many short sequences (``trace.synth.sequences=256``,
``trace.synth.tokens=4096``) so that 64 of them can decode together; ``mixtral-real`` holds 2 sequences, so
every batch size replays it at batch 2 (the table's ``tokens/step`` column says what a step really held).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from traces.io import atomic_path

from .paper import ROOT, run_sweep
from .plot_style import _colors, _save, plt
from .render import md_table
from .runs import find_results, load_runs

STRATEGIES = ("ondemand-lru", "ondemand-lfru", "ondemand-belady", "transition-fixed", "transition-adaptive",
              "expertflow-2024", "oracle-belady")


@dataclass(frozen=True)
class Grid:
    traces: dict[str, tuple[str, ...]]  # conf/trace name -> its extra overrides
    batch_sizes: str
    fractions: str
    strategies: tuple[str, ...]


MANY_SEQUENCES = ("trace.synth.sequences=256", "trace.synth.tokens=4096")
FULL = Grid(traces={"deepseek-synth": MANY_SEQUENCES, "qwen-synth": MANY_SEQUENCES,
                    "mixtral-real": ("split.test_fraction=null",)},
            batch_sizes="1,4,8,16,32,64", fractions="0.25,0.5", strategies=STRATEGIES)
QUICK = Grid(traces={"deepseek-synth": ("trace.synth.sequences=32", "trace.synth.tokens=512")},
             batch_sizes="1,4,16", fractions="0.5", strategies=("ondemand-lru", "transition-adaptive", "oracle-belady"))


def sweeps(g: Grid) -> dict[str, list[str]]:
    return {f"batching-{tr}": [f"trace={tr}", *extra, f"strategy={','.join(g.strategies)}",
                               f"batch_size={g.batch_sizes}", f"cache.fraction={g.fractions}"]
            for tr, extra in g.traces.items()}


def collect(runs_dir: Path, names: list[str]) -> pd.DataFrame:
    df = pd.concat([load_runs(runs_dir / n) for n in names], ignore_index=True)
    df["strategy"] = strategy_of(df)
    df["tokens_per_step"] = df.tokens / df.steps
    df["stall_ms_per_token"] = 1e3 * df.stall_s / df.tokens
    df["bound_ms_per_token"] = 1e3 * df.oracle_stall_s / df.tokens
    return df


def strategy_of(df: pd.DataFrame) -> pd.Series:
    """The conf/strategy name of each run, from its cache, predictor and horizon."""
    names = {("lru", "none"): "ondemand-lru", ("lfru", "none"): "ondemand-lfru", ("belady", "none"): "ondemand-belady",
             ("lru", "transition", "fixed"): "transition-fixed", ("lru", "transition", "adaptive"): "transition-adaptive",
             ("expertflow", "transition", "fixed"): "expertflow-2024", ("belady", "oracle", "fixed"): "oracle-belady"}

    def one(r) -> str:
        key = (r.cache, r.predictor) if r.predictor == "none" else (r.cache, r.predictor, r.horizon)
        return names.get(key, r.policy)
    return df.apply(one, axis=1)


def tables(df: pd.DataFrame) -> dict[tuple[str, float], pd.DataFrame]:
    """Per (trace, cache size): stall per decoded token (ms) by strategy and batch size, the bound's row last."""
    out = {}
    for (tr, frac), g in df.groupby(["trace_name", "capacity_fraction"]):
        t = g.pivot_table(index="strategy", columns="batch_size", values="stall_ms_per_token")
        t = t.reindex([s for s in STRATEGIES if s in t.index])
        t.loc["oracle bound"] = g.groupby("batch_size").bound_ms_per_token.min()
        t.loc["tokens/step"] = g.groupby("batch_size").tokens_per_step.mean()
        t.columns = [f"batch {b}" for b in t.columns]
        out[tr, frac] = t.reset_index().rename(columns={"index": "strategy"})
    return out


def stall_figure(df: pd.DataFrame, out: Path) -> Path:
    keys = sorted(df.groupby(["trace_name", "capacity_fraction"]).groups)
    traces = sorted({k[0] for k in keys})
    fracs = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(len(fracs), len(traces), figsize=(4.8 * len(traces), 3.8 * len(fracs)), squeeze=False)
    colors = _colors(list(STRATEGIES))
    for i, frac in enumerate(fracs):
        for j, tr in enumerate(traces):
            ax, g = axes[i, j], df[(df.trace_name == tr) & (df.capacity_fraction == frac)]
            for s in STRATEGIES:
                t = g[g.strategy == s].sort_values("batch_size")
                if not t.empty:
                    ax.plot(t.batch_size, t.stall_ms_per_token, marker="o", ms=3, label=s, color=colors[s])
            b = g.groupby("batch_size").bound_ms_per_token.min()
            ax.plot(b.index, b.values, "k--", lw=1, label="oracle bound")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(g.batch_size.unique()), [str(int(x)) for x in sorted(g.batch_size.unique())])
            ax.set_xlabel("batch size")
            ax.set_ylabel("stall per decoded token (ms)")
            ax.set_title(f"{tr}, {frac:.0%} cached", fontsize=10)
    axes[0, -1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, out / "stall_vs_batch.png")


def trajectories(runs_dir: Path, names: list[str]) -> list[dict]:
    """The adaptive runs' horizon trajectories (results.json ``horizon_trajectory``) with their settings."""
    out = []
    for n in names:
        for p in find_results(runs_dir / n):
            res = json.loads(p.read_text())
            run = res.get("run", {})
            traj = res.get("horizon_trajectory")
            if run.get("horizon") == "adaptive" and traj:
                layers, steps = run.get("num_layers"), (res.get("whole_run") or {}).get("steps")
                if layers and steps and traj[-1][0] < layers * steps:  # results written before the closing point
                    traj = [*traj, [layers * steps, traj[-1][1]]]
                out.append({"trace": run.get("trace_name"), "batch": run.get("batch_size"),
                            "fraction": run.get("capacity_fraction"), "trajectory": traj})
    return out


def trajectory_figure(trajs: list[dict], out: Path) -> Path | str:
    """Per trace (the larger cache size), the adaptive horizon's distance over each run, one band per batch size
    (0 at the band's grey line, 4 near the next); the x axis is the share of the run's layer-steps (runs of
    different batch sizes differ in length)."""
    if not trajs:
        return "no adaptive runs"
    traces = sorted({t["trace"] for t in trajs})
    batches = sorted({t["batch"] for t in trajs})
    fig, axes = plt.subplots(1, len(traces), figsize=(5.2 * len(traces), 0.5 * len(batches) + 1.2), squeeze=False)
    for ax, tr in zip(axes[0], traces):
        mine = [t for t in trajs if t["trace"] == tr]
        frac = max(t["fraction"] for t in mine)
        for t in mine:
            if t["fraction"] != frac:
                continue
            pts = np.asarray(t["trajectory"], dtype=float)
            x = pts[:, 0] / pts[-1, 0] if pts[-1, 0] > 0 else np.zeros(len(pts))
            if x[-1] < 1:  # a run that never changed its distance (no closing point): flat to the end
                x, pts = np.r_[x, 1.0], np.vstack([pts, pts[-1]])
            base = 5 * batches.index(t["batch"])
            ax.axhline(base, color="0.85", lw=0.5)
            ax.step(x, base + pts[:, 1], where="post", lw=0.8, color="C0")
        ax.set_yticks([5 * i + 2 for i in range(len(batches))], [f"batch {b}" for b in batches])
        ax.set_xlabel("share of the run (layer-steps)")
        ax.set_title(f"{tr}, {frac:.0%} cached: prefetch distance 0-4", fontsize=10)
    fig.tight_layout()
    return _save(fig, out / "horizon_trajectory.png")


def write_report(df: pd.DataFrame, trajs: list[dict], out: Path, grid_name: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    figs = {"stall_vs_batch": stall_figure(df, out), "horizon_trajectory": trajectory_figure(trajs, out)}
    cols = ["trace_name", "capacity_fraction", "batch_size", "strategy", "stall_s", "oracle_stall_s", "hit_rate",
            "copies", "tokens", "steps", "tokens_per_step", "stall_ms_per_token", "bound_ms_per_token"]
    doc = {"schema": "expertflow.batching/1", "grid": grid_name, "runs": int(len(df)),
           "rows": df[cols].sort_values(cols[:4]).to_dict(orient="records")}
    with atomic_path(out / "batching.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=float))
    md = ["# Stall against batch size", "",
          f"Grid `{grid_name}`: {len(df)} simulator runs (hardware {', '.join(sorted(df.hardware.unique()))}; "
          f"regenerate with `python -m analysis batching{' --quick' if grid_name == 'quick' else ''}`). Stall per "
          "decoded token (ms) in the measured window (after the warm-up); `oracle bound`: the perfect-foresight "
          "schedules' stall per token; `tokens/step`: tokens a step really held.", ""]
    for (tr, frac), t in tables(df).items():
        md += [f"## {tr}, {frac:.0%} cached", "", md_table(t), ""]
    md += [f"![{k}]({Path(v).name})" for k, v in figs.items() if not isinstance(v, str)]
    with atomic_path(out / "batching.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    return doc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("batching", help="stall vs batch size (1-64) for the main strategies, with the bound",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small trace, batch 1/4/16, three strategies (CI)")
    p.add_argument("--runs", type=Path, help="where the sweeps write (default multirun/batching[-quick])")
    p.add_argument("--out", type=Path, help="where batching.json, batching.md and the figures go (default RUNS/report)")
    p.add_argument("--jobs", type=int, default=2, help="parallel simulator jobs (hydra joblib launcher)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    grid, name = (QUICK, "quick") if args.quick else (FULL, "full")
    runs_dir = (args.runs or ROOT / "multirun" / f"batching{'-quick' if args.quick else ''}").resolve()
    out = (args.out or runs_dir / "report").resolve()
    todo = sweeps(grid)
    from tqdm import tqdm

    for sweep_name, overrides in tqdm(todo.items(), desc="batching sweeps", unit="sweep", file=sys.stderr):
        run_sweep(sweep_name, overrides, runs_dir, args.jobs)
    df = collect(runs_dir, list(todo))
    write_report(df, trajectories(runs_dir, list(todo)), out, name)
    print(f"wrote {out / 'batching.md'}, {out / 'batching.json'} and the figures ({len(df)} runs)")
    return 0
