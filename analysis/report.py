"""``python -m analysis report MULTIRUN_DIR``: the runs table (Parquet + CSV), figures, and a Markdown and a
self-contained HTML report that open with their headline: per trace and hardware, which deployable policy wins,
by how much against on-demand LRU and how far from the oracle bound."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from traces.io import atomic_path

from .figures import all_figures, reference_hardware
from .headline import headline
from .render import Bullets, Figure, Heading, Para, Table, html_page, markdown
from .report_tables import best_table, policy_table
from .runs import load_runs
from .seeds import seeds_in
from .sweep_plan import sweep_status

DEFINITIONS = [
    "**stall**: time the compute waited for experts to reach fast memory; **stall per token** divides it by the "
    "tokens replayed.",
    "**on-demand LRU** (`lru+none`): load an expert when a token needs it, evict the least recently used: the "
    "baseline every policy is compared with (same trace, hardware, cache size, batch size and seed).",
    "**oracle bound**: the stall of a perfect-foresight prefetch-and-cache schedule on the same hardware and cache "
    "size (the better of two schedules); **Belady hit rate**: the hit rate of Belady's MIN at the same capacity.",
    "**(bound)**: a clairvoyant policy (Belady eviction knows future requests; the oracle predictor knows future "
    "routing). Not deployable: it shows what a real policy could at best reach, and is never called the best.",
    "**TPOT**: mean time per output token (decode step); **all-resident TPOT**: the compute per step alone, as if "
    "every expert were in fast memory (on these decode-only traces, the TPOT with no stall).",
    "**×**: a ratio (1.00× = the same); **%** of cache: the share of all experts fast memory holds.",
]


def trace_sources(df: pd.DataFrame) -> dict[str, str]:
    """Per trace name: where its routing comes from (results.json ``run.trace_source``; a synthetic preset says
    whose statistics it matches), the distinct values joined by '; '."""
    out = {}
    for tr, t in df.groupby("trace_name"):
        found = sorted({str(s) for s in t.get("trace_source", pd.Series(dtype=object)).dropna() if str(s)})
        out[tr] = "; ".join(found) or "not recorded (results written before run.trace_source existed)"
    return out


def summary(df: pd.DataFrame, seeds: list[int]) -> list[str]:
    caps = ", ".join(f"{c:.0%}" for c in sorted(df.capacity_fraction.dropna().unique()))
    seed_line = (f"seeds: {', '.join(map(str, seeds))} (each table value is the mean over them, with the min–max "
                 "range in brackets where they differ; figures draw the range as bars)") if len(seeds) > 1 else \
        f"seed: {seeds[0] if seeds else 'n/a'} (one run per configuration: no spread over seeds is shown)"
    return [
        f"runs: {len(df)}; traces: {', '.join(sorted(df.trace_name.unique()))}",
        f"policies: {', '.join(sorted(df.policy.unique()))}",
        f"hardware: {', '.join(sorted(df.hardware.unique()))}; cache sizes: {caps}; batch sizes: "
        f"{', '.join(map(str, sorted(df.batch_size.unique().tolist())))}; drivers: {', '.join(sorted(df.driver.dropna().unique()))}",
        seed_line,
    ]


def build(df: pd.DataFrame, root: Path, figs: dict, missing: list[str]) -> list:
    """The report as blocks: headline, what the sweep holds and the definitions, the tables, the figures."""
    seeds = seeds_in(df)
    sources = trace_sources(df)
    blocks: list = [Heading("Policy comparison", 1), Para(f"Results under `{root}`.")]
    if missing:
        blocks += [Para("**Incomplete sweep.** " + " ".join(missing))]
    blocks.append(Heading("Headline"))
    for tr, lines in headline(df).items():
        blocks += [Para(f"**{tr}**: {sources[tr]}."), Bullets(lines)]
    blocks += [Heading("What was run"), Bullets(summary(df, seeds)), Heading("Definitions"), Bullets(DEFINITIONS)]
    best = best_table(df)
    if not best.empty:
        blocks += [Heading("Best deployable policy per trace, hardware and cache size"), Table(best)]
    hw = reference_hardware(df)
    for (tr, batch), t in df[df.hardware == hw].groupby(["trace_name", "batch_size"], sort=True):
        batch_note = f", batch {batch}" if df.batch_size.nunique() > 1 else ""
        blocks += [Heading(f"{tr} on {hw}{batch_note}"), Table(policy_table(t)),
                   Para(f"Trace {tr}: {sources[tr]}. Every policy at every cache size on {hw}, the hardware most runs "
                        "used; `runs.csv` holds every run.")]
    blocks.append(Heading("Figures"))
    blocks += [f for f in figs.values() if isinstance(f, Figure)]
    skipped = [f"{k} ({v})" for k, v in figs.items() if isinstance(v, str)]
    if skipped:
        blocks.append(Para("Figures not drawn: " + "; ".join(skipped) + "."))
    return blocks


def write_report(root: Path, out_dir: Path, log=None) -> dict[str, Path]:
    log = log or sys.stderr
    df = load_runs(root, log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "runs.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out_dir / "runs.csv") as tmp:
        df.to_csv(tmp, index=False)
    status = sweep_status(Path(root), {Path(root) / d for d in df.run_dir})
    missing = [s.sentence() for s in status if s.sentence()]
    for line in missing:
        print(f"warning: {line}", file=log)
    figs = all_figures(df, root, out_dir)
    blocks = build(df, root, figs, missing)
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(markdown(blocks))
    with atomic_path(out_dir / "report.html") as tmp:
        tmp.write_text(html_page(blocks, "Policy comparison"))
    return {"md": out_dir / "report.md", "html": out_dir / "report.html", "table": out_dir / "runs.parquet"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="collect a sweep's results into a table, figures and a Markdown/HTML report",
        description="Reads every results.json under MULTIRUN_DIR (a hydra sweep dir) and writes runs.parquet, "
        "runs.csv, PNG figures, report.md and a self-contained report.html. The report opens with a headline per "
        "trace and hardware (best deployable policy vs on-demand LRU and the oracle bound); values are means over "
        "seeds with their min-max range. A sweep whose multirun.yaml plans jobs that have no results (killed "
        "midway) is reported as incomplete, naming the missing jobs.",
    )
    p.add_argument("multirun_dir", type=Path, help="directory holding the runs (searched recursively)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: MULTIRUN_DIR/report)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    paths = write_report(args.multirun_dir, args.out or args.multirun_dir / "report")
    print(f"report: {paths['html']} (and {paths['md'].name}, {paths['table'].name})")
    return 0
