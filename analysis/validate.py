"""``python -m analysis validate``: the same trace and policies through the real executor and the profiled
simulator, compared metric by metric.

Steps (each a command of its own, run as a subprocess, so this module reads results only):
1. ``python -m executor profile`` measures this machine's tier and compute at the executor's scale, as the
   executor's replay loop gets them (``--backend cuda``: the GPU's, with ``executor.backend=cuda`` runs);
2. per policy, ``python -m executor profile loop`` measures the host cost of that policy's decision loop per
   layer (the executor's own loop with no compute and instant copies, plus the profile's main-thread cost per
   copy), which the simulator then adds to every layer (``hardware.compute.layer_overhead_s``);
3. ``python -m executor ...`` runs every policy for real;
4. ``python -m sim ... hardware=profiled`` replays the same trace with the measured profile;
5. a table ``metric | real | sim | error %`` per policy, ``validation.json`` and ``validation.md``.
Decisions that do not depend on timing (on-demand caches) must give identical hit rates and bytes; the
table marks those rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from traces.io import atomic_path

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
TIMING_FREE = ("lru", "lfru")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")


def profile_command(out: Path, trace_args: list[str], scale: int, backend: str = "cpu") -> list[str]:
    """Step 1: ``python -m executor profile`` for this trace's shape at ``scale`` on ``backend``."""
    return [sys.executable, "-m", "executor", "profile", "--scale", str(scale), "--tier-dir", str(out / "tier"),
            "--backend", backend, "-o", str(out / "profile.json"), *trace_args]


def common_overrides(out: Path, scale: int, extra: list[str]) -> list[str]:
    return [f"executor.scale={scale}", f"executor.tier_dir={out / 'tier'}", "hardware=profiled",
            f"hardware.profile_path={out / 'profile.json'}", *extra]


def policy_commands(out: Path, name: str, scale: int, extra: list[str], backend: str = "cpu",
                    layer_overhead_s: float | None = None) -> dict[str, list[str]]:
    """Steps 2-4 for one policy: ``loop`` (its decision-loop cost), ``executor`` (the real run on ``backend``)
    and ``sim`` (with ``layer_overhead_s`` from the loop step, when known)."""
    py, ov, common = sys.executable, POLICIES[name], common_overrides(out, scale, extra)
    sim_extra = [] if layer_overhead_s is None else [f"hardware.compute.layer_overhead_s={layer_overhead_s!r}"]
    return {
        "loop": [py, "-m", "executor", "profile", "loop", "--profile", str(out / "profile.json"),
                 "-o", str(out / "loop" / f"{name}.json"), *ov, *common],
        "executor": [py, "-m", "executor", *ov, *common, f"executor.backend={backend}",
                     f"hydra.run.dir={out / 'executor' / name}"],
        "sim": [py, "-m", "sim", *ov, *common, *sim_extra, f"hydra.run.dir={out / 'sim' / name}"],
    }


def run_all(out: Path, trace_args: list[str], scale: int, extra: list[str], policies: list[str],
            backend: str = "cpu") -> None:
    _run(profile_command(out, trace_args, scale, backend))
    for name in policies:
        _run(policy_commands(out, name, scale, extra, backend)["loop"])
        over = json.loads((out / "loop" / f"{name}.json").read_text())["layer_overhead_s"]
        cmds = policy_commands(out, name, scale, extra, backend, over)
        for driver in ("executor", "sim"):
            _run(cmds[driver])


