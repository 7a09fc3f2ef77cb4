"""The simulator's dispatch to the compiled kernels (``sim/run.py``): ``python -m sim`` replays and bounds a run
compiled where the kernels cover it, else in Python, and ``results.json`` says which path ran and why not the
compiled one. The differential test runs every covered policy family x cache scope x batch size x link both
ways (``sim.compiled=true`` / ``false``) and compares the whole ``results.json`` and ``per_layer.parquet``:
decisions and counts identical, floats equal within 1e-9 relative (in practice bit for bit)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from kernel_cases import model_trace
from omegaconf import OmegaConf

import replay_kernels
from sim.run import NOT_ASKED, simulate
from traces import write_trace

pytestmark = pytest.mark.skipif(not replay_kernels.available(), reason="numba is not installed: no compiled kernels")

# policy family -> overrides: every eviction policy the kernel covers (with parameter variants), on demand, and
# a predictor asked for nothing (distance 0), which the kernel also covers
FAMILIES = {
    "lru": ["cache=lru"],
    "lfu": ["cache=lfu"],
    "lfu-in-cache": ["cache=lfu", "cache.policy.keep_counts=false"],
    "lfru": ["cache=lfru", "cache.policy.half_life_steps=0.5"],
    "static": ["cache=static"],
    "static-half": ["cache=static", "cache.policy.pin_share=0.5"],
    "belady": ["cache=belady"],
    "two_level": ["cache=two_level"],
    "lru+transition-d0": ["cache=lru", "predictor=transition", "horizon=fixed", "horizon.distance=0"],
}
# (batch size, hardware preset, slots per layer): a PCIe 3 link, a slow NVMe tier (long copy queues, stalls), a
# fast link at batch 16, and a one-slot cache that defers demands until computed experts release their slots
SETTINGS = [(1, "t4", 3), (4, "cpu-nvme", 2), (16, "h100-pcie5", 3), (4, "t4", 1)]
PATH_KEYS = ("replay_path", "replay_fallback", "bounds_path", "bounds_fallback")
WALL_KEYS = ("sim_wall_s", "scheduler_wall_s")  # host time: differs between any two runs


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("dispatch") / "model.parquet"
    write_trace(model_trace(tokens=160, seed=11), path)
    return path


def compose_run(trace_path, overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[f"trace.path={trace_path}", "trace.name=t", "paths.bounds_dir=null",
                                            "cache.fraction=null", *overrides])


def run(tmp_path, trace_path, overrides: list[str], name: str, cfg=None) -> tuple[dict, pd.DataFrame]:
    """One ``python -m sim`` run (in process) of the trace with ``overrides`` (or the composed ``cfg``): its
    results.json and per-layer table."""
    out = tmp_path / name
    simulate(compose_run(trace_path, overrides) if cfg is None else cfg, out)
    return json.loads((out / "results.json").read_text()), pd.read_parquet(out / "per_layer.parquet")


def assert_same(a, b, where: str = "results") -> None:
    """``a`` and ``b`` (parsed JSON) equal: the same keys, types and values, floats within 1e-9 relative."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), (where, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (where, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0), (where, a, b)
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def comparable(res: dict) -> dict:
    """results.json less what may differ between the two paths: host times and the path keys."""
    out = {k: v for k, v in res.items() if k not in WALL_KEYS}
    out["run"] = {k: v for k, v in res["run"].items() if k not in PATH_KEYS}
    return out


