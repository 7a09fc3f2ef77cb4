"""Promises under faults: names from data never become paths unchecked, killed runs' temps are cleaned (never a
live run's), bad cache entries are recomputed, write failures are one `error:` line with nothing half-written,
values that would silently mean something else are refused."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, random_trace
from hydra import compose, initialize_config_dir

from executor.tier import StoreLayout, TierError, clean_stale_temps, ensure_store, locked_temp
from replay.errors import OutputWriteError, RunConfigError
from traces import write_trace
from traces.io import safe_name


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def small_trace(tmp_path, model="random", hidden=64, inter=96):
    tr = random_trace(tokens=40, layers=2, experts=8, top_k=2, sequences=2, seed=1)
    tr.meta.model, tr.meta.hidden_size, tr.meta.intermediate_size = model, hidden, inter
    return write_trace(tr, tmp_path / "t.parquet")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# names from data ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../x", "/etc/passwd", "a\x00b", "..", ".hidden", "a/../../b", "\udcff", "x" * 300])
def test_safe_name_is_one_harmless_component(name):
    out = safe_name(name)
    assert out and "/" not in out and "\x00" not in out and not out.startswith(".") and len(out) < 200
    assert Path("base", out).parent == Path("base")
    out.encode("utf-8")  # no surrogate survives


def test_safe_name_keeps_safe_names_and_distinct_names_apart():
    assert safe_name("mixtral-8x7b") == "mixtral-8x7b" and safe_name("Qwen1.5-MoE-A2.7B") == "Qwen1.5-MoE-A2.7B"
    assert safe_name("") == ""
    assert safe_name("a/b") != safe_name("a_b") and safe_name("a/b") != safe_name("a:b")


@pytest.mark.parametrize("model", ["../../escape", "mistralai/Mixtral-8x7B", "a\x00b"])
def test_a_traces_model_field_never_leaves_the_tier_dir(tmp_path, model):
    """executor/run.py named the expert file from the trace's model field: '../../x' wrote outside
    paths.tier_dir, a NUL byte raised a raw ValueError."""
    from executor.run import execute_config

    work = tmp_path / "work"
    work.mkdir()
    path = small_trace(work, model=model)
    tier = work / "a" / "b" / "tier"
    res = execute_config(compose_cfg([f"trace.path={path}", "executor.scale=2", f"paths.tier_dir={tier}",
                                      "paths.bounds_dir=null"]), work / "run")
    stores = list(tier.glob("*.experts"))
    assert len(stores) == 1 and stores[0].parent == tier and res["run"]["model"] == model
    assert files_under(tmp_path) == {path, stores[0], *files_under(work / "run")}


def test_a_run_name_with_a_path_in_it_stays_inside_outputs(tmp_path):
    """The run folder and the trace cache file are named from trace.name: a name with '..' stays one folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "sim", "trace.name=../../../esc", "trace.synth.tokens=60",
                           "trace.synth.sequences=2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    made = {p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")}
    assert made == {"outputs", ".cache"}, made
    (run,) = (tmp_path / "outputs").iterdir()
    assert (run / "results.json").exists() and len(list((tmp_path / ".cache" / "traces").glob("*.parquet"))) == 1


# stale temps of the expert tier -------------------------------------------------------------------------------------

WRITER = """
import sys, time
from executor.tier import locked_temp
with locked_temp(sys.argv[1]) as f:
    f.write(b"x" * 8192)
    f.flush()
    print("writing", flush=True)
    time.sleep(120)
"""


def test_a_killed_writers_temp_is_cleaned_and_a_live_writers_is_not(tmp_path):
    tier = tmp_path / "tier"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tier / "m.experts")], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        (tmp,) = tier.glob(".m.experts.*.tmp")
        assert clean_stale_temps(tier) == (0, 0) and tmp.exists()  # a live run is still writing it
        ensure_store(tier / "other.experts", StoreLayout([2], 8, 8))
        assert tmp.exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert tmp.exists()  # the killed run left it
    ensure_store(tier / "other.experts", StoreLayout([2], 8, 8))  # the next run of the tier cleans it
    assert not tmp.exists() and not list(tier.glob("*.tmp"))
    assert sorted(p.name for p in tier.iterdir()) == ["other.experts"]


