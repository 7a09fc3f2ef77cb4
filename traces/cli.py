"""Subcommand registry shared by the ``python -m traces`` and ``python -m analysis`` command lines: each
subcommand lives in its own module exposing ``register(subparsers)``; modules absent from a checkout are
skipped. :func:`plain` turns a module docstring into ``--help`` text."""

from __future__ import annotations

import argparse
import importlib
import re

_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")  # :mod:`x`, :func:`~a.b`


def add_subcommands(parser: argparse.ArgumentParser, package: str, modules: tuple[str, ...]) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in modules:
        try:
            module = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{package}.{name}":
                continue  # that part is not present in this checkout
            raise
        module.register(sub)


def plain(doc: str) -> str:
    """A docstring as plain ``--help`` text: reStructuredText roles become their target (``:mod:`a.b``` ->
    ``a.b``, ``:func:`~a.b``` -> ``b``), inline literals lose their backquotes and a ``::`` that opens a literal
    block becomes ``:``."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), doc)
    text = text.replace("``", "")
    text = re.sub(r"`([^`\n]+)`", r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.M)
