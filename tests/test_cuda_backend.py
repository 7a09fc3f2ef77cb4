"""The CUDA backend. On a CPU machine: the copy scheduling logic (host priority queue, bounded per-stream
window, upgrade/cancel, accounting) with an injected fake device, the threaded engine around it, the replay
loop driving it unchanged, the API parity with the CPU backend and the clear stop without a GPU. These do not
pretend to be a GPU: the fake device only says when a copy has landed. Real CUDA copies, streams and events:
``test_cuda_gpu.py`` (skipped without a GPU); NVML telemetry: ``test_gpu_telemetry.py``."""

from __future__ import annotations

import inspect
import itertools
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, random_trace
from hydra import compose, initialize_config_dir

from executor.compute import LayerCompute
from executor.copy_schedule import CopyScheduler
from executor.cuda_backend import CudaTransferEngine, GpuLayerCompute, load_host, require_cuda
from executor.tier import HEADER_BYTES, ExpertReader, StoreLayout, TierError, write_store
from executor.transfer import TransferEngine
from traces import write_trace

LAYOUT = StoreLayout([4, 4], hidden=32, intermediate=48, seed=1)
HAS_CUDA = torch.cuda.is_available()


class Handle:
    _ids = itertools.count()

    def __init__(self, key: int):
        self.key, self.id, self.landed = key, next(self._ids), threading.Event()


class FakeDevice:
    """Stands in for CudaOps: records the order copies were enqueued and lands them only when told (or at
    once with ``auto``); ``synchronize`` blocks like a blocking-sync CUDA event. It moves no data."""

    nbytes = 1000

    def __init__(self, auto: bool = False, fail_issue=(), fail_sync=()):
        self.auto, self.fail_issue, self.fail_sync = auto, set(fail_issue), set(fail_sync)
        self.issued: list[tuple[int, int, int]] = []  # (key, slot, stream)
        self.handles: list[Handle] = []
        self.t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def issue(self, key, slot, stream):
        if key in self.fail_issue:
            raise RuntimeError(f"copy of {key} refused")
        self.issued.append((key, slot, stream))
        h = Handle(key)
        if self.auto:
            h.landed.set()
        self.handles.append(h)
        return h

    def done(self, h) -> bool:
        return h.landed.is_set()

    def synchronize(self, h) -> None:
        if h.key in self.fail_sync:
            raise RuntimeError(f"device error during copy of {h.key}")
        h.landed.wait()

    def times(self, h):
        return float(h.id), float(h.id) + 0.5

    def land(self, *keys) -> None:
        for h in self.handles:
            if h.key in keys:
                h.landed.set()

    def land_all(self) -> None:
        self.auto = True
        for h in self.handles:
            h.landed.set()


def keys(dev: FakeDevice) -> list[int]:
    return [k for k, _, _ in dev.issued]


# -- the pure scheduler -------------------------------------------------------------------------------------
def test_a_demand_waits_behind_at_most_the_copy_running_on_its_stream():
    """Prefetches go onto a stream only while it is idle, so a later demand is enqueued at once behind the one
    copy running (a stream runs in order: with two prefetches committed to it, as the scheduler used to allow,
    a demand waited behind both); demands fill up to ``window``."""
    dev = FakeDevice()
    s = CopyScheduler(dev, streams=1, window=2, clock=lambda: 0.0)
    for k in range(6):
        s.submit(k, slot=k, priority=3)
    assert keys(dev) == [0] and s.depth(0) == 1  # one prefetch on the stream, the rest in the host queue
    s.submit(9, slot=7, priority=0)
    assert keys(dev) == [0, 9] and not s.is_queued(9)  # straight onto the stream, behind the running copy only
    s.submit(8, slot=8, priority=0)
    assert keys(dev) == [0, 9] and s.is_queued(8)  # the window is full: the next demand waits in the host queue
    dev.land(0)
    assert s.poll() == 1 and s.dispatch() == 1
    assert keys(dev) == [0, 9, 8]  # next on the stream: the demand, not prefetch 1
    while s.busy():
        dev.land(*keys(dev))
        s.poll()
        s.dispatch()
    assert keys(dev) == [0, 9, 8, 1, 2, 3, 4, 5]  # FIFO within a priority
    assert s.take_landed() == [0, 9, 8, 1, 2, 3, 4, 5] and s.take_landed() == []
    assert s.copies_started == 8 and s.bytes_started == 8 * dev.nbytes
    rec = {r.key: r for r in s.records}
    assert rec[9].priority == 0 and rec[9].slot == 7 and rec[2].priority == 3 and rec[9].nbytes == dev.nbytes


