"""`python -m analysis paper`: each claim's decision rule on hand-made tables (so each verdict can flip), and
the `--quick` grid end to end (sweeps through hydra, paper.json, paper.md, figures)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from analysis import claims


def horizon_runs(adaptive_stall):
    rows = []
    for bw in (3.0, 25.0):
        for frac in (0.25, 0.5):
            for d, s in ((1, 2.0), (2, 1.0)):
                rows.append(dict(trace_name="t", bandwidth_GBps=bw, capacity_fraction=frac, horizon="fixed",
                                 horizon_distance=d, stall_s=s * bw))
            rows.append(dict(trace_name="t", bandwidth_GBps=bw, capacity_fraction=frac, horizon="adaptive",
                             horizon_distance=np.nan, stall_s=adaptive_stall(bw, frac) * bw))
    return pd.DataFrame(rows)


def test_horizon_claim_rule():
    assert claims.horizon_claim(horizon_runs(lambda bw, f: 0.9)).held is True
    # equal to the best fixed everywhere: never worse, but not better than the single best choice
    assert claims.horizon_claim(horizon_runs(lambda bw, f: 1.0)).held is False
    # better on average but worse in one cell
    c = claims.horizon_claim(horizon_runs(lambda bw, f: 1.2 if (bw, f) == (3.0, 0.25) else 0.5))
    assert c.held is False and c.table["adaptive <= best fixed"].iloc[0] == 3


def test_predictor_claim_rule():
    def recall(hybrid):
        rows = [dict(predictor=p, distance=d, layer=0, recall=r) for d in (1, 2)
                for p, r in (("pregate", 0.6), ("transition", 0.5), ("frequency", 0.4), ("hybrid", hybrid))]
        return pd.DataFrame(rows)

    assert claims.predictor_claim(recall(0.75)).held is True  # +25% over pre-gating
    assert claims.predictor_claim(recall(0.63)).held is False  # beats it, by 5% only
    assert claims.predictor_claim(None).held is None


def stall_runs(best, bound):
    rows = [dict(trace_name="t", hardware="h", cache="lru", predictor="none", policy="lru+none", stall_s=1.0, oracle_stall_s=bound),
            dict(trace_name="t", hardware="h", cache="expertflow", predictor="transition", policy="ef", stall_s=best, oracle_stall_s=bound),
            dict(trace_name="t", hardware="h", cache="belady", predictor="oracle", policy="oracle", stall_s=bound, oracle_stall_s=bound)]
    return pd.DataFrame(rows)


def test_stall_claim_rule():
    assert claims.stall_claim(stall_runs(best=5e-4, bound=1e-4)).held is True
    assert claims.stall_claim(stall_runs(best=0.2, bound=1e-4)).held is False
    c = claims.stall_claim(stall_runs(best=0.2, bound=0.1))  # the link cannot do it: claim not applicable
    assert c.held is None and c.table["oracle bound / on-demand"].iloc[0] == pytest.approx(0.1)


def test_memory_and_scheduler_rules():
    rows = [dict(trace_name="t", policy="lru+none", cache="lru", predictor="none", capacity_fraction=f,
                 total_s=s, allresident_total_s=1.0) for f, s in ((0.25, 1.5), (0.5, 1.05), (0.75, 1.0))]
    c = claims.memory_claim(pd.DataFrame(rows))
    assert c.held is True and c.table["memory saving"].iloc[0] == pytest.approx(0.5)
    rows[1]["total_s"] = 1.2
    assert claims.memory_claim(pd.DataFrame(rows)).held is False

    def sched(gain):
        return pd.DataFrame([dict(trace_name="t", batch_size=b, scheduler=s, distinct_experts_per_layer_step=d,
                                  tokens_per_s=tp, request_tpot_s=1.0, scheduler_wall_s=0.01)
                             for b in (4, 8) for s, d, tp in (("fifo", 10, 100.0), ("route_grouping", 8, 100.0 * gain))])

    assert claims.scheduler_claim(sched(1.05)).held is True
    assert claims.scheduler_claim(sched(0.97)).held is False


def test_quick_paper_end_to_end(tmp_path):
    from analysis.__main__ import main

    runs, out = tmp_path / "runs", tmp_path / "out"
    assert main(["paper", "--quick", "--runs", str(runs), "--out", str(out)]) == 0
    doc = json.loads((out / "paper.json").read_text())
    assert [c["id"] for c in doc["claims"]] == ["horizon", "predictors", "stall", "memory", "sched"]
    for c in doc["claims"]:
        assert c["held"] in (True, False, None) and c["values"], c["id"]
    assert doc["claims"][1]["held"] is True  # the hybrid's lead on the reference model is pinned elsewhere too
    assert doc["runs"] == len(list(runs.rglob("results.json")))
    for fig in ("claim1_horizon", "claim2_predictors", "claim3_stall", "claim4_memory", "claim5_scheduling"):
        assert (out / f"{fig}.png").stat().st_size > 10_000
    md = (out / "paper.md").read_text()
    assert "## 5. Token scheduling" in md and "claim5_scheduling.png" in md
    # where each trace's routing comes from (run.trace_source), listed under the grid line
    assert set(doc["trace_sources"]) == set(doc["traces"]) and all(doc["trace_sources"].values())
    assert all(f"- {tr}: {src}" in md for tr, src in doc["trace_sources"].items())
    # a second run reuses every finished sweep
    mtime = (runs / "stall-reference-moe" / ".done").stat().st_mtime
    assert main(["paper", "--quick", "--runs", str(runs), "--out", str(out)]) == 0
    assert (runs / "stall-reference-moe" / ".done").stat().st_mtime == mtime


def test_claim_rules_on_degenerate_tables():
    # nothing to compare against: "not tested", never a crash or a vacuous "held"
    assert claims.stall_claim(stall_runs(best=0.0, bound=0.0).assign(stall_s=0.0)).held is None
    no_pregate = pd.DataFrame([dict(predictor=p, distance=1, layer=0, recall=r) for p, r in (("hybrid", 0.9), ("frequency", 0.5))])
    assert claims.predictor_claim(no_pregate).held is None
    oracle_only = pd.DataFrame([dict(trace_name="t", policy="belady+oracle", cache="belady", predictor="oracle",
                                     capacity_fraction=0.5, total_s=1.0, allresident_total_s=1.0)])
    assert claims.memory_claim(oracle_only).held is None


class FakeSweep:
    """Stands in for the ``python -m sim -m`` subprocess of ``paper.run_sweep``: one results file per call."""

    def __init__(self):
        self.calls = 0

    def __call__(self, cmd, **kw):
        import subprocess
        from pathlib import Path

        self.calls += 1
        out = Path(next(a for a in cmd if a.startswith("hydra.sweep.dir=")).split("=", 1)[1])
        (out / "0").mkdir(parents=True)
        (out / "0" / "results.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0, "", "")


def test_a_finished_sweep_is_reused_only_with_the_same_overrides(tmp_path, monkeypatch):
    from analysis import paper
    from analysis.errors import AnalysisError

    fake = FakeSweep()
    monkeypatch.setattr(paper.subprocess, "run", fake)
    out = paper.run_sweep("s", ["trace=a", "cache.fraction=0.25,0.5"], tmp_path, 1)
    assert json.loads((out / ".done").read_text())["overrides"] == ["trace=a", "cache.fraction=0.25,0.5"]
    paper.run_sweep("s", ["trace=a", "cache.fraction=0.25,0.5"], tmp_path, 2)  # jobs do not change the runs
    assert fake.calls == 1
    with pytest.raises(AnalysisError, match=r"\.done: sweep s there was run with overrides \['trace=a', "
                                            r"'cache.fraction=0.25,0.5'\], this grid asks for .*0.75.*; delete"):
        paper.run_sweep("s", ["trace=a", "cache.fraction=0.25,0.5,0.75"], tmp_path, 1)
    assert fake.calls == 1
    (out / ".done").write_text("{trunc")
    with pytest.raises(AnalysisError, match="not a sweep marker"):
        paper.run_sweep("s", ["trace=a", "cache.fraction=0.25,0.5"], tmp_path, 1)


def test_an_unfinished_sweep_is_run_again_whole(tmp_path, monkeypatch):
    from analysis import paper

    stale = tmp_path / "s" / "7" / "results.json"  # an interrupted attempt at another grid
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    monkeypatch.setattr(paper.subprocess, "run", FakeSweep())
    paper.run_sweep("s", ["trace=a"], tmp_path, 1)
    assert not stale.exists() and (tmp_path / "s" / "0" / "results.json").exists()


def test_the_done_marker_is_written_atomically(tmp_path, monkeypatch):
    """A write that dies half way leaves no marker, so the sweep is not taken for finished."""
    from pathlib import Path

    from analysis import paper

    monkeypatch.setattr(paper.subprocess, "run", FakeSweep())
    real_write = Path.write_text

    def dies_half_way(self, text, *a, **kw):
        if ".done" in self.name:
            real_write(self, text[: len(text) // 2])
            raise OSError("disk full")
        return real_write(self, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        paper.run_sweep("s", ["trace=a"], tmp_path, 1)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["0"]