@pytest.mark.parametrize("scope", ["per_layer", "global"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_results_equal_python(tmp_path, trace_path, family, scope):
    for batch, hw, slots in SETTINGS:
        total = slots if scope == "per_layer" else slots * 4  # global: the same slots in one shared partition
        over = [*FAMILIES[family], f"cache.scope={scope}", f"cache.slots={total}", f"batch_size={batch}",
                f"hardware={hw}"]
        name = f"{batch}-{hw}-{slots}"
        cfg = compose_run(trace_path, over)
        fast, fast_layers = run(tmp_path, trace_path, over, f"{name}-compiled", cfg)
        OmegaConf.update(cfg, "sim.compiled", False)  # what the override sim.compiled=false sets
        slow, slow_layers = run(tmp_path, trace_path, over, f"{name}-python", cfg)
        assert {k: fast["run"][k] for k in PATH_KEYS} == {
            "replay_path": "compiled", "replay_fallback": None, "bounds_path": "compiled", "bounds_fallback": None}
        assert {k: slow["run"][k] for k in PATH_KEYS} == {
            "replay_path": "python", "replay_fallback": NOT_ASKED, "bounds_path": "python",
            "bounds_fallback": NOT_ASKED}
        assert_same(comparable(fast), comparable(slow))
        pd.testing.assert_frame_equal(fast_layers, slow_layers, check_exact=False, rtol=1e-9, atol=0)
        assert fast["warmup_steps"] > 0 and fast["whole_run"]["stall_s"] > fast["stall_s"]


def test_the_comparison_can_fail():
    """assert_same catches a changed count, a float off by more than 1e-9 relative, a missing key, a type."""
    base = {"a": 1, "b": [0.5, None], "c": {"d": "x"}}
    assert_same(base, json.loads(json.dumps(base)))
    for other in ({"a": 2, "b": [0.5, None], "c": {"d": "x"}}, {"a": 1, "b": [0.5 * (1 + 1e-8), None], "c": {"d": "x"}},
                  {"a": 1, "b": [0.5, None], "c": {}}, {"a": 1.0, "b": [0.5, None], "c": {"d": "x"}},
                  {"a": 1, "b": [0.5, 0], "c": {"d": "x"}}):
        with pytest.raises(AssertionError):
            assert_same(base, other)


@pytest.mark.parametrize("overrides,replay_reason,bounds_reason", [
    (["predictor=transition", "horizon.distance=1"], "the run prefetches", None),
    (["output.chrome_trace=true"], "a Chrome trace is logged", None),
    (["strategy=oracle-belady"], "the run prefetches", None),
    (["cache=expertflow", "predictor=transition", "horizon.distance=0"], "ExpertFlowCache has no kernel", None),
])
def test_what_falls_back_is_recorded(tmp_path, trace_path, overrides, replay_reason, bounds_reason):
    res, _ = run(tmp_path, trace_path, [*overrides, "cache.slots=3"], "run")
    info = res["run"]
    assert info["replay_path"] == "python" and replay_reason in info["replay_fallback"]
    assert info["bounds_path"] == "compiled" and info["bounds_fallback"] is None


def test_two_copy_channels_fall_back_for_both(tmp_path, trace_path):
    """Two copy channels are not one serial channel: neither the replay nor the bounds have a kernel for them."""
    res, _ = run(tmp_path, trace_path, ["hardware=t4", "hardware.bandwidth.channels=2", "cache.slots=3"], "run")
    info = res["run"]
    for what in ("replay", "bounds"):
        assert info[f"{what}_path"] == "python"
        assert info[f"{what}_fallback"] == "copy model 'alpha_beta' with 2 channel(s) is not one serial channel"


def test_bounds_read_from_the_cache_record_the_same_path(tmp_path, trace_path):
    """A run whose bounds an earlier run cached writes the same results.json as one that computes them (the
    path keys name the path that computes them: the numbers are the same either way)."""
    over = ["cache.slots=3", f"paths.bounds_dir={tmp_path / 'bounds'}"]
    first = simulate(compose_run(trace_path, over), tmp_path / "a")
    (entry,) = (tmp_path / "bounds").iterdir()
    written = entry.stat().st_mtime_ns
    second = simulate(compose_run(trace_path, over), tmp_path / "b")
    assert entry.stat().st_mtime_ns == written  # read, not computed again
    assert comparable(first) == comparable(second) and first["run"]["bounds_path"] == "compiled"
    assert {k: first["run"][k] for k in PATH_KEYS} == {k: second["run"][k] for k in PATH_KEYS}


def test_sim_compiled_must_be_a_boolean(tmp_path, trace_path):
    out = subprocess.run([sys.executable, "-m", "sim", f"trace.path={trace_path}", "trace.name=t", "sim.compiled=maybe",
                          f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "error: sim.compiled: expected true or false, got 'maybe'" in out.stderr
    assert not (tmp_path / "run" / "results.json").exists()
