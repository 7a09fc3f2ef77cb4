"""Old config keys (replay/config_keys.py) are still accepted, from a command line, a config file, an experiment's
sweep and an older run's saved config, each with a warning that names the new key, and give the results the new
keys give."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, random_trace
from omegaconf import OmegaConf

from replay.config_keys import (
    RENAMED,
    TRANSLATED,
    DeprecatedKeyWarning,
    compose_config,
    normalise,
    rewrite_overrides,
)
from replay.errors import RunConfigError
from traces import write_trace


def test_overrides_are_rewritten_with_a_warning_naming_the_new_key():
    args = ["-m", "hardware.bandwidth.bandwidth_gbps=3,6", "+trace.cache_dir=/tmp/x", "~bounds.cache_dir",
            "hardware.bandwidth.model=shared_link", "cache.fraction=0.25", "--cfg", "job", "predictor=transition"]
    with pytest.warns(DeprecatedKeyWarning) as got:
        out = rewrite_overrides(args)
    assert out == ["-m", "hardware.bandwidth.bandwidth_GBps=3,6", "++paths.traces_dir=/tmp/x", "~paths.bounds_dir",
                   "++hardware.bandwidth.model=shared_link", "cache.fraction=0.25", "--cfg", "job",
                   "predictor=transition"]
    said = [str(w.message) for w in got]
    assert said == ["config key hardware.bandwidth.bandwidth_gbps is deprecated: use hardware.bandwidth.bandwidth_GBps",
                    "config key trace.cache_dir is deprecated: use paths.traces_dir",
                    "config key bounds.cache_dir is deprecated: use paths.bounds_dir"]


def test_new_keys_pass_unchanged_and_quietly(recwarn):
    args = ["hardware.bandwidth.bandwidth_GBps=3", "prefetch.min_score=0.2", "paths.tier_dir=t", "-m", "x=1,2"]
    assert rewrite_overrides(args) == args
    assert not [w for w in recwarn if issubclass(w.category, DeprecatedKeyWarning)]


def test_every_renamed_key_moves_in_a_composed_config():
    """An older run's saved config (every old key at once) reads as the current one: values at the new keys, the
    emptied ``bounds`` node gone, one warning per old key naming the new one."""
    old = {"hardware": {"bandwidth": {"bandwidth_gbps": 7.0, "latency_s": 0.0}, "compute": {"tflops": 9, "mem_gbps": 8}},
           "predictor": {"name": "transition", "min_score": 0.3, "max_per_layer": 2},
           "executor": {"scale": 8, "tier_dir": "t"}, "bounds": {"cache_dir": "b"}, "trace": {"cache_dir": "c"}}
    cfg = OmegaConf.create(old)
    OmegaConf.set_struct(cfg, True)  # as hydra composes it
    with pytest.warns(DeprecatedKeyWarning) as got:
        normalise(cfg)
    assert {str(w.message).split()[2] for w in got} == set(RENAMED)
    assert all(f"use {RENAMED[str(w.message).split()[2]]}" in str(w.message) for w in got)
    assert OmegaConf.to_container(cfg) == {
        "hardware": {"bandwidth": {"bandwidth_GBps": 7.0, "latency_s": 0.0}, "compute": {"peak_TFLOPS": 9, "mem_GBps": 8}},
        "predictor": {"name": "transition"}, "executor": {"scale": 8}, "trace": {},
        "prefetch": {"min_score": 0.3, "max_per_layer": 2}, "paths": {"tier_dir": "t", "bounds_dir": "b", "traces_dir": "c"},
    }


@pytest.mark.parametrize("model, want", [
    ("constant", {"source": "measured", "sharing": "independent", "latency_s": 0.0}),
    ("alpha_beta", {"source": "measured", "sharing": "independent", "latency_s": 1e-5}),
    ("shared_link", {"source": "measured", "sharing": "shared", "latency_s": 1e-5}),
    ("partial_link", {"source": "measured", "sharing": "partial", "latency_s": 1e-5}),
    ("profiled", {"source": "profile", "sharing": "independent", "latency_s": 1e-5}),
])
def test_the_old_copy_model_splits_into_source_and_sharing(model, want):
    cfg = {"hardware": {"bandwidth": {"model": model, "source": "measured", "sharing": "independent", "latency_s": 1e-5}}}
    with pytest.warns(DeprecatedKeyWarning, match=f"hardware.bandwidth.model is deprecated: use {TRANSLATED['hardware.bandwidth.model']}"):
        normalise(cfg)
    assert cfg["hardware"]["bandwidth"] == want


def test_translated_keys_from_a_profiled_config_and_bad_values():
    cfg = {"hardware": {"bandwidth": {"model": "alpha_beta", "source": "profile"}, "compute": {"model": "analytic", "source": "profile"}}}
    with pytest.warns(DeprecatedKeyWarning):
        normalise(cfg)
    # the figures are the config's now, of unstated origin
    assert cfg["hardware"] == {"bandwidth": {"source": None, "sharing": "independent"}, "compute": {"source": None}}
    old_file = {"hardware": {"compute": {"model": "profiled"}}}  # an old hardware file: no source key at all
    with pytest.warns(DeprecatedKeyWarning, match="use hardware.compute.source"):
        normalise(old_file)
    assert old_file["hardware"]["compute"] == {"source": "profile"}
    for node in ({"bandwidth": {"model": "warp"}}, {"compute": {"model": "warp"}}):
        with pytest.warns(DeprecatedKeyWarning), pytest.raises(RunConfigError, match=r"model \(deprecated\): expected"):
            normalise({"hardware": node})


def test_compose_config_takes_old_overrides():
    with pytest.warns(DeprecatedKeyWarning):
        cfg = compose_config(["hardware=t4", "hardware.bandwidth.bandwidth_gbps=3", "hardware.bandwidth.model=shared_link",
                              "predictor.min_score=0.2", "executor.tier_dir=t"])
    assert cfg.hardware.bandwidth.bandwidth_GBps == 3 and cfg.hardware.bandwidth.sharing == "shared"
    assert cfg.hardware.bandwidth.source == "measured" and "model" not in cfg.hardware.bandwidth
    assert cfg.prefetch.min_score == 0.2 and cfg.paths.tier_dir == "t" and "tier_dir" not in cfg.executor


def _sim(tmp_path, name, *overrides, multirun=False):
    run = [f"hydra.sweep.dir={tmp_path / name}", "hydra.launcher.n_jobs=1"] if multirun else [f"hydra.run.dir={tmp_path / name}"]
    proc = subprocess.run([sys.executable, "-m", "sim", *(["-m"] if multirun else []), *overrides, *run],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _results(path) -> dict:
    res = json.loads(path.read_text())
    for k in ("sim_wall_s", "scheduler_wall_s"):  # host time, not a result
        res.pop(k)
    return res


def test_old_key_overrides_give_the_same_results_as_the_new_keys(tmp_path):
    trace = write_trace(random_trace(tokens=120, layers=3, experts=8, top_k=2, sequences=3, seed=4), tmp_path / "t.parquet")
    common = [f"trace.path={trace}", "trace.name=t", "predictor=transition", "hardware=t4", "cache.fraction=0.5"]
    new = ["hardware.bandwidth.bandwidth_GBps=3", "hardware.bandwidth.sharing=shared", "hardware.bandwidth.channels=2",
           "prefetch.min_score=0.2", "paths.bounds_dir=null"]
    old = ["hardware.bandwidth.bandwidth_gbps=3", "hardware.bandwidth.model=shared_link", "hardware.bandwidth.channels=2",
           "predictor.min_score=0.2", "bounds.cache_dir=null"]
    assert "DeprecatedKeyWarning" not in _sim(tmp_path, "new", *common, *new)
    err = _sim(tmp_path, "old", *common, *old)
    for line in ("hardware.bandwidth.bandwidth_gbps is deprecated: use hardware.bandwidth.bandwidth_GBps",
                 "hardware.bandwidth.model is deprecated: use hardware.bandwidth.source and hardware.bandwidth.sharing",
                 "predictor.min_score is deprecated: use prefetch.min_score",
                 "bounds.cache_dir is deprecated: use paths.bounds_dir"):
        assert line in err
    a, b = _results(tmp_path / "new" / "results.json"), _results(tmp_path / "old" / "results.json")
    assert a == b
    assert a["run"]["bandwidth_GBps"] == 3 and a["run"]["copy_model"] == "shared_link"


def test_old_keys_in_a_config_file_and_an_experiments_sweep(tmp_path):
    """A hardware file and an experiment written for the old keys (found through hydra.searchpath) run: the
    sweep's old key reaches every job, the file's figures the models."""
    conf = tmp_path / "conf"
    (conf / "hardware").mkdir(parents=True)
    (conf / "experiment").mkdir()
    (conf / "hardware" / "oldgpu.yaml").write_text(
        "name: oldgpu\nbandwidth: {model: alpha_beta, bandwidth_gbps: 5.0, latency_s: 1.0e-5, channels: 1}\n"
        "compute: {model: analytic, tflops: 65, efficiency: 0.5, mem_gbps: 320, mem_efficiency: 0.8}\nprofile_path: null\n")
    (conf / "experiment" / "oldsweep.yaml").write_text(
        "# @package _global_\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      hardware.bandwidth.bandwidth_gbps: 3,6\n")
    trace = write_trace(random_trace(tokens=60, layers=2, experts=8, seed=5), tmp_path / "t.parquet")
    common = [f"trace.path={trace}", "trace.name=t", "paths.bounds_dir=null", f"hydra.searchpath=[file://{conf}]"]
    err = _sim(tmp_path, "file", *common, "hardware=oldgpu")
    assert "hardware.compute.tflops is deprecated: use hardware.compute.peak_TFLOPS" in err
    _sim(tmp_path, "same", *common, "hardware=t4", "hardware.bandwidth.bandwidth_GBps=5")
    a, b = _results(tmp_path / "file" / "results.json"), _results(tmp_path / "same" / "results.json")
    assert a["run"].pop("hardware") == "oldgpu" and b["run"].pop("hardware") == "t4"
    assert a == b  # t4's figures but the link: the old file's, read through the new keys
    err = _sim(tmp_path, "sweep", *common, "+experiment=oldsweep", multirun=True)
    assert err.count("hardware.bandwidth.bandwidth_gbps is deprecated: use hardware.bandwidth.bandwidth_GBps") == 1
    got = sorted(json.loads(p.read_text())["run"]["bandwidth_GBps"] for p in (tmp_path / "sweep").rglob("results.json"))
    assert got == [3.0, 6.0]
