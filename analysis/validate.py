"""``python -m analysis validate``: the same trace and policies through the real executor and the profiled
simulator, compared metric by metric.

Steps (each a command of its own, run as a subprocess, so this module reads results only):
1. ``python -m executor profile`` measures this machine's tier and compute at the executor's scale, as the
   executor's replay loop gets them (``--backend cuda``: the GPU's, with ``executor.backend=cuda`` runs);
2. per policy, ``python -m executor profile loop`` measures the host cost of that policy's decision loop per
   layer (the executor's own loop with no compute and instant copies), which the simulator adds to every layer
   (``hardware.compute.layer_overhead_s``), and the profile's main-thread cost per copy spread over the experts
   computed while copies are in flight (``hardware.compute.expert_overhead_s``);
3. ``python -m executor ...`` runs every policy for real;
4. ``python -m sim ... hardware=profiled`` replays the same trace with the measured profile;
5. a table ``metric | real | sim | error %`` per policy, ``validation.json`` and ``validation.md``.
Decisions that do not depend on timing (on-demand caches) must give identical hit rates and bytes; the
table marks those rows.

``--repeats N`` runs steps 1-4 N times (``round-<r>/``), each round with a fresh profile (so the profiles
bracket the real runs and follow the machine's load) and the policies in a rotated order. The table compares
the median real run with the median simulation and reports the real runs' spread, ``(max - min) / median``,
next to the error: an error inside the spread is noise of this machine, not of the model.

``--out`` keeps a manifest of the settings; rounds of other settings are refused, finished rounds of the same
settings are reused (an interrupted run resumes) and the table reads rounds 0..N-1 only: see
:mod:`analysis.validate_out`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from traces.cli import plain
from traces.io import atomic_path

from . import validate_out as vout
from .errors import AnalysisError
from .runs import load_runs

POLICIES = {
    "lru": ["cache=lru", "predictor=none"],
    "lfru": ["cache=lfru", "predictor=none"],
    "belady+oracle": ["cache=belady", "predictor=oracle", "horizon=fixed", "horizon.distance=2"],
    "transition-d1": ["cache=lru", "predictor=transition", "horizon=fixed", "horizon.distance=1"],
    "transition-d2": ["cache=lru", "predictor=transition", "horizon=fixed", "horizon.distance=2"],
    "adaptive": ["cache=lru", "predictor=transition", "horizon=adaptive"],
}
METRICS = ("total_s", "stall_s", "hit_rate", "tpot_p50_s", "tpot_p90_s")
TIME_METRICS = ("total_s", "stall_s", "tpot_p50_s", "tpot_p90_s")
TIMING_FREE = ("lru", "lfru")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")


def profile_command(out: Path, trace_args: list[str], scale: int, backend: str = "cpu",
                    tier_dir: Path | None = None) -> list[str]:
    """Step 1: ``python -m executor profile`` for this trace's shape at ``scale`` on ``backend``."""
    return [sys.executable, "-m", "executor", "profile", "--scale", str(scale), "--tier-dir", str(tier_dir or out / "tier"),
            "--backend", backend, "-o", str(out / "profile.json"), *trace_args]


def common_overrides(out: Path, scale: int, extra: list[str], tier_dir: Path | None = None) -> list[str]:
    return [f"executor.scale={scale}", f"paths.tier_dir={tier_dir or out / 'tier'}", "hardware=profiled",
            f"hardware.profile_path={out / 'profile.json'}", *extra]


def policy_commands(out: Path, name: str, scale: int, extra: list[str], backend: str = "cpu",
                    layer_overhead_s: float | None = None, tier_dir: Path | None = None,
                    expert_overhead_s: float | None = None) -> dict[str, list[str]]:
    """Steps 2-4 for one policy: ``loop`` (its decision-loop cost), ``executor`` (the real run on ``backend``)
    and ``sim`` (with ``layer_overhead_s`` and ``expert_overhead_s`` from the loop step, when known)."""
    py, ov, common = sys.executable, POLICIES[name], common_overrides(out, scale, extra, tier_dir)
    sim_extra = [f"hardware.compute.{k}={v!r}" for k, v in (("layer_overhead_s", layer_overhead_s),
                                                             ("expert_overhead_s", expert_overhead_s)) if v is not None]
    return {
        "loop": [py, "-m", "executor", "profile", "loop", "--profile", str(out / "profile.json"),
                 "-o", str(out / "loop" / f"{name}.json"), *ov, *common],
        "executor": [py, "-m", "executor", *ov, *common, f"executor.backend={backend}",
                     f"hydra.run.dir={out / 'executor' / name}"],
        "sim": [py, "-m", "sim", *ov, *common, *sim_extra, f"hydra.run.dir={out / 'sim' / name}"],
    }


