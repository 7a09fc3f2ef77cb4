"""The wheel directory of the offline GPU check: download it here (``make gpu-wheels``), install from it there.

``requirements-gpu-check.txt`` pins, each with the hash of its PyPI file, the pure-Python packages a bare GPU
machine lacks (see its header). Here, with the registry:

    python scripts/gpu_wheels.py download [--dest wheels]

downloads exactly those files (hash-checked, for CPython 3.12 on manylinux x86-64: pure-Python wheels, so any
CPython 3 on any platform), builds the wheel of the one sdist-only package from its hash-checked sdist, checks
that every wheel is pure Python and that nothing in the set needs a package that is neither in it nor on the GPU
machine, and writes ``DEST/requirements.lock``: each file in DEST pinned by its own sha256. Already there and
matching: nothing is downloaded. On the GPU machine (no network), ``scripts/gpu_check.py`` calls :func:`install`:

    python scripts/gpu_wheels.py install --wheels wheels --target DIR

installs the packages that are not importable yet into DIR with ``pip install --no-index --find-links DEST
--require-hashes --no-deps --target DIR -r <lock lines>`` (pip's configuration files and ``PIP_*`` variables
ignored), or, where the interpreter has no pip, by unpacking the hash-checked wheels (pure Python: a wheel is
then just a zip to extract). Standard library only, so it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS = ROOT / "requirements-gpu-check.txt"
LOCK_NAME = "requirements.lock"
TARGET_PYTHON = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "any")
# Distributions the bare GPU machine has (the list; PyYAML and packaging come with transformers,
# typing-extensions with torch): a wheel here may depend on them. packaging and typing-extensions are in the set
# all the same (small), should a machine lack them.
GPU_MACHINE_HAS = {"torch", "transformers", "numpy", "pandas", "pyarrow", "matplotlib", "tqdm", "pytest",
                   "safetensors", "nvidia-ml-py", "pyyaml", "packaging", "typing-extensions"}
# The project's own dependencies (pyproject) deliberately not carried, and why.
NOT_CARRIED = {"numba": "llvmlite's wheel is 57 MB; the replay kernels fall back to Python without numba",
               "ruff": "a linter; the check does not lint", "pytest-timeout": "no test uses its marker"}


class WheelError(RuntimeError):
    """A requirements line, a download, a wheel or an install is not what the check needs."""


@dataclass(frozen=True)
class Req:
    name: str  # distribution name as pinned
    version: str  # the exact version pinned
    sha256: str  # hash of the pinned file (of the PyPI file in requirements-gpu-check.txt; of the local one in a lock)
    module: str  # what the check imports to tell whether the package is already there
    sdist: bool = False  # the PyPI file is a source archive, built into a wheel by `download`
    filename: str = ""  # the wheel's file name (lock only)

    def line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s]+)\s+--hash=sha256:(?P<sha>[0-9a-f]{64})"
                  r"\s+#\s*import:\s*(?P<module>[A-Za-z0-9_.]+)(?P<flags>(;\s*\w+(:\s*\S+)?)*)\s*$")


def norm(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(path: Path = REQUIREMENTS) -> list[Req]:
    """The pins of ``path`` (requirements file or lock); every line ``name==version --hash=sha256:H  # import: M``
    (lock lines add ``; file: NAME``), else a WheelError naming the line."""
    reqs = []
    for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        m = LINE.match(text)
        if m is None:
            raise WheelError(f"{path}:{n}: expected 'name==version --hash=sha256:<64 hex>  # import: module', "
                             f"got {text!r}")
        flags = dict((f.split(":", 1) + [""])[:2] for f in (x.strip() for x in m["flags"].split(";")) if f)
        reqs.append(Req(m["name"], m["version"], m["sha"], m["module"], "sdist" in flags, flags.get("file", "").strip()))
    if not reqs:
        raise WheelError(f"{path}: no requirement lines")
    return reqs


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def isolated_pip_env() -> dict[str, str]:
    """The environment for an offline pip: no configuration file and no ``PIP_*`` variable (an index or
    find-links set there must not take part)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def _pip(python: str, args: list[str], env: dict | None = None, timeout_s: float = 600) -> None:
    proc = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, env=env, timeout=timeout_s)
    if proc.returncode:
        raise WheelError(f"pip {args[0]} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


def _wheel_meta(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) of a wheel."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    head = text.split("\n\n", 1)[0]
    fields = [line.split(": ", 1) for line in head.splitlines() if ": " in line]
    get = {k: v for k, v in fields}
    return get["Name"], get["Version"], [v for k, v in fields if k == "Requires-Dist"]


def check_closure(wheels: list[Path], python_version: str = TARGET_PYTHON) -> list[str]:
    """What the set lacks: for each wheel, each dependency (markers evaluated for Linux CPython
    ``python_version``, no extras) that is neither a wheel of the set at a matching version nor on the GPU
    machine. Empty: the set is closed."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    have = {}
    metas = []
    for w in wheels:
        name, version, deps = _wheel_meta(w)
        have[norm(name)] = version
        metas.append((name, deps))
    problems = []
    for name, deps in metas:
        for dep in deps:
            r = Requirement(dep)
            if r.marker is not None and not r.marker.evaluate(env):
                continue
            dn = norm(r.name)
            if dn in GPU_MACHINE_HAS:
                continue
            if dn not in have:
                problems.append(f"{name} needs {dep}: not in the wheel set")
            elif not r.specifier.contains(have[dn], prereleases=True):
                problems.append(f"{name} needs {dep}: the set has {r.name} {have[dn]}")
    return problems


def wheel_top_level(path: Path) -> set[str]:
    """The top-level importable names a wheel installs (from its file list)."""
    with zipfile.ZipFile(path) as z:
        names = {n.split("/", 1)[0] for n in z.namelist()}
    return {n.removesuffix(".py") for n in names if not n.endswith((".dist-info", ".data")) and n != "__pycache__"}


def _is_pure(filename: str) -> bool:
    return filename.endswith("-none-any.whl")


def read_lock(wheels_dir: Path) -> list[Req]:
    lock = Path(wheels_dir) / LOCK_NAME
    if not lock.is_file():
        raise WheelError(f"{lock}: no lock: run `make gpu-wheels` (on a machine with the registry) and carry "
                         f"{Path(wheels_dir).name}/ along")
    return parse_requirements(lock)


def lock_matches(reqs: list[Req], wheels_dir: Path) -> list[str]:
    """Why ``wheels_dir`` does not hold exactly the pinned set (empty: it does, every file hash-checked)."""
    try:
        lock = read_lock(wheels_dir)
    except WheelError as exc:
        return [str(exc)]
    pins = {(norm(r.name), r.version) for r in reqs}
    locked = {(norm(r.name), r.version) for r in lock}
    out = [f"{n}=={v}: pinned, not in the lock" for n, v in sorted(pins - locked)]
    out += [f"{n}=={v}: in the lock, not pinned" for n, v in sorted(locked - pins)]
    for r in lock:
        f = Path(wheels_dir) / r.filename
        if not f.is_file():
            out.append(f"{f}: missing")
        elif file_sha256(f) != r.sha256:
            out.append(f"{f}: sha256 differs from the lock")
    return out


def download(dest: Path, reqs: list[Req] | None = None, python_version: str = TARGET_PYTHON,
             python: str = sys.executable, log: Callable[[str], None] = print) -> Path:
    """Fill ``dest`` with the pinned set's wheels and write its lock (see the module docstring); returns the lock
    path. A ``dest`` already holding exactly the set is left as it is."""
    reqs = reqs or parse_requirements()
    dest = Path(dest)
    if not lock_matches(reqs, dest):
        log(f"[gpu-wheels] {dest}: already holds the {len(reqs)} pinned wheels")
        return dest / LOCK_NAME
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp_s:
        tmp = Path(tmp_s)
        got = tmp / "got"
        wheels = [r for r in reqs if not r.sdist]
        sdists = [r for r in reqs if r.sdist]
        (tmp / "wheels.txt").write_text("".join(r.line() + "\n" for r in wheels))
        (tmp / "sdists.txt").write_text("".join(r.line() + "\n" for r in sdists))
        log(f"[gpu-wheels] downloading {len(wheels)} wheels for CPython {python_version} ({', '.join(PLATFORMS)})")
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        _pip(python, ["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                      "--implementation", "cp", *plat, "-d", str(got), "-r", str(tmp / "wheels.txt")])
        if sdists:
            log(f"[gpu-wheels] downloading {len(sdists)} sdist(s) and building their wheels")
            _pip(python, ["download", "--no-deps", "--no-binary=:all:", "-d", str(tmp / "src"), "-r",
                          str(tmp / "sdists.txt")])
            for src in sorted((tmp / "src").iterdir()):
                _pip(python, ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(got), str(src)])
        files = sorted(got.glob("*.whl"))
        impure = [f.name for f in files if not _is_pure(f.name)]
        if impure:
            raise WheelError(f"not pure-Python wheels (the set must serve any CPython): {impure}")
        by_name = {norm(_wheel_meta(f)[0]): f for f in files}
        missing = [r.name for r in reqs if norm(r.name) not in by_name]
        if missing or len(files) != len(reqs):
            raise WheelError(f"download gave {[f.name for f in files]}; pinned {[r.name for r in reqs]}")
        problems = check_closure(files, python_version)
        if problems:
            raise WheelError("the wheel set is not closed:\n  " + "\n  ".join(problems))
        for old in dest.glob("*.whl"):
            old.unlink()
        lines = ["# Every file of this directory, pinned by its own sha256 (written by scripts/gpu_wheels.py download",
                 f"# from {REQUIREMENTS.name}; the installer reads it)."]
        for r in reqs:
            f = by_name[norm(r.name)]
            shutil.move(str(f), dest / f.name)
            lines.append(f"{r.name}=={r.version} --hash=sha256:{file_sha256(dest / f.name)}  # import: {r.module}; "
                         f"file: {f.name}")
        lock = dest / LOCK_NAME
        tmp_lock = tmp / LOCK_NAME
        tmp_lock.write_text("\n".join(lines) + "\n")
        os.replace(tmp_lock, lock)
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    log(f"[gpu-wheels] {dest}: {len(reqs)} wheels, {size / 2**20:.1f} MiB, lock {lock}")
    return lock


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing
        return False


def has_pip(python: str) -> bool:
    return subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0


def _unpack(wheel: Path, target: Path) -> None:
    """Install a pure-Python wheel by extracting it: its files at the top, ``*.data/purelib|platlib`` too."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: nothing the check imports
                parts = parts[2:]
            if not parts[-1]:
                continue
            out = target.joinpath(*parts)
            if ".." in parts or not out.resolve().is_relative_to(target.resolve()):
                raise WheelError(f"{wheel.name}: member {info.filename!r} points outside the target")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(info))


