"""Sim-vs-real fidelity plumbing (issue 5): the executor loop's phase instrumentation, the per-policy loop
overhead the profiled simulator adds per layer, and the ``--backend cpu|cuda`` wiring of ``executor profile``
and ``analysis validate`` (command construction, and a clear stop without a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, random_trace
from hydra import compose, initialize_config_dir

from analysis.validate import POLICIES, policy_commands, profile_command
from executor.profile import InstantTransfer, NullCompute, measure_loop_overhead
from replay.hardware import HardwareConfigError, build_models
from traces import write_trace

HAS_CUDA = torch.cuda.is_available()


def small_trace(tmp_path: Path) -> Path:
    tr = random_trace(tokens=60, layers=3, experts=8, top_k=2, sequences=2, seed=2)
    tr.meta.hidden_size, tr.meta.intermediate_size = 64, 96
    return write_trace(tr, tmp_path / "t.parquet")


def fake_profile(tmp_path: Path, **compute_extra) -> Path:
    prof = {"schema": "expertflow.hwprofile/1", "device": "cpu", "tier": "disk-odirect", "expert_bytes": 4096,
            "copy": {"bytes": [4096], "seconds": [1e-4], "latency_s": 1e-5, "bandwidth_bytes_per_s": 1e9,
                     "io_threads": 2, "main_thread_s": 2e-5},
            "compute": {"dense_tokens": [1, 8], "dense_s": [1e-4, 2e-4], "expert_tokens": [1, 8],
                        "expert_s": [5e-5, 1e-4], **compute_extra}}
    p = tmp_path / "prof.json"
    p.write_text(json.dumps(prof))
    return p


def test_profile_and_executor_commands_carry_the_backend(tmp_path):
    out = tmp_path / "v"
    prof = profile_command(out, ["--model-preset", "deepseek-v2-lite"], 8, "cuda")
    assert prof[1:4] == ["-m", "executor", "profile"]
    assert prof[prof.index("--backend") + 1] == "cuda" and prof[prof.index("-o") + 1] == str(out / "profile.json")
    assert prof[-2:] == ["--model-preset", "deepseek-v2-lite"]
    assert profile_command(out, [], 8)[profile_command(out, [], 8).index("--backend") + 1] == "cpu"
    cmds = policy_commands(out, "lru", 8, ["trace=deepseek-synth"], "cuda", 1.25e-4)
    assert "executor.backend=cuda" in cmds["executor"] and cmds["executor"][1:3] == ["-m", "executor"]
    # the simulator models the profiled hardware; it never gets the executor's backend
    assert not any(a.startswith("executor.backend") for a in cmds["sim"]) and cmds["sim"][1:3] == ["-m", "sim"]
    assert "hardware.compute.layer_overhead_s=0.000125" in cmds["sim"]
    assert cmds["loop"][1:5] == ["-m", "executor", "profile", "loop"]
    for c in cmds.values():  # same policy, trace and profile everywhere
        assert all(o in c for o in POLICIES["lru"]) and "trace=deepseek-synth" in c
        assert f"hardware.profile_path={out / 'profile.json'}" in c
    assert not any("layer_overhead_s" in a for a in policy_commands(out, "lru", 8, [], "cpu")["sim"])


def test_validate_rejects_an_unknown_backend(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis", "validate", "--backend", "tpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--backend" in proc.stderr


@pytest.mark.skipif(HAS_CUDA, reason="checks the stop on a machine without a GPU")
def test_profile_backend_cuda_without_a_gpu_stops_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "executor", "profile", "--model-preset", "olmoe-1b-7b", "--scale", "16",
                           "--tier-dir", str(tmp_path / "tier"), "--backend", "cuda", "-o", str(tmp_path / "p.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "executor.backend=cuda: no CUDA device" in proc.stderr
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "tier").exists()  # stopped before any work


@pytest.mark.skipif(HAS_CUDA, reason="checks the stop on a machine without a GPU")
def test_validate_backend_cuda_without_a_gpu_stops_clearly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "analysis", "validate", "--backend", "cuda", "--tokens", "20",
                           "--policies", "lru", "--out", str(tmp_path / "v")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not (tmp_path / "v").exists()


def test_layer_overhead_is_added_to_every_layer(tmp_path):
    prof = fake_profile(tmp_path, layer_overhead_s=3e-5)
    meta = random_trace(tokens=10, layers=2, experts=4, top_k=2, sequences=1, seed=0).meta
    hw = {"bandwidth": {"source": "profile"}, "compute": {"source": "profile"}, "profile_path": str(prof)}
    _, c = build_models(hw, meta)
    assert c.dense_time_s(1) == pytest.approx(1e-4 + 3e-5) and c.expert_time_s(1) == pytest.approx(5e-5)
    _, c = build_models({**hw, "compute": {"source": "profile", "layer_overhead_s": 1e-4}}, meta)
    assert c.dense_time_s(8) == pytest.approx(3e-4)  # the override wins over the profile's value
    _, c = build_models({**hw, "profile_path": str(fake_profile(tmp_path))}, meta)
    assert c.dense_time_s(1) == pytest.approx(1e-4)  # older profiles: no overhead
    with pytest.raises(HardwareConfigError, match="layer_overhead_s"):
        build_models({**hw, "compute": {"source": "profile", "layer_overhead_s": -1.0}}, meta)


def test_profiled_sim_total_grows_by_the_overhead_per_layer_step(tmp_path):
    from sim.run import simulate

    trace, prof = small_trace(tmp_path), fake_profile(tmp_path)
    base = [f"trace.path={trace}", "hardware=profiled", f"hardware.profile_path={prof}", "cache.fraction=0.5"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        a = simulate(compose("config", overrides=base), tmp_path / "a")
        b = simulate(compose("config", overrides=[*base, "hardware.compute.layer_overhead_s=0.001"]), tmp_path / "b")
    layer_steps = a["steps"] * 3
    assert b["hit_rate"] == a["hit_rate"] and b["copies"] == a["copies"]
    # on-demand: the overhead only delays compute, so total grows by at least overhead x layer-steps
    assert b["total_s"] - a["total_s"] >= 0.001 * layer_steps * 0.999


def test_loop_overhead_replays_the_policy_without_compute_or_io(tmp_path):
    trace, prof = small_trace(tmp_path), fake_profile(tmp_path)
    ov = [f"trace.path={trace}", "hardware=profiled", f"hardware.profile_path={prof}", "cache.fraction=0.5"]
    out = measure_loop_overhead(ov, main_thread_copy_s=1e-3, repeats=1)
    assert 0 < out["loop_s_per_layer_step"] < 0.05 and out["copies_per_layer_step"] > 0
    assert out["layer_overhead_s"] == pytest.approx(out["loop_s_per_layer_step"] + out["copies_per_layer_step"] * 1e-3)
    # the instant-copy loop makes the on-demand cache's decisions: as many copies as the simulator
    from sim.run import simulate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        res = simulate(compose("config", overrides=ov), tmp_path / "s")
    whole = res["whole_run"]  # the loop profile replays every step, the warm-up included
    assert out["copies_per_layer_step"] == pytest.approx(whole["copies"] / (whole["steps"] * 3))


def test_loop_cli_writes_the_overhead(tmp_path):
    trace, prof = small_trace(tmp_path), fake_profile(tmp_path)
    out = tmp_path / "loop.json"
    proc = subprocess.run([sys.executable, "-m", "executor", "profile", "loop", "--profile", str(prof), "--repeats", "1",
                           "-o", str(out), f"trace.path={trace}", "hardware=profiled", f"hardware.profile_path={prof}",
                           "cache=lru", "predictor=transition", "cache.fraction=0.5"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["main_thread_copy_s"] == 2e-5 and got["layer_overhead_s"] > got["loop_s_per_layer_step"] > 0


def test_engine_phases_are_instrumentation_only(tmp_path):
    """The same replay with and without ``phases``: identical decisions; the phases add up to the loop."""
    from executor.engine import execute
    from replay.prepare import prepare

    trace, prof = small_trace(tmp_path), fake_profile(tmp_path)
    ov = [f"trace.path={trace}", "hardware=profiled", f"hardware.profile_path={prof}", "cache=lru",
          "predictor=transition", "cache.fraction=0.5"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=ov)
    runs = []
    for phases in (None, {}):
        p = prepare(cfg)
        res = execute(p.steps, p.runtime, InstantTransfer(), NullCompute(), p.meta.num_layers, p.uses, phases=phases)
        runs.append((res, phases))
    (a, _), (b, ph) = runs
    assert a.copies == b.copies and np.array_equal(a.layers.hits, b.layers.hits)
    assert ph["layer_steps"] == len(p.steps) * 3 and ph["expert_runs"] == sum(len(u) for u in p.uses)
    parts = sum(v for k, v in ph.items() if k not in ("layer_steps", "expert_runs"))
    assert 0 < parts <= b.total_s


@pytest.mark.parametrize("args, msg", [
    (["--model-preset", "nope"], "error: --model-preset: unknown preset 'nope'; expected one of ["),
    (["--trace", "/nonexist.parquet"], "error: /nonexist.parquet: no such trace file"),
    (["--model-preset", "olmoe-1b-7b", "--repeats", "0"], "error: --repeats: expected an integer >= 1, got 0"),
])
def test_profile_bad_input_is_a_one_line_error(tmp_path, capsys, args, msg):
    from executor.profile import main

    assert main([*args, "--tier-dir", str(tmp_path / "tier"), "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(msg) and err.count("\n") == 1, err
    assert not (tmp_path / "tier").exists() and not (tmp_path / "p.json").exists()


def test_loop_bad_profile_is_a_one_line_error(tmp_path, capsys):
    from executor.profile import main

    bad_json, no_copy = tmp_path / "bad.json", tmp_path / "nocopy.json"
    bad_json.write_bytes(b"\xb5not json")
    no_copy.write_text(json.dumps({"schema": "expertflow.hwprofile/1"}))
    out = tmp_path / "loop.json"
    for prof, msg in ((tmp_path / "nonexist.json", "cannot read it (No such file or directory)"),
                      (bad_json, "not valid JSON"), (no_copy, "field 'copy': expected an object")):
        assert main(["loop", "--profile", str(prof), "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --profile {prof}: {msg}") and err.count("\n") == 1, err
    assert main(["loop", "-o", str(out), "trace.path=/nonexist.parquet"]) == 2
    assert capsys.readouterr().err == "error: trace.path: no such trace file /nonexist.parquet\n"
    assert main(["loop", "-o", str(out), "executor.odirect=maybe"]) == 2
    assert capsys.readouterr().err.startswith("error: executor.odirect: expected one of")
    assert not out.exists()
