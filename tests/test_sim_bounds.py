"""The perfect-foresight bounds: the fast paths (direct serial channel, resumed aggressive scan) give exactly
the plain implementations' stall."""

from __future__ import annotations

import pytest
from conftest import ROOT, random_trace
from hydra import compose, initialize_config_dir

from policies.ondemand import ondemand_replay
from replay.oracle import oracle_stall
from replay.prepare import prepare
from traces import write_trace


def bound_inputs(tmp_path, hw: str, batch: int, slots: int, seed: int = 5, experts: int = 8, scope: str = "per_layer"):
    """A prepared Belady run of a random trace, MIN's loads and compute orders, and the oracle's arguments."""
    path = write_trace(random_trace(tokens=80, layers=4, experts=experts, top_k=2, sequences=4, seed=seed),
                       tmp_path / f"t{seed}.parquet")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"trace.path={path}", "trace.name=t", f"hardware={hw}", f"cache.slots={slots}",
                                           "cache.fraction=null", "cache=belady", f"batch_size={batch}",
                                           f"cache.scope={scope}"])
    p = prepare(cfg)
    p.runtime.cache.load_log = []
    orders: list = []
    ondemand_replay(p.steps, p.runtime, orders)
    args = (p.steps, p.future, p.uses, p.partition_of, p.capacity, p.copy_model, p.compute, p.copy_bytes,
            p.meta.num_layers)
    return args, p.runtime.cache.load_log, orders


@pytest.mark.parametrize("hw", ["t4", "cpu-nvme", "h100-pcie5"])
@pytest.mark.parametrize("batch", [1, 3])
def test_oracle_bounds_on_the_direct_channel_equal_simpy(tmp_path, hw, batch):
    """The schedules run on the direct one-worker channel (copies submitted from inside a landing, as
    ``fetch_more`` does) and give exactly the SimPy channels' stall, both schedules."""
    args, min_loads, orders = bound_inputs(tmp_path, hw, batch, 3)
    for kw in ({"schedule": "aggressive"}, {"schedule": "conservative", "min_loads": min_loads, "orders": orders}):
        direct, simpy_ = oracle_stall(*args, **kw), oracle_stall(*args, **kw, simpy_channels=True)
        assert direct == simpy_ and direct > 0, kw["schedule"]


@pytest.mark.parametrize("hw", ["t4", "cpu-nvme"])
@pytest.mark.parametrize("batch,slots,experts", [(1, 2, 4), (1, 3, 4), (3, 2, 4), (1, 6, 16), (1, 15, 16)])
@pytest.mark.parametrize("seed", [5, 9])
def test_resumed_aggressive_scan_equals_the_full_rescan(tmp_path, hw, batch, slots, experts, seed):
    """The aggressive schedule resumes its scan where the last one stopped; rescanning the whole window from
    ``now`` every time gives the same stall. Few experts and slots make partitions block (every candidate
    victim needed first), many make long runs of resident keys to skip."""
    args, _, _ = bound_inputs(tmp_path, hw, batch, slots, seed, experts=experts)
    for window in (None, 3, 5):
        fast = oracle_stall(*args, schedule="aggressive", window=window)
        plain = oracle_stall(*args, schedule="aggressive", window=window, resume_scan=False)
        assert fast == plain and plain > 0


def plain_victim(self, part):
    """The rule spelled out: every candidate's next use, the farthest (ties to the highest key)."""
    cands = self.resident[part] - self.protected - self.inflight
    if not cands:
        return None
    nxt, after = self.future.next_use, self.now + 1
    return max(cands, key=lambda k: (nxt(k, after), k))


