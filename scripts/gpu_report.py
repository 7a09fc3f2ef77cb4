"""The GPU check's summary (``scripts/gpu_check.py``): what each step's outputs say, and ``summary.json`` /
``summary.md`` written atomically. Standard library only (it must work before anything is installed, and when a
step wrote nothing)."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

SCHEMA = "expertflow.gpu-check/1"
PACKAGES = ("torch", "transformers", "numpy", "pandas", "pyarrow", "matplotlib", "safetensors", "pytest",
            "nvidia-ml-py", "hydra-core", "omegaconf", "simpy", "hypothesis", "numba")


def new_summary(budget_s: float, facts: dict) -> dict:
    return {"schema": SCHEMA, "status": "running", "message": "", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "budget_s": budget_s, "wall_s": 0.0, "device": facts, "steps": [], "versions": {}}


# -- what each step's outputs say (each returns a callable(record) -> detail; "problem" fails a step) ---------
def read_bandwidth(path: Path):
    def parse(rec: dict) -> dict:
        return json.loads(Path(path).read_text())

    return parse


def read_model(out_dir: Path):
    def parse(rec: dict) -> dict:
        res = json.loads((Path(out_dir) / "results.json").read_text())
        keys = ("hit_rate", "stall_s", "total_s", "tokens_per_s", "copies", "bytes_moved", "expert_bytes",
                "copy_bandwidth_bytes_per_s", "tier", "device", "loads", "evictions", "prefetch_issued")
        detail = {k: res.get(k) for k in keys}
        detail["check"] = res.get("check")
        chk = res.get("check") or {}
        if not chk.get("passed"):
            detail["problem"] = (f"--check failed: tokens equal {chk.get('tokens_equal')}, max |logit diff| "
                                 f"{chk.get('max_abs_logit_diff')} (atol {chk.get('atol')})")
        return detail

    return parse


def read_pytest(xml_path: Path):
    def parse(rec: dict) -> dict:
        root = ET.parse(xml_path).getroot()
        cases = list(root.iter("testcase"))
        failed, skipped = [], []
        for c in cases:
            name = f"{c.get('classname', '')}::{c.get('name', '')}"
            if c.find("failure") is not None or c.find("error") is not None:
                failed.append(name)
            elif c.find("skipped") is not None:
                skipped.append(f"{name}: {c.find('skipped').get('message', '')}")
        detail = {"tests": len(cases), "passed": len(cases) - len(failed) - len(skipped), "failed": failed,
                  "skipped": skipped}
        if not cases:
            detail["problem"] = "no gpu-marked test ran"
        elif skipped:  # on a GPU machine a skipped gpu test proves nothing
            detail["problem"] = f"{len(skipped)} gpu test(s) skipped on a GPU machine"
        return detail

    return parse


def read_validate(work_dir: Path, out: Path):
    """validation.json of ``analysis validate`` (copied with validation.md into ``OUT/validate/``), and the copy
    rates its CUDA executor runs achieved."""

    def parse(rec: dict) -> dict:
        v = json.loads((Path(work_dir) / "validation.json").read_text())
        dest = Path(out) / "validate"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("validation.json", "validation.md", "manifest.json"):
            src = Path(work_dir) / name
            if src.is_file():
                atomic_write(dest / name, src.read_text())
        rates = {}
        for res in sorted(Path(work_dir).glob("round-*/executor/*/results.json")):
            r = json.loads(res.read_text())
            if r.get("copy_bandwidth_bytes_per_s"):
                rates.setdefault(res.parent.name, []).append(r["copy_bandwidth_bytes_per_s"])
        prof = sorted(Path(work_dir).glob("round-*/profile.json"))
        expert_bytes = json.loads(prof[0].read_text()).get("expert_bytes") if prof else None
        detail = {k: v.get(k) for k in ("rounds", "same_ranking", "ranking_real", "ranking_sim",
                                         "median_abs_time_error_pct", "max_abs_time_error_pct", "median_real_spread_pct",
                                         "errors_within_real_spread", "time_rows", "timing_free_decisions_identical")}
        detail["rows"] = v.get("rows", [])
        detail["replay_copy_bytes_per_s"] = {p: statistics.median(x) for p, x in rates.items()}
        detail["expert_bytes"] = expert_bytes
        if v.get("timing_free_decisions_identical") is False:
            detail["problem"] = "the on-demand caches' decisions differ between the simulator and the executor"
        return detail

    return parse


# -- versions ------------------------------------------------------------------------------------------------
def versions(site: Path, facts: dict) -> dict:
    """Python, platform, the GPU facts, each package's version (``site`` searched too), driver, git commit."""
    out = {"python": sys.version.split()[0], "platform": platform.platform(), **facts}
    path = [str(site), *sys.path]
    for name in PACKAGES:
        dist = next(iter(md.distributions(name=name, path=path)), None)
        out[name] = dist.version if dist is not None else None
    try:
        import pynvml

        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        out["driver"] = drv.decode() if isinstance(drv, bytes) else drv
        pynvml.nvmlShutdown()
    except Exception as exc:  # no NVML here: say so, the rest stands
        out["driver"] = f"unknown ({type(exc).__name__})"
    root = Path(__file__).resolve().parents[1]
    try:
        out["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["git_commit"] = None
    return out


# -- the summary ---------------------------------------------------------------------------------------------
def bandwidth_rows(summary: dict) -> list[dict]:
    """Copy bandwidth achieved vs the link's peak: the peak, the engine on large copies, the replays' and model
    mode's copies (each copy's own rate), from whichever steps got that far."""
    steps = {s["name"]: s.get("detail") or {} for s in summary["steps"]}
    bw = steps.get("bandwidth", {})
    peak = (bw.get("peak") or {}).get("bandwidth_bytes_per_s")
    rows = []
    if peak:
        rows.append({"copies": f"peak: one pinned copy, median of {bw['peak']['repeats']}", "bytes": bw["peak"]["bytes"],
                     "bytes_per_s": peak})
    eng = bw.get("engine") or {}
    if eng.get("bandwidth_bytes_per_s"):
        rows.append({"copies": f"copy engine: {eng['copies']} copies, {eng['streams']} streams, span",
                     "bytes": eng["expert_bytes"], "bytes_per_s": eng["bandwidth_bytes_per_s"]})
    val = steps.get("validate", {})
    for pol, rate in (val.get("replay_copy_bytes_per_s") or {}).items():
        rows.append({"copies": f"replay ({pol}), per copy, median of rounds", "bytes": val.get("expert_bytes"),
                     "bytes_per_s": rate})
    for name in ("model", "model-prefetch"):
        m = steps.get(name, {})
        if m.get("copy_bandwidth_bytes_per_s"):
            rows.append({"copies": f"{name} (reference model), per copy", "bytes": m.get("expert_bytes"),
                         "bytes_per_s": m["copy_bandwidth_bytes_per_s"]})
    for r in rows:
        r["of_peak"] = r["bytes_per_s"] / peak if peak else None
    return rows


def _f(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def to_markdown(s: dict) -> str:
    dev = s.get("device") or {}
    lines = [f"# GPU check: {s['status']}", "", s.get("message", ""), "",
             f"{dev.get('gpu', 'no GPU')}; started {s['started']}, {s['wall_s']:.0f} s of a {s['budget_s']:.0f} s budget."]
    if s["steps"]:
        lines += ["", "| step | status | wall s | timeout s | what |", "|---|---|---|---|---|"]
    for st in s["steps"]:
        note = st.get("message") or (st.get("detail") or {}).get("problem") or ""
        lines.append(f"| {st['name']} | {st['status']}{' (' + note + ')' if note else ''} | {_f(st.get('wall_s'), '.1f')} "
                     f"| {_f(st.get('timeout_s'), '.0f')} | {st['what']} |")
    steps = {st["name"]: st.get("detail") or {} for st in s["steps"]}
    bw = bandwidth_rows(s)
    if bw:
        lines += ["", "## Copy bandwidth, host (pinned) to GPU", "", "| copies | bytes per copy | GB/s | of peak |",
                  "|---|---|---|---|"]
        lines += [f"| {r['copies']} | {_f(r['bytes'], ',')} | {r['bytes_per_s'] / 1e9:.2f} | {_f(r['of_peak'], '.0%')} |"
                  for r in bw]
    for name in ("model", "model-prefetch"):
        m = steps.get(name)
        if m and m.get("check"):
            c = m["check"]
            lines += ["", f"## {name}: tokens equal {c.get('tokens_equal')}, max |logit diff| "
                          f"{_f(c.get('max_abs_logit_diff'), '.3g')} (atol {c.get('atol')}); hit rate "
                          f"{_f(m.get('hit_rate'), '.3f')}, stall {_f(m.get('stall_s'), '.3f')} s of "
                          f"{_f(m.get('total_s'), '.3f')} s, {_f(m.get('tokens_per_s'), '.1f')} tokens/s"]
    pt = steps.get("pytest")
    if pt and "tests" in pt:
        lines += ["", f"## gpu tests: {pt['passed']} passed of {pt['tests']}"]
        lines += [f"- failed: {n}" for n in pt["failed"]] + [f"- skipped: {n}" for n in pt["skipped"]]
    v = steps.get("validate")
    if v and v.get("rows"):
        lines += ["", "## Simulator vs real executor (analysis validate --backend cuda)", "",
                  "| policy | metric | real | sim | error % | real spread % |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['metric']} | {r['real']:.4g} | {r['sim']:.4g} | {_f(r['error_pct'], '+.1f')} | "
                  f"{_f(r.get('real_spread_pct'), '.1f')} |" for r in v["rows"]]
        lines += ["", f"{v.get('rounds')} rounds; same ranking {v.get('same_ranking')}; time metrics: median |error| "
                      f"{_f(v.get('median_abs_time_error_pct'), '.1f')}%, max {_f(v.get('max_abs_time_error_pct'), '.1f')}%; "
                      f"{v.get('errors_within_real_spread')} of {v.get('time_rows')} within the real spread; on-demand "
                      f"decisions identical: {v.get('timing_free_decisions_identical')}"]
    if s.get("versions"):
        lines += ["", "## Versions", ""] + [f"- {k}: {val}" for k, val in s["versions"].items()]
    failed = [st for st in s["steps"] if st.get("log_tail")]
    for st in failed:
        lines += ["", f"## {st['name']}: last lines of {Path(st['log']).name}", "", "```", st["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(out: Path, summary: dict, wall_s: float) -> None:
    """``OUT/summary.json`` and ``OUT/summary.md``, each replaced whole."""
    summary["wall_s"] = round(wall_s, 1)
    summary["bandwidth"] = bandwidth_rows(summary)
    atomic_write(Path(out) / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write(Path(out) / "summary.md", to_markdown(summary))
