"""Every option of every config group and every experiment composes and instantiates (so a broken config fails
here, not in a sweep); a 2-job multirun runs end to end (lightning-hydra-template style)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_TRACES, random_trace, skip_without_shared, write_profile
from hydra.utils import instantiate
from omegaconf import OmegaConf

from policies.base import EvictionPolicy, Horizon, Predictor, Scheduler
from replay.config_keys import compose_config
from replay.trace_source import resolve_trace
from traces import write_trace

CONF = ROOT / "conf"
PROTOCOLS = {"cache": EvictionPolicy, "predictor": Predictor, "horizon": Horizon, "scheduler": Scheduler}
# every config group (a folder of options under conf/, hydra's own excepted): a new group must be added here
GROUPS = ("trace", "cache", "predictor", "horizon", "scheduler", "hardware", "executor", "paths", "strategy",
          "experiment")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_is_checked():
    found = {p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")}
    assert found == set(GROUPS), f"conf/ groups {sorted(found)}, checked here {sorted(GROUPS)}"


def needs(group: str, name: str, tmp_path: Path) -> list[str]:
    """Overrides an option cannot run without (a user-supplied file): given here, so it is checked too."""
    if (group, name) == ("hardware", "profiled"):
        return [f"hardware.profile_path={write_profile(tmp_path, None)}"]
    if (group, name) == ("trace", "file"):
        return [f"trace.path={write_trace(random_trace(tokens=20, layers=2, experts=8), tmp_path / 'file.parquet')}"]
    return []


def instantiate_run(cfg, meta=None) -> dict:
    """Everything a composed run config builds before it reads a trace: the four policies (each a subclass of
    its base class), the copy and compute models, the cache's capacity, the runtime's prefetch settings, the
    executor's checked settings and the folders. Raises what a run would raise."""
    from executor.run import check_executor_config
    from policies.cache import capacities_for
    from policies.runtime import RuntimeConfig
    from replay.hardware import build_models
    from traces.presets import MODEL_PRESETS

    meta = meta or MODEL_PRESETS["mixtral-8x7b"].meta()
    built = {}
    for group, base in PROTOCOLS.items():
        built[group] = instantiate(cfg[group]["policy"])
        assert isinstance(built[group], base), f"{group}={cfg[group].name} does not build a {base.__name__}"
    built["copy"], built["compute"] = build_models(OmegaConf.to_container(cfg.hardware, resolve=True), meta)
    built["capacity"] = capacities_for(meta.num_experts, str(cfg.cache.scope), cfg.cache.slots, cfg.cache.fraction)
    pf = cfg.prefetch
    assert 0.0 < float(pf.min_score) <= 1.0 and (pf.max_per_layer is None or int(pf.max_per_layer) >= 1)
    built["runtime"] = RuntimeConfig(meta.num_layers, meta.num_experts, meta.expert_bytes,
                                     min_score=float(pf.min_score), max_per_layer=pf.max_per_layer)
    check_executor_config(cfg.executor)
    for key, value in cfg.paths.items():  # relative: the project root is wherever it is checked out
        assert value is None or not Path(str(value)).is_absolute(), f"paths.{key} = {value} is absolute"
    return built


@pytest.mark.parametrize("group", [g for g in GROUPS if g != "experiment"])
def test_every_option_composes_and_instantiates(group, tmp_path):
    """Each option of each group, composed as a run composes it and built (:func:`instantiate_run`)."""
    assert options(group), f"conf/{group} is empty"
    unchecked: list[str] = []  # trace configs importing ../shared/traces, where it is absent
    for name in options(group):
        extra = [*needs(group, name, tmp_path), *(["seed=7"] if group == "trace" else [])]  # not the default seed
        cfg = compose_config([f"{group}={name}", *extra])
        built = instantiate_run(cfg)
        if group in (*PROTOCOLS, "hardware"):
            assert cfg[group].name == name, f"conf/{group}/{name}.yaml: name {cfg[group].name}"
        if group == "hardware":
            assert built["copy"].bandwidth_bytes_per_s > 0 and cfg.hardware.bandwidth.source
        if group == "executor":
            assert cfg.executor.backend == ("cuda" if name == "cuda" else "cpu")
        if group == "strategy":  # a strategy selects a cache and a predictor
            assert cfg.cache.name and cfg.predictor.name
        if group == "trace":
            if not check_trace_config(cfg, name):
                unchecked.append(name)
                continue
            if cfg.trace.get("synth"):  # a short one: the generator, not its speed, is checked here
                cfg.trace.synth.tokens = 40
            trace = resolve_trace(cfg.trace, tmp_path / "traces")
            instantiate_run(cfg, trace.meta)
    if unchecked:  # every other config was checked first
        skip_without_shared(f"conf/trace/{', '.join(unchecked)}.yaml")


def test_cache_sizing_is_one_node_every_cache_option_shares():
    """scope, fraction and slots are defined once (conf/cache_sizing.yaml) and reach every cache option; an option
    may change one (expertflow: global, as in its paper), and the run's policy label then says so."""
    shared = OmegaConf.load(CONF / "cache_sizing.yaml")
    for name in options("cache"):
        own = OmegaConf.load(CONF / "cache" / f"{name}.yaml")
        assert "/cache_sizing@_here_" in own.defaults and not {"fraction", "slots"} & set(own), name
        cache = compose_config([f"cache={name}"]).cache
        assert (cache.fraction, cache.slots) == (shared.fraction, shared.slots)
        assert cache.scope == ("global" if name == "expertflow" else shared.scope)
    for name in options("predictor"):
        assert not {"min_score", "max_per_layer"} & set(OmegaConf.load(CONF / "predictor" / f"{name}.yaml")), name


def test_paths_name_the_run_and_sweep_folders():
    cfg = compose_config(["paths.outputs_dir=o", "paths.multirun_dir=m", "paths.cache_dir=c"], return_hydra_config=True)
    assert str(cfg.hydra.run.dir).startswith("o/") and str(cfg.hydra.sweep.dir).startswith("m/")
    assert (cfg.paths.traces_dir, cfg.paths.bounds_dir, cfg.paths.tier_dir) == ("c/traces", "c/bounds", "c/experts")


def sweep_values(params) -> list[str]:
    """Each value of each swept key as one override (``k=a,b`` -> ``k=a``, ``k=b``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [f"{o.get_key_element()}={v}" for o in parsed for v in o.sweep_string_iterator()]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiments_compose_and_instantiate(experiment):
    """An experiment composes (a sweep), and each value it sweeps, composed with it, builds a run."""
    cfg = compose_config([f"+experiment={experiment}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.params
    for override in sweep_values(cfg.hydra.sweeper.params):
        instantiate_run(compose_config([f"+experiment={experiment}", override]))


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
