"""Shared fixtures. The real traces live in ../shared/traces (beside the project), never copied in."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

from traces import Trace, TraceMeta

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = ROOT.parent / "shared" / "traces"

# Property tests draw their examples from a fixed seed, so a test run is reproducible (CI included) and never fails
# on a case no earlier run saw. HYPOTHESIS_PROFILE=explore searches new examples (and keeps what fails in
# .hypothesis/ to replay); a counterexample worth keeping becomes an @example of its test.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def skip_without_shared(what: str = "this test") -> None:
    """Skip, naming ../shared/traces, where the real traces beside the project are absent (a lone clone); CI has
    them, so the tests that need them run there."""
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"{what} needs the real traces in ../shared/traces ({SHARED_TRACES} is absent)")


@pytest.fixture(scope="session")
def shared_traces() -> Path:
    skip_without_shared()
    return SHARED_TRACES


def random_trace(
    tokens: int = 200, layers: int = 4, experts: int = 8, top_k: int = 2, sequences: int = 2, seed: int = 0
) -> Trace:
    """Uniform random routing (distinct experts per token), for property and reference tests."""
    rng = np.random.default_rng(seed)
    ex = np.argsort(rng.random((tokens, layers, experts)), axis=2)[:, :, :top_k].astype(np.int16)
    w = rng.random((tokens, layers, top_k)).astype(np.float32)
    seq = np.sort(rng.integers(0, sequences, tokens)).astype(np.int32)
    pos = np.zeros(tokens, dtype=np.int32)
    for s in np.unique(seq):
        m = seq == s
        pos[m] = np.arange(m.sum())
    meta = TraceMeta(
        model="random", num_layers=layers, num_experts=[experts] * layers, top_k=top_k,
        expert_bytes=1 << 20, hidden_size=0, source="tests.random_trace",
    )
    return Trace(meta, ex, w, seq, pos, np.ones(tokens, dtype=np.int8), np.full(tokens, -1, np.int32))


def write_profile(tmp_path: Path, replay: dict | None) -> Path:
    """A small hardware profile (as ``executor profile`` writes) in ``tmp_path``, with the copy section's
    ``replay`` measurements (alone / pair / hand-off) if given; a new file per call."""
    copy = {"bytes": [4096], "seconds": [1e-3], "latency_s": 1e-5, "bandwidth_bytes_per_s": 1e9, "io_threads": 2}
    if replay is not None:
        copy["replay"] = replay
    prof = {"schema": "expertflow.hwprofile/1", "expert_bytes": 4096, "copy": copy,
            "compute": {"dense_tokens": [1, 8], "dense_s": [1e-4, 2e-4], "expert_tokens": [1, 8], "expert_s": [5e-5, 1e-4]}}
    p = tmp_path / f"prof-{len(list(tmp_path.glob('prof-*')))}.json"
    p.write_text(json.dumps(prof))
    return p
