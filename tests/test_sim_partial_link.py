"""The partially shared copy link (``partial_link``, issue 5): hand-computed timelines of 1-3 overlapping copies
with latency, its two ends (pair_speedup 1 = the fully shared link, 2 = independent channels), the fit from a
profile, and bad values rejected."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import simpy
from conftest import ROOT, random_trace, write_profile
from hydra import compose, initialize_config_dir

from replay.channels import CopyChannels
from replay.hardware import CopyModel, HardwareConfigError, build_models
from sim.run import simulate
from traces import write_trace

META = random_trace(tokens=10, layers=2, experts=4, top_k=2, sequences=1, seed=0).meta
REL = 1e-12  # the timelines below are a few float operations each: they agree to rounding


def partial(channels: int, latency_s: float = 0.25, pair_speedup: float = 1.5) -> CopyModel:
    # 1000 bytes at 1000 B/s: a copy's transfer alone takes 1 s
    return CopyModel("partial_link", 1000.0, latency_s, channels, pair_speedup=pair_speedup)


def run(model: CopyModel, submits: list[tuple[float, int, int]], nbytes: int = 1000) -> dict[int, float]:
    """Submit (time_s, key, priority) in order through the driver API; key -> landing time."""
    env = simpy.Environment()
    landed: dict[int, float] = {}
    chan = CopyChannels(env, model, nbytes, lambda k: landed.__setitem__(k, env.now))
    for t, key, prio in submits:
        chan.advance(t)
        chan.submit(key, prio)
    while chan.busy():
        chan.wait_any()
    return landed


def test_link_speedup_extrapolation():
    m = partial(4, pair_speedup=1.5)
    assert [m.link_speedup(n) for n in (1, 2, 3, 4)] == [1.0, 1.5, 2.0, 2.5]
    assert [partial(4, pair_speedup=1.0).link_speedup(n) for n in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [partial(4, pair_speedup=2.0).link_speedup(n) for n in (1, 2, 3)] == [1.0, 2.0, 3.0]
    assert partial(4, pair_speedup=1.9).link_speedup(4) == pytest.approx(3.7)  # below the cap n


def test_one_copy_pays_latency_then_bytes():
    assert run(partial(2), [(0.0, 1, 0)]) == {1: pytest.approx(1.25, rel=REL)}


def test_two_copies_at_once_share_s2_after_their_latency():
    # both wait 0.25 s, then move 1000 B/s x 1.5 together: 750 B/s each, 1000 bytes in 4/3 s
    got = run(partial(2), [(0.0, 1, 0), (0.0, 2, 0)])
    assert got == {1: pytest.approx(0.25 + 4 / 3, rel=REL), 2: pytest.approx(0.25 + 4 / 3, rel=REL)}


def test_three_copies_at_once_use_the_extrapolated_s3():
    # s(3) = min(3, 1 + 0.5 x 2) = 2: 2000/3 B/s each, 1000 bytes in 1.5 s
    got = run(partial(3), [(0.0, k, 0) for k in (1, 2, 3)])
    assert got == {k: pytest.approx(1.75, rel=REL) for k in (1, 2, 3)}


def test_staggered_pair_latency_does_not_take_link_share():
    # copy 1 alone on the link 0.25-0.75 (500 bytes); copy 2, submitted at 0.5, pays its latency until 0.75
    # without slowing copy 1; then 750 B/s each: copy 1's last 500 bytes land at 0.75 + 2/3; copy 2 has 500
    # bytes by then and moves the rest alone at 1000 B/s
    got = run(partial(2), [(0.0, 1, 0), (0.5, 2, 0)])
    assert got == {1: pytest.approx(0.75 + 2 / 3, rel=REL), 2: pytest.approx(0.75 + 2 / 3 + 0.5, rel=REL)}


def test_three_staggered_copies():
    # 0.25-0.75: copy 1 alone (500 B moved); 0.75-1.25: copies 1, 2 at 750 B/s (375 B each); 1.25: copy 3
    # (submitted at 1.0) joins, three at 2000/3 B/s: copy 1's last 125 B take 0.1875 s; then two at 750 B/s:
    # copy 2's last 500 B take 2/3 s; copy 3's last 375 B alone take 0.375 s
    got = run(partial(3), [(0.0, 1, 0), (0.5, 2, 0), (1.0, 3, 0)])
    t1 = 1.25 + 0.1875
    assert got == {1: pytest.approx(t1, rel=REL), 2: pytest.approx(t1 + 2 / 3, rel=REL),
                   3: pytest.approx(t1 + 2 / 3 + 0.375, rel=REL)}


def test_a_third_copy_waits_for_a_free_channel():
    got = run(partial(2), [(0.0, 1, 0), (0.0, 2, 0), (0.0, 3, 0)])
    pair = 0.25 + 4 / 3
    assert got == {1: pytest.approx(pair, rel=REL), 2: pytest.approx(pair, rel=REL),
                   3: pytest.approx(pair + 1.25, rel=REL)}


def test_latency_is_not_shared_unlike_the_shared_link():
    # alone both models give latency + bytes / bandwidth; a pair on the shared link also splits the latency
    # (2 x (1000 + 250) bytes at 1000 B/s), on the partial link it is paid once, apart
    shared = CopyModel("shared_link", 1000.0, 0.25, 2)
    assert run(shared, [(0.0, 1, 0)]) == run(partial(2, pair_speedup=1.0), [(0.0, 1, 0)])
    assert run(shared, [(0.0, 1, 0), (0.0, 2, 0)]) == {1: pytest.approx(2.5), 2: pytest.approx(2.5)}
    assert run(partial(2, pair_speedup=1.0), [(0.0, 1, 0), (0.0, 2, 0)]) == {1: pytest.approx(2.25),
                                                                             2: pytest.approx(2.25)}


def workload(seed: int, n: int = 60) -> list[tuple[float, int, int]]:
    """Submissions at random (non-round) times with random priorities, some bursts of overlapping copies."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(0.6, n)) * (rng.random(n) > 0.3)
    return [(float(t), k, int(rng.integers(0, 3))) for k, t in enumerate(np.maximum.accumulate(times))]