def install(wheels_dir: Path, target: Path, reqs: list[Req] | None = None, python: str = sys.executable,
            is_importable: Callable[[str], bool] = importable, use_pip: bool | None = None,
            timeout_s: float = 120) -> dict:
    """Install into ``target`` the pinned packages whose module ``is_importable`` says is missing, from
    ``wheels_dir`` only. Returns ``{"installed": [...], "present": [...], "method": "pip"|"unpack"|None}``."""
    reqs = reqs or parse_requirements()
    problems = lock_matches(reqs, wheels_dir)
    lock = {norm(r.name): r for r in read_lock(wheels_dir)} if not problems else {}
    present = [r.name for r in reqs if is_importable(r.module)]
    todo = [r for r in reqs if r.name not in present]
    if not todo:
        return {"installed": [], "present": present, "method": None}
    if problems:
        raise WheelError(f"{wheels_dir}: not the pinned wheel set ({'; '.join(problems[:5])}); missing here: "
                         f"{[r.name for r in todo]}")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    method = "pip" if (has_pip(python) if use_pip is None else use_pip) else "unpack"
    picked = [lock[norm(r.name)] for r in todo]
    if method == "pip":
        req_file = target / ".gpu-check-requirements.txt"
        req_file.write_text("".join(r.line() + "\n" for r in picked))
        try:
            _pip(python, ["install", "--no-index", "--find-links", str(Path(wheels_dir).resolve()), "--no-deps",
                          "--require-hashes", "--upgrade", "--target", str(target), "--no-warn-script-location",
                          "-q", "-r", str(req_file)], env=isolated_pip_env(), timeout_s=timeout_s)
        finally:
            req_file.unlink(missing_ok=True)
    else:
        for r in picked:
            f = Path(wheels_dir) / r.filename
            if file_sha256(f) != r.sha256:
                raise WheelError(f"{f}: sha256 differs from the lock")
            _unpack(f, target)
    return {"installed": [r.name for r in todo], "present": present, "method": method}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/gpu_wheels.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download the pinned wheels into DEST and lock them (needs the registry)")
    d.add_argument("--dest", type=Path, default=ROOT / "wheels")
    d.add_argument("--python-version", default=TARGET_PYTHON, help=f"CPython version to download for ({TARGET_PYTHON})")
    i = sub.add_parser("install", help="install the missing ones from WHEELS into TARGET, offline")
    i.add_argument("--wheels", type=Path, default=ROOT / "wheels")
    i.add_argument("--target", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "download":
            download(args.dest, python_version=args.python_version)
        else:
            res = install(args.wheels, args.target)
            print(f"installed {res['installed'] or 'nothing'} ({res['method']}); already there: {res['present']}")
    except (WheelError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
