"""The report reads results only: table values, figures, self-contained HTML, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT

from analysis.__main__ import main


def fake_run(root, name, trace, policy, cache, predictor, frac, bw, stall, oracle, hit=0.5):
    d = root / name
    d.mkdir(parents=True)
    res = {
        "schema": "expertflow.results/2",
        "run": {"driver": "sim", "trace_name": trace, "model": "m", "policy": policy, "cache": cache,
                "predictor": predictor, "horizon": "fixed", "horizon_distance": 1, "scheduler": "fifo",
                "hardware": f"hw{bw}", "bandwidth_GBps": bw, "capacity_fraction": frac,
                "capacity_slots_per_layer": frac * 8, "batch_size": 1, "seed": 0, "expert_bytes": 10, "scope": "per_layer"},
        "stall_s": stall, "total_s": stall + 1.0, "tpot_s": (stall + 1) / 10, "tokens_per_s": 10 / (stall + 1),
        "hit_rate": hit, "belady_hit_rate": 0.8, "oracle_stall_s": oracle, "bytes_moved": 100,
        "wasted_bytes": 2e9, "prefetch_precision": None, "prefetch_recall": None, "allresident_total_s": 1.0,
        "tokens": 10, "steps": 10,
    }
    (d / "results.json").write_text(json.dumps(res))
    pd.DataFrame({"layer": [0, 1], "requests": [10, 10], "hits": [5, 6], "late_hits": [0, 0], "misses": [5, 4],
                  "stall_s": [0.1, 0.2], "hit_rate": [0.5, 0.6]}).to_parquet(d / "per_layer.parquet")


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "mr"
    i = 0
    for trace in ("A", "B"):
        for frac in (0.25, 0.5):
            for bw in (12.0, 25.0):
                for pol, cache, pred, stall in (("lru+none", "lru", "none", 4.0), ("lru+transition+fixed1", "lru", "transition", 3.0)):
                    fake_run(root, f"{i}_x", trace, pol, cache, pred, frac, bw, stall * (1 - frac) * 25 / bw, 1.0)
                    i += 1
    return root


def test_report_table_and_files(sweep, capsys):
    assert main(["report", str(sweep)]) == 0
    out = sweep / "report"
    df = pd.read_parquet(out / "runs.parquet")
    assert len(df) == 16 and (out / "runs.csv").exists()
    assert (df.oracle_gap_s == df.stall_s - 1.0).all()
    tr = df[df.predictor == "transition"]
    assert tr.stall_vs_ondemand.round(6).eq(0.75).all()
    assert df[df.predictor == "none"].stall_vs_ondemand.eq(1.0).all()
    # hw12.0 and hw25.0 are presets (their compute may differ too): stall is drawn by preset, not by bandwidth
    for png in ("stall_vs_cache", "hit_vs_cache", "stall_by_hardware", "per_layer_hits", "tpot"):
        assert (out / f"{png}.png").stat().st_size > 5000
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and 'src="http' not in page
    md = (out / "report.md").read_text()
    assert "## A on hw12.0" in md or "## A on hw25.0" in md
    assert "lru+transition+fixed1" in md


def test_malformed_results_are_skipped_with_their_path(sweep, capsys):
    bad = sweep / "broken"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    partial = sweep / "partial"
    partial.mkdir()
    (partial / "results.json").write_text(json.dumps({"run": {}}))
    assert main(["report", str(sweep), "--out", str(sweep / "r2")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {bad / 'results.json'}" in err and "missing key" in err
    assert len(pd.read_parquet(sweep / "r2" / "runs.parquet")) == 16


def test_empty_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no usable results.json" in capsys.readouterr().err


def test_report_on_a_real_sweep(tmp_path):
    mr = tmp_path / "mr"
    sim = subprocess.run([sys.executable, "-m", "sim", "-m", "+experiment=smoke", f"hydra.sweep.dir={mr}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr[-2000:]
    assert main(["report", str(mr)]) == 0
    df = pd.read_parquet(mr / "report" / "runs.parquet")
    assert set(df.policy) == {"lru+none", "lru+transition+fixed1"}
    assert (df.stall_s >= df.oracle_stall_s).all()


def test_stall_relative_to_ondemand_matches_the_link_bandwidth():
    import pandas as pd

    from analysis.runs import relative_to_ondemand

    rows = [dict(driver="sim", trace_name="t", hardware="a100-pcie4", bandwidth_GBps=bw, capacity_fraction=0.5,
                 batch_size=1, scheduler="fifo", cache=c, predictor=p, stall_s=s)
            for bw, c, p, s in ((3.0, "lru", "none", 8.0), (25.0, "lru", "none", 1.0),
                                (3.0, "lru", "transition", 4.0), (25.0, "lru", "transition", 2.0))]
    assert relative_to_ondemand(pd.DataFrame(rows)).tolist() == [1.0, 1.0, 0.5, 2.0]


def test_the_ondemand_baseline_is_lru_per_layer_not_global():
    """Two runs that differ only in the cache's scope: on-demand LRU per layer is the baseline, lru/global is not."""
    import pandas as pd

    from analysis.runs import relative_to_ondemand

    rows = [dict(driver="sim", trace_name="t", hardware="t4", bandwidth_GBps=12.0, capacity_fraction=0.5, batch_size=1,
                 scheduler="fifo", cache="lru", predictor="none", scope=scope, stall_s=s)
            for scope, s in (("per_layer", 4.0), ("global", 2.0))]
    assert relative_to_ondemand(pd.DataFrame(rows)).tolist() == [1.0, 0.5]