@pytest.mark.parametrize("channels", [2, 3])
def test_pair_speedup_1_without_latency_is_the_shared_link_exactly(channels):
    for seed in range(3):
        sub = workload(seed)
        assert run(partial(channels, 0.0, 1.0), sub) == run(CopyModel("shared_link", 1000.0, 0.0, channels), sub)


@pytest.mark.parametrize("latency_s", [0.0, 0.25])
def test_pair_speedup_2_is_independent_channels(latency_s):
    for seed in range(3):
        sub = workload(seed)
        got = run(partial(3, latency_s, 2.0), sub)
        want = run(CopyModel("alpha_beta", 1000.0, latency_s, 3), sub)
        assert list(got) == list(want)  # same landing order
        assert got == {k: pytest.approx(t, rel=1e-9) for k, t in want.items()}


@pytest.mark.parametrize("bad", [0.9, 2.5, -1, float("nan"), "fast", True])
def test_bad_pair_speedup_is_rejected_naming_the_field(bad):
    with pytest.raises(HardwareConfigError, match="CopyModel.pair_speedup"):
        CopyModel("partial_link", 1e9, pair_speedup=bad)
    hw = {"bandwidth": {"sharing": "partial", "bandwidth_GBps": 1.0, "channels": 2, "pair_speedup": bad},
          "compute": {"source": "datasheet", "peak_TFLOPS": 10, "mem_GBps": 100}}
    with pytest.raises(HardwareConfigError, match="hardware.bandwidth.pair_speedup"):
        build_models(hw, META)


