"""Copy channels and hardware models: priorities, cancellation, processor sharing, profiled tables."""

from __future__ import annotations

import json

import numpy as np
import pytest
import simpy

from replay.channels import CopyChannels
from replay.hardware import CopyModel, HardwareConfigError, build_models
from traces.presets import MODEL_PRESETS


def make(model: CopyModel, nbytes: int = 1000):
    env = simpy.Environment()
    landed: list[tuple[int, float]] = []
    chan = CopyChannels(env, model, nbytes, lambda k: landed.append((k, env.now)), log=True)
    return env, chan, landed


def test_demand_overtakes_queued_prefetch():
    env, chan, landed = make(CopyModel("constant", 1000.0))  # 1 s per copy
    chan.submit(1, 2)
    env.run(until=0.5)  # copy 1 has started
    chan.submit(2, 2)
    chan.submit(3, 0)  # demand: must go before 2
    env.run()
    assert [k for k, _ in landed] == [1, 3, 2]
    assert [t for _, t in landed] == [1.0, 2.0, 3.0]


def test_same_instant_submissions_go_by_priority():
    env, chan, landed = make(CopyModel("constant", 1000.0))
    for k, p in [(1, 2), (2, 1), (3, 0)]:
        chan.submit(k, p)
    env.run()
    assert [k for k, _ in landed] == [3, 2, 1]


def test_cancel_and_upgrade():
    env, chan, landed = make(CopyModel("constant", 1000.0))
    chan.submit(1, 1)
    env.run(until=0.5)
    for k, p in [(2, 3), (3, 2)]:
        chan.submit(k, p)
    assert chan.cancel(3) and not chan.cancel(1)  # 1 already started
    chan.upgrade(2)
    env.run()
    assert [k for k, _ in landed] == [1, 2]
    assert chan.copies_started == 2 and chan.bytes_started == 2000


def test_alpha_beta_latency_term():
    m = CopyModel("alpha_beta", 1e9, latency_s=1e-4)
    assert m.seconds(10**9) == pytest.approx(1.0001)
    env, chan, landed = make(m, 10**6)
    chan.submit(7, 0)
    env.run()
    assert landed == [(7, pytest.approx(1e-4 + 1e-3))]


def test_parallel_channels_run_concurrently():
    env, chan, landed = make(CopyModel("constant", 1000.0, channels=2))
    for k in range(4):
        chan.submit(k, 0)
    env.run()
    assert [t for _, t in landed] == [1.0, 1.0, 2.0, 2.0]


def test_shared_link_splits_bandwidth():
    """Two copies sharing a link each take twice as long; a third that joins later gets a third of it."""
    env, chan, landed = make(CopyModel("shared_link", 1000.0, channels=3))
    chan.submit(1, 0)
    chan.submit(2, 0)
    env.run()
    assert [t for _, t in landed] == [pytest.approx(2.0), pytest.approx(2.0)]
    env2, chan2, landed2 = make(CopyModel("shared_link", 1000.0, channels=3))
    chan2.submit(1, 0)

    def late():
        yield env2.timeout(0.5)
        chan2.submit(2, 0)

    env2.process(late())
    env2.run()
    # copy 1: 500 bytes alone in 0.5 s, then 500 bytes at half rate = 1.0 s -> lands at 1.5;
    # copy 2: 500 bytes at half rate by 1.5, then 500 alone -> lands at 2.0
    assert dict(landed2) == {1: pytest.approx(1.5), 2: pytest.approx(2.0)}


def test_shared_link_lands_big_copies_late_in_a_run():
    """Copies of hundreds of MB sharing a link, late in a run: rounding leaves a residue of bytes too small to
    move the clock, which must count as landed (it used to spin forever at one simulated time)."""
    import signal

    def stuck(*_):
        raise TimeoutError("the shared link made no progress")

    env = simpy.Environment(initial_time=987.654321)
    landed = []
    chan = CopyChannels(env, CopyModel("shared_link", 25e9, latency_s=1e-5, channels=2), 352_321_536,
                        lambda k: landed.append((k, env.now)))
    old = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(20)
    try:
        for k in range(6):
            chan.submit(k, 0)
            chan.wait_key(k) if k % 3 == 2 else env.run(until=env.now + 0.003)
        env.run()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert [k for k, _ in landed] == list(range(6))
    per_copy_s = (352_321_536 + 1e-5 * 25e9) / 25e9
    assert landed[-1][1] - 987.654321 == pytest.approx(6 * per_copy_s, rel=0.05)  # the link stays busy


