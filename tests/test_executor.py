"""The CPU executor: packed tier, O_DIRECT and its fallback, the I/O thread queue, faults, the same decisions
as the simulator, and the profile the simulator reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from conftest import ROOT, random_trace, write_profile
from hydra import compose, initialize_config_dir

from executor.profile import fit_alpha_beta
from executor.tier import HEADER_BYTES, ExpertReader, StoreLayout, TierError, aligned_buffer, write_store
from executor.transfer import TransferEngine
from policies.link_budget import prefetch_target
from traces import write_trace

LAYOUT = StoreLayout([4, 4], hidden=32, intermediate=48, seed=1)


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "t.experts", LAYOUT)


def test_store_round_trip_and_alignment(store):
    r = ExpertReader(store)
    buf = aligned_buffer(LAYOUT.stride_bytes)
    assert r.read_into(5, memoryview(buf)) == LAYOUT.stride_bytes
    assert LAYOUT.stride_bytes % 4096 == 0 and store.stat().st_size == LAYOUT.file_bytes()
    got = np.frombuffer(buf, np.float32, LAYOUT.expert_bytes // 4)
    with open(store, "rb") as f:
        f.seek(HEADER_BYTES + 5 * LAYOUT.stride_bytes)
        want = np.frombuffer(f.read(LAYOUT.expert_bytes), np.float32)
    np.testing.assert_array_equal(got, want)
    assert 0.5 < got.std() * np.sqrt(32) < 2  # initialised like a real layer
    r.close()


def refuse_odirect(monkeypatch):
    """Make every open with O_DIRECT fail as a filesystem without it does (EINVAL); other opens are real."""
    import errno

    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_buffered_fallback_warns(store, monkeypatch):
    r = ExpertReader(store, direct=False)
    assert not r.direct
    r.close()
    if not hasattr(os, "O_DIRECT"):
        pytest.fail("this platform has no O_DIRECT; the executor's tier is for Linux")
    refuse_odirect(monkeypatch)
    with pytest.warns(RuntimeWarning) as w:
        r2 = ExpertReader(store)  # auto: the refusal is a warning naming the file, then buffered reads
    (msg,) = [str(x.message) for x in w]
    assert msg.startswith(f"{store}: the filesystem refuses O_DIRECT (Invalid argument); falling back to buffered")
    assert not r2.direct
    buf = aligned_buffer(LAYOUT.stride_bytes)
    assert r2.read_into(5, memoryview(buf)) == LAYOUT.stride_bytes
    r2.close()
    with open(store, "rb") as f:
        f.seek(HEADER_BYTES + 5 * LAYOUT.stride_bytes)
        assert bytes(buf[: LAYOUT.expert_bytes]) == f.read(LAYOUT.expert_bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # forced on: an error, not a warning and a fallback
        with pytest.raises(TierError, match=rf"{re.escape(str(store))}: O_DIRECT refused \(\[Errno 22\] Invalid argument"):
            ExpertReader(store, direct=True)


def test_short_and_foreign_files(store, tmp_path):
    short = tmp_path / "short.experts"
    short.write_bytes(store.read_bytes()[: HEADER_BYTES + LAYOUT.stride_bytes])
    with pytest.raises(TierError, match=r"short\.experts.*short file"):
        ExpertReader(short)
    foreign = tmp_path / "x.experts"
    foreign.write_bytes(b"\x00" * 8192)
    with pytest.raises(TierError, match=r"x\.experts.*not an expert file"):
        ExpertReader(foreign)
    with pytest.raises(TierError, match="no such expert file"):
        ExpertReader(tmp_path / "missing.experts")


def test_demand_overtakes_queued_prefetches_and_cancel(store):
    r = ExpertReader(store)
    slots = aligned_buffer(8 * LAYOUT.stride_bytes)
    eng = TransferEngine(r, memoryview(slots), io_threads=1)
    with eng._cv:  # hold the queue (a re-entrant lock) so everything is queued before the thread picks
        for k in range(6):
            eng.submit(k, k, 3)
        eng.submit(7, 7, 0)
        assert eng.cancel(5)  # cancelled before it started
        assert eng.cancel(1)
        eng.submit(1, 1, 3)  # resubmitted: behind the prefetches queued before it
    eng.wait(1)
    eng.wait(7)
    order = [rec.key for rec in eng.records]
    assert order == [7, 0, 2, 3, 4, 1]
    eng.close()
    r.close()


def test_transfer_engine_reports_its_link_facts(store):
    """What the runtime's link budget reads from the CPU tier: nothing before a copy landed, then the measured copy
    time, the queued work at a priority or better, and the share of time the threads were reading."""
    r = ExpertReader(store)
    slots = aligned_buffer(8 * LAYOUT.stride_bytes)
    eng = TransferEngine(r, memoryview(slots), io_threads=1)
    assert eng.channels == 1 and eng.copy_s() is None and eng.backlog_s(99) == 0.0 and eng.busy_share() == 0.0
    eng.submit(0, 0, 0)
    eng.wait(0)
    c = eng.copy_s()
    assert c > 0 and 0 < eng.busy_share() <= 1
    with eng._cv:  # hold the queue so nothing starts: 2 copies at priority 5, 1 at priority 9
        for k, prio in ((1, 5), (2, 5), (3, 9)):
            eng.submit(k, k, prio)
        assert eng.backlog_s(4) == 0.0 and eng.backlog_s(5) == pytest.approx(2 * c)
        assert eng.backlog_s(9) == pytest.approx(3 * c)
    for k in (1, 2, 3):
        eng.wait(k)
    eng.close()
    r.close()


def test_failed_read_reaches_the_waiter_and_threads_stop(store):
    r = ExpertReader(store, direct=False)
    with open(store, "r+b") as f:
        f.truncate(HEADER_BYTES + 2 * LAYOUT.stride_bytes)  # experts 2.. are gone now
    slots = aligned_buffer(2 * LAYOUT.stride_bytes)
    eng = TransferEngine(r, memoryview(slots), io_threads=2)
    eng.submit(6, 0, 0)
    with pytest.raises(TierError, match=r"expert 6 at offset \d+ returned 0 bytes, expected"):
        eng.wait(6, timeout_s=10)
    eng.close()
    assert not any(t.is_alive() for t in eng._threads)
    r.close()


def test_fit_recovers_alpha_beta():
    b = [65536, 262144, 1 << 20, 4 << 20]
    s = [50e-6 + x / 2e9 for x in b]
    lat, bw = fit_alpha_beta(b, s)
    assert lat == pytest.approx(50e-6, rel=1e-6) and bw == pytest.approx(2e9, rel=1e-6)


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("cache", ["lru", "lfru", "static"])
def test_executor_makes_the_simulators_decisions(tmp_path, cache):
    tr = random_trace(tokens=120, layers=3, experts=8, top_k=2, sequences=4, seed=3)
    tr.meta.hidden_size, tr.meta.intermediate_size = 64, 96
    path = write_trace(tr, tmp_path / "t.parquet")
    ov = [f"trace.path={path}", "trace.name=t", f"cache={cache}", "batch_size=2", "executor.scale=1",
          f"paths.tier_dir={tmp_path / 'tier'}"]
    from executor.run import execute_config
    from sim.run import simulate

    real = execute_config(compose_cfg(ov), tmp_path / "ex")
    sim = simulate(compose_cfg(ov), tmp_path / "sim")
    for k in ("hit_rate", "late_hit_rate", "copies", "expert_requests", "belady_hit_rate"):
        assert real[k] == sim[k], k
    # static pins experts before the run: both drivers load (executor: for real) and count them
    assert (real["preload_bytes"] > 0) == (sim["preload_bytes"] > 0) == (cache == "static")
    assert real["run"]["driver"] == "executor" and real["stall_s"] >= 0 and real["total_s"] > 0
    assert real["bytes_moved"] == real["copies"] * real["run"]["expert_bytes"]
    assert (tmp_path / "ex" / "results.json").exists() and (tmp_path / "ex" / "per_layer.parquet").exists()


class CopiesOnlyWhenWaited:
    """A deterministic stand-in for TransferEngine that starts no copy by itself: a copy runs (and lands at
    once) only when the loop waits for it. So no prefetch starts before its target layer-step, and one whose
    key that layer does not use is still queued there: the loop must cancel it. ``now`` is the layer-step
    (counted by the fake compute's dense calls)."""

    channels = 1  # LinkFacts: no copy time is ever measured here (copy_s None), so the link budget stays off

    def __init__(self):
        self.now, self.seq = -1, 0
        self.queued: dict[int, tuple[int, int]] = {}  # key -> (priority, seq)
        self.prefetches: list[tuple[int, int]] = []  # (target layer-step, key) of every prefetch submitted
        self.cancelled: list[tuple[int, int]] = []  # (layer-step, key)
        self.submitted = self.copies_started = self.bytes_started = 0
        self.records: list = []
        self._landed: list[int] = []
        self.done: set[int] = set()

    def submit(self, key, slot, priority):
        self.done.discard(key)
        self.seq += 1
        self.submitted += 1
        self.queued[key] = (priority, self.seq)
        if priority:  # a prefetch's priority names its target layer-step (policies.link_budget)
            self.prefetches.append((prefetch_target(priority), key))

    def upgrade(self, key):
        if key in self.queued:
            self.queued[key] = (0, self.queued[key][1])

    def cancel(self, key):
        if self.queued.pop(key, None) is None:
            return False
        self.cancelled.append((self.now, key))
        return True

    def _land(self, key):
        del self.queued[key]
        self.done.add(key)
        self.copies_started += 1
        self.bytes_started += 1
        self._landed.append(key)

    def wait(self, key):
        if key in self.queued:
            self._land(key)
        assert key in self.done, f"wait for expert {key}: no copy of it is queued"  # as TransferEngine.wait
        return 0.0

    def wait_any(self):
        assert self.queued, "wait for any copy: none is queued"
        self._land(min(self.queued, key=self.queued.get))  # the copy a single I/O thread would take next
        return 0.0

    def landed(self):
        out, self._landed = self._landed, []
        return out

    def bandwidth_bytes_per_s(self):
        return 1e9

    def copy_s(self):
        return None

    def backlog_s(self, priority):
        return 0.0

    def busy_share(self):
        return 0.0


class CountingCompute:
    def __init__(self, transfer):
        self.transfer = transfer

    def run_dense(self, ntok):
        self.transfer.now += 1  # one dense call per layer-step

    def run_expert(self, slot, uses):
        pass  # experts take no time in this fake: only the dense part of a layer-step moves the clock


def test_prefetches_still_queued_at_their_target_are_cancelled(tmp_path):
    from executor.engine import execute
    from replay.prepare import prepare

    tr = random_trace(tokens=60, layers=3, experts=8, top_k=2, sequences=3, seed=3)
    path = write_trace(tr, tmp_path / "t.parquet")
    p = prepare(compose_cfg([f"trace.path={path}", "trace.name=t", "cache=lru", "predictor=transition",
                             "horizon=fixed", "horizon.distance=2", "cache.fraction=0.5"]))
    fake = CopiesOnlyWhenWaited()
    res = execute(p.steps, p.runtime, fake, CountingCompute(fake), p.meta.num_layers, p.uses)
    assert fake.now == len(p.steps) * 3 - 1
    # exactly the prefetches whose key their target layer-step does not use are cancelled, at that step
    mispredicted = [(target, k) for target, k in fake.prefetches if k not in p.uses[target]]
    assert fake.cancelled and sorted(fake.cancelled) == sorted(mispredicted)
    # the rest were used (waited for, landed); every copy not cancelled ran; the cancelled are not issued
    issued = len(fake.prefetches) - len(fake.cancelled)
    assert p.runtime.prefetch_issued == issued == p.runtime.cache.stats.prefetch_used > 0
    assert not fake.queued and res.copies == fake.copies_started == fake.submitted - len(fake.cancelled)


def test_profile_writes_what_the_simulator_reads(tmp_path):
    out = tmp_path / "prof.json"
    proc = subprocess.run([sys.executable, "-m", "executor", "profile", "--model-preset", "olmoe-1b-7b", "--scale", "16",
                           "--tier-dir", str(tmp_path), "--repeats", "3", "-o", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    prof = json.loads(out.read_text())
    assert prof["copy"]["bandwidth_bytes_per_s"] > 1e7 and all(s > 0 for s in prof["compute"]["expert_s"])
    tr = random_trace(tokens=60, layers=2, experts=8, top_k=2, sequences=2, seed=1)
    p = write_trace(tr, tmp_path / "t.parquet")
    from sim.run import simulate

    res = simulate(compose_cfg([f"trace.path={p}", "hardware=profiled", f"hardware.profile_path={out}"]), tmp_path / "s")
    assert res["run"]["expert_bytes"] == prof["expert_bytes"] and res["total_s"] > 0


def test_bad_input_leaves_no_results(tmp_path):
    tr = random_trace(tokens=30, layers=2, experts=8, top_k=2, sequences=2, seed=1)
    tr.meta.hidden_size, tr.meta.intermediate_size = 64, 96
    path = write_trace(tr, tmp_path / "t.parquet")
    proc = subprocess.run([sys.executable, "-m", "executor", f"trace.path={path}", "executor.scale=0",
                           f"hydra.run.dir={tmp_path / 'run'}", f"paths.tier_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "executor.scale" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_validate_small_case(tmp_path):
    """The validation pipeline end to end on a small case: identical on-demand decisions, a table, the JSON."""
    out = tmp_path / "val"
    proc = subprocess.run([sys.executable, "-m", "analysis", "validate", "--out", str(out), "--tokens", "60",
                           "--scale", "16", "--policies", "lru,transition-d1", "--repeats", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    v = json.loads((out / "validation.json").read_text())
    assert v["timing_free_decisions_identical"] is True
    assert {r["policy"] for r in v["rows"]} == {"lru", "transition-d1"}
    lru = {r["metric"]: r for r in v["rows"] if r["policy"] == "lru"}
    assert lru["hit_rate"]["real"] == lru["hit_rate"]["sim"] and lru["copies"]["error_pct"] == 0.0
    assert isinstance(v["same_ranking"], bool) and "| lru | total_s |" in (out / "validation.md").read_text()
    assert v["rounds"] == 1 and (out / "round-0" / "profile.json").exists() and lru["total_s"]["real_spread_pct"] == 0.0


def test_bounds_only_where_the_hardware_model_describes_the_run(tmp_path):
    """A preset models full-size experts on another machine: its perfect-foresight stall is no bound of this run,
    so it is null and the run is labelled with the tier it used. A profile of this tier at this expert size
    gives the simulator's bounds."""
    tr = random_trace(tokens=60, layers=2, experts=8, top_k=2, sequences=2, seed=1)
    tr.meta.hidden_size, tr.meta.intermediate_size = 64, 96
    path = write_trace(tr, tmp_path / "t.parquet")
    ov = [f"trace.path={path}", "executor.scale=2", f"paths.tier_dir={tmp_path / 'tier'}", "paths.bounds_dir=null"]
    from executor.run import execute_config
    from sim.run import simulate

    preset = execute_config(compose_cfg(ov), tmp_path / "a100")
    on_disk = json.loads((tmp_path / "a100" / "results.json").read_text())
    for res in (preset, on_disk):
        assert res["oracle_stall_s"] is None and res["oracle_aggressive_stall_s"] is None
        assert res["oracle_conservative_stall_s"] is None
        assert res["run"]["hardware"] == f"local-{res['tier']}" != "a100-pcie4"
        assert res["run"]["bandwidth_GBps"] is None and res["run"]["copy_model"] is None
    sim = simulate(compose_cfg(ov), tmp_path / "sim")
    assert (preset["belady_hit_rate"], preset["belady_misses_unique"]) == (sim["belady_hit_rate"], sim["belady_misses_unique"])

    def profile(expert_bytes, tier):
        prof = json.loads(write_profile(tmp_path, None).read_text())
        prof.update(expert_bytes=expert_bytes, tier=tier)
        p = tmp_path / f"prof-{expert_bytes}-{tier}.json"
        p.write_text(json.dumps(prof))
        return ["hardware=profiled", f"hardware.profile_path={p}"]

    ours = profile(preset["run"]["expert_bytes"], preset["tier"])
    real = execute_config(compose_cfg([*ov, *ours]), tmp_path / "prof")
    sim = simulate(compose_cfg([*ov, *ours]), tmp_path / "sim-prof")
    assert real["run"]["hardware"] == "profiled" and real["run"]["bandwidth_GBps"] == sim["run"]["bandwidth_GBps"]
    for k in ("oracle_stall_s", "oracle_aggressive_stall_s", "belady_hit_rate"):
        assert real[k] == sim[k] is not None, k
    for other in (profile(4096 * 1000, preset["tier"]), profile(preset["run"]["expert_bytes"], "host-pinned")):
        res = execute_config(compose_cfg([*ov, *other]), tmp_path / "other")
        assert res["oracle_stall_s"] is None and res["run"]["hardware"].startswith("local-")


@pytest.mark.parametrize("override, msg", [
    ("executor.odirect=foo", "error: executor.odirect: expected one of ['auto', 'on', 'off'], got 'foo'"),
    ("executor.io_threads=0", "error: executor.io_threads: expected an integer >= 1, got 0"),
    ("executor.compute_threads=x", "error: executor.compute_threads: expected an integer >= 1, got 'x'"),
    ("executor.scale=1.5", "error: executor.scale: expected an integer >= 1, got 1.5"),
])
def test_bad_executor_values_stop_before_any_work(tmp_path, override, msg):
    tr = random_trace(tokens=30, layers=2, experts=8, top_k=2, sequences=2, seed=1)
    path = write_trace(tr, tmp_path / "t.parquet")
    proc = subprocess.run([sys.executable, "-m", "executor", f"trace.path={path}", override,
                           f"hydra.run.dir={tmp_path / 'run'}", f"paths.tier_dir={tmp_path / 'tier'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == msg, proc.stderr[-2000:]
    assert not (tmp_path / "tier").exists() and not (tmp_path / "run" / "results.json").exists()
