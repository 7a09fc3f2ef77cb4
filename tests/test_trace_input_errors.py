"""Bad values reaching the trace commands: a clear one-line error naming the field, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.parquet as pq
from conftest import ROOT, random_trace

from traces.__main__ import main
from traces.io import trace_to_table


def test_stats_on_a_lone_surrogate_in_the_model_name(tmp_path):
    """JSON metadata can hold "\\udcff"; no UTF-8 output can: the trace is refused naming the field (it used
    to crash the table print and the plot)."""
    tr = random_trace(tokens=40)
    tr.meta.model = "mixtral\udcff"
    path = tmp_path / "t.parquet"
    pq.write_table(trace_to_table(tr), path)  # bypasses write_trace's checks, as a foreign writer would
    proc = subprocess.run([sys.executable, "-m", "traces", "stats", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"error: {path}: metadata: field 'model': expected text that can be written as "
                                  "UTF-8 (no lone surrogates)"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == [path]  # no plot left behind


def test_synth_zero_tokens_blames_tokens(tmp_path, capsys):
    out = tmp_path / "s.parquet"
    assert main(["synth", "--preset", "mixtral-8x7b", "--tokens", "0", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: synth config: field 'tokens' = 0, expected a positive number of tokens"), err
    assert "sequences" not in err and not out.exists()
