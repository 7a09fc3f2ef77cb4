"""``python -m analysis {report,...}``: reads results only and makes tables, figures and reports.

Each subcommand lives in its own module exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import sys

from traces.cli import add_subcommands

SUBCOMMAND_MODULES = ("report", "predictors", "validate", "paper", "batching")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description="Compare policies from their results.")
    add_subcommands(parser, "analysis", SUBCOMMAND_MODULES)
    return parser


def main(argv: list[str] | None = None) -> int:
    from traces import TraceError

    from .errors import AnalysisError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (AnalysisError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
