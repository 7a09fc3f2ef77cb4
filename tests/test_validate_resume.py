"""``analysis validate`` compares the rounds of this run only: a manifest of the settings in --out, rounds of
other settings refused, finished rounds of the same settings reused. The subprocesses are faked (a real
validate takes minutes): each fake step writes what the real one would, with values that name the round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis import validate
from analysis.__main__ import main


class FakeSteps:
    """Stands in for ``validate._run``: writes the profile, loop costs and results.json each command would."""

    def __init__(self, fail_at: int | None = None):
        self.calls: list[list[str]] = []
        self.fail_at = fail_at

    def __call__(self, cmd: list[str]) -> None:
        self.calls.append(cmd)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("python -m executor ... failed: interrupted")
        if "-o" in cmd:
            out = Path(cmd[cmd.index("-o") + 1])
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"decide_overhead_s": 1e-6, "expert_overhead_s": 0.0} if "loop" in cmd else {}))
            return
        run_dir = Path(next(a for a in cmd if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        rnd = int(run_dir.parent.parent.name.split("-")[1])
        total = 10.0 + rnd  # round r: total 10 + r, in both drivers
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({
            "run": {"driver": run_dir.parent.name, "cache": "lru", "predictor": "none"}, "total_s": total,
            "stall_s": 1.0, "hit_rate": 0.5, "belady_hit_rate": 0.6, "oracle_stall_s": 0.5, "bytes_moved": 40,
            "copies": 10, "tpot_p50_s": 0.1, "tpot_p90_s": 0.2}))

    def rounds_run(self) -> list[str]:
        return [Path(c[c.index("-o") + 1]).parent.name for c in self.calls if "profile" in c and "loop" not in c]


def validate_args(out: Path, *extra: str) -> list[str]:
    return ["validate", "--out", str(out), "--tokens", "60", "--scale", "16", "--policies", "lru,lfru", *extra]


@pytest.fixture
def fake(monkeypatch):
    steps = FakeSteps()
    monkeypatch.setattr(validate, "_run", steps)
    return steps


def test_validate_reads_only_its_own_rounds(tmp_path, fake):
    out = tmp_path / "val"
    assert main(validate_args(out, "--repeats", "3")) == 0
    assert fake.rounds_run() == ["round-0", "round-1", "round-2"]
    # a later run asking for fewer rounds reads those only, not the third one left in the directory
    assert main(validate_args(out, "--repeats", "2")) == 0
    v = json.loads((out / "validation.json").read_text())
    total = next(r for r in v["rows"] if r["policy"] == "lru" and r["metric"] == "total_s")
    assert v["rounds"] == 2 and total["rounds"] == 2 and total["real"] == 10.5
    assert fake.rounds_run() == ["round-0", "round-1", "round-2"]  # nothing run again
    assert json.loads((out / "manifest.json").read_text())["repeats"] == 2


@pytest.mark.parametrize("change, what", [
    (["--tokens", "80"], "synthetic_tokens (was 60, now 80)"),
    (["--policies", "lru"], "policies (was ['lru', 'lfru'], now ['lru'])"),
    (["--scale", "8"], "scale (was 16, now 8)"),
    (["cache.fraction=0.25"], "overrides (was [], now ['cache.fraction=0.25'])"),
])
def test_rounds_of_other_settings_are_refused(tmp_path, fake, capsys, change, what):
    out = tmp_path / "val"
    assert main(validate_args(out, "--repeats", "1")) == 0
    n = len(fake.calls)
    argv = validate_args(out, "--repeats", "1")
    if change[0] in argv:  # replace the flag's value
        i = argv.index(change[0])
        argv[i + 1] = change[1]
    else:
        argv += change
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'manifest.json'}: {out} holds rounds run with other settings (")
    assert what in err and "use a fresh --out" in err and err.count("\n") == 1
    assert len(fake.calls) == n  # stopped before any work


def test_a_changed_trace_file_is_another_setting(tmp_path, fake, capsys):
    trace = tmp_path / "t.parquet"
    trace.write_bytes(b"one")
    out = tmp_path / "val"
    assert main(validate_args(out, "--repeats", "1", "--trace", str(trace))) == 0
    trace.write_bytes(b"two")
    assert main(validate_args(out, "--repeats", "1", "--trace", str(trace))) == 2
    assert "trace_sha256" in capsys.readouterr().err


def test_rounds_without_a_manifest_are_refused(tmp_path, fake, capsys):
    out = tmp_path / "val"
    (out / "round-7" / "executor").mkdir(parents=True)  # left by an older version, settings unknown
    assert main(validate_args(out, "--repeats", "1")) == 2
    assert "holds validate results without a manifest.json" in capsys.readouterr().err
    assert fake.calls == [] and not (out / "manifest.json").exists()


def test_an_interrupted_run_resumes_at_the_unfinished_round(tmp_path, monkeypatch):
    out = tmp_path / "val"
    per_round = 1 + 2 * 3  # a profile, then per policy: loop, executor, sim
    broken = FakeSteps(fail_at=per_round + 4)  # dies inside round 1
    monkeypatch.setattr(validate, "_run", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        main(validate_args(out, "--repeats", "3"))
    assert (out / "round-0" / "done.json").exists() and not (out / "round-1" / "done.json").exists()
    with pytest.raises(validate.AnalysisError, match="round-1, round-2 not finished"):
        validate.compare(out)
    steps = FakeSteps()
    monkeypatch.setattr(validate, "_run", steps)
    assert main(validate_args(out, "--repeats", "3")) == 0
    assert steps.rounds_run() == ["round-1", "round-2"] and len(steps.calls) == 2 * per_round
    v = json.loads((out / "validation.json").read_text())
    assert v["rounds"] == 3 and next(r for r in v["rows"] if r["metric"] == "total_s")["real"] == 11.0
    done = json.loads((out / "round-1" / "done.json").read_text())
    assert done["policies"] == ["lfru", "lru"]  # round 1's rotation
