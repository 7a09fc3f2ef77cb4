"""Sweeps through hydra's launcher plugins: the default (joblib, local) and submitit, whose local mode runs the
same job machinery a Slurm cluster does (pickled jobs, one process each), so the cluster path runs here."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT
from hydra import compose, initialize_config_dir

CONF = ROOT / "conf"


def test_two_job_sweep_through_submitit_local(tmp_path):
    out = tmp_path / "mr"
    proc = subprocess.run(
        [sys.executable, "-m", "sim", "-m", "hydra/launcher=submitit_local", "+experiment=smoke",
         "trace.synth.tokens=200", f"hydra.sweep.dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    results = sorted(out.glob("*/results.json"))
    assert len(results) == 2, sorted(p.name for p in out.iterdir())
    runs = [json.loads(p.read_text()) for p in results]
    assert {r["run"]["policy"] for r in runs} == {"lru+none", "lru+transition+fixed1"}
    for r in runs:
        assert r["tokens"] > 0 and 0 <= r["hit_rate"] <= 1 and r["stall_s"] >= 0 and r["tpot_s"] > 0
    # each job went through submitit (its own process, its result pickled in the sweep's .submitit folder)
    assert len(list((out / ".submitit").glob("*/*_result.pkl"))) == 2


def test_cluster_launchers_compose():
    """The default launcher's settings do not leak into another launcher's config (they used to sit in
    config.yaml's hydra.launcher and made every other launcher fail on 'n_jobs')."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        default = compose("config", return_hydra_config=True)
        slurm = compose("config", overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True)
    assert "JoblibLauncher" in default.hydra.launcher._target_ and default.hydra.launcher.n_jobs == 2
    assert "SlurmLauncher" in slurm.hydra.launcher._target_ and slurm.hydra.launcher.partition == "gpu"
    assert "n_jobs" not in slurm.hydra.launcher