def test_prefetches_wait_for_an_idle_stream():
    """With every stream busy (a prefetch running on each) no further prefetch is enqueued, however many wait."""
    dev = FakeDevice()
    s = CopyScheduler(dev, streams=2, window=2, clock=lambda: 0.0)
    for k in range(5):
        s.submit(k, slot=k, priority=1 + k)
    assert [(k, st) for k, _, st in dev.issued] == [(0, 0), (1, 1)] and s.depth(0) == s.depth(1) == 1
    dev.land(1)
    assert s.poll() == 1 and s.dispatch() == 1 and dev.issued[-1] == (2, 2, 1)  # the freed stream takes the next


def test_upgrade_and_cancel_act_on_the_host_queue_only():
    dev = FakeDevice()
    s = CopyScheduler(dev, streams=1, window=1, clock=lambda: 0.0)
    for k in range(4):
        s.submit(k, slot=k, priority=2)
    assert keys(dev) == [0]
    s.upgrade(3)
    assert not s.cancel(0) and s.in_flight(0)  # already on the stream: runs to the end
    assert s.cancel(2) and not s.is_queued(2) and not s.pending(2)
    assert not s.cancel(2) and not s.cancel(42)
    for _ in range(3):
        dev.land(*keys(dev))
        s.poll()
        s.dispatch()
    assert keys(dev) == [0, 3, 1]  # the upgraded copy first, the cancelled one never
    s.submit(2, slot=2, priority=1)  # resubmitted after its cancel: runs once
    dev.land_all()
    s.poll()
    s.dispatch()
    s.poll()
    assert keys(dev) == [0, 3, 1, 2] and not s.busy() and s.done == {0, 1, 2, 3}


def test_scheduler_backlog_counts_the_host_queue_and_the_streams():
    dev = FakeDevice()
    now = [0.0]
    s = CopyScheduler(dev, streams=1, window=2, clock=lambda: now[0])
    assert s.backlog_s(99) == 0.0  # no copy timed yet
    s.submit(0, slot=0, priority=0)
    dev.land(0)
    s.poll()
    assert s.copy_ewma_s == pytest.approx(0.5)  # the fake device times every copy at 0.5 s
    s.submit(1, slot=1, priority=3)  # onto the idle stream
    s.submit(2, slot=2, priority=3)
    s.submit(3, slot=3, priority=7)
    now[0] = 0.2  # 0.2 s after copy 1 was enqueued: 0.3 s of it left
    assert s.backlog_s(0) == pytest.approx(0.3) and s.backlog_s(3) == pytest.approx(0.8)
    assert s.backlog_s(7) == pytest.approx(1.3)


def test_streams_fill_evenly_and_only_stream_heads_retire():
    dev = FakeDevice()
    s = CopyScheduler(dev, streams=2, window=2, clock=lambda: 0.0)
    for k in range(6):
        s.submit(k, slot=k, priority=0)  # demands: up to ``window`` per stream
    assert [st for _, _, st in dev.issued] == [0, 1, 0, 1] and s.depth(0) == s.depth(1) == 2
    dev.land(2)  # behind 0 on stream 0: a stream runs in order, so 2 cannot be retired before 0
    assert s.poll() == 0 and s.oldest().key == 0
    dev.land(0, 1)
    assert s.poll() == 3 and s.take_landed() == [0, 2, 1]
    assert s.dispatch() == 2 and keys(dev)[4:] == [4, 5]


def test_failed_copies_are_kept_for_their_waiters():
    dev = FakeDevice(fail_issue={1})
    s = CopyScheduler(dev, streams=1, window=4, clock=lambda: 0.0)
    s.submit(0, 0, 1)
    s.submit(1, 1, 0)
    assert isinstance(s.errors[1], RuntimeError) and not s.pending(1) and s.pending(0)
    s.fail_in_flight(RuntimeError("device lost"))
    assert "device lost" in str(s.errors[0]) and not s.busy()
    with pytest.raises(ValueError):
        CopyScheduler(dev, streams=0, window=1, clock=lambda: 0.0)


