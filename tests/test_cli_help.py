"""Every entry point's ``--help``: plain text (no reStructuredText markup), a usage line, and for the two
drivers a usage of their own listing the subcommands and common options before hydra's config help."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
from conftest import ROOT

RST = re.compile(r"``|:(mod|func|class|meth|data|attr):`|`[^`\s][^`]*`")
ARGPARSE = [
    ("traces", []), ("traces", ["import"]), ("traces", ["synth"]), ("traces", ["stats"]), ("traces", ["collect"]),
    ("traces", ["train-ref"]), ("analysis", []), ("analysis", ["report"]), ("analysis", ["predictors"]),
    ("analysis", ["validate"]), ("analysis", ["paper"]),
    ("executor.profile", []), ("executor.profile", ["loop"]), ("executor.model_cli", []),
    ("executor.router_bias", []), ("executor.check", []),
]


def help_of(module: str, args: list[str], capsys) -> str:
    mod = importlib.import_module(module if module.startswith("executor.") else f"{module}.__main__")
    with pytest.raises(SystemExit) as exc:
        mod.main([*args, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module,args", ARGPARSE, ids=[" ".join([m, *a]) for m, a in ARGPARSE])
def test_argparse_help_is_plain_text(module, args, capsys):
    out = help_of(module, args, capsys)
    assert out.startswith("usage: python -m ") and not RST.search(out), RST.search(out)


def run_help(*cmd: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_sim_and_executor_help_say_what_each_does():
    sim, ex = run_help("sim"), run_help("executor")
    for out, prog in ((sim, "sim"), (ex, "executor")):
        usage = out.split("== Config groups")[0]
        assert usage.startswith(f"usage: python -m {prog} ") and not RST.search(usage), RST.search(usage)
        assert "trace=NAME" in usage and "cache.fraction=F" in usage and "batch_size=B" in usage
        assert "cache: belady, expertflow" in out and "== The composed config" in out  # hydra's help follows
    assert sim.split("== Config groups")[0] != ex.split("== Config groups")[0]
    for sub in ("profile ", "profile loop", "model ", "router-bias", "check "):
        assert f"\n  {sub}" in ex, sub
    assert "+experiment=smoke" in sim and "executor.scale=N" in ex


def test_plain_strips_the_markup():
    from traces.cli import plain

    assert plain("Use :func:`~a.b.run` and :mod:`replay.driver` with ``x=1``, `y` and::\n") == \
           "Use run and replay.driver with x=1, y and:\n"
