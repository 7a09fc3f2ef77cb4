"""``python -m traces {import,synth,stats,collect,...}``: the trace layer's command line.

Each subcommand lives in its own module exposing ``register(subparsers)``; this file only wires them up."""

from __future__ import annotations

import argparse
import sys

from .cli import add_subcommands
from .schema import TraceError

SUBCOMMAND_MODULES = ("importers", "synth", "stats", "collect", "refmodel")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m traces",
        description="Record, import, generate and describe MoE routing traces (Parquet, one schema).",
    )
    add_subcommands(parser, "traces", SUBCOMMAND_MODULES)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