# -- the threaded engine around it ---------------------------------------------------------------------------
def test_engine_demand_overtakes_prefetches_and_wait_reports_the_wait():
    dev = FakeDevice()
    eng = CudaTransferEngine(dev, streams=1, window=1)
    try:
        for k in range(5):
            eng.submit(k, k, 2)
        eng.submit(7, 7, 0)
        assert eng.is_queued(7) and keys(dev) == [0]
        threading.Timer(0.05, dev.land_all).start()
        waited = eng.wait(7)
        assert waited >= 0.04
        eng.wait(4)
        assert [r.key for r in eng.records] == [0, 7, 1, 2, 3, 4]
        assert sorted(eng.landed()) == [0, 1, 2, 3, 4, 7] and eng.landed() == []
        assert not eng.busy() and eng.copies_started == 6 and eng.bandwidth_bytes_per_s() == pytest.approx(2000)
        with pytest.raises(TierError, match="no copy of it is queued or running"):
            eng.wait(99)
        with pytest.raises(TierError, match="none is queued or running"):
            eng.wait_any()
        dev.auto = False
        eng.submit(5, 5, 1)
        threading.Timer(0.02, dev.land, args=(5,)).start()
        assert eng.wait_any() > 0 and eng.wait(5) >= 0 and eng.landed() == [5]
    finally:
        eng.close()
    assert not eng._thread.is_alive()


def test_engine_errors_reach_the_waiter():
    dev = FakeDevice(auto=True, fail_issue={3}, fail_sync={4})
    eng = CudaTransferEngine(dev, streams=1, window=2)
    try:
        eng.submit(3, 0, 0)
        with pytest.raises(RuntimeError, match="copy of 3 refused"):
            eng.wait(3, timeout_s=5)
        dev.auto = False
        eng.submit(4, 1, 0)
        with pytest.raises(RuntimeError, match="device error during copy of 4"):
            eng.wait(4, timeout_s=5)
    finally:
        eng.close()
    with pytest.raises(TierError, match="expected >= 1"):
        CudaTransferEngine(dev, streams=0)


class CpuCopyDevice(FakeDevice):
    """Copies host rows into slot rows for real, on the CPU, and lands them at once (no streams involved)."""

    def __init__(self, host: torch.Tensor, slots: torch.Tensor):
        super().__init__(auto=True)
        self.host, self.slots, self.nbytes = host, slots, host.shape[1] * 4

    def issue(self, key, slot, stream):
        self.slots[slot].copy_(self.host[key])
        return super().issue(key, slot, stream)