def test_partial_link_from_config():
    hw = {"bandwidth": {"sharing": "partial", "bandwidth_GBps": 2.0, "latency_s": 1e-5, "channels": 2,
                        "pair_speedup": 1.25}, "compute": {"source": "datasheet", "peak_TFLOPS": 10, "mem_GBps": 100}}
    copy, _ = build_models(hw, META)
    assert (copy.kind, copy.channels, copy.pair_speedup, copy.latency_s) == ("partial_link", 2, 1.25, 1e-5)
    hw["bandwidth"].pop("pair_speedup")
    assert build_models(hw, META)[0].pair_speedup == 1.0
    # the other models ignore it (they are fully shared or fully independent)
    hw["bandwidth"].update(sharing="independent", pair_speedup=1.25)
    assert build_models(hw, META)[0].pair_speedup == 1.0


def hw(path: Path, sharing: str) -> dict:
    return {"bandwidth": {"source": "profile", "sharing": sharing}, "compute": {"source": "profile"},
            "profile_path": str(path)}


def test_profile_fit_reproduces_alone_and_pair_exactly(tmp_path):
    alone, pair = 4e-4, 7.5e-4
    rep = {"pickup_s": 1e-4, "wake_s": 5e-5, "read_s": 6e-4, "read_alone_s": alone, "read_pair_s": pair,
           "pair_speedup": 2 * alone / pair}
    copy, _ = build_models(hw(write_profile(tmp_path, rep), "partial"), META)
    assert copy.kind == "partial_link" and copy.channels == 2 and copy.expert_bytes == 4096
    assert copy.latency_s == pytest.approx(1.5e-4) and copy.bandwidth_bytes_per_s == pytest.approx(4096 / alone)
    assert copy.pair_speedup == pytest.approx(2 * alone / pair)
    assert run(copy, [(0.0, 1, 0)], 4096) == {1: pytest.approx(1.5e-4 + alone, rel=1e-9)}
    assert run(copy, [(0.0, 1, 0), (0.0, 2, 0)], 4096) == {k: pytest.approx(1.5e-4 + pair, rel=1e-9) for k in (1, 2)}


def test_profile_fit_clamps_speedup_and_needs_the_pair(tmp_path):
    rep = {"pickup_s": 1e-4, "wake_s": 5e-5, "read_alone_s": 4e-4, "read_pair_s": 9e-4}
    for measured, used in ((0.89, 1.0), (2.3, 2.0), (1.2, 1.2)):
        copy, _ = build_models(hw(write_profile(tmp_path, {**rep, "pair_speedup": measured}), "partial"), META)
        assert copy.pair_speedup == used
    with pytest.raises(HardwareConfigError, match="sharing=partial needs copy.replay.pair_speedup"):
        build_models(hw(write_profile(tmp_path, None), "partial"), META)
    with pytest.raises(HardwareConfigError, match=re.escape(
            "hardware.bandwidth.sharing: expected auto|shared|partial|independent, got 'halfway'")):
        build_models(hw(write_profile(tmp_path, rep), "halfway"), META)


def test_partial_profile_runs_in_the_simulator_between_its_ends(tmp_path):
    """End to end (``python -m sim``): with no hand-off latency, pair_speedup 1 stalls exactly like the shared
    link, 2 like independent channels at the same copy time."""
    tr = random_trace(tokens=30, layers=3, experts=8, top_k=2, sequences=1, seed=3)
    t = write_trace(tr, tmp_path / "t.parquet")
    rep = {"pickup_s": 0.0, "wake_s": 0.0, "read_alone_s": 1e-3, "read_pair_s": 2e-3}

    def sim(speedup: float, sharing: str) -> dict:
        p = write_profile(tmp_path, {**rep, "pair_speedup": speedup})
        ov = [f"trace.path={t}", "hardware=profiled", f"hardware.profile_path={p}", "cache.fraction=0.5",
              f"hardware.bandwidth.sharing={sharing}"]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=ov)
        return simulate(cfg, tmp_path / f"{sharing}-{speedup}")

    low, high = sim(1.0, "partial"), sim(2.0, "partial")
    assert low["run"]["copy_model"] == "partial_link"
    assert low["stall_s"] == sim(1.0, "shared")["stall_s"]
    assert high["stall_s"] == pytest.approx(sim(2.0, "independent")["stall_s"], rel=1e-9)
    assert high["stall_s"] < low["stall_s"]