def compare(out: Path) -> dict:
    rows = []
    real = {r.run_dir.split("/")[-1]: r for r in load_runs(out / "executor").itertuples()}
    sim = {r.run_dir.split("/")[-1]: r for r in load_runs(out / "sim").itertuples()}
    for pol in POLICIES:
        if pol not in real or pol not in sim:
            continue
        for m in METRICS:
            a, b = getattr(real[pol], m), getattr(sim[pol], m)
            err = (b - a) / a * 100 if a else None
            rows.append({"policy": pol, "metric": m, "real": float(a), "sim": float(b),
                         "error_pct": None if err is None else float(err)})
        for m in ("copies", "bytes_moved"):
            rows.append({"policy": pol, "metric": m, "real": float(getattr(real[pol], m)),
                         "sim": float(getattr(sim[pol], m)), "error_pct": 0.0 if getattr(real[pol], m) == getattr(sim[pol], m)
                         else float((getattr(sim[pol], m) - getattr(real[pol], m)) / getattr(real[pol], m) * 100)})
    pols = [p for p in POLICIES if p in real and p in sim]
    rank_real = sorted(pols, key=lambda p: real[p].total_s)
    rank_sim = sorted(pols, key=lambda p: sim[p].total_s)
    time_errs = [abs(r["error_pct"]) for r in rows if r["metric"] in ("total_s", "stall_s", "tpot_p50_s", "tpot_p90_s")
                 and r["error_pct"] is not None]
    timing_free_identical = all(
        r["real"] == r["sim"] for r in rows if r["policy"] in TIMING_FREE and r["metric"] in ("hit_rate", "copies", "bytes_moved")
    )
    return {
        "rows": rows, "same_ranking": rank_real == rank_sim, "ranking_real": rank_real, "ranking_sim": rank_sim,
        "median_abs_time_error_pct": float(np.median(time_errs)) if time_errs else None,
        "max_abs_time_error_pct": float(max(time_errs)) if time_errs else None,
        "timing_free_decisions_identical": timing_free_identical,
    }


def to_markdown(v: dict) -> str:
    lines = ["| policy | metric | real | sim | error % |", "|---|---|---|---|---|"]
    for r in v["rows"]:
        err = "" if r["error_pct"] is None else f"{r['error_pct']:+.1f}"
        lines.append(f"| {r['policy']} | {r['metric']} | {r['real']:.4g} | {r['sim']:.4g} | {err} |")
    lines += ["", f"same ranking by total time: {v['same_ranking']} (real {v['ranking_real']}, sim {v['ranking_sim']})",
              f"time metrics: median |error| {v['median_abs_time_error_pct']:.1f}%, max {v['max_abs_time_error_pct']:.1f}%",
              f"on-demand caches made identical decisions (hit rate, copies, bytes): {v['timing_free_decisions_identical']}"]
    return "\n".join(lines) + "\n"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("validate", help="real executor vs profiled simulator, run for run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--trace", type=Path, help="trace file to replay (default: the small synthetic DeepSeek-V2-Lite trace)")
    p.add_argument("--scale", type=int, default=8, help="executor.scale: divide the model's widths by this")
    p.add_argument("--tokens", type=int, default=200, help="tokens of the default synthetic trace")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma list of {list(POLICIES)}")
    p.add_argument("--out", type=Path, default=Path("outputs/validate"))
    p.add_argument("--backend", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (default) or cuda: profile the GPU (executor profile --backend cuda) and run the "
                        "executor with executor.backend=cuda (needs a CUDA device)")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for both drivers (e.g. cache.fraction=0.25)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    if args.trace:
        trace_over, prof = [f"trace.path={args.trace.resolve()}"], ["--trace", str(args.trace.resolve())]
    else:
        trace_over = ["trace=deepseek-synth", f"trace.synth.tokens={args.tokens}"]
        prof = ["--model-preset", "deepseek-v2-lite"]
    if args.backend == "cuda":  # stop before any work on a machine without a GPU
        from executor.cuda_backend import require_cuda
        from executor.tier import TierError

        try:
            require_cuda()
        except TierError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    chosen = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(POLICIES))
    if unknown:
        raise ValueError(f"--policies: unknown {unknown}; expected some of {list(POLICIES)}")
    run_all(out, prof, args.scale, [*trace_over, *args.overrides], chosen, args.backend)
    v = compare(out)
    with atomic_path(out / "validation.json") as tmp:
        tmp.write_text(json.dumps(v, indent=2) + "\n")
    md = to_markdown(v)
    with atomic_path(out / "validation.md") as tmp:
        tmp.write_text(md)
    print(md)
    return 0