def test_older_results_files_read_in_the_current_keys(tmp_path):
    """A results.json of schema /1 (run.bandwidth_gbps; a global cache's label without its scope) loads as a
    current one, so a report may mix runs from before and after the rename."""
    from analysis.runs import load_runs

    fake_run(tmp_path, "new", "A", "expertflow/global+transition+fixed2", "expertflow", "transition", 0.5, 25.0, 1.0, 0.5)
    fake_run(tmp_path, "old", "A", "expertflow+transition+fixed2", "expertflow", "transition", 0.5, 12.0, 2.0, 0.5)
    fake_run(tmp_path, "old_per_layer", "A", "lru+none", "lru", "none", 0.5, 12.0, 3.0, 0.5)
    for name, scope in (("new", "global"), ("old", "global"), ("old_per_layer", "per_layer")):
        res = json.loads((tmp_path / name / "results.json").read_text())
        res["run"]["scope"] = scope
        if name != "new":
            res["schema"] = "expertflow.results/1"
            res["run"]["bandwidth_gbps"] = res["run"].pop("bandwidth_GBps")
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    df = load_runs(tmp_path).set_index("run_dir")
    assert df.bandwidth_GBps.to_dict() == {"new": 25.0, "old": 12.0, "old_per_layer": 12.0}
    assert df.policy.to_dict() == {"new": "expertflow/global+transition+fixed2", "old": "expertflow/global+transition+fixed2",
                                   "old_per_layer": "lru+none"}
    assert "bandwidth_gbps" not in df


def test_a_parent_folder_named_report_is_not_skipped(tmp_path, capsys):
    """Only a ``report`` folder inside the sweep holds outputs to skip; the folders above it may be named so."""
    root = tmp_path / "report" / "sweep"
    fake_run(root, "0_x", "A", "lru+none", "lru", "none", 0.5, 25.0, 1.0, 0.5)
    fake_run(root, "report", "A", "lru+none", "lru", "none", 0.5, 25.0, 9.0, 0.5)  # a report's own folder
    from analysis.runs import load_runs

    df = load_runs(root)
    assert df.stall_s.tolist() == [1.0]


