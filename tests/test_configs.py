"""Every config composes and instantiates; a 2-job multirun runs end to end (lightning-hydra-template style)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_TRACES, skip_without_shared
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from policies.base import EvictionPolicy, Horizon, Predictor, Scheduler

CONF = ROOT / "conf"
PROTOCOLS = {"cache": EvictionPolicy, "predictor": Predictor, "horizon": Horizon, "scheduler": Scheduler}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", sorted(PROTOCOLS))
def test_every_policy_config_composes_and_instantiates(group):
    assert options(group), f"conf/{group} is empty"
    for name in options(group):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[f"{group}={name}"])
        obj = instantiate(cfg[group]["policy"])
        assert isinstance(obj, PROTOCOLS[group]), f"conf/{group}/{name}.yaml does not build a {PROTOCOLS[group].__name__}"
        assert cfg[group]["name"] == name


@pytest.mark.parametrize("group", ["hardware", "trace", "strategy"])
def test_other_groups_compose(group):
    unchecked: list[str] = []  # trace configs importing ../shared/traces, where it is absent
    for name in options(group):
        overrides = [f"{group}={name}", *(["seed=7"] if group == "trace" else [])]  # not the default seed
        if name in ("file", "profiled"):
            continue  # need a user-supplied path (checked in test_sim / executor tests)
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        if group == "hardware":
            assert cfg.hardware.bandwidth.bandwidth_gbps > 0
        if group == "strategy":
            # a strategy selects a cache and a predictor
            assert cfg.cache.name and cfg.predictor.name
        if group == "trace" and not check_trace_config(cfg, name):
            unchecked.append(name)
    if unchecked:  # every other config was checked first
        skip_without_shared(f"conf/trace/{', '.join(unchecked)}.yaml")


def check_trace_config(cfg, name: str) -> bool:
    """A trace config names itself and gives exactly one source that resolves: a file in the project, a
    synthetic preset (seeded by the run's seed) or an import of files that exist. False: the import's files are
    in ../shared/traces, which is absent here (everything else was checked)."""
    from replay.trace_source import trace_name
    from traces.importers import FORMATS
    from traces.presets import MODEL_PRESETS

    t = cfg.trace
    assert t.name == name and trace_name(t) == name, f"conf/trace/{name}.yaml"
    sources = [k for k in ("path", "synth", "imported") if t.get(k)]
    assert len(sources) == 1, f"conf/trace/{name}.yaml: sources {sources}, expected exactly one"
    if t.get("path"):
        for key in ("path", "train_path"):
            if t.get(key):
                assert (ROOT / t[key]).is_file(), f"conf/trace/{name}.yaml: {key} {t[key]} is not a file"
    elif t.get("synth"):
        assert t.synth.preset in MODEL_PRESETS and t.synth.tokens > 0
        assert t.synth.seed == cfg.seed == 7, f"conf/trace/{name}.yaml: synth.seed is not the run's seed"
    else:
        imp = t.imported
        assert imp.format in FORMATS and imp.model_preset in MODEL_PRESETS
        assert imp.sources
        if any(Path(src).parts[:2] == ("..", "shared") for src in imp.sources) and not SHARED_TRACES.is_dir():
            return False
        assert all((ROOT / src).is_file() for src in imp.sources), imp.sources
    return True


@pytest.mark.parametrize("experiment", ["demo", "smoke"])
def test_experiments_compose(experiment):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params


def test_multirun_smoke(tmp_path):
    out = tmp_path / "mr"
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "-m", "+experiment=smoke", f"hydra.sweep.dir={out}", "hydra.launcher.n_jobs=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(out.rglob("results.json"))
    assert len(results) == 2
    policies = {json.loads(p.read_text())["run"]["policy"] for p in results}
    assert policies == {"lru+none", "lru+transition+fixed1"}


def test_cli_bad_value_exits_with_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "cache.fraction=1.5", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "cache.fraction" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results.json").exists()
