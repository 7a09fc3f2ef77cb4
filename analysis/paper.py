"""``python -m analysis paper``: test the two ExpertFlow papers' claims on our traces, from one command.

It runs hydra sweeps of the simulator (``python -m sim -m ...`` in a subprocess: this module reads their
``results.json`` only, it never imports the simulator), scores the predictors on the reference model's splits,
then writes ``paper.json`` (per claim: the compared policies, the metric, the values, whether the claim held),
``paper.md`` and one figure per claim. Sweeps that finished before with the same overrides are not run again,
so an interrupted run resumes; a finished sweep with other overrides (the grid changed) stops the command
(delete its directory to redo it) and an unfinished one is run again whole. ``--quick`` is a small grid on the
reference model (CI).

The claims and how each is decided are in :mod:`analysis.claims`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from replay.config_keys import rewrite_overrides
from traces.cli import plain
from traces.io import atomic_path

from . import claims, paper_figs
from .errors import AnalysisError
from .render import md_table as _md_table
from .report import trace_sources
from .runs import load_runs, relative_to_ondemand

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = "ondemand-lru,ondemand-lfru,transition-adaptive,expertflow-2024,oracle-belady"


@dataclass(frozen=True)
class Grid:
    traces: tuple[str, ...]  # conf/trace names
    bandwidths_GBps: str  # claim 1: comma list of link bandwidths
    fractions: str  # claim 1: cache sizes (share of all experts)
    distances: str  # claim 1: fixed horizons compared with the adaptive one
    hardware: str  # claim 3: hardware presets
    strategies: str  # claims 3 and 4: conf/strategy names
    memory_fractions: str  # claim 4: cache sizes scanned for the memory needed
    batch_sizes: str  # claim 5
    sched_traces: tuple[str, ...]  # claim 5: traces with enough sequences for large batches
    sched_overrides: tuple[str, ...]  # claim 5: e.g. more, shorter synthetic sequences
    max_tokens: int | None  # replay at most this many test tokens per run


FULL = Grid(
    traces=("reference-moe", "deepseek-synth", "qwen-synth", "mixtral-real"),
    bandwidths_GBps="3,6,12,25", fractions="0.25,0.5,0.75", distances="1,2,3,4",
    hardware="cpu-nvme,t4,a100-pcie4,h100-pcie5", strategies=STRATEGIES,
    memory_fractions="0.125,0.25,0.375,0.5,0.625,0.75,0.875", batch_sizes="4,8,16,32,64",
    sched_traces=("deepseek-synth", "qwen-synth"),
    sched_overrides=("trace.synth.sequences=256", "trace.synth.tokens=4096"), max_tokens=None,
)
QUICK = Grid(
    traces=("reference-moe",), bandwidths_GBps="3,25", fractions="0.25,0.5", distances="1,2",
    hardware="t4,h100-pcie5", strategies="ondemand-lru,expertflow-2024,oracle-belady",
    memory_fractions="0.25,0.5,0.75", batch_sizes="4,8", sched_traces=("reference-moe",), sched_overrides=(),
    max_tokens=600,
)


def sweeps(g: Grid) -> dict[str, list[str]]:
    """Sweep directory name -> hydra overrides (comma lists are swept)."""
    out: dict[str, list[str]] = {}
    cap = [f"max_tokens={g.max_tokens}"] if g.max_tokens else []
    for tr in g.traces:
        grid = [f"trace={tr}", "cache=lru", "predictor=transition", "hardware=a100-pcie4",
                f"hardware.bandwidth.bandwidth_GBps={g.bandwidths_GBps}", f"cache.fraction={g.fractions}", *cap]
        out[f"horizon-fixed-{tr}"] = [*grid, "horizon=fixed", f"horizon.distance={g.distances}"]
        out[f"horizon-adaptive-{tr}"] = [*grid, "horizon=adaptive"]
        out[f"stall-{tr}"] = [f"trace={tr}", f"strategy={g.strategies}", f"hardware={g.hardware}", "cache.fraction=0.5", *cap]
        if tr == "reference-moe":  # the learned predictors need its hidden states and token ids
            out[f"stall-{tr}-learned"] = [f"trace={tr}", "cache=lru,expertflow", "predictor=hybrid,routing_path",
                                          "horizon=fixed", "horizon.distance=1", f"hardware={g.hardware}",
                                          "cache.fraction=0.5", *cap]
        out[f"memory-{tr}"] = [f"trace={tr}", f"strategy={g.strategies}", "hardware=a100-pcie4",
                               f"cache.fraction={g.memory_fractions}", *cap]
    for tr in g.sched_traces:
        out[f"sched-{tr}"] = [f"trace={tr}", *g.sched_overrides, "strategy=ondemand-lru", "cache.fraction=0.5",
                              "scheduler=fifo,route_grouping", f"batch_size={g.batch_sizes}", *cap]
    return out


def finished_before(name: str, overrides: list[str], out: Path) -> bool:
    """Whether ``out`` holds a finished sweep with these ``overrides`` (its ``.done`` marker says so, old config
    key names read as the new ones); a finished sweep of other overrides is refused, as its runs would be read as
    this grid's."""
    done = out / ".done"
    if not done.exists():
        return False
    try:
        stored = json.loads(done.read_text())["overrides"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AnalysisError(f"{done}: not a sweep marker ({exc}); delete {out} to run sweep {name} again") from exc
    if not isinstance(stored, list) or rewrite_overrides([str(o) for o in stored]) != list(overrides):
        raise AnalysisError(f"{done}: sweep {name} there was run with overrides {stored}, this grid asks for "
                            f"{list(overrides)}; delete {out} to run it again")
    return True


def run_sweep(name: str, overrides: list[str], runs_dir: Path, jobs: int) -> Path:
    """One hydra multirun into ``runs_dir/name``; skipped when a previous one with the same overrides finished
    (marker file)."""
    out = runs_dir / name
    if finished_before(name, overrides, out):
        print(f"[paper] {name}: done before, reusing {out}", file=sys.stderr)
        return out
    if out.exists():  # an interrupted attempt: its runs may be of another grid (or more jobs) than this one
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "sim", "-m", *overrides, f"hydra.sweep.dir={out}", f"hydra.launcher.n_jobs={jobs}",
           "hydra.launcher.verbose=0"]
    print(f"[paper] {name}: {' '.join(overrides)}", file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with atomic_path(out / ".done") as tmp:
        tmp.write_text(json.dumps({"overrides": list(overrides), "wall_s": time.perf_counter() - t0}))
    print(f"[paper] {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def collect(runs_dir: Path, names: list[str]) -> pd.DataFrame:
    frames = []
    for n in names:
        df = load_runs(runs_dir / n)
        df["sweep"] = n.split("-")[0]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    # a sweep without its own on-demand LRU runs (the learned predictors) is compared with its neighbours'
    df["stall_vs_ondemand"] = relative_to_ondemand(df)
    return df


def write_paper(df: pd.DataFrame, recall: pd.DataFrame | None, out_dir: Path, grid_name: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    results = [
        claims.horizon_claim(df[df.sweep == "horizon"]),
        claims.predictor_claim(recall),
        claims.stall_claim(df[df.sweep == "stall"]),
        claims.memory_claim(df[df.sweep == "memory"]),
        claims.scheduler_claim(df[df.sweep == "sched"]),
    ]
    figs = paper_figs.all_figures(df, recall, out_dir)
    sources = trace_sources(df)
    doc = {"schema": "expertflow.paper/1", "grid": grid_name, "runs": int(len(df)),
           "traces": sorted(df.trace_name.unique().tolist()), "trace_sources": sources,
           "claims": [c.to_json() for c in results]}
    with atomic_path(out_dir / "paper.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=False, default=float))
    md = ["# The ExpertFlow claims, tested", "",
          f"Grid `{grid_name}`: {len(df)} simulator runs on {', '.join(doc['traces'])}; regenerate with "
          f"`python -m analysis paper{' --quick' if grid_name == 'quick' else ''}`.", "",
          "Traces:", *[f"- {tr}: {src}" for tr, src in sources.items()], "",
          "| # | claim | held | headline |", "|---|---|---|---|"]
    md += [f"| {i} | {c.claim} | {c.verdict()} | {c.headline} |" for i, c in enumerate(results, 1)]
    for i, c in enumerate(results, 1):
        md += ["", f"## {i}. {c.title}", "", f"**Claim.** {c.claim}", "", f"**Verdict: {c.verdict()}.** {c.note}", ""]
        if c.table is not None and not c.table.empty:
            md += [_md_table(c.table), ""]
        fig = figs.get(c.key)
        md += [f"![{c.key}]({Path(fig).name})" if fig and not isinstance(fig, str) else f"(figure not drawn: {fig})"]
    with atomic_path(out_dir / "paper.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")
    return doc


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("paper", help="run the sweeps that test the ExpertFlow claims; write paper.json, paper.md, figures",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid on the reference model only (39 runs, about 1.5 minutes)")
    p.add_argument("--runs", type=Path, help="where the sweeps write (default multirun/paper[-quick])")
    p.add_argument("--out", type=Path, help="where paper.json, paper.md and figures go (default docs/paper, or RUNS/report with --quick)")
    p.add_argument("--jobs", type=int, default=2, help="parallel simulator jobs (hydra joblib launcher)")
    p.add_argument("--no-predictors", action="store_true", help="skip scoring the predictors (claim 2)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    grid, name = (QUICK, "quick") if args.quick else (FULL, "full")
    runs_dir = (args.runs or ROOT / "multirun" / f"paper{'-quick' if args.quick else ''}").resolve()
    out_dir = (args.out or (runs_dir / "report" if args.quick else ROOT / "docs" / "paper")).resolve()
    todo = sweeps(grid)
    from tqdm import tqdm

    for sweep_name, overrides in tqdm(todo.items(), desc="paper sweeps", unit="sweep", file=sys.stderr):
        run_sweep(sweep_name, overrides, runs_dir, args.jobs)
    df = collect(runs_dir, list(todo))
    recall = None if args.no_predictors else claims.predictor_recall(ROOT / "data" / "reference-moe", runs_dir)
    doc = write_paper(df, recall, out_dir, name)
    for c in doc["claims"]:
        print(f"claim {c['id']}: {c['verdict']:>10}  {c['headline']}")
    print(f"wrote {out_dir / 'paper.json'} and {out_dir / 'paper.md'}")
    return 0
