"""``python scripts/gpu_check.py [--out DIR]`` (``make gpu-check``): prove the GPU path on a bare, offline GPU machine
in under 8 minutes, and write one summary of what ran and what passed.

1. ``preflight``: torch sees a CUDA GPU, or the check stops at once (exit 2) with a message and a summary saying so.
2. ``deps``: the project's pure-Python dependencies the machine lacks, installed with no network from the wheel
   directory (``--wheels``, default ``wheels/``: ``make gpu-wheels`` fills it where the registry is reachable)
   into ``WORK/site`` (put on every later step's ``PYTHONPATH``); what is importable already is left alone.
   ``imports``: the modules every later step needs import.
3. ``bandwidth``: the link's peak (large pinned host -> GPU copies) and the CUDA copy engine's share of it
   (``python -m executor.cuda_bandwidth``).
4. ``model`` and ``model-prefetch``: ``python -m executor model --backend cuda --check`` on the reference model
   (``data/reference-moe/model``), on demand and with a last-token predictor one layer ahead: greedy tokens and
   logits against the unmodified model on the same GPU.
5. ``pytest``: every ``gpu``-marked test.
6. ``validate``: ``python -m analysis validate --backend cuda`` on a small synthetic trace (a profile of this GPU's
   own link, then the simulator vs the real executor per policy and metric, 2 rounds).

Every step runs as a subprocess with a time budget (its timeout, cut to what is left of ``--budget-s``); one that
fails or times out is recorded (its log in ``OUT/logs/``) and the others still run. ``OUT/summary.json`` and
``OUT/summary.md`` (steps, pass/fail, the validation table, copy bandwidth achieved vs the link's peak,
versions) are rewritten after every step, so a run cut short still says how far it got. Heavy scratch files
(expert stores, validate's rounds) go to ``--work`` (default ``OUT/../gpu-check-work``), not to ``OUT``.
Exit 0 if every step passed, 1 if any failed, 2 if there is no GPU. Standard library (and torch) only until
``deps`` has run.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gpu_report

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450.0  # the whole check: 7.5 minutes, inside the 8 the machine allows with start-up to spare
MIN_STEP_S = 5.0  # a step with less time than this left is skipped, not started
KILL_GRACE_S = 5.0  # SIGTERM, then this long before SIGKILL
NEEDED_MODULES = ("hydra", "omegaconf", "simpy", "yaml", "hypothesis", "transformers", "safetensors", "pandas",
                  "pyarrow", "matplotlib", "executor.model_slots", "analysis.validate", "sim.run")


@dataclass
class Step:
    name: str  # short id (logs/NAME.log, --only)
    what: str  # one line for the summary
    cmd: list[str]  # run from the project root
    budget_s: float  # its timeout, unless less of the whole budget is left
    parse: Callable[[dict], dict] | None = None  # its record -> what its outputs say ("problem": it failed)


def default_steps(py: str, out: Path, work: Path, wheels: Path) -> list[Step]:
    """The check's steps, in order (see the module docstring)."""
    ref = ROOT / "data" / "reference-moe" / "model"
    model = [py, "-m", "executor", "model", "--backend", "cuda", "--model", str(ref), "--prompt", "def main():",
             "--prompt", "import torch", "--max-new-tokens", "32", "--slots-per-layer", "4", "--io-threads", "2",
             "--check", "--store", str(work / "model.experts")]
    return [
        Step("deps", f"install the missing pure-Python packages from {wheels} (offline)",
             [py, str(ROOT / "scripts" / "gpu_wheels.py"), "install", "--wheels", str(wheels), "--target",
              str(work / "site")], 60),
        Step("imports", "import what the later steps need", [py, "-c", "import importlib; [importlib.import_module(m) "
                                                                   f"for m in {list(NEEDED_MODULES)!r}]"], 60),
        Step("bandwidth", "pinned host -> GPU: the link's peak and the copy engine's share of it",
             [py, "-m", "executor.cuda_bandwidth", "-o", str(out / "bandwidth.json")], 60,
             gpu_report.read_bandwidth(out / "bandwidth.json")),
        Step("model", "model mode on CUDA, on demand, --check against the unmodified model",
             [*model, "--out", str(out / "model")], 90, gpu_report.read_model(out / "model")),
        Step("model-prefetch", "model mode on CUDA, last-token prefetch 1 layer ahead, --check",
             [*model, "--predictor", "last_token", "--prefetch-distance", "1", "--out", str(out / "model-prefetch")],
             90, gpu_report.read_model(out / "model-prefetch")),
        Step("pytest", "the gpu-marked tests", [py, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs",
                                                "--junitxml", str(out / "pytest.xml"), str(ROOT / "tests")],
             180, gpu_report.read_pytest(out / "pytest.xml")),
        Step("validate", "analysis validate --backend cuda: simulator vs real executor (2 rounds, 2 policies)",
             [py, "-m", "analysis", "validate", "--backend", "cuda", "--repeats", "2", "--tokens", "120", "--scale",
              "16", "--policies", "lru,transition-d1", "--out", str(work / "validate")], 240,
             gpu_report.read_validate(work / "validate", out)),
    ]