def compose_cfg(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def small_case(tmp_path, cache="lru", tokens=80):
    tr = random_trace(tokens=tokens, layers=3, experts=8, top_k=2, sequences=4, seed=3)
    tr.meta.hidden_size, tr.meta.intermediate_size = 64, 96
    path = write_trace(tr, tmp_path / "t.parquet")
    return [f"trace.path={path}", "trace.name=t", f"cache={cache}", "batch_size=2", "executor.scale=1",
            f"paths.tier_dir={tmp_path / 'tier'}"]


@pytest.mark.parametrize("cache,predictor", [("lru", "none"), ("lru", "transition")])
def test_replay_loop_drives_the_cuda_engine_unchanged(tmp_path, cache, predictor):
    """executor/engine.py with CudaTransferEngine (copies done on the CPU): the simulator's decisions, and every
    resident expert's slot holds that expert's weights."""
    from executor.engine import execute
    from executor.tier import scaled_layout
    from replay.prepare import prepare
    from replay.results import results_dict
    from sim.run import simulate

    ov = [*small_case(tmp_path, cache), f"predictor={predictor}"]
    p = prepare(compose_cfg(ov))
    layout = scaled_layout(p.meta, 1, 0)
    store = write_store(tmp_path / "s.experts", layout)
    reader = ExpertReader(store, direct=False)
    host = load_host(reader, pin=False)
    reader.close()
    slots = torch.zeros(sum(p.capacity), layout.stride_bytes // 4)
    eng = CudaTransferEngine(CpuCopyDevice(host, slots), streams=2, window=2)
    compute = LayerCompute(layout, memoryview(slots.numpy()).cast("B"))
    try:
        res = execute(p.steps, p.runtime, eng, compute, p.meta.num_layers, p.uses, warmup_steps=p.warmup_steps)
    finally:
        eng.close()
    real = results_dict(p, res, layout.stride_bytes, "executor")
    if predictor == "none":  # timing-free decisions: identical to the simulator's
        sim = simulate(compose_cfg(ov), tmp_path / "sim")
        for k in ("hit_rate", "late_hit_rate", "copies", "expert_requests"):
            assert real[k] == sim[k], k
    assert real["bytes_moved"] == real["copies"] * layout.stride_bytes and real["copies"] > 0
    cache_ = p.runtime.cache
    resident = [k for k in cache_.slot_of if cache_.is_resident(k)]
    assert resident
    for k in resident:
        assert torch.equal(slots[cache_.slot_of[k]], host[k]), k


def test_engine_facing_api_matches_the_cpu_backend():
    def sig(cls, name):
        return [(p.name, p.default) for p in inspect.signature(getattr(cls, name)).parameters.values()][1:]

    for name in ("submit", "upgrade", "cancel", "is_queued", "busy", "wait", "landed", "wait_any", "close",
                 "bandwidth_bytes_per_s", "now"):
        assert sig(CudaTransferEngine, name) == sig(TransferEngine, name), name
    for attr in ("records", "bytes_started", "copies_started"):
        assert isinstance(getattr(CudaTransferEngine, attr), property)
    for name in ("run_dense", "run_expert", "tokens", "expert_weights"):
        assert sig(GpuLayerCompute, name) == sig(LayerCompute, name), name


def test_host_tier_holds_every_expert(tmp_path):
    store = write_store(tmp_path / "t.experts", LAYOUT)
    reader = ExpertReader(store, direct=False)
    host = load_host(reader, pin=False)  # pin=True needs CUDA; the loading is the same
    reader.close()
    assert host.shape == (LAYOUT.total_experts, LAYOUT.stride_bytes // 4)
    raw = store.read_bytes()
    for k in (0, 5, 7):
        off = HEADER_BYTES + k * LAYOUT.stride_bytes
        want = np.frombuffer(raw[off:off + LAYOUT.stride_bytes], np.float32)
        np.testing.assert_array_equal(host[k].numpy(), want)


# -- configuration and the stop without a GPU -----------------------------------------------------------------
def test_backend_defaults_to_cpu():
    assert compose_cfg([]).executor.backend == "cpu"


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_backend_without_a_gpu_stops_before_any_work(tmp_path):
    from executor.cuda_profile import profile_cuda

    with pytest.raises(TierError, match=r"executor.backend=cuda: no CUDA device"):
        require_cuda()
    with pytest.raises(TierError, match="no CUDA device"):
        profile_cuda(tmp_path / "none.experts", LAYOUT)
    ov = small_case(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "executor", *ov, "executor.backend=cuda",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "executor.backend=cuda: no CUDA device" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists() and not (tmp_path / "tier").exists()


def test_unknown_backend_is_an_error(tmp_path):
    from executor.run import execute_config

    with pytest.raises(TierError, match="executor.backend: expected cpu or cuda, got 'tpu'"):
        execute_config(compose_cfg([*small_case(tmp_path), "executor.backend=tpu"]), tmp_path / "out")
    assert not (tmp_path / "tier").exists()


def test_resubmitted_copy_queues_behind_later_ones_in_the_host_queue():
    """Cancel + resubmit puts a copy at the back of its priority (its stale heap entry is skipped)."""
    dev = FakeDevice()
    s = CopyScheduler(dev, streams=1, window=1, clock=lambda: 0.0)
    s.submit(9, slot=0, priority=0)  # fills the stream's window
    s.submit(1, slot=1, priority=1)
    s.submit(2, slot=2, priority=1)
    assert s.cancel(1)
    s.submit(1, slot=1, priority=1)
    while s.busy():
        dev.land(*keys(dev))
        s.poll()
        s.dispatch()
    assert keys(dev) == [9, 2, 1]