def test_profiled_model_interpolates_and_extrapolates(tmp_path):
    prof = {
        "schema": "expertflow.hwprofile/1",
        "copy": {"bytes": [1000, 2000], "seconds": [0.002, 0.003], "latency_s": 0.001, "bandwidth_bytes_per_s": 1e6},
        "compute": {"dense_tokens": [1, 8], "dense_s": [1e-3, 2e-3], "expert_tokens": [1, 8], "expert_s": [1e-4, 8e-4]},
    }
    p = tmp_path / "p.json"
    p.write_text(json.dumps(prof))
    meta = MODEL_PRESETS["olmoe-1b-7b"].meta()
    copy, comp = build_models({"bandwidth": {"source": "profile"}, "compute": {"source": "profile"}, "profile_path": str(p)}, meta)
    assert copy.seconds(1500) == pytest.approx(0.0025)
    assert copy.seconds(10_000) == pytest.approx(0.001 + 0.01)
    assert comp.dense_time_s(4) == pytest.approx(1e-3 + 3 / 7 * 1e-3)
    assert comp.expert_time_s(8) == pytest.approx(8e-4)


def test_analytic_compute_is_a_roofline():
    meta = MODEL_PRESETS["mixtral-8x7b"].meta()
    hw = {"bandwidth": {"sharing": "independent", "bandwidth_GBps": 25}, "compute": {"source": "datasheet", "peak_TFLOPS": 100, "efficiency": 1.0, "mem_GBps": 1000, "mem_efficiency": 1.0}}
    _, comp = build_models(hw, meta)
    # one token reads all 352 MB of an expert: memory bound
    assert comp.expert_time_s(1) == pytest.approx(meta.expert_bytes / 1e12)
    # enough tokens make it compute bound: 2 FLOPs per weight per token
    w = meta.expert_bytes / 2
    assert comp.expert_time_s(4096) == pytest.approx(2 * 4096 * w / 1e14)
    assert np.isclose(comp.dense_time_s(1), 4 * 4096 * 4096 * 2 / 1e12)


@pytest.mark.parametrize(
    "hw, msg",
    [
        ({"bandwidth": {"source": "warp"}}, "bandwidth.source"),
        ({"bandwidth": {"sharing": "warp"}}, "bandwidth.sharing"),
        ({"bandwidth": {"sharing": "auto", "bandwidth_GBps": 1}}, "auto needs hardware.bandwidth.source=profile"),
        ({"compute": {"source": "profiled"}}, "compute.source"),
        ({"bandwidth": {"sharing": "independent", "bandwidth_GBps": 0}}, "bandwidth_GBps"),
        ({"bandwidth": {"sharing": "independent", "bandwidth_GBps": 1, "channels": 0}}, "channels"),
        ({"bandwidth": {"source": "profile"}, "compute": {"source": "datasheet"}, "profile_path": "/no/such.json"}, "no such profile"),
    ],
)
def test_bad_hardware_values(hw, msg):
    with pytest.raises(HardwareConfigError, match=msg):
        build_models(hw, MODEL_PRESETS["mixtral-8x7b"].meta())


@pytest.mark.parametrize("profile, msg", [
    ({"schema": "expertflow.hwprofile/1", "compute": {}}, r"section 'copy' lacks field\(s\) \['bandwidth_bytes_per_s'"),
    ([1, 2], "field 'schema'"),
])
def test_profile_without_what_the_models_read(tmp_path, profile, msg):
    """A profile missing a section or field the models read stops naming the file and what is missing."""
    import json

    path = tmp_path / "hw.json"
    path.write_text(json.dumps(profile))
    hw = {"bandwidth": {"source": "profile"}, "compute": {"source": "datasheet", "peak_TFLOPS": 1, "mem_GBps": 1},
          "profile_path": str(path)}
    with pytest.raises(HardwareConfigError, match=f"{path}: .*{msg}"):
        build_models(hw, MODEL_PRESETS["mixtral-8x7b"].meta())


def test_profile_needs_only_the_sections_its_models_read(tmp_path):
    """Profiled copies with analytic compute read only the profile's ``copy`` section."""
    import json

    path = tmp_path / "hw.json"
    path.write_text(json.dumps({"schema": "expertflow.hwprofile/1", "copy": {
        "bandwidth_bytes_per_s": 1e9, "latency_s": 1e-5, "bytes": [1e6, 2e6], "seconds": [1e-3, 2e-3]}}))
    hw = {"bandwidth": {"source": "profile", "sharing": "independent"},
          "compute": {"source": "datasheet", "peak_TFLOPS": 1, "mem_GBps": 1}, "profile_path": str(path)}
    copy, compute = build_models(hw, MODEL_PRESETS["mixtral-8x7b"].meta())
    assert copy.kind == "profiled" and compute.kind == "analytic"
    with pytest.raises(HardwareConfigError, match="section 'compute' lacks"):
        build_models({**hw, "compute": {"source": "profile"}}, MODEL_PRESETS["mixtral-8x7b"].meta())


