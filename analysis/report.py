"""``python -m analysis report MULTIRUN_DIR``: the runs table (Parquet + CSV), figures, and a Markdown and a
self-contained HTML report."""

from __future__ import annotations

import argparse
import base64
import html
from pathlib import Path

import pandas as pd

from traces.io import atomic_path

from .figures import all_figures, reference_hardware
from .runs import load_runs

HEADLINE = {
    "policy": "policy",
    "capacity_fraction": "cache",
    "hit_rate": "hit rate",
    "belady_hit_rate": "Belady hit",
    "stall_s": "stall s",
    "oracle_stall_s": "oracle stall s",
    "stall_vs_ondemand": "stall / on-demand LRU",
    "tpot_ms": "TPOT ms",
    "tokens_per_s": "tokens/s",
    "prefetch_precision": "prefetch prec.",
    "prefetch_recall": "prefetch recall",
    "wasted_gb": "wasted GB",
}


def headline(df: pd.DataFrame) -> dict[str, tuple[str, pd.DataFrame]]:
    """Per trace (at the reference hardware): {heading: (trace name, the headline columns, one row per policy
    and cache size)}."""
    hw = reference_hardware(df)
    out = {}
    for tr, t in df[df.hardware == hw].groupby("trace_name"):
        t = t.assign(tpot_ms=t.tpot_s * 1e3)
        cols = [c for c in HEADLINE if c in t]
        out[f"{tr} on {hw}"] = (tr, t[cols].rename(columns=HEADLINE).sort_values(["cache", "stall s"]))
    return out


def trace_sources(df: pd.DataFrame) -> dict[str, str]:
    """Per trace name: where its routing comes from (results.json ``run.trace_source``; a synthetic preset says
    whose statistics it matches), the distinct values joined by '; '."""
    out = {}
    for tr, t in df.groupby("trace_name"):
        found = sorted({str(s) for s in t.get("trace_source", pd.Series(dtype=object)).dropna() if str(s)})
        out[tr] = "; ".join(found) or "not recorded (results written before run.trace_source existed)"
    return out


def best_policies(df: pd.DataFrame) -> pd.DataFrame:
    """The lowest-stall deployable policy (no oracle, no Belady) per trace, hardware and cache size."""
    real = df[~df.cache.isin(["belady"]) & ~df.predictor.isin(["oracle"])]
    if real.empty:
        return pd.DataFrame()
    idx = real.groupby(["trace_name", "hardware", "capacity_fraction"])["stall_s"].idxmin()
    best = real.loc[idx, ["trace_name", "hardware", "capacity_fraction", "policy", "stall_s", "oracle_stall_s", "stall_vs_ondemand"]]
    return best.reset_index(drop=True)


def _fmt(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for c in out.columns:
        if c in ("cache", "capacity_fraction"):
            out[c] = out[c].map(lambda v: f"{v:.0%}" if pd.notna(v) else "")
        elif pd.api.types.is_float_dtype(out[c]):
            out[c] = out[c].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    return out


def _md_table(df: pd.DataFrame) -> str:
    df = _fmt(df)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines)


def summary_lines(df: pd.DataFrame, figs: dict) -> list[str]:
    lines = [
        f"- runs: {len(df)}; traces: {', '.join(sorted(df.trace_name.unique()))}",
        f"- policies: {', '.join(sorted(df.policy.unique()))}",
        f"- hardware: {', '.join(sorted(df.hardware.unique()))}; cache sizes: "
        + ", ".join(f"{c:.0%}" for c in sorted(df.capacity_fraction.dropna().unique())),
        f"- drivers: {', '.join(sorted(df.driver.dropna().unique()))}; batch sizes: {sorted(df.batch_size.unique().tolist())}",
    ]
    skipped = [f"{k} ({v})" for k, v in figs.items() if isinstance(v, str)]
    if skipped:
        lines.append(f"- figures not drawn: {'; '.join(skipped)}")
    return lines


def write_report(root: Path, out_dir: Path) -> dict[str, Path]:
    df = load_runs(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "runs.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out_dir / "runs.csv") as tmp:
        df.to_csv(tmp, index=False)
    figs = all_figures(df, root, out_dir)
    heads = headline(df)
    sources = trace_sources(df)
    best = best_policies(df)
    intro = summary_lines(df, figs)

    md = ["# Policy comparison", "", f"Results under `{root}`.", "", *intro, ""]
    md += ["Stall is the time the compute waited for experts; the oracle is the perfect-foresight prefetch-and-cache",
           "schedule on the same hardware, Belady the MIN hit rate at the same capacity (see README, *Outputs*).", ""]
    if not best.empty:
        md += ["## Best deployable policy per trace, hardware and cache size", "", _md_table(best), ""]
    for name, (tr, t) in heads.items():
        md += [f"## {name}", "", _md_table(t), "", f"Trace {tr}: {sources[tr]}.", ""]
    md += ["## Figures", ""]
    md += [f"![{k}]({Path(v).name})" for k, v in figs.items() if not isinstance(v, str)]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(md) + "\n")

    body = ["<h1>Policy comparison</h1>", f"<p>Results under <code>{html.escape(str(root))}</code>.</p>", "<ul>"]
    body += [f"<li>{html.escape(line[2:])}</li>" for line in intro] + ["</ul>"]
    if not best.empty:
        body += ["<h2>Best deployable policy per trace, hardware and cache size</h2>", _fmt(best).to_html(index=False)]
    for name, (tr, t) in heads.items():
        body += [f"<h2>{html.escape(name)}</h2>", _fmt(t).to_html(index=False),
                 f"<p>Trace {html.escape(str(tr))}: {html.escape(sources[tr])}.</p>"]
    body.append("<h2>Figures</h2>")
    for k, v in figs.items():
        if not isinstance(v, str):
            data = base64.b64encode(Path(v).read_bytes()).decode()
            body.append(f'<figure><img alt="{k}" src="data:image/png;base64,{data}"/><figcaption>{k}</figcaption></figure>')
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Policy comparison</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>"
        + "\n".join(body) + "</body></html>"
    )
    with atomic_path(out_dir / "report.html") as tmp:
        tmp.write_text(page)
    return {"md": out_dir / "report.md", "html": out_dir / "report.html", "table": out_dir / "runs.parquet"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="collect a sweep's results into a table, figures and a Markdown/HTML report",
        description="Reads every results.json under MULTIRUN_DIR (a hydra sweep dir) and writes runs.parquet, "
        "runs.csv, PNG figures, report.md and a self-contained report.html.",
    )
    p.add_argument("multirun_dir", type=Path, help="directory holding the runs (searched recursively)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: MULTIRUN_DIR/report)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    paths = write_report(args.multirun_dir, args.out or args.multirun_dir / "report")
    print(f"report: {paths['html']} (and {paths['md'].name}, {paths['table'].name})")
    return 0
