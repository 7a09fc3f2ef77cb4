"""The CUDA backend on a real GPU: copies, stream ordering, compute, a whole executor run with telemetry, and
the profile. Every test here is marked ``gpu`` and skipped without CUDA (``make validate-gpu`` runs them); the
backend's logic is tested on a CPU in ``test_cuda_backend.py``."""

from __future__ import annotations

import pytest
import torch
from test_cuda_backend import HAS_CUDA, LAYOUT, compose_cfg, small_case

from executor.compute import LayerCompute
from executor.cuda_backend import CudaBackend
from executor.tier import write_store

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False")


def gpu_backend(tmp_path, n_slots=4, streams=1, window=2):
    store = write_store(tmp_path / "g.experts", LAYOUT)
    return CudaBackend.build(store, LAYOUT, n_slots, seed=0, copy_streams=streams, window=window)


@pytest.mark.gpu
@gpu
def test_gpu_copies_match_the_host(tmp_path):
    b = gpu_backend(tmp_path, n_slots=8, streams=2)
    try:
        for k in range(8):
            b.transfer.submit(k, 7 - k, 1 + k % 2)
        for k in range(8):
            assert b.transfer.wait(k) >= 0
        host = b.compute.ops.host
        for k in range(8):
            assert torch.equal(b.compute.slots[7 - k].cpu(), host[k])
        assert all(r.end_s >= r.start_s >= 0 for r in b.transfer.records) and b.transfer.bandwidth_bytes_per_s() > 0
    finally:
        b.close()


@pytest.mark.gpu
@gpu
def test_gpu_demand_overtakes_queued_prefetches(tmp_path):
    b = gpu_backend(tmp_path, n_slots=8, streams=1, window=1)
    eng = b.transfer
    try:
        with eng._cv:  # everything is submitted before the copy thread can retire the first copy
            for k in range(6):
                eng.submit(k, k, 3)
            eng.submit(7, 7, 0)
            assert eng.cancel(5) and not eng.cancel(0)
        eng.wait(7)
        eng.wait(4)
        assert [r.key for r in eng.records] == [0, 7, 1, 2, 3, 4]
    finally:
        b.close()


@pytest.mark.gpu
@gpu
def test_gpu_compute_matches_the_cpu(tmp_path):
    b = gpu_backend(tmp_path, n_slots=2)
    try:
        b.transfer.submit(3, 1, 0)
        b.transfer.wait(3)
        cpu_slots = b.compute.ops.host[3].clone()
        cpu = LayerCompute(LAYOUT, memoryview(cpu_slots.numpy()).cast("B"))
        torch.testing.assert_close(b.compute.run_expert(1, 5).cpu(), cpu.run_expert(0, 5), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.compute.run_dense(3).cpu(), cpu.run_dense(3), rtol=1e-4, atol=1e-5)
    finally:
        b.close()


@pytest.mark.gpu
@gpu
def test_gpu_executor_run_writes_the_simulators_keys_and_telemetry(tmp_path):
    import json

    from executor.run import execute_config
    from sim.run import simulate

    ov = small_case(tmp_path, tokens=120)
    real = execute_config(compose_cfg([*ov, "executor.backend=cuda"]), tmp_path / "ex")
    sim = simulate(compose_cfg(ov), tmp_path / "sim")
    assert set(sim) <= set(real)
    for k in ("hit_rate", "late_hit_rate", "copies", "expert_requests"):
        assert real[k] == sim[k], k
    assert real["tier"] == "host-pinned" and real["run"]["backend"] == "cuda"
    assert isinstance(real["telemetry"]["available"], bool)
    assert json.loads((tmp_path / "ex" / "results.json").read_text())["telemetry"] == real["telemetry"]


@pytest.mark.gpu
@gpu
def test_gpu_profile_measures_copies_and_compute(tmp_path):
    from executor.cuda_profile import profile_cuda

    store = write_store(tmp_path / "p.experts", LAYOUT)
    prof = profile_cuda(store, LAYOUT, repeats=3, copy_streams=2)
    assert prof["tier"] == "host-pinned" and prof["copy"]["bandwidth_bytes_per_s"] > 1e8
    assert prof["copy"]["seconds"][0] > 0 and all(s > 0 for s in prof["compute"]["expert_s"])
