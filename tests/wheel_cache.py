"""The GPU check's wheel set for the tests: downloaded once into ``.cache/gpu-wheels/`` (the same files as ``make
gpu-wheels``: pure Python, so the CPython 3.12 download serves this 3.11 too) and reused offline afterwards; and
an interpreter set up like the bare GPU machine: the wheel set's modules importable only from where they were
installed, numba absent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_wheels  # noqa: E402

CACHE = ROOT / ".cache" / "gpu-wheels"


def cached_wheels() -> Path:
    """``.cache/gpu-wheels`` holding exactly the pinned set (downloaded on the first use only)."""
    gpu_wheels.download(CACHE, log=lambda s: None)
    return CACHE


def top_level_modules(target: Path) -> set[str]:
    """The importable top-level names an install put into ``target`` (read from the wheels' RECORD files)."""
    names = set()
    for record in target.glob("*.dist-info/RECORD"):
        for line in record.read_text().splitlines():
            first = line.split(",", 1)[0].split("/", 1)[0]
            if first.endswith((".dist-info", ".data")) or first in ("..", "__pycache__", "bin", ""):
                continue
            names.add(first.removesuffix(".py"))
    return names


# Run in ``python -I`` (no PYTHONPATH, no user site): the target and the project first on the path, and a finder
# that makes the wheel set's modules importable from the target only (a dependency missing from the set fails
# here, though this venv has it) and numba absent, as on the GPU machine.
BOOT = r"""
import importlib.abc, importlib.machinery, json, sys
target, repo, only_target, absent, code = json.loads(sys.argv[1])
sys.path[:0] = [target, repo]
class GpuMachine(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target_module=None):
        top = name.partition(".")[0]
        if top in absent:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)", name=name)
        if top in only_target and path is None:
            spec = importlib.machinery.PathFinder.find_spec(name, [target])
            if spec is None:
                raise ModuleNotFoundError(f"No module named {name!r} (not in the installed wheel set)", name=name)
            return spec
        return None
sys.meta_path.insert(0, GpuMachine())
exec(code)
"""


def lacking_modules(wheels: Path) -> list[str]:
    """Top-level modules of the wheel set's packages that the GPU machine does not have."""
    out = set()
    for w in wheels.glob("*.whl"):
        if gpu_wheels.norm(gpu_wheels._wheel_meta(w)[0]) not in gpu_wheels.GPU_MACHINE_HAS:
            out |= gpu_wheels.wheel_top_level(w)
    return sorted(out)


def run_like_gpu_machine(target: Path, code: str, cwd: Path, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that sees the packages the GPU machine lacks only in ``target``, and no
    numba."""
    only = lacking_modules(cached_wheels())
    assert {"hydra", "hydra_plugins", "omegaconf", "antlr4", "simpy", "hypothesis"} <= set(only), only
    arg = json.dumps([str(target), str(ROOT), only, ["numba", "llvmlite"], code])
    return subprocess.run([sys.executable, "-I", "-c", BOOT, arg], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout_s)
