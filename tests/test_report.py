"""The report speaks first (a headline per trace and hardware), marks bounds, shows the spread over seeds, keeps
its definitions and captions in the HTML, says when a sweep is incomplete, and skips unreadable results."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from conftest import ROOT

from analysis.__main__ import main
from analysis.render import num

POLICIES = {  # policy: (cache, predictor, stall multiplier vs on-demand LRU, prefetch precision)
    "lru+none": ("lru", "none", 1.0, None),
    "lfru+none": ("lfru", "none", 0.8, None),
    "lru+transition+fixed1": ("lru", "transition", 1.5, 0.2),
    "belady+oracle+fixed2": ("belady", "oracle", 0.3, 1.0),
}


def fake_run(root, name, trace, policy, frac, hw, bw, seed, stall, tokens=100, batch=1):
    cache, pred, _, prec = POLICIES[policy]
    d = root / name
    d.mkdir(parents=True)
    steps, compute = tokens, 0.5
    res = {
        "schema": "expertflow.results/2",
        "run": {"driver": "sim", "trace_name": trace, "trace_source": f"synthetic {trace}", "model": "m",
                "policy": policy, "cache": cache, "predictor": pred, "horizon": "fixed", "horizon_distance": 1,
                "scheduler": "fifo", "hardware": hw, "bandwidth_GBps": bw, "capacity_fraction": frac,
                "capacity_slots_per_layer": frac * 8, "batch_size": batch, "seed": seed, "expert_bytes": 10,
                "scope": "per_layer"},
        "stall_s": stall, "total_s": stall + compute, "tpot_s": (stall + compute) / steps, "tokens": tokens,
        "steps": steps, "allresident_total_s": compute, "tokens_per_s": tokens / (stall + compute),
        "hit_rate": 0.5, "belady_hit_rate": 0.8, "oracle_stall_s": 0.25 * (1 - frac) * 25 / bw, "bytes_moved": 100,
        "wasted_bytes": 0, "prefetch_precision": prec, "prefetch_recall": prec,
    }
    (d / "results.json").write_text(json.dumps(res))
    pd.DataFrame({"layer": [0, 1], "requests": [10, 10], "hits": [5, 6], "late_hits": [0, 0], "misses": [5, 4],
                  "stall_s": [0.1, 0.2], "hit_rate": [0.5, 0.6]}).to_parquet(d / "per_layer.parquet")


def seeded_sweep(root):
    """Two traces x two hardware presets x two cache sizes x four policies x three seeds."""
    i = 0
    for trace in ("A", "B"):
        for hw, bw in (("slow", 12.0), ("fast", 25.0)):
            for frac in (0.25, 0.5):
                for pol, (_, _, mult, _) in POLICIES.items():
                    for seed in (0, 1, 2):
                        stall = (1 - frac) * 25 / bw * mult * (1 + 0.1 * seed)
                        fake_run(root, f"{i}_x", trace, pol, frac, hw, bw, seed, stall)
                        i += 1
    return root


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The seeded sweep and its report, made once for the tests that only read them."""
    root = seeded_sweep(tmp_path_factory.mktemp("seeded") / "mr")
    assert main(["report", str(root)]) == 0
    return root


def test_the_report_opens_with_its_headline(seeded):
    md = (seeded / "report" / "report.md").read_text()
    assert [line for line in md.splitlines() if line.startswith("## ")][0] == "## Headline"
    head = md.split("## Headline")[1].split("## What was run")[0]
    for hw in ("slow", "fast"):  # per trace and hardware: the winner, vs on-demand LRU, vs the oracle bound
        line = next(x for x in head.splitlines() if x.startswith(f"- On {hw}:"))
        assert "**lfru+none** stalls least at every cache size (25%, 50%), 20% less than on-demand LRU" in line
        assert "the oracle bound (lowest on all 3 seeds everywhere)" in line
    assert "Prefetching raised stall above on-demand LRU's" in head and "**lru+transition+fixed1** 1.50×" in head
    assert "prefetch precision 20%" in head
    assert head.index("**A**") < head.index("**B**")


def test_tables_mark_bounds_and_show_the_spread_over_seeds(seeded):
    md = (seeded / "report" / "report.md").read_text()
    for header in ("stall per token (ms)", "stall vs on-demand LRU (×)", "stall vs oracle bound (×)", "TPOT (ms)",
                   "TPOT vs all-resident (×)", "tokens replayed"):
        assert header in md
    best = md.split("## Best deployable policy")[1].split("\n## ")[0]
    assert "belady" not in best and "| lfru+none |" in best and "3 of 3" in best
    row = next(x for x in md.splitlines() if x.startswith("| 25% | belady+oracle+fixed2 (bound) |"))
    # the tables are at the reference hardware ("fast": a tie broken by name); seeds scale stall by 1.0, 1.1, 1.2
    stall_ms = [(1 - 0.25) * 25 / 25.0 * 0.3 * (1 + 0.1 * s) / 100 * 1e3 for s in (0, 1, 2)]
    mean = sum(stall_ms) / 3
    assert f"| {num(mean)} ({num(min(stall_ms))}–{num(max(stall_ms))}) |" in row
    lru = next(x for x in md.splitlines() if x.startswith("| 25% | lru+none |"))
    assert "| 1.00 |" in lru  # LRU against itself, every seed: no range
    table_rows = [x for x in md.split("## A on fast")[1].split("## ")[0].splitlines() if x.startswith("| 25%")]
    assert [r.split(" | ")[1] for r in table_rows] == ["lfru+none", "lru+none", "lru+transition+fixed1",
                                                       "belady+oracle+fixed2 (bound)"]