def test_wrongly_typed_results_are_skipped_naming_the_key(sweep, capsys):
    for name, patch in (("run_str", {"run": "x"}), ("stall_str", {"stall_s": "abc"}),
                        ("frac_str", {"run": {"capacity_fraction": "half"}}), ("hit_null", {"hit_rate": None})):
        fake_run(sweep, name, "A", "lru+none", "lru", "none", 0.5, 25.0, 1.0, 0.5)
        res = json.loads((sweep / name / "results.json").read_text())
        for k, v in patch.items():
            res[k] = {**res[k], **v} if isinstance(v, dict) else v
        (sweep / name / "results.json").write_text(json.dumps(res))
    assert main(["report", str(sweep), "--out", str(sweep / "r2")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {sweep / 'run_str' / 'results.json'}: key 'run' is 'x', expected an object" in err
    assert f"skipped {sweep / 'stall_str' / 'results.json'}: key 'stall_s' is 'abc', expected a number" in err
    assert "key 'run.capacity_fraction' is 'half'" in err and "key 'hit_rate' is None, expected a number" in err
    assert len(pd.read_parquet(sweep / "r2" / "runs.parquet")) == 16


def test_null_bounds_are_reported_as_missing(tmp_path):
    """An executor run writes null for the bounds it cannot compute honestly: the report shows them blank."""
    root = tmp_path / "mr"
    for i, (pred, stall) in enumerate((("none", 2.0), ("transition", 1.0))):
        fake_run(root, f"{i}", "A", f"lru+{pred}", "lru", pred, 0.5, 25.0, stall, None)
        res = json.loads((root / f"{i}" / "results.json").read_text())
        res["belady_hit_rate"] = None
        (root / f"{i}" / "results.json").write_text(json.dumps(res))
    assert main(["report", str(root)]) == 0
    df = pd.read_parquet(root / "report" / "runs.parquet")
    assert df.oracle_stall_s.isna().all() and df.oracle_gap_s.isna().all() and df.belady_hit_rate.isna().all()
    assert sorted(df.stall_vs_ondemand) == [0.5, 1.0]
    md = (root / "report" / "report.md").read_text()
    # stall vs on-demand LRU 0.5, stall vs oracle bound blank, ..., Belady hit rate blank
    assert "| 50% | lru+transition | 100 | 0.500 |  | 200 | 2.00 | 50.0 |  |  | 10 |" in md
    assert "no oracle bound recorded" in md


def test_report_prints_each_traces_source(sweep):
    """results.json's ``run.trace_source`` (a synthetic preset's origin) appears under the trace's table; a
    result without one says so."""
    for p in sweep.glob("*/results.json"):
        res = json.loads(p.read_text())
        if res["run"]["trace_name"] == "A":
            res["run"]["trace_source"] = "synthetic: X shape, routing statistics borrowed from Y"
            p.write_text(json.dumps(res))
    assert main(["report", str(sweep)]) == 0
    md = (sweep / "report" / "report.md").read_text()
    assert "Trace A: synthetic: X shape, routing statistics borrowed from Y." in md
    assert "Trace B: not recorded" in md
    assert "Trace A: synthetic: X shape" in (sweep / "report" / "report.html").read_text()
    df = pd.read_parquet(sweep / "report" / "runs.parquet")
    assert set(df[df.trace_name == "A"].trace_source) == {"synthetic: X shape, routing statistics borrowed from Y"}


def test_a_synthetic_runs_results_name_whose_statistics_it_borrows(tmp_path):
    """A sim run on the DeepSeek-V2-Lite preset records in results.json that its routing is Qwen3-30B-A3B's
    statistics, and the report prints that next to the trace."""
    from traces.synth import SYNTH_PRESETS

    run_dir = tmp_path / "runs" / "one"
    sim = subprocess.run([sys.executable, "-m", "sim", "trace=deepseek-synth", "trace.synth.tokens=48",
                          f"paths.traces_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr[-2000:]
    source = json.loads((run_dir / "results.json").read_text())["run"]["trace_source"]
    assert source == SYNTH_PRESETS["deepseek-v2-lite"].source
    assert "borrowed from Qwen3-30B-A3B" in source and "no published DeepSeek-V2-Lite" in source
    assert main(["report", str(tmp_path / "runs")]) == 0
    assert f"Trace deepseek-synth: {source}." in (tmp_path / "runs" / "report" / "report.md").read_text()


def batching_run(root, i, strategy, batch, frac, stall, oracle, trajectory=None):
    """A results.json as one run of ``analysis batching``'s sweep writes it (the keys the report reads)."""
    cache, predictor, horizon = {"ondemand-lru": ("lru", "none", "fixed"), "oracle-belady": ("belady", "oracle", "fixed"),
                                 "transition-adaptive": ("lru", "transition", "adaptive")}[strategy]
    d = root / "batching-deepseek-synth" / f"{i}"
    d.mkdir(parents=True)
    tokens, steps = 64 * batch, 64
    res = {
        "schema": "expertflow.results/1",
        "run": {"driver": "sim", "trace_name": "deepseek-synth", "model": "m", "policy": f"{cache}+{predictor}",
                "cache": cache, "predictor": predictor, "horizon": horizon, "horizon_distance": 1, "scheduler": "fifo",
                "hardware": "a100-pcie4", "bandwidth_gbps": 25.0, "capacity_fraction": frac, "capacity_slots_per_layer": 8,
                "batch_size": batch, "seed": 0, "expert_bytes": 10, "scope": "per_layer"},
        "stall_s": stall, "total_s": stall + 1.0, "hit_rate": 0.5, "belady_hit_rate": 0.8, "oracle_stall_s": oracle,
        "bytes_moved": 100, "copies": 10, "tokens": tokens, "steps": steps, "whole_run": {"steps": steps + 6},
        "horizon_trajectory": trajectory,
    }
    (d / "results.json").write_text(json.dumps(res))


def test_batching_report_from_results(tmp_path):
    """``analysis batching``'s tables and figures from a sweep's results: stall per decoded token by strategy and
    batch size, the bound's row (the least of the runs' bounds), the tokens a step held, the trajectories."""
    from analysis.batching import collect, tables, trajectories, write_report

    runs = tmp_path / "runs"
    i = 0
    for batch in (1, 16):
        for strategy, stall in (("ondemand-lru", 6.4), ("oracle-belady", 3.2), ("transition-adaptive", 6.4)):
            traj = [[0, 0], [40, 1 if batch == 1 else 0]] if strategy == "transition-adaptive" else None
            batching_run(runs, i, strategy, batch, 0.5, stall * batch, 1.6 * batch + (0.1 if i % 2 else 0), traj)
            i += 1
    df = collect(runs, ["batching-deepseek-synth"])
    (t,) = tables(df).values()
    row = {r.strategy: r for r in t.itertuples(index=False)}
    assert row["ondemand-lru"][1] == pytest.approx(1e3 * 6.4 / 64) and row["oracle-belady"][2] == pytest.approx(1e3 * 3.2 * 16 / (64 * 16))
    assert row["oracle bound"][1] == pytest.approx(1e3 * 1.6 / 64)  # the least of the runs' bounds at batch 1
    assert row["tokens/step"][2] == 16
    trajs = trajectories(runs, ["batching-deepseek-synth"])
    assert sorted(t["batch"] for t in trajs) == [1, 16] and trajs[0]["trajectory"][0] == [0, 0]
    doc = write_report(df, trajs, tmp_path / "out", "test")
    assert doc["runs"] == 6 and (tmp_path / "out" / "stall_vs_batch.png").stat().st_size > 0
    assert (tmp_path / "out" / "horizon_trajectory.png").exists()
    md = (tmp_path / "out" / "batching.md").read_text()
    assert "## deepseek-synth, 50% cached" in md and "| oracle bound |" in md


@pytest.mark.slow
def test_batching_quick_end_to_end(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.run([sys.executable, "-m", "analysis", "batching", "--quick", "--runs", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "report" / "batching.json").read_text())
    assert doc["runs"] == 9 and {r["batch_size"] for r in doc["rows"]} == {1, 4, 16}