def round_order(policies: list[str], r: int) -> list[str]:
    """Round ``r`` runs the policies rotated by ``r``, so no policy always runs first (or right after another)."""
    k = r % len(policies) if policies else 0
    return policies[k:] + policies[:k]


def run_all(out: Path, trace_args: list[str], scale: int, extra: list[str], policies: list[str],
            backend: str = "cpu", repeats: int = 1) -> None:
    """Rounds 0..repeats-1 into ``out``; a round finished before is kept (see :mod:`analysis.validate_out`, whose
    ``open_out`` must have checked that ``out`` holds rounds of these settings only)."""
    tier = out / "tier"  # one expert file for every round
    for r in range(repeats):
        rd = vout.round_dir(out, r)
        if vout.round_done(rd):
            print(f"[validate] {rd.name}: finished before, reused", file=sys.stderr)
            continue
        vout.start_round(rd)
        t0 = time.perf_counter()
        _run(profile_command(rd, trace_args, scale, backend, tier))
        for name in round_order(policies, r):
            _run(policy_commands(rd, name, scale, extra, backend, tier_dir=tier)["loop"])
            loop = json.loads((rd / "loop" / f"{name}.json").read_text())
            # the decision loop before the layer's copies go out, the copies' main-thread cost on the experts
            # computed while they are in flight (see replay/hardware.py)
            cmds = policy_commands(rd, name, scale, extra, backend, loop["decide_overhead_s"], tier,
                                   loop["expert_overhead_s"])
            for driver in ("executor", "sim"):
                _run(cmds[driver])
        vout.finish_round(rd, {"policies": round_order(policies, r), "wall_s": time.perf_counter() - t0})


def _runs_by_policy(root: Path) -> dict:
    return {r.run_dir.split("/")[-1]: r for r in load_runs(root).itertuples()} if root.is_dir() else {}


