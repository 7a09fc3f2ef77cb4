"""Long jobs say what they are doing: set-up shows pip's progress, the executor announces its expert file (where,
how big) and shows the replay's progress, `analysis predictors` reports each predictor, and a sweep's log line
names each run's hardware and cache size."""

from __future__ import annotations

import io
import subprocess

from conftest import ROOT, random_trace

from executor.run import ReplayProgress
from executor.tier import StoreLayout, ensure_store
from replay.outputs import run_line


def test_make_setup_shows_pips_progress_and_its_steps(tmp_path):
    out = subprocess.run(["make", "-n", "-B", "venv", f"VENV={tmp_path / 'v'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60).stdout
    installs = [line for line in out.splitlines() if "pip install" in line]
    assert len(installs) == 3 and not any(" -q" in line for line in installs), out
    assert "set-up 1/3" in out and "set-up 3/3" in out


def test_the_executor_says_where_and_how_big_its_expert_file_is_before_writing_it(tmp_path):
    log = io.StringIO()
    layout = StoreLayout([4, 4], 32, 48)
    path = ensure_store(tmp_path / "m.experts", layout, log)
    msg = log.getvalue()
    assert msg.startswith(f"executor: writing the expert file {path} ({layout.file_bytes() / 1e9:.2f} GB: 8 experts of "
                          f"{layout.stride_bytes / 2**20:.2f} MiB)")
    again = io.StringIO()
    ensure_store(path, layout, again)
    assert again.getvalue() == ""  # reused, nothing to say


def test_the_replay_progress_bar_follows_the_first_walk_only():
    bar = io.StringIO()
    steps = ReplayProgress(list(range(5)), file=bar, delay_s=0)
    assert list(steps) == [0, 1, 2, 3, 4] and "executor: replaying" in bar.getvalue() and "/5" in bar.getvalue()
    shown = bar.getvalue()
    assert [s for s in steps] == [0, 1, 2, 3, 4] and bar.getvalue() == shown and len(steps) == 5


def test_predictors_report_each_predictor_as_it_finishes():
    from analysis.predictors import recall_table

    tr = random_trace(tokens=40, layers=3, experts=8, top_k=2, sequences=2, seed=0)
    log = io.StringIO()
    df = recall_table(tr, tr, ("transition", "frequency", "pregate"), max_distance=2, log=log)
    lines = [x for x in log.getvalue().replace("\r", "\n").splitlines() if ": recall " in x or "skipped" in x]
    assert lines[0].startswith("predictors: 1/3 transition: recall d=1 ") and "d=2" in lines[0]
    assert lines[1].startswith("predictors: 2/3 frequency: recall d=1 ")
    assert lines[2] == "predictors: 3/3 pregate: skipped (needs hidden states; the trace has none)"
    mean_d1 = df[(df.predictor == "transition") & (df.distance == 1)].recall.mean()
    assert f"d=1 {mean_d1:.3f}" in lines[0]


def test_a_runs_log_line_names_its_hardware_cache_size_batch_and_seed():
    res = {"run": {"trace_name": "t", "policy": "lru+none", "hardware": "h100-pcie5", "capacity_fraction": 0.25,
                   "batch_size": 16, "seed": 2}, "hit_rate": 0.5, "belady_hit_rate": None, "stall_s": 1.25,
           "oracle_stall_s": None, "tpot_s": None}
    assert run_line(res) == ("t | lru+none | h100-pcie5 | cache 25% | batch 16 | seed 2: hit 0.500 (Belady n/a), "
                             "stall 1.25 s (oracle n/a), TPOT n/a")