def test_a_cleaner_never_takes_a_temp_from_under_its_writer(tmp_path):
    """The writer holds its lock until the file has its final name, so a cleaner running meanwhile finds it busy."""
    target = tmp_path / "x.experts"
    with locked_temp(target) as f:
        f.write(b"abc")
        assert clean_stale_temps(tmp_path) == (0, 0)
    assert target.read_bytes() == b"abc" and clean_stale_temps(tmp_path) == (0, 0)


# write failures ---------------------------------------------------------------------------------------------------

class FullDisk:
    """A file whose writes fail as on a full disk after ``room`` bytes."""

    def __init__(self, f, room=8192):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(28, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_while_writing_the_expert_file_is_a_tier_error_leaving_nothing(tmp_path, monkeypatch):
    import executor.tier as tier

    real = os.fdopen
    monkeypatch.setattr(tier.os, "fdopen", lambda fd, mode: FullDisk(real(fd, mode)))
    with pytest.raises(TierError, match="No space left on device"):
        ensure_store(tmp_path / "m.experts", StoreLayout([4, 4], 32, 48))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_stops_before_writing(tmp_path, monkeypatch):
    import executor.tier as tier

    monkeypatch.setattr(tier.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(TierError, match=r"paths.tier_dir: the expert file needs .* GB free"):
        ensure_store(tmp_path / "m.experts", StoreLayout([4, 4], 32, 48))
    assert list(tmp_path.iterdir()) == []


def run_cli(tmp_path, module, *overrides):
    return subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_file_where_the_tier_dir_should_be_is_an_error(tmp_path):
    path = small_trace(tmp_path)
    (tmp_path / "tier").write_text("a file")
    proc = run_cli(tmp_path, "executor", f"trace.path={path}", "executor.scale=2", f"paths.tier_dir={tmp_path / 'tier'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2 and proc.stderr.startswith("error: paths.tier_dir: cannot use"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "results.json").exists()


def test_a_file_where_the_run_dir_should_be_is_an_error(tmp_path):
    (tmp_path / "f").write_text("a file")
    proc = run_cli(tmp_path, "sim", f"hydra.run.dir={tmp_path / 'f' / 'run'}")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: hydra.run.dir: cannot create the folder {tmp_path / 'f' / 'run'} (Not a directory)")


def test_a_failed_output_write_leaves_no_outputs_without_results(tmp_path):
    """The chrome trace cannot be written (a folder is in its way): the per-layer table already written is
    removed again, and an older results.json of that folder does not survive to vouch for it."""
    run = tmp_path / "run"
    (run / "chrome_trace.json").mkdir(parents=True)
    (run / "chrome_trace.json" / "x").write_text("")
    (run / "results.json").write_text("{}")
    proc = run_cli(tmp_path, "sim", "trace.synth.tokens=60", "output.chrome_trace=true", f"hydra.run.dir={run}")
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {run}: cannot write the run's outputs"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "results.json").exists() and not (run / "per_layer.parquet").exists()


def test_a_full_disk_at_results_json_removes_the_per_layer_table(tmp_path, monkeypatch):
    import replay.outputs as outputs
    from sim.run import simulate

    def full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "write_json", full)
    with pytest.raises(OutputWriteError, match="No space left on device"):
        simulate(compose_cfg(["trace.synth.tokens=60", f"paths.traces_dir={tmp_path / 'c'}"]), tmp_path / "run")
    assert list((tmp_path / "run").iterdir()) == []


# values that silently meant something else ------------------------------------------------------------------------

@pytest.mark.parametrize("override, msg", [
    ("max_tokens=0", "max_tokens: expected an integer >= 1 (or null: replay every token), got 0"),
    ("max_tokens=-5", "max_tokens: expected an integer >= 1 (or null: replay every token), got -5"),
    ("split.test_fraction=0", "split.test_fraction: expected a share of the sequences in (0, 1), or null"),
    ("split.test_fraction=1.0", "split.test_fraction: expected a share of the sequences in (0, 1), or null"),
])
def test_values_that_would_silently_mean_all_are_refused(tmp_path, override, msg):
    from replay.prepare import prepare

    with pytest.raises(RunConfigError) as exc:
        prepare(compose_cfg([f"trace.path={small_trace(tmp_path)}", override]))
    assert str(exc.value).startswith(msg)


def test_an_executor_scale_beyond_the_models_shape_is_refused_not_clamped(tmp_path):
    path = small_trace(tmp_path, hidden=64, inter=96)  # 64 / 16 = 4 < 8: the tier would clamp it to 8
    proc = run_cli(tmp_path, "executor", f"trace.path={path}", "executor.scale=16", f"paths.tier_dir={tmp_path / 'tier'}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: executor.scale: 16 would shrink 'random''s experts (hidden 64, intermediate "
                                   "96) below 8, the smallest size the tier packs; the largest scale for this model is 8")
    assert not (tmp_path / "tier").exists()
    from executor.run import execute_config

    res = execute_config(compose_cfg([f"trace.path={path}", "executor.scale=8", f"paths.tier_dir={tmp_path / 'tier'}",
                                      "paths.bounds_dir=null"]), tmp_path / "ok")
    assert (res["run"]["scale"], res["run"]["scaled_hidden"], res["run"]["scaled_intermediate"]) == (8, 8, 12)


# the bounds cache -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["{}", '{"belady_hit_rate": "0.5"}', "[1, 2]", "\xff\xfe not utf-8", "BAD"])
def test_a_bad_bounds_cache_entry_is_a_warning_and_a_recompute(tmp_path, caplog, content):
    from sim.run import simulate

    ov = [f"trace.path={small_trace(tmp_path)}", f"paths.bounds_dir={tmp_path / 'bounds'}"]
    first = simulate(compose_cfg(ov), tmp_path / "a")
    (entry,) = (tmp_path / "bounds").glob("*.json")
    if content == "BAD":  # every key, one value out of range
        good = json.loads(entry.read_text())
        entry.write_text(json.dumps({**good, "belady_hit_rate": 1.5}))
    else:
        entry.write_bytes(content.encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="replay.bounds_cache"):
        again = simulate(compose_cfg(ov), tmp_path / "b")
    assert f"bounds cache: ignoring {entry}" in caplog.text
    keys = ("belady_hit_rate", "belady_misses_unique", "oracle_stall_s", "oracle_aggressive_stall_s",
            "oracle_conservative_stall_s", "oracle_preloaded_stall_s")
    assert all(again[k] == first[k] and first[k] is not None for k in keys)
    replaced = json.loads(entry.read_text())  # replaced by the recomputed entry: the window's and the whole run's
    assert {k: replaced[k] for k in keys} == {k: first[k] for k in keys}
    assert replaced["whole_run"] == {k: first["whole_run"][k] for k in keys}


def test_the_cache_schema_is_what_compute_bounds_returns(tmp_path):
    from replay.bounds import compute_bounds
    from replay.bounds_cache import BOUND_KEYS, entry_problem
    from replay.prepare import prepare

    out = compute_bounds(prepare(compose_cfg([f"trace.path={small_trace(tmp_path)}"])))
    assert set(out) == {*BOUND_KEYS, "whole_run"} and set(out["whole_run"]) == set(BOUND_KEYS)
    assert entry_problem(out) is None
    out["whole_run"]["oracle_stall_s"] = -1.0  # the whole run's bounds are checked too
    assert "under 'whole_run'" in entry_problem(out)
