"""The offline GPU check's own logic (``scripts/gpu_check.py``, ``scripts/gpu_report.py``), on a CPU: the stop
without a GPU, the step runner (failures, timeouts that kill a step's whole process group, the budget, steps
whose outputs say they failed), the parsers of the steps' outputs and the summary. The steps that need a GPU run
on a GPU only (``make gpu-check``); here the runner is given plain commands and a preflight result."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402
import gpu_report  # noqa: E402

GPU = (True, "gpu-check: test preflight", {"gpu": "test"})  # a preflight result for the runner's tests


def py(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop on a machine without CUDA")
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sees no CUDA GPU (torch.cuda.is_available() is False)" in proc.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "no-gpu" and s["steps"] == [] and "sees no CUDA GPU" in s["message"]
    assert "# GPU check: no-gpu" in (out / "summary.md").read_text()
    assert not (tmp_path / "gpu-check-work").exists()  # nothing installed, nothing run


def test_failures_and_timeouts_are_recorded_and_the_rest_still_runs(tmp_path):
    marker = tmp_path / "grandchild-survived"
    steps = [
        gpu_check.Step("ok", "prints", py("print('fine')"), 30),
        gpu_check.Step("fails", "exits 3", py("import sys; print('broken'); sys.exit(3)"), 30),
        # a child that spawns a grandchild, then hangs: the timeout kills both (the whole process group)
        gpu_check.Step("hangs", "sleeps past its budget", py(f"""
            import subprocess, sys, time
            subprocess.Popen([sys.executable, "-c", "import time, pathlib; time.sleep(3); pathlib.Path({str(marker)!r}).touch()"])
            time.sleep(60)
        """), 1.5),
        gpu_check.Step("says-no", "exits 0, its output says it failed", py("pass"), 30,
                       lambda rec: {"problem": "2 gpu test(s) skipped on a GPU machine"}),
        gpu_check.Step("unreadable", "exits 0, no output", py("pass"), 30, gpu_report.read_model(tmp_path / "nothing")),
        gpu_check.Step("last", "still runs", py("print('last')"), 30),
    ]
    out = tmp_path / "out"
    t0 = time.monotonic()
    rc = gpu_check.run_check(steps, out, tmp_path / "work", budget_s=120, gpu=GPU, log=lambda s: None)
    assert rc == 1 and time.monotonic() - t0 < 30
    s = json.loads((out / "summary.json").read_text())
    got = {st["name"]: st for st in s["steps"]}
    assert [st["status"] for st in s["steps"]] == ["passed", "failed", "timeout", "failed", "failed", "passed"]
    assert got["fails"]["rc"] == 3 and "broken" in got["fails"]["log_tail"]
    assert got["hangs"]["rc"] is None and got["hangs"]["message"] == "killed after 2 s"
    assert got["says-no"]["message"] == "2 gpu test(s) skipped on a GPU machine"
    assert "unreadable" in got["unreadable"]["message"] and "FileNotFoundError" in got["unreadable"]["detail"]["error"]
    assert (out / "logs" / "last.log").read_text() == "last\n"
    assert s["status"] == "failed" and s["message"] == "not passed: fails, hangs, says-no, unreadable"
    time.sleep(4)
    assert not marker.exists(), "the timed-out step's grandchild was left running"
    md = (out / "summary.md").read_text()
    assert "| hangs | timeout (killed after 2 s) |" in md and "## fails: last lines of fails.log" in md
    assert not list(out.glob(".summary.*"))  # written atomically


def test_the_budget_cuts_timeouts_and_skips_what_does_not_fit(tmp_path):
    steps = [gpu_check.Step("a", "", py("import time; time.sleep(2)"), 60),
             gpu_check.Step("b", "", py("import time; time.sleep(60)"), 60),
             gpu_check.Step("c", "", py("pass"), 60)]
    rc = gpu_check.run_check(steps, tmp_path / "out", tmp_path / "work", budget_s=8, gpu=GPU, log=lambda s: None)
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    a, b, c = s["steps"]
    assert rc == 1 and a["status"] == "passed" and b["status"] == "timeout" and c["status"] == "skipped"
    assert b["timeout_s"] <= 6.5 and "not started" in c["message"] and s["wall_s"] < 20


def test_the_deps_step_runs_for_real(tmp_path):
    """The check's install step as wired, on this machine: everything importable, so nothing to install and no
    wheel directory needed (the install itself: test_gpu_wheels.py)."""
    out, work = tmp_path / "out", tmp_path / "work"
    steps = [st for st in gpu_check.default_steps(sys.executable, out, work, tmp_path / "no-wheels") if st.name == "deps"]
    assert gpu_check.run_check(steps, out, work, gpu=GPU, log=lambda s: None) == 0
    assert "installed nothing" in (out / "logs" / "deps.log").read_text()


def test_default_steps_and_options():
    out, work = ROOT / "o", ROOT / "w"
    steps = gpu_check.default_steps("python3", out, work, ROOT / "wheels")
    assert [s.name for s in steps] == ["deps", "imports", "bandwidth", "model", "model-prefetch", "pytest", "validate"]
    assert sum(s.budget_s for s in steps) < 16 * 60 and gpu_check.BUDGET_S < 8 * 60
    model = {s.name: s for s in steps}["model"].cmd
    assert model[model.index("--backend") + 1] == "cuda" and "--check" in model
    assert str(ROOT / "data" / "reference-moe" / "model") in model
    val = {s.name: s for s in steps}["validate"].cmd
    assert val[val.index("--backend") + 1] == "cuda" and val[val.index("--out") + 1].startswith(str(work))
    # every step's command line is valid for the tool it calls (parsed by that tool's own parser)
    import argparse

    from analysis.validate import register
    from executor.cuda_bandwidth import main as bw_main
    from executor.model_cli import parser as model_parser

    by = {s.name: s.cmd for s in steps}
    args = model_parser().parse_args(by["model-prefetch"][by["model-prefetch"].index("model") + 1:])
    assert args.backend == "cuda" and args.check and args.predictor == "last_token" and args.prefetch_distance == 1
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    va = sub.choices["validate"].parse_args(val[val.index("validate") + 1:])
    assert (va.backend, va.repeats, va.scale, va.policies) == ("cuda", 2, 16, "lru,transition-d1")
    with pytest.raises(SystemExit) as exc:
        bw_main([*by["bandwidth"][by["bandwidth"].index("executor.cuda_bandwidth") + 1:], "--help"])
    assert exc.value.code == 0
    env = gpu_check.step_env(work)
    assert env["PYTHONPATH"].split(":")[:2] == [str(work / "site"), str(ROOT)]
    assert gpu_check.main(["--only", "nope"]) == 2


def test_pytest_output_is_read(tmp_path):
    (tmp_path / "test_x.py").write_text("import pytest\n\ndef test_ok():\n    pass\n\n"
                                        "@pytest.mark.skip(reason='no GPU')\ndef test_skipped():\n    pass\n")
    xml = tmp_path / "r.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", str(xml),
                    str(tmp_path / "test_x.py")], capture_output=True, cwd=tmp_path, timeout=120)
    d = gpu_report.read_pytest(xml)({})
    assert d["tests"] == 2 and d["passed"] == 1 and d["failed"] == [] and "no GPU" in d["skipped"][0]
    assert d["problem"] == "1 gpu test(s) skipped on a GPU machine"


def validate_work(tmp_path):
    """A validate output directory as ``analysis validate`` leaves it (the fields the check reads)."""
    work = tmp_path / "validate"
    rows = [{"policy": p, "metric": m, "real": 1.0, "sim": 1.1, "error_pct": 10.0, "real_spread_pct": 12.0,
             "sim_spread_pct": 1.0, "rounds": 2} for p in ("lru", "transition-d1") for m in ("total_s", "stall_s")]
    v = {"rows": rows, "rounds": 2, "same_ranking": True, "ranking_real": ["lru", "transition-d1"],
         "ranking_sim": ["lru", "transition-d1"], "median_abs_time_error_pct": 10.0, "max_abs_time_error_pct": 10.0,
         "median_real_spread_pct": 12.0, "errors_within_real_spread": 4, "time_rows": 4,
         "timing_free_decisions_identical": True}
    work.mkdir()
    (work / "validation.json").write_text(json.dumps(v))
    (work / "validation.md").write_text("table\n")
    for r, rate in ((0, 2e10), (1, 4e10)):
        (work / f"round-{r}").mkdir()
        (work / f"round-{r}" / "profile.json").write_text(json.dumps({"expert_bytes": 139264}))
        d = work / f"round-{r}" / "executor" / "lru"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"copy_bandwidth_bytes_per_s": rate}))
    return work, v


def test_summary_tables_bandwidth_vs_peak_and_validation(tmp_path):
    work, v = validate_work(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    val = gpu_report.read_validate(work, out)({})
    assert val["replay_copy_bytes_per_s"] == {"lru": 3e10} and val["expert_bytes"] == 139264 and "problem" not in val
    assert json.loads((out / "validate" / "validation.json").read_text()) == v
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "results.json").write_text(json.dumps({
        "hit_rate": 0.5, "stall_s": 0.01, "total_s": 1.0, "tokens_per_s": 64.0, "copy_bandwidth_bytes_per_s": 1e10,
        "expert_bytes": 196608, "check": {"tokens_equal": True, "max_abs_logit_diff": 0.0, "atol": 1e-4, "passed": True}}))
    model = gpu_report.read_model(tmp_path / "m")({})
    bw = {"peak": {"bytes": 256 << 20, "repeats": 10, "bandwidth_bytes_per_s": 5e10},
          "engine": {"copies": 128, "streams": 2, "expert_bytes": 16 << 20, "bandwidth_bytes_per_s": 4.5e10}}
    s = gpu_report.new_summary(450, {"gpu": "NVIDIA H200"})
    s["steps"] = [{"name": "bandwidth", "what": "", "status": "passed", "detail": bw},
                  {"name": "model", "what": "", "status": "passed", "detail": model},
                  {"name": "validate", "what": "", "status": "passed", "detail": val}]
    s.update(status="passed", message="every step passed", versions={"torch": "2.11"})
    gpu_report.write(out, s, 123.4)
    got = json.loads((out / "summary.json").read_text())
    assert [round(r["of_peak"], 2) for r in got["bandwidth"]] == [1.0, 0.9, 0.6, 0.2]
    md = (out / "summary.md").read_text()
    for want in ("# GPU check: passed", "| peak: one pinned copy, median of 10 | 268,435,456 | 50.00 | 100% |",
                 "| replay (lru), per copy, median of rounds | 139,264 | 30.00 | 60% |",
                 "| model (reference model), per copy | 196,608 | 10.00 | 20% |", "| lru | total_s | 1 | 1.1 | +10.0 | 12.0 |",
                 "4 of 4 within the real spread", "## model: tokens equal True", "- torch: 2.11"):
        assert want in md, want
    # a failed --check or differing on-demand decisions fail their steps
    bad = json.loads((tmp_path / "m" / "results.json").read_text())
    bad["check"].update(passed=False, tokens_equal=False)
    (tmp_path / "m" / "results.json").write_text(json.dumps(bad))
    assert "--check failed: tokens equal False" in gpu_report.read_model(tmp_path / "m")({})["problem"]
    v["timing_free_decisions_identical"] = False
    (work / "validation.json").write_text(json.dumps(v))
    assert "decisions differ" in gpu_report.read_validate(work, out)({})["problem"]


def test_a_cuda_profile_feeds_the_validate_steps_that_run_on_the_cpu(tmp_path):
    """``analysis validate --backend cuda`` hands the GPU's profile to ``executor profile loop`` and to the
    simulator (``hardware=profiled``): both on the CPU. The profile has the fields ``executor profile --backend
    cuda`` writes (profile.py's head + ``cuda_profile.profile_cuda``: no ``copy.replay`` or ``main_thread_s``),
    so what would break only on a GPU machine breaks here."""
    from test_cuda_backend import compose_cfg

    from executor.profile_loop import measure_loop_overhead, profile_copy_cost
    from sim.run import simulate

    eb = 139264  # deepseek-v2-lite / 16, as the check's validate step
    tokens = [1, 2, 4, 8, 16, 32, 64]
    prof = {"schema": "expertflow.hwprofile/1", "model": "deepseek-v2-lite", "scale": 16, "expert_bytes": eb,
            "device": "NVIDIA H200", "tier": "host-pinned",
            "copy": {"bytes": [eb], "seconds": [2e-5], "latency_s": 8e-6, "bandwidth_bytes_per_s": 5e10,
                     "io_threads": 2, "isolated": {"bytes": [65536, eb], "seconds": [9e-6, 1.1e-5]}},
            "compute": {"dense_tokens": tokens, "dense_s": [5e-5] * 7, "expert_tokens": tokens, "expert_s": [3e-5] * 7,
                        "experts_per_layer": 6, "isolated": {"dense_tokens": tokens, "dense_s": [4e-5] * 7,
                                                             "expert_tokens": tokens, "expert_s": [2e-5] * 7}}}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(prof))
    ov = ["trace=deepseek-synth", "trace.synth.tokens=30", "cache=lru", "predictor=transition", "horizon=fixed",
          "horizon.distance=1", "executor.scale=16", "hardware=profiled", f"hardware.profile_path={path}"]
    assert profile_copy_cost(path) == 0.0
    loop = measure_loop_overhead(ov, profile_copy_cost(path), repeats=1)
    assert loop["decide_overhead_s"] > 0 and loop["expert_overhead_s"] == 0.0
    res = simulate(compose_cfg([*ov, f"hardware.compute.layer_overhead_s={loop['decide_overhead_s']!r}",
                                "hardware.compute.expert_overhead_s=0.0"]), tmp_path / "sim")
    assert res["run"]["copy_model"] == "profiled" and res["total_s"] > 0 and res["oracle_stall_s"] is not None
