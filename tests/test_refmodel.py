"""The reference MoE: the training script is deterministic, and the shipped artifacts load and agree."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT

from analysis.predictors import recall_table, summary
from traces import read_trace
from traces.refmodel import RefConfig, build_model, train

REF = ROOT / "data" / "reference-moe"


def test_training_is_deterministic_from_a_seed():
    cfg = RefConfig(layers=2, hidden=32, intermediate=32, experts=4, steps=3, batch=2, seq_len=32, max_files=20)
    _, a = train(cfg)
    _, b = train(cfg)
    assert a == b and all(np.isfinite(a))
    _, c = train(RefConfig(**{**cfg.__dict__, "seed": 1}))
    assert c != a


def test_shipped_artifacts_load_and_match_metadata():
    from transformers import MixtralForCausalLM

    info = json.loads((REF / "training.json").read_text())
    model = MixtralForCausalLM.from_pretrained(REF / "model")
    cfg = RefConfig(**info["config"])
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_model(cfg).parameters())
    assert 2e6 <= sum(p.numel() for p in model.parameters()) <= 10e6
    assert info["loss_last_50"] < info["loss_first_50"] - 1.0  # it learned something
    for split in ("train", "test"):
        tr = read_trace(REF / f"{split}.parquet")
        assert tr.meta.model_path == "data/reference-moe/model"
        assert (tr.meta.num_layers, tr.meta.num_experts[0], tr.meta.top_k) == (cfg.layers, cfg.experts, cfg.top_k)
        assert tr.num_tokens == info["tokens"][split]
        assert tr.hidden_states().shape == (tr.num_tokens, cfg.layers, cfg.hidden)
    # the recorded routing is the model's: recompute one layer's top-k on the (float16) recorded hidden states
    tr = read_trace(REF / "test.parquet")
    router = model.model.layers[2].mlp.gate.float()
    with torch.no_grad():
        _, _, idx = router(torch.from_numpy(np.asarray(tr.hidden_states()[:, 2], np.float32)))
    agree = (np.sort(idx.numpy(), 1) == np.sort(tr.experts[:, 2], 1)).all(1).mean()
    assert agree > 0.97  # float16 storage and bf16 weights flip a few near-ties


@pytest.fixture(scope="module")
def recall():
    return summary(recall_table(read_trace(REF / "test.parquet"), read_trace(REF / "train.parquet")))


def test_pregate_recall_pinned_and_above_chance(recall):
    """Golden: pre-gate recall@2 at distance 1 on the shipped test split (tolerance 0.02)."""
    assert recall.loc["pregate", 1] == pytest.approx(PREGATE_D1, abs=0.02)
    assert recall.loc["pregate", 1] > 2 / 8 + 0.3  # random: k/E
    assert set(recall.index) == {"routing_path", "hybrid", "pregate", "transition", "frequency", "last_token"}


def test_hybrid_beats_pregate_at_every_distance(recall):
    """ExpertFlow 2025's claim on our reference model: the corrected pre-gate is better at every distance
    (golden recall@2 at d=1 pinned, tolerance 0.02)."""
    assert recall.loc["hybrid", 1] == pytest.approx(HYBRID_D1, abs=0.02)
    for d in (1, 2, 3, 4):
        assert recall.loc["hybrid", d] > recall.loc["pregate", d] + 0.05
        assert recall.loc["hybrid", d] > max(recall.loc["transition", d], recall.loc["last_token", d])


def test_routing_path_predicts_from_token_ids_alone(recall):
    """ExpertFlow 2024's RPP: every layer's experts from the token ids, well above popularity-free chance (k/E)
    and within reach of pre-gating, which needs the hidden state (golden, tolerance 0.02)."""
    assert recall.loc["routing_path", 1] == pytest.approx(ROUTING_PATH_D1, abs=0.02)
    assert recall.loc["routing_path"].min() > 2 / 8 + 0.4


def test_hybrid_training_is_deterministic():
    from policies.base import Observation, PredictorContext
    from policies.predictors.hybrid import HybridPredictor

    train = read_trace(REF / "train.parquet")
    test = read_trace(REF / "test.parquet")
    outs = []
    for _ in range(2):
        p = HybridPredictor(max_distance=1, epochs=1)
        p.reset(PredictorContext(train.meta.num_experts, 2, train=train, model_path=train.meta.model_path))
        tok = np.arange(8)
        obs = Observation(0, 0, 0, tok, test.experts[tok, 0], test.token_id[tok], np.asarray(test.hidden_states()[tok, 0], np.float32))
        p.observe(obs)
        outs.append(p.predict(obs, 1))
    np.testing.assert_array_equal(outs[0], outs[1])
PREGATE_D1 = 0.779
HYBRID_D1 = 0.896
ROUTING_PATH_D1 = 0.776


TINY_REF = dict(layers=2, hidden=32, intermediate=32, experts=4, steps=2, batch=2, seq_len=32, max_files=20,
                train_prompts=2, test_prompts=2, prompt_bytes=16, new_tokens=2)


def test_train_ref_elsewhere_records_the_model_it_wrote(tmp_path):
    """`train-ref -o DIR`: the traces point at DIR/model (was always data/reference-moe/model, so the pregate
    predictor on them loaded the shipped model), and the checkpoint is swapped in whole."""
    from policies.predictors.pregate import load_router_weights
    from traces.refmodel import build_reference

    out = tmp_path / "ref"
    (out / "model").mkdir(parents=True)
    (out / "model" / "stale.txt").write_text("an earlier checkpoint")  # replaced as a whole, not written into
    build_reference(RefConfig(**TINY_REF), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(["model", "test.hidden.safetensors", "test.parquet",
                                                            "train.hidden.safetensors", "train.parquet", "training.json"])
    assert not (out / "model" / "stale.txt").exists()
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(out / "model")
    for split in ("train", "test"):
        meta = read_trace(out / f"{split}.parquet").meta
        assert meta.model_path == str((out / "model").resolve())
        routers = load_router_weights(meta.model_path, meta.num_layers)
        np.testing.assert_array_equal(routers[1], model.model.layers[1].mlp.gate.weight.float().detach().numpy())


def test_recorded_model_path_is_relative_to_the_project_inside_it(monkeypatch, tmp_path):
    from traces.refmodel import recorded_model_path

    monkeypatch.chdir(tmp_path)  # whatever the working directory
    assert recorded_model_path(REF / "model") == "data/reference-moe/model"
    assert recorded_model_path(tmp_path / "m") == str(tmp_path.resolve() / "m")


def test_atomic_dir_keeps_the_old_directory_on_failure(tmp_path):
    from traces.io import atomic_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "w").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_dir(target) as tmp:
        (tmp / "w").write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "w").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "w").read_text() == "new"


def test_atomic_dir_never_deletes_the_only_copy(tmp_path, monkeypatch):
    """If the swap and the put-back both fail, the old directory (moved aside) is the only copy: kept."""
    import os

    from traces.io import atomic_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "w").write_text("old")
    real_replace, calls = os.replace, []

    def flaky(src, dst):
        calls.append(1)
        if len(calls) > 1:  # the move aside works; the swap and the put-back fail
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="putting the old copy back; it is kept at .*\\.old") as err, atomic_dir(target) as tmp:
        (tmp / "w").write_text("new")
    (kept,) = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
    assert (kept / "w").read_text() == "old" and not target.exists() and str(kept) in str(err.value)