@pytest.mark.parametrize("policy", [
    ["cache=lru", "predictor=none"],
    ["cache=lru", "predictor=transition", "horizon=fixed", "horizon.distance=2"],
    ["cache=expertflow", "predictor=last_token", "horizon=adaptive"],
    ["cache=belady", "predictor=oracle", "horizon=fixed", "horizon.distance=3", "batch_size=3"],
], ids=["lru", "transition", "expertflow", "oracle-batch3"])
@pytest.mark.parametrize("hw", ["t4", "cpu-nvme", "h100-pcie5"])
def test_direct_serial_channel_equals_simpy(tmp_path, policy, hw):
    """The simulator's direct one-worker channel (the fast path every preset takes) gives exactly what the
    SimPy channels give: times, copies, per-layer stats, every copy record."""
    from conftest import ROOT, random_trace
    from hydra import compose, initialize_config_dir

    from replay.prepare import prepare
    from sim.engine import replay
    from traces import write_trace

    path = write_trace(random_trace(tokens=60, layers=4, experts=8, top_k=2, sequences=4, seed=3), tmp_path / "t.parquet")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"trace.path={path}", "trace.name=t", f"hardware={hw}", "cache.slots=3",
                                           "cache.fraction=null", *policy])
    out = []
    for forced in (False, True):
        p = prepare(cfg)
        r = replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers, log=True,
                   uses=p.uses, simpy_channels=forced)
        out.append(r)
    a, b = out
    assert (a.total_s, a.stall_s, a.step_s, a.bytes_moved, a.copies, a.demand_loads) == \
           (b.total_s, b.stall_s, b.step_s, b.bytes_moved, b.copies, b.demand_loads)
    for f in ("requests", "hits", "late_hits", "misses", "stall_s"):
        assert np.array_equal(getattr(a.layers, f), getattr(b.layers, f)), f
    assert a.copy_records == b.copy_records and a.events == b.events
    assert a.copies > 0


def _channel_ops(seed: int, serial: bool):
    """A random sequence of driver operations on one channel; returns everything observable."""
    import random

    from replay.serial_channel import SerialChannel

    rng = random.Random(seed)
    landed = []
    model = CopyModel("alpha_beta", 3e3, latency_s=1e-3) if seed % 2 else CopyModel("constant", 1000.0)
    ch = (SerialChannel(model, 1000, landed.append, log=True) if serial
          else CopyChannels(simpy.Environment(), model, 1000, landed.append, log=True))
    t, nxt, seen = 0.0, 0, []
    for _ in range(60):
        op = rng.random()
        if op < 0.35:
            k = nxt if rng.random() < 0.8 else rng.randrange(max(1, nxt))
            if not ch.has(k):
                ch.submit(k, rng.choice([0, 1, 2, 3]))
                nxt += 1
        elif op < 0.5 and ch.queued:
            ch.cancel(rng.choice(sorted(ch.queued)))
        elif op < 0.6 and ch.queued:
            ch.upgrade(rng.choice(sorted(ch.queued)))
        elif op < 0.85:  # include times that land exactly on a copy's end and float-awkward ones
            t += rng.choice([0.0, 0.5, 1.0, 0.25, 2.0, 0.1, 1 / 3, 0.334, rng.random()])
            ch.advance(t)
        elif op < 0.95:
            keys = [k for k in range(nxt) if ch.has(k)]
            if keys:
                ch.wait_key(rng.choice(keys))
                t = max(t, ch.now)
        elif ch.busy():
            ch.wait_any()
            t = max(t, ch.now)
        seen.append((ch.now, tuple(landed)))
    return seen, [(r.key, r.priority, r.submit_s, r.start_s, r.end_s) for r in ch.records], ch.copies_started


@pytest.mark.parametrize("block", range(4))
def test_serial_channel_fuzzed_against_simpy(block):
    """Random submits (4 priorities), cancels, upgrades, waits for a key or any copy, and clock advances:
    the direct channel and the SimPy channels agree on every landing, clock and copy record."""
    for seed in range(block * 150, (block + 1) * 150):
        assert _channel_ops(seed, True) == _channel_ops(seed, False), f"seed {seed}"


@pytest.mark.parametrize("serial", [True, False], ids=["direct", "simpy"])
def test_resubmitted_copy_queues_behind_later_ones(serial):
    """A cancelled then resubmitted prefetch goes to the back of its priority, not to its old place."""
    from replay.serial_channel import SerialChannel

    model = CopyModel("constant", 1000.0)
    ch = SerialChannel(model, 1000, lambda k: None, log=True) if serial else \
        CopyChannels(simpy.Environment(), model, 1000, lambda k: None, log=True)
    ch.submit(9, 0)
    ch.advance(0.5)  # 9 is copying
    ch.submit(1, 1)
    ch.submit(2, 1)
    assert ch.cancel(1)
    ch.submit(1, 1)
    ch.advance(10.0)
    assert [r.key for r in ch.records] == [9, 2, 1]