@pytest.mark.parametrize("scope", ["per_layer", "global"])
@pytest.mark.parametrize("batch,slots,experts", [(1, 2, 4), (3, 3, 4), (1, 6, 16)])
@pytest.mark.parametrize("seed", [5, 9])
def test_heap_victims_equal_the_plain_farthest_rule(tmp_path, monkeypatch, scope, batch, slots, experts, seed):
    """The bounds' victims come from a lazy heap of next uses; scanning every candidate gives the same stalls
    for both schedules (and MIN's loads, which use the same heap through the Belady policy)."""
    import replay.oracle as bounds

    if scope == "global":
        slots *= 4
    args, min_loads, orders = bound_inputs(tmp_path, "cpu-nvme", batch, slots, seed, experts=experts, scope=scope)
    kws = ({"schedule": "aggressive"}, {"schedule": "conservative", "min_loads": min_loads, "orders": orders})
    fast = [oracle_stall(*args, **kw) for kw in kws]
    monkeypatch.setattr(bounds._OracleState, "victim", plain_victim)
    assert [oracle_stall(*args, **kw) for kw in kws] == fast and min(fast) > 0


def test_a_sweeps_runs_share_their_bounds_through_the_cache(tmp_path, monkeypatch):
    """Two policies at the same trace, capacity and hardware share one cached bounds file and give exactly the
    bounds a fresh computation gives; a different capacity, or different code, gets its own; an unreadable
    file is recomputed; ``paths.bounds_dir=null`` caches nothing."""
    import json

    from test_sim import run_sim

    import replay.bounds_cache as bc
    import sim.kernel_bridge as kb
    import sim.run as sim_run

    computed = []  # one entry per fresh computation of the bounds, by the compiled path or the Python one
    for module, name in ((sim_run, "compute_bounds"), (kb, "compute_bounds_kernel")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda p, real=real: computed.append(1) or real(p))
    cache = tmp_path / "bounds"
    tr = random_trace(tokens=60, layers=3, experts=8, top_k=2, sequences=3, seed=2)
    keys = ("belady_hit_rate", "belady_misses_unique", "oracle_stall_s", "oracle_aggressive_stall_s",
            "oracle_conservative_stall_s")

    def run(*ov):
        res, _ = run_sim(tmp_path, [f"paths.bounds_dir={cache}", "cache.slots=3", "cache.fraction=null", *ov], tr)
        return {k: res[k] for k in keys}

    fresh = run("paths.bounds_dir=null", "cache=lru")
    assert not cache.exists() and len(computed) == 1
    assert run("cache=lru") == fresh and len(list(cache.glob("*.json"))) == 1 and len(computed) == 2
    assert run("cache=lfru", "predictor=transition") == fresh and len(list(cache.glob("*.json"))) == 1
    assert len(computed) == 2  # read from the cache, not computed again
    other = run("cache.slots=5")
    assert other != fresh and len(list(cache.glob("*.json"))) == 2 and len(computed) == 3
    (f,) = [f for f in cache.glob("*.json") if json.loads(f.read_text())["oracle_stall_s"] == fresh["oracle_stall_s"]]
    f.write_text(json.dumps({**json.loads(f.read_text()), "oracle_stall_s": 1234.5}))  # a planted value is what a run reports
    assert run("cache=lfu") == {**fresh, "oracle_stall_s": 1234.5} and len(computed) == 3
    f.write_text("{not json")
    assert run("cache=lru") == fresh and json.loads(f.read_text())["oracle_stall_s"] == fresh["oracle_stall_s"]
    assert len(computed) == 4
    monkeypatch.setattr(bc, "code_digest", lambda: "edited code")
    assert run("cache=lru") == fresh and len(list(cache.glob("*.json"))) == 3 and len(computed) == 5


def test_an_unwritable_bounds_cache_only_warns(tmp_path, caplog):
    from test_sim import run_sim

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    tr = random_trace(tokens=30, layers=2, experts=4, top_k=2, sequences=2, seed=1)
    ov = ["cache.slots=2", "cache.fraction=null"]
    res, _ = run_sim(tmp_path, [f"paths.bounds_dir={blocker / 'bounds'}", *ov], tr)
    fresh, _ = run_sim(tmp_path, ["paths.bounds_dir=null", *ov], tr)
    assert res["oracle_stall_s"] == fresh["oracle_stall_s"] and "cannot write" in caplog.text