def run_step(step: Step, env: dict, logs: Path, deadline: float) -> dict:
    """Run one step (its own process group, killed whole on timeout); its record for the summary."""
    left = deadline - time.monotonic()
    rec = {"name": step.name, "what": step.what, "cmd": step.cmd, "budget_s": step.budget_s}
    if left < MIN_STEP_S:
        return {**rec, "status": "skipped", "message": f"not started: {max(left, 0):.0f} s of the budget left"}
    timeout = min(step.budget_s, left)
    log = logs / f"{step.name}.log"
    rec.update(timeout_s=round(timeout, 1), log=str(log))
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(step.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rc, status = None, "timeout"
    rec.update(status=status, rc=rc, wall_s=round(time.monotonic() - t0, 1))
    if status == "timeout":
        rec["message"] = f"killed after {timeout:.0f} s"
    if step.parse is not None:
        try:
            rec["detail"] = step.parse(rec)
        except Exception as exc:  # a step that wrote nothing readable is recorded as such, the rest still runs
            rec["detail"] = {"error": f"{type(exc).__name__}: {exc}"}
            if status == "passed":
                rec.update(status="failed", message=f"its output is unreadable ({rec['detail']['error']})")
        problem = rec["detail"].get("problem")
        if status == "passed" and problem:
            rec.update(status="failed", message=problem)
    if status != "passed":
        rec["log_tail"] = tail(log, 40)
    return rec


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group (its children too), SIGKILL what is left after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    # the leader exited on SIGTERM: make sure no child of it lingers
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def step_env(work: Path) -> dict:
    """The steps' environment: the installed packages and the project first on the path, no stdin prompts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(work / "site"), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    return env


def preflight() -> tuple[bool, str, dict]:
    """(GPU seen, message, facts) from torch in this process (no CUDA context beyond what the query needs)."""
    try:
        import torch
    except Exception as exc:  # a broken torch is a stop as clear as no GPU
        return False, f"gpu-check: torch cannot be imported ({type(exc).__name__}: {exc})", {}
    facts = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        return False, (f"gpu-check: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no CUDA "
                       "GPU (torch.cuda.is_available() is False): nothing to check on this machine. Run it on a GPU "
                       "machine (docs/gpu.md)."), facts
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    facts.update(gpu=torch.cuda.get_device_name(i), capability=".".join(map(str, torch.cuda.get_device_capability(i))),
                 gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_count=torch.cuda.device_count())
    return True, f"gpu-check: {facts['gpu']} (torch {torch.__version__}, CUDA {torch.version.cuda})", facts


def run_check(steps: list[Step], out: Path, work: Path, budget_s: float = BUDGET_S, gpu: tuple | None = None,
              log=print) -> int:
    """Preflight, then ``steps`` in order within ``budget_s``; the summary after each. ``gpu``: a preflight
    result to use instead of asking torch (the tests of the runner pass one)."""
    t0 = time.monotonic()
    deadline = t0 + budget_s
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    ok, message, facts = gpu if gpu is not None else preflight()
    summary = gpu_report.new_summary(budget_s, facts)
    if not ok:
        print(message, file=sys.stderr)
        summary.update(status="no-gpu", message=message)
        gpu_report.write(out, summary, time.monotonic() - t0)
        return 2
    log(message)
    work.mkdir(parents=True, exist_ok=True)
    env = step_env(work)
    summary["versions"] = gpu_report.versions(work / "site", facts)  # again at the end, with what deps installed
    gpu_report.write(out, summary, time.monotonic() - t0)
    for i, step in enumerate(steps):
        log(f"[gpu-check] {i + 1}/{len(steps)} {step.name}: {step.what}")
        rec = run_step(step, env, logs, deadline)
        summary["steps"].append(rec)
        log(f"[gpu-check] {step.name}: {rec['status']}" + (f" in {rec['wall_s']} s" if "wall_s" in rec else "")
            + (f" ({rec['message']})" if rec.get("message") else ""))
        gpu_report.write(out, summary, time.monotonic() - t0)
    summary["versions"] = gpu_report.versions(work / "site", facts)
    failed = [s["name"] for s in summary["steps"] if s["status"] != "passed"]
    summary.update(status="failed" if failed else "passed",
                   message=f"not passed: {', '.join(failed)}" if failed else "every step passed")
    gpu_report.write(out, summary, time.monotonic() - t0)
    log(f"[gpu-check] {summary['status']}: {summary['message']} -> {out / 'summary.md'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu-check", help="summary, logs, small results")
    ap.add_argument("--work", type=Path, help="scratch: installed packages, expert stores, validate's rounds "
                                              "(default: OUT/../gpu-check-work)")
    ap.add_argument("--wheels", type=Path, default=ROOT / "wheels", help="the wheel directory (make gpu-wheels)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help=f"time for all steps (default {BUDGET_S:.0f})")
    ap.add_argument("--only", help="comma list of steps to run (default: all; deps and imports always run)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    work = (args.work or out.parent / "gpu-check-work").resolve()
    steps = default_steps(sys.executable, out, work, args.wheels.resolve())
    if args.only:
        names = {s.name for s in steps}
        chosen = {n.strip() for n in args.only.split(",") if n.strip()}
        if not chosen or chosen - names:
            print(f"error: --only: unknown {sorted(chosen - names)}; expected some of {sorted(names)}", file=sys.stderr)
            return 2
        steps = [s for s in steps if s.name in chosen | {"deps", "imports"}]
    if args.budget_s < MIN_STEP_S:
        print(f"error: --budget-s: expected >= {MIN_STEP_S:.0f}, got {args.budget_s:g}", file=sys.stderr)
        return 2
    return run_check(steps, out, work, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
