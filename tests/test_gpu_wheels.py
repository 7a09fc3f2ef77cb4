"""The offline install of the GPU check (``scripts/gpu_wheels.py``, ``requirements-gpu-check.txt``): the pinned set
covers what the project needs beyond the GPU machine's packages, it is closed and pure Python, and installed with
no index into an empty target it lets an interpreter without those packages (and without numba) import the
project and run the simulator. The wheels come from ``.cache/gpu-wheels/`` (downloaded from the registry on the
first run only, about 25 s; every later run is offline)."""

from __future__ import annotations

import textwrap

import pytest
import tomllib
from conftest import ROOT
from wheel_cache import cached_wheels, gpu_wheels, run_like_gpu_machine, top_level_modules


@pytest.fixture(scope="module")
def wheels():
    return cached_wheels()


def test_the_pins_cover_the_project_and_parse(tmp_path):
    reqs = gpu_wheels.parse_requirements()
    names = {gpu_wheels.norm(r.name) for r in reqs}
    assert all(len(r.sha256) == 64 and r.module for r in reqs)
    assert [r.name for r in reqs if r.sdist] == ["antlr4-python3-runtime"]
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [*proj["dependencies"], *proj["optional-dependencies"]["dev"]]
    for dep in deps:
        name = gpu_wheels.norm(dep.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip())
        assert name in names | gpu_wheels.GPU_MACHINE_HAS | set(gpu_wheels.NOT_CARRIED), \
            f"{dep}: a project dependency neither in requirements-gpu-check.txt nor on the GPU machine"
    bad = tmp_path / "r.txt"
    bad.write_text("# ok\nhydra-core>=1.3  # import: hydra\n")
    with pytest.raises(gpu_wheels.WheelError, match=r"r.txt:2: expected 'name==version --hash"):
        gpu_wheels.parse_requirements(bad)


def test_the_wheel_set_is_pure_closed_small_and_locked(wheels):
    files = sorted(wheels.glob("*.whl"))
    assert len(files) == len(gpu_wheels.parse_requirements())
    assert all(f.name.endswith("-none-any.whl") for f in files)
    assert sum(f.stat().st_size for f in files) < 4 * 2**20
    assert gpu_wheels.lock_matches(gpu_wheels.parse_requirements(), wheels) == []
    assert gpu_wheels.check_closure(files) == []
    # a set missing a dependency is reported (hypothesis needs sortedcontainers)
    short = [f for f in files if not f.name.startswith("sortedcontainers")]
    assert any("hypothesis needs sortedcontainers" in p for p in gpu_wheels.check_closure(short))


def test_offline_install_runs_the_project_without_the_venvs_packages(wheels, tmp_path):
    target = tmp_path / "site"
    res = gpu_wheels.install(wheels, target, is_importable=lambda m: False, use_pip=True)
    assert res["method"] == "pip" and len(res["installed"]) == len(gpu_wheels.parse_requirements())
    assert {"hydra", "omegaconf", "antlr4", "simpy", "joblib", "submitit", "hypothesis"} <= top_level_modules(target)
    code = textwrap.dedent(f"""
        import importlib, runpy, sys
        from pathlib import Path
        for mod in ("hydra", "omegaconf", "antlr4", "simpy", "joblib", "submitit", "cloudpickle", "hypothesis",
                    "hydra_plugins.hydra_joblib_launcher", "hydra_plugins.hydra_submitit_launcher"):
            m = importlib.import_module(mod)
            where = Path(m.__file__ or list(m.__path__)[0])
            assert where.is_relative_to({str(target)!r}), (mod, where)
        import replay_kernels
        assert not replay_kernels.available()
        import analysis.__main__, executor.__main__, executor.model_slots, sim.__main__  # the project imports
        sys.argv = ["sim", "trace=mixtral-synth", "trace.synth.tokens=60", "trace.synth.sequences=2",
                    "hydra.run.dir=run", "hydra/job_logging=disabled"]
        try:
            runpy.run_module("sim", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert not exc.code, exc.code
        assert Path("run/results.json").is_file()
        print("ok")
    """)
    proc = run_like_gpu_machine(target, code, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_without_pip_the_wheels_are_unpacked_and_work(wheels, tmp_path):
    target = tmp_path / "site"
    present = {"typing_extensions", "packaging"}
    res = gpu_wheels.install(wheels, target, is_importable=lambda m: m in present, use_pip=False)
    assert res["method"] == "unpack" and set(res["present"]) == {"packaging", "typing-extensions"}
    assert not (target / "packaging").exists()  # importable already: not installed
    proc = run_like_gpu_machine(target, "import hydra, omegaconf, simpy, hypothesis; from hydra import compose; "
                                        "print('ok')", cwd=tmp_path)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_a_stale_or_tampered_wheel_dir_is_refused(wheels, tmp_path):
    import shutil

    copy = tmp_path / "wheels"
    shutil.copytree(wheels, copy)
    victim = next(copy.glob("simpy-*.whl"))
    victim.write_bytes(victim.read_bytes() + b"x")
    with pytest.raises(gpu_wheels.WheelError, match="simpy-4.1.2-py3-none-any.whl: sha256 differs from the lock"):
        gpu_wheels.install(copy, tmp_path / "site", is_importable=lambda m: False)
    with pytest.raises(gpu_wheels.WheelError, match="no lock: run `make gpu-wheels`"):
        gpu_wheels.install(tmp_path / "nowhere", tmp_path / "site", is_importable=lambda m: False)
    # nothing missing: nothing to install, whatever the directory holds
    assert gpu_wheels.install(tmp_path / "nowhere", tmp_path / "site", is_importable=lambda m: True)["method"] is None


@pytest.mark.slow
def test_the_gpu_tests_collect_on_a_machine_like_the_gpu_one(wheels, tmp_path):
    """The check's pytest step imports every test module (about 40 s here): with only the wheel set installed
    and no numba, collection succeeds and finds the gpu-marked tests."""
    target = tmp_path / "site"
    gpu_wheels.install(wheels, target, is_importable=lambda m: False, use_pip=True)
    code = (f"import sys, pytest; sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', '-m', 'gpu', "
            f"{str(ROOT / 'tests')!r}]))")
    proc = run_like_gpu_machine(target, code, cwd=ROOT, timeout_s=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = dict(line.rsplit(": ", 1) for line in proc.stdout.splitlines() if line.startswith("tests/"))
    assert int(counts["tests/test_cuda_gpu.py"]) >= 5 and int(counts["tests/test_model_cuda.py"]) >= 3, counts