def _rounds(out: Path) -> list[Path]:
    rounds = vout.manifest_rounds(out)
    if rounds is not None:  # this run's rounds only, never others left in the directory
        unfinished = [rd.name for rd in rounds if not vout.round_done(rd)]
        if unfinished:
            raise AnalysisError(f"{out}: {', '.join(unfinished)} not finished; run validate again to finish them")
        return rounds
    rounds = sorted(out.glob("round-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    # an older version's output, without a manifest: every round in it, or a single one (executor/ and sim/
    # directly under out)
    return rounds or [out]


def _pct(a: float, b: float) -> float | None:
    return float((b - a) / a * 100) if a else None


def compare(out: Path) -> dict:
    """Median real vs median simulated value per policy and metric over the rounds of the run recorded in
    ``out``'s manifest (or every round of an older output without one), with the real runs' spread ``(max - min) / median`` in % (0 with one round)."""
    per_round = [(_runs_by_policy(rd / "executor"), _runs_by_policy(rd / "sim")) for rd in _rounds(out)]
    pols = [p for p in POLICIES if any(p in real and p in sim for real, sim in per_round)]
    rows, med_total = [], {}
    timing_free_identical = True
    for pol in pols:
        pairs = [(real[pol], sim[pol]) for real, sim in per_round if pol in real and pol in sim]
        for m in (*METRICS, "copies", "bytes_moved"):
            a = np.array([float(getattr(x, m)) for x, _ in pairs])
            b = np.array([float(getattr(y, m)) for _, y in pairs])
            ra, sb = float(np.median(a)), float(np.median(b))
            if pol in TIMING_FREE and m in ("hit_rate", "copies", "bytes_moved") and not np.array_equal(a, b):
                timing_free_identical = False
            err = 0.0 if ra == sb else _pct(ra, sb)
            rows.append({"policy": pol, "metric": m, "real": ra, "sim": sb, "error_pct": err,
                         "real_spread_pct": float((a.max() - a.min()) / ra * 100) if ra else None,
                         "sim_spread_pct": float((b.max() - b.min()) / sb * 100) if sb else None,
                         "rounds": len(pairs)})
            if m == "total_s":
                med_total[pol] = (ra, sb)
    rank_real = sorted(pols, key=lambda p: med_total[p][0])
    rank_sim = sorted(pols, key=lambda p: med_total[p][1])
    timed = [r for r in rows if r["metric"] in TIME_METRICS and r["error_pct"] is not None]
    errs = [abs(r["error_pct"]) for r in timed]
    spreads = [r["real_spread_pct"] for r in timed if r["real_spread_pct"] is not None]
    return {
        "rows": rows, "rounds": len(per_round), "same_ranking": rank_real == rank_sim, "ranking_real": rank_real,
        "ranking_sim": rank_sim,
        "median_abs_time_error_pct": float(np.median(errs)) if errs else None,
        "max_abs_time_error_pct": float(max(errs)) if errs else None,
        "median_real_spread_pct": float(np.median(spreads)) if spreads else None,
        "errors_within_real_spread": sum(1 for r in timed if r["real_spread_pct"] is not None
                                         and abs(r["error_pct"]) <= r["real_spread_pct"]),
        "time_rows": len(timed),
        "timing_free_decisions_identical": timing_free_identical,
    }


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def to_markdown(v: dict) -> str:
    lines = [f"{v.get('rounds', 1)} round(s); real and sim are medians over the rounds; real spread = (max - min) / "
             "median of the real runs", "",
             "| policy | metric | real | sim | error % | real spread % |", "|---|---|---|---|---|---|"]
    for r in v["rows"]:
        lines.append(f"| {r['policy']} | {r['metric']} | {r['real']:.4g} | {r['sim']:.4g} | "
                     f"{_fmt(r['error_pct'], '+.1f')} | {_fmt(r.get('real_spread_pct'), '.1f')} |")
    lines += ["", f"same ranking by total time: {v['same_ranking']} (real {v['ranking_real']}, sim {v['ranking_sim']})",
              f"time metrics: median |error| {_fmt(v['median_abs_time_error_pct'], '.1f')}%, "
              f"max {_fmt(v['max_abs_time_error_pct'], '.1f')}%; median real spread "
              f"{_fmt(v.get('median_real_spread_pct'), '.1f')}%; {v.get('errors_within_real_spread', '?')} of "
              f"{v.get('time_rows', '?')} time errors within the real spread",
              f"on-demand caches made identical decisions (hit rate, copies, bytes): {v['timing_free_decisions_identical']}"]
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="real executor vs profiled simulator, run for run",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", type=Path, help="trace file to replay (default: the small synthetic DeepSeek-V2-Lite trace)")
    p.add_argument("--scale", type=int, default=8, help="executor.scale: divide the model's widths by this")
    p.add_argument("--tokens", type=int, default=200, help="tokens of the default synthetic trace")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {list(POLICIES)}")
    p.add_argument("--out", type=Path, default=Path("outputs/validate"),
                   help="results; must be fresh or hold rounds of the same settings (finished ones are reused)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds of profile + real + simulated runs (policies rotated each round); the table compares "
                        "medians and shows the real runs' spread")
    p.add_argument("--backend", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda: profile the GPU (executor profile --backend cuda) and run the "
                        "executor with executor.backend=cuda (needs a CUDA device)")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for both drivers (e.g. cache.fraction=0.25)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(POLICIES))
    if unknown or not chosen:
        raise AnalysisError(f"--policies: {f'unknown {unknown}; ' if unknown else ''}expected some of {list(POLICIES)}")
    for flag, value in (("--repeats", args.repeats), ("--scale", args.scale), ("--tokens", args.tokens)):
        if value < 1:
            raise AnalysisError(f"{flag}: expected >= 1, got {value}")
    if args.trace and not args.trace.is_file():
        raise AnalysisError(f"--trace {args.trace}: no such file")
    if args.trace:
        trace_over, prof = [f"trace.path={args.trace.resolve()}"], ["--trace", str(args.trace.resolve())]
    else:
        trace_over = ["trace=deepseek-synth", f"trace.synth.tokens={args.tokens}"]
        prof = ["--model-preset", "deepseek-v2-lite"]
    if args.backend == "cuda":  # stop before any work on a machine without a GPU (the executor says why)
        check = subprocess.run([sys.executable, "-m", "executor", "check", "--backend", "cuda"], capture_output=True,
                               text=True)
        if check.returncode:
            print(check.stderr.strip() or f"error: python -m executor check --backend cuda failed ({check.returncode})",
                  file=sys.stderr)
            return 2
    trace = args.trace.resolve() if args.trace else None
    vout.open_out(out, vout.settings(trace, args.tokens, args.scale, chosen, args.backend, args.overrides), args.repeats)
    run_all(out, prof, args.scale, [*trace_over, *args.overrides], chosen, args.backend, args.repeats)
    v = compare(out)
    with atomic_path(out / "validation.json") as tmp:
        tmp.write_text(json.dumps(v, indent=2) + "\n")
    md = to_markdown(v)
    with atomic_path(out / "validation.md") as tmp:
        tmp.write_text(md)
    print(md)
    return 0