def test_the_html_keeps_definitions_and_captions(seeded):
    page = (seeded / "report" / "report.html").read_text()
    md = (seeded / "report" / "report.md").read_text()
    assert "<strong>oracle bound</strong>: the stall of a perfect-foresight" in page and "**oracle bound**" in md
    captions = page.count("<figcaption>")
    assert captions == 5 and md.count("*Figure ") == 5
    assert "<figcaption><strong>Figure tpot:</strong> Time per output token split into compute (green) and stall" in page
    assert "min–max over the seeds" in page and 'src="http' not in page


def test_stall_against_the_link_names_what_varies(seeded, tmp_path):
    """Presets differ in compute as well as link: the figure labels its axis by preset. A sweep of one preset's
    link bandwidth gets a true bandwidth axis."""
    out = seeded / "report"
    assert (out / "stall_by_hardware.png").exists() and not (out / "stall_vs_bandwidth.png").exists()
    assert "so this is not a bandwidth sweep" in (out / "report.md").read_text()
    root = tmp_path / "bw"
    for i, bw in enumerate((6.0, 12.0, 25.0)):
        for j, pol in enumerate(POLICIES):
            fake_run(root, f"{i}_{j}_a", "A", pol, 0.25, "a100-pcie4", bw, 0, 1.0 / bw)
            fake_run(root, f"{i}_{j}_b", "A", pol, 0.5, "a100-pcie4", bw, 0, 0.5 / bw)
    assert main(["report", str(root)]) == 0
    assert (root / "report" / "stall_vs_bandwidth.png").stat().st_size > 5000
    assert "link bandwidth of a100-pcie4 alone (its compute fixed)" in (root / "report" / "report.md").read_text()


def test_a_non_utf8_results_file_is_skipped_with_a_warning(tmp_path):
    from analysis.runs import load_runs

    root = tmp_path / "mr"
    fake_run(root, "0", "A", "lru+none", 0.5, "a100-pcie4", 25.0, 0, 1.0)
    bad = root / "latin1"
    bad.mkdir()
    (bad / "results.json").write_bytes(b'{"run": "caf\xe9"}')
    log = io.StringIO()
    assert len(load_runs(root, log=log)) == 1
    assert f"skipped {bad / 'results.json'}: not UTF-8 text" in log.getvalue()


def test_a_killed_sweep_is_reported_as_incomplete(tmp_path, capsys):
    mr = tmp_path / "mr"
    sim = subprocess.run([sys.executable, "-m", "sim", "-m", "+experiment=smoke", "cache.fraction=0.25,0.5",
                          "trace.synth.tokens=80", f"hydra.sweep.dir={mr}", f"paths.traces_dir={tmp_path / 'c'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr[-2000:]
    # each run's log line names its hardware and cache size
    assert "| lru+none | a100-pcie4 | cache 25% | batch 1 | seed 0: hit" in sim.stdout + sim.stderr
    assert main(["report", str(mr)]) == 0
    assert "Incomplete" not in (mr / "report" / "report.md").read_text()  # all 4 planned runs finished
    jobs = sorted(p for p in mr.iterdir() if p.is_dir() and p.name[0].isdigit())
    (jobs[1] / "results.json").unlink()  # killed while running: its folder stays
    shutil.rmtree(jobs[3])  # never started
    capsys.readouterr()
    assert main(["report", str(mr)]) == 0
    md = (mr / "report" / "report.md").read_text()
    want = (f"{mr}: 2 of 4 planned runs are missing (1 started but wrote no results: killed or failed; 1 never "
            "started), so the tables and figures compare the 2 finished runs only. Missing: #1 ")
    assert f"**Incomplete sweep.** {want}" in md and md.index("Incomplete") < md.index("## Headline")
    assert "#3 " in md and f"warning: {want}" in capsys.readouterr().err


def test_a_sweep_over_batch_sizes_is_reported_per_batch_size(tmp_path):
    root = tmp_path / "mr"
    i = 0
    for batch, lfru in ((1, 0.8), (16, 1.2)):  # LFRU wins at batch 1, loses at batch 16
        for frac in (0.25, 0.5):
            for pol in ("lru+none", "lfru+none", "belady+oracle+fixed2"):
                mult = {"lru+none": 1.0, "lfru+none": lfru, "belady+oracle+fixed2": 0.3}[pol]
                fake_run(root, f"{i}", "A", pol, frac, "a100-pcie4", 25.0, 0, mult * (1 - frac), batch=batch)
                i += 1
    assert main(["report", str(root)]) == 0
    md = (root / "report" / "report.md").read_text()
    assert "- On a100-pcie4 at batch 1: **lfru+none** stalls least" in md
    assert "- On a100-pcie4 at batch 16: no deployable policy beats on-demand LRU" in md
    assert "## A on a100-pcie4, batch 16" in md and "| trace | hardware | batch | cache |" in md


def test_one_number_format():
    assert [num(v) for v in (0.0123456, 1.23456, 12.3456, 123.456, 12345.6, 0.5, 1.0, 0)] == [
        "0.0123", "1.23", "12.3", "123", "12,300", "0.500", "1.00", "0"]
