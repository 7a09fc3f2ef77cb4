"""``python -m executor profile loop``: the per-layer host cost of one policy's decision loop as the executor
runs it (the executor's own loop with no compute and copies that land at once), and how the simulator charges
it. See ``python -m executor profile -h`` (``executor/profile.py``)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from traces.io import atomic_path

from .tier import TierError


class InstantTransfer:
    """A transfer engine whose copies land at once (at the loop's next look): the replay loop's own cost."""

    channels = 1

    def __init__(self):
        self._landed: list[int] = []
        self.records: list = []
        self.bytes_started = 0
        self.copies_started = 0

    def submit(self, key: int, slot: int, priority: int) -> None:
        self._landed.append(key)
        self.copies_started += 1

    def landed(self) -> list[int]:
        out, self._landed = self._landed, []
        return out

    def upgrade(self, key: int) -> None:
        pass  # nothing ever waits in a queue here

    def cancel(self, key: int) -> bool:
        return False

    def wait(self, key: int) -> float:
        return 0.0

    def wait_any(self) -> float:
        if not self._landed:
            raise TierError("wait for any copy: none is queued or running")
        return 0.0

    def bandwidth_bytes_per_s(self) -> float:
        return 0.0

    def copy_s(self) -> float:
        return 0.0  # copies take no time: every prefetch fits the link budget (whose checks still run)

    def backlog_s(self, priority: int) -> float:
        return 0.0

    def busy_share(self) -> float:
        return 0.0


class NullCompute:
    """A compute engine that does nothing: with InstantTransfer, what remains of a replay is the loop's own cost."""

    def run_dense(self, n_tokens: int) -> None:
        pass

    def run_expert(self, slot: int, n_tokens: int) -> None:
        pass


def measure_loop_overhead(overrides: list[str], main_thread_copy_s: float = 0.0, repeats: int = 3) -> dict:
    """The replay loop of ``executor/engine.py`` for the configured trace and policy with no compute and
    instant copies (median of ``repeats`` runs): seconds per layer-step, copies per layer-step, and
    ``layer_overhead_s`` = the former + the latter x ``main_thread_copy_s``. The two parts happen at different
    moments: the decision loop runs before the layer's copies are submitted, the copies' main-thread cost while
    they are in flight, i.e. during the layer's expert compute. So the split is given too: ``decide_overhead_s``
    (the loop alone, per layer) and ``expert_overhead_s`` (the copies' cost spread over the experts computed
    per layer-step); the simulator adds them where they occur."""
    from replay.config_keys import compose_config
    from replay.prepare import prepare

    from .engine import execute
    from .run import check_executor_config

    cfg = compose_config(overrides)
    check_executor_config(cfg.executor)  # unused by the loop, but a bad value is an error wherever it is given
    per_ls, copies, experts = [], [], []
    for _ in range(repeats):
        p = prepare(cfg)  # fresh policy state each time
        tr = InstantTransfer()
        phases: dict[str, float] = {}
        res = execute(p.steps, p.runtime, tr, NullCompute(), p.meta.num_layers, p.uses, phases=phases)
        n = max(1, int(phases["layer_steps"]))
        per_ls.append(res.total_s / n)
        copies.append(res.copies / n)
        experts.append(phases["expert_runs"] / n)
    loop_s, cps, eps = statistics.median(per_ls), statistics.median(copies), statistics.median(experts)
    return {"loop_s_per_layer_step": loop_s, "copies_per_layer_step": cps, "main_thread_copy_s": main_thread_copy_s,
            "experts_per_layer_step": eps, "layer_overhead_s": loop_s + cps * main_thread_copy_s,
            "decide_overhead_s": loop_s, "expert_overhead_s": cps * main_thread_copy_s / eps if eps else 0.0,
            "overrides": overrides}


def profile_copy_cost(path: Path) -> float:
    """The profile's main-thread seconds per copy (``copy.main_thread_s``; 0 in profiles older than it)."""
    try:
        prof = json.loads(path.read_text())
    except OSError as exc:
        raise TierError(f"--profile {path}: cannot read it ({exc.strerror})") from exc
    except ValueError as exc:  # not JSON, or not even text
        raise TierError(f"--profile {path}: not valid JSON ({exc})") from exc
    copy = prof.get("copy") if isinstance(prof, dict) else None
    if not isinstance(copy, dict):
        raise TierError(f"--profile {path}: field 'copy': expected an object (make one with `python -m executor profile`)")
    mt = copy.get("main_thread_s", 0.0)
    if isinstance(mt, bool) or not isinstance(mt, (int, float)) or mt < 0:
        raise TierError(f"--profile {path}: field 'copy.main_thread_s': expected a number >= 0, got {mt!r}")
    return float(mt)


def loop_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor profile loop",
                                 description="per-layer cost of a policy's decision loop (see python -m executor profile -h)")
    ap.add_argument("--profile", type=Path, help="a profile from python -m executor profile: adds its copy.main_thread_s per copy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("overrides", nargs="*", help="hydra overrides: trace, cache, predictor, horizon, ...")
    args = ap.parse_args(argv)
    from hydra.errors import HydraException

    from replay.errors import known_errors

    try:
        if args.repeats < 1:
            raise TierError(f"--repeats: expected an integer >= 1, got {args.repeats}")
        mt = profile_copy_cost(args.profile) if args.profile else 0.0
        out = measure_loop_overhead(args.overrides, mt, args.repeats)
    except (*known_errors(), TierError, HydraException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with atomic_path(args.output) as tmp:
        tmp.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}: loop {out['loop_s_per_layer_step'] * 1e6:.1f} us/layer-step, "
          f"{out['copies_per_layer_step']:.2f} copies/layer-step -> layer_overhead_s {out['layer_overhead_s'] * 1e6:.1f} us")
    return 0
