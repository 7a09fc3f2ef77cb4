"""The runtime's block-scored prefetch path (PrefetchTable: ``predict_steps`` + ``top_scores_rows``) against the
per-observation path (``predict`` + ``top_scores``): the same choices row for row, and the same replay."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import ROOT, random_trace
from hydra import compose, initialize_config_dir

import sim.engine as engine
from policies.base import Observation, PredictorContext, top_scores, top_scores_rows
from policies.future import FutureIndex
from policies.predictors.oracle import OraclePredictor
from policies.predictors.transition import TransitionPredictor
from policies.runtime import PolicyRuntime
from replay.prepare import prepare
from traces import write_trace


@pytest.mark.parametrize("seed", range(6))
def test_top_scores_rows_equals_top_scores_row_by_row(seed):
    """Ties (scores rounded to a few levels), rows with fewer candidates than the limit, NaN rows, limits from
    0 to above the width, thresholds that cut inside the top: every row as ``top_scores`` gives it."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n, e = int(rng.integers(1, 30)), int(rng.integers(1, 20))
        scores = np.round(rng.random((n, e)) * rng.choice([3, 10, 1000]), 0) / 10
        if rng.random() < 0.3:
            scores[rng.integers(0, n)] = np.nan
        limit = int(rng.integers(0, e + 3))
        min_score = float(rng.choice([0.0, 0.05, 0.2, 0.5]))
        offset = int(rng.integers(0, 100))
        got = top_scores_rows(scores, limit, min_score, offset)
        want = [[offset + x for x in top_scores(row, limit, min_score)] for row in scores]
        assert got == want, (scores, limit, min_score)


@pytest.mark.parametrize("batch", [1, 3])
def test_transition_predict_steps_equals_predict(batch):
    """Row n of ``predict_steps`` is bit for bit ``predict`` of an observation with those experts, for every
    layer and distance, wrapping into the next step past the last layer, and past ``max_distance``."""
    tr = random_trace(tokens=200, layers=4, experts=8, top_k=2, sequences=4, seed=1)
    pred = TransitionPredictor(max_distance=2)
    pred.reset(PredictorContext(list(tr.meta.num_experts), 2, train=tr))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, tr.num_tokens, (25, batch))
    for layer in range(4):
        for ahead in (1, 2, 3, 5):
            rows = pred.predict_steps(layer, ahead, tr.experts[tokens, layer])
            for n in range(len(tokens)):
                obs = Observation(layer_step=layer, step=0, layer=layer, tokens=tokens[n],
                                  experts=tr.experts[tokens[n], layer], token_ids=np.full(batch, -1))
                assert np.array_equal(rows[n], pred.predict(obs, ahead)), (layer, ahead, n)


def test_oracle_predict_steps_equals_predict():
    """The oracle reads the layer-step: row n of ``predict_steps`` is ``predict`` at ``layer_steps[n]``,
    including targets past the end of the replay (zeros)."""
    rng = np.random.default_rng(3)
    L, E = 4, 8
    offsets = np.arange(L) * E
    needed = [np.unique(rng.integers(0, E, 3)) + offsets[i % L] for i in range(40)]  # 10 steps x 4 layers
    pred = OraclePredictor()
    pred.reset(PredictorContext([E] * L, 2, future=FutureIndex(needed), layer_offsets=offsets))
    for layer in range(L):
        steps = np.arange(10) * L + layer
        for ahead in (1, 2, 5):
            rows = pred.predict_steps(layer, ahead, np.zeros((10, 1, 2), dtype=np.int64), steps)
            for n, ls in enumerate(steps.tolist()):
                obs = Observation(layer_step=ls, step=ls // L, layer=layer, tokens=np.zeros(1, dtype=np.int64),
                                  experts=np.zeros((1, 2), dtype=np.int64), token_ids=np.full(1, -1))
                assert np.array_equal(rows[n], pred.predict(obs, ahead)), (layer, ahead, n)
    assert rows[-1].sum() == 0  # the last step's target lies past the end


@pytest.mark.parametrize("overrides", [
    ["horizon.distance=1", "batch_size=1", "predictor=transition"],
    ["horizon.distance=2", "batch_size=3", "predictor=transition"],
    ["horizon.distance=3", "batch_size=1", "cache=lfru", "predictor=transition"],
    ["horizon.distance=2", "batch_size=3", "cache=belady", "predictor=oracle"],
], ids=["d1-b1", "d2-b3", "d3-lfru", "oracle-d2-b3"])
def test_replay_with_the_table_equals_replay_with_observations(tmp_path, monkeypatch, overrides):
    """The whole replay with the table (what the simulator does) and with ``set_schedule`` turned off (every
    layer builds an Observation and calls ``predict``, as the executor's model mode does) is the same. (A model
    shape and a fast link, so that experts take time to compute and the link budget lets prefetches through.)"""
    tr = random_trace(tokens=160, layers=4, experts=8, top_k=2, sequences=4, seed=2)
    tr.meta = dataclasses.replace(tr.meta, hidden_size=1024, intermediate_size=512, expert_bytes=3 * 1024 * 512 * 2)
    path = write_trace(tr, tmp_path / "t.parquet")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"trace.path={path}", "trace.name=t", "hardware=t4", "cache.slots=3",
                                           "hardware.bandwidth.bandwidth_GBps=160", "cache.fraction=null", *overrides])
    out = []
    for table in (True, False):
        p = prepare(cfg)
        if not table:
            monkeypatch.setattr(PolicyRuntime, "set_schedule", lambda self, steps: None)
        r = engine.replay(p.steps, p.runtime, p.copy_model, p.compute, p.copy_bytes, p.meta.num_layers, uses=p.uses)
        out.append((r, p.runtime))
    (a, rta), (b, rtb) = out
    assert rta.prefetch_table is not None and rtb.prefetch_table is None
    assert type(rta.predictor).__name__ == ("OraclePredictor" if "predictor=oracle" in overrides else "TransitionPredictor")
    assert (a.total_s, a.stall_s, a.bytes_moved, a.copies) == (b.total_s, b.stall_s, b.bytes_moved, b.copies)
    assert rta.cache.stats == rtb.cache.stats and rta.prefetch_issued == rtb.prefetch_issued > 0
