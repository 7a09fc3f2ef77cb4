"""Package layering and import cycles, read from the source (every import statement, function-level and
``TYPE_CHECKING`` ones included, since a lazy import is still a dependency).

Layers, bottom up: ``traces`` and ``policies`` (policies never import traces); ``replay`` (the core sim and
executor share); ``sim`` and ``executor`` (never each other); ``analysis`` (results files and the core's
schema only). ``conf``, ``benchmarks`` and ``tests`` are outside the layering."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("traces", "policies", "replay", "sim", "executor", "analysis")
# what each package may import (besides itself)
ALLOWED = {
    "traces": {"policies"},
    "policies": set(),
    "replay": {"traces", "policies"},
    "sim": {"traces", "policies", "replay"},
    "executor": {"traces", "policies", "replay"},
    "analysis": {"traces", "policies", "replay"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(f): f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as importing ``pkg.mod`` when that
    is a module, else ``pkg``)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # ``import a.b.c`` of a non-module attribute: its module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def test_packages_import_only_the_layers_below():
    bad = []
    for mod, deps in graph().items():
        pkg = mod.split(".")[0]
        for dep in sorted(deps):
            dpkg = dep.split(".")[0]
            if dpkg != pkg and dpkg not in ALLOWED[pkg]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_no_import_cycles():
    g = graph()
    # package __init__ modules are entered by every submodule import; a cycle through them is a real one
    # only if the __init__ itself imports back, which the edges already say.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """Function-level, ``TYPE_CHECKING`` and relative imports are edges too (a lazy import is still a
    dependency), and ``from pkg import mod`` names the module."""
    src = ("from typing import TYPE_CHECKING\nfrom . import sibling\nif TYPE_CHECKING:\n    from .typed import T\n"
           "def f():\n    from ..other import x\n    import traces.io\n    import numpy\n")
    (tmp_path / "mod.py").write_text(src)
    known = {"pkg.sub.mod", "pkg.sub.sibling", "pkg.sub.typed", "pkg.other", "traces.io", "traces"}
    assert imports_of("pkg.sub.mod", tmp_path / "mod.py", known) == {"pkg.sub.sibling", "pkg.sub.typed", "pkg.other",
                                                                     "traces.io"}


def test_a_cycle_and_an_upward_import_would_be_caught(tmp_path, monkeypatch):
    """The two checks above fail on a planted cycle and on a planted sim -> executor import."""
    g = graph()
    g["policies.cache"] = g["policies.cache"] | {"policies.runtime"}  # runtime imports cache: a cycle
    g["sim.run"] = g["sim.run"] | {"executor.run"}
    monkeypatch.setitem(globals(), "graph", lambda: g)
    for check in (test_no_import_cycles, test_packages_import_only_the_layers_below):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} missed the planted violation")
