"""``python -m executor check --backend cpu|cuda``: whether that backend can run on this machine. Prints what it
found and exits 0, or one ``error: ...`` line and exit 2 (``analysis validate --backend cuda`` asks it before any
work, so a machine without a GPU stops at once)."""

from __future__ import annotations

import argparse
import sys

from traces.cli import plain

from .tier import TierError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor check", description=plain(__doc__))
    ap.add_argument("--backend", choices=("cpu", "cuda"), default="cpu",
                    help="cpu: disk tier -> RAM (always there); cuda: pinned host -> GPU (needs a CUDA device)")
    args = ap.parse_args(argv)
    if args.backend == "cuda":
        from .cuda_backend import require_cuda

        try:
            require_cuda()
        except TierError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        import torch

        print(f"cuda: {torch.cuda.get_device_name(torch.cuda.current_device())}")
        return 0
    print("cpu: available")
    return 0
