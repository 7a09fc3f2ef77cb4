"""Without numba the kernels are unavailable, cleanly: importing them never fails, ``replay_kernels.available()`` says
False and why, the simulator's dispatch gets that reason (``python -m sim`` takes the Python path and records
why in ``results.json``), and the kernels still run as plain Python with the same results. With numba, compiled code is cached on disk under a digest of the
kernels' sources, so a second process loads it instead of compiling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

import replay_kernels
from replay_kernels import _jit

PROBE = """
import json, sys
{setup}
import replay_kernels
from conftest import random_trace
from replay_kernels.decide import _decide_kernel, hit_curves
from kernel_cases import LINKS, model_trace, on_demand_run
from sim import kernel_bridge as kb
trace = random_trace(tokens=100, layers=4, experts=8, top_k=2, seed=123)
hits = hit_curves(trace.experts, trace.meta.num_experts, [2, 4], ("lru", "belady"))
_, _, rt = on_demand_run(model_trace(), "lru", "per_layer", 3, 1)
print(json.dumps({{"available": replay_kernels.available(), "reason": replay_kernels.unavailable_reason(),
                  "compiled": type(_decide_kernel).__name__ != "function",
                  "dispatch": kb.ondemand_unsupported(rt, LINKS["fast"][0]),
                  "hits": {{p: h.sum(axis=1).tolist() for p, h in hits.items()}}}}))
"""


def probe(setup: str = "", pythonpath: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(ROOT), str(ROOT / "tests")) if p)}
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


WANT_HITS = {"lru": [171, 377], "belady": [311, 537]}  # tests/test_kernel_stats.py's GOLDEN_HITS at 2 and 4 slots


def test_numba_missing_is_a_clean_fallback():
    got = probe("sys.modules['numba'] = None  # what an uninstalled numba looks like to an import")
    assert not got["available"] and not got["compiled"]
    assert got["reason"].startswith("numba could not be imported (ModuleNotFoundError")
    assert got["dispatch"] == got["reason"]  # the simulator is told to take its Python path, and why
    assert got["hits"] == WANT_HITS  # the kernels, run as plain Python, compute the same


def test_numba_failing_at_import_is_a_clean_fallback(tmp_path):
    """A numba that raises something else than ImportError (a broken llvmlite, a numpy it was not built for)."""
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("raise OSError('libllvmlite.so: cannot open shared object')\n")
    got = probe(pythonpath=str(tmp_path))
    assert not got["available"] and "OSError: libllvmlite.so" in got["reason"]
    assert got["dispatch"] == got["reason"] and got["hits"] == WANT_HITS


@pytest.mark.skipif(not replay_kernels.available(), reason="numba is not installed: no compiled kernels")
def test_compiled_code_is_cached_across_processes(tmp_path):
    """The first process compiles the keys kernel into NUMBA_CACHE_DIR/<digest>, the second loads it."""
    code = ("import numpy as np\nfrom replay_kernels.keys import _keys_kernel, layer_step_keys\n"
            "layer_step_keys(np.zeros((2, 1, 2), np.int16) + [[[0, 1]]], [0], [0, 1, 2], [0, 1], 2)\n"
            "print(len(_keys_kernel.stats.cache_hits), len(_keys_kernel.stats.cache_misses))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           timeout=600).stdout.split() for _ in range(2)]
    assert runs == [["0", "1"], ["1", "0"]]  # compiled, then loaded
    assert [p.name for p in tmp_path.iterdir()] == [_jit.source_digest()]


def test_an_edit_anywhere_in_the_kernels_starts_a_fresh_cache(tmp_path):
    """numba keys a cached function on its own file only; the cache directory covers every file."""
    copy = tmp_path / "replay_kernels"
    shutil.copytree(ROOT / "replay_kernels", copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _jit.source_digest(copy) == _jit.source_digest()
    (copy / "channel.py").write_text((copy / "channel.py").read_text() + "\n# an edit\n")
    assert _jit.source_digest(copy) != _jit.source_digest()
    assert _jit.cache_dir().name == _jit.source_digest()


def test_the_simulator_without_numba_takes_the_python_path_and_says_why(tmp_path):
    """``python -m sim`` with a numba that fails at import: the run completes in Python, ``results.json`` names
    that path and the reason for the replay and the bounds, and its figures are the Python path's."""
    from hydra import compose, initialize_config_dir
    from kernel_cases import model_trace

    from sim.run import simulate
    from traces import write_trace

    trace = tmp_path / "t.parquet"
    write_trace(model_trace(tokens=80, seed=3), trace)
    (tmp_path / "numba").mkdir()
    (tmp_path / "numba" / "__init__.py").write_text("raise OSError('libllvmlite.so: cannot open shared object')\n")
    over = [f"trace.path={trace}", "trace.name=t", "cache.slots=3", "cache.fraction=null", "paths.bounds_dir=null"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(tmp_path), str(ROOT)))}
    out = subprocess.run([sys.executable, "-m", "sim", *over, f"hydra.run.dir={tmp_path / 'run'}"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    for what in ("replay", "bounds"):
        assert got["run"][f"{what}_path"] == "python"
        assert got["run"][f"{what}_fallback"].startswith("numba could not be imported (OSError: libllvmlite.so")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        want = simulate(compose("config", overrides=[*over, "sim.compiled=false"]), tmp_path / "here")
    for key in ("stall_s", "hit_rate", "total_s", "belady_hit_rate", "oracle_stall_s", "whole_run"):
        assert got[key] == want[key]
