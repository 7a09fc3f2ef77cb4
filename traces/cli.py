"""Subcommand registry shared by the ``python -m traces`` and ``python -m analysis`` command lines: each
subcommand lives in its own module exposing ``register(subparsers)``; modules absent from a checkout are
skipped."""

from __future__ import annotations

import argparse
import importlib


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
