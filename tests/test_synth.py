"""Synthetic trace generator (traces.synth): validity, determinism, knob directions, calibration."""

from __future__ import annotations

import numpy as np
import pytest

from traces import read_trace, write_trace
from traces.__main__ import main
from traces.calibration import TARGETS, calibration_config, measure
from traces.presets import MODEL_PRESETS
from traces.schema import TraceError
from traces.stats import adjacent_overlap, popularity
from traces.synth import SYNTH_PRESETS, SynthConfig, generate, preset_config


def small(**kw) -> SynthConfig:
    base = dict(num_layers=4, num_experts=16, top_k=4, tokens=600, sequences=3, seed=0)
    return SynthConfig(**{**base, **kw})


def test_same_seed_identical_different_seed_differs():
    a, b = generate(small(seed=7, skew=0.5, locality=0.4, cross_layer=1.0, drift=1.0)), generate(
        small(seed=7, skew=0.5, locality=0.4, cross_layer=1.0, drift=1.0)
    )
    for name in ("experts", "weights", "seq_id", "position"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    c = generate(small(seed=8, skew=0.5, locality=0.4, cross_layer=1.0, drift=1.0))
    assert (a.experts != c.experts).mean() > 0.3


def test_trace_is_valid_and_round_trips(tmp_path):
    cfg = small(skew=[0.0, 0.5, 1.0, 2.0], locality=0.9, cross_layer=3.0, tokens=301, sequences=4)
    tr = generate(cfg)
    assert tr.experts.shape == (301, 4, 4)
    srt = np.sort(tr.experts, axis=2)
    assert (srt[..., 1:] != srt[..., :-1]).all() and tr.experts.min() >= 0 and tr.experts.max() < 16
    np.testing.assert_allclose(tr.weights.sum(axis=2), 1.0, rtol=1e-5)
    assert (np.diff(tr.weights, axis=2) <= 1e-7).all()  # rank order: descending gate weight
    assert np.bincount(tr.seq_id).tolist() == [76, 75, 75, 75]
    assert (tr.position[tr.seq_id == 1] == np.arange(75)).all()
    back = read_trace(write_trace(tr, tmp_path / "s.parquet"))
    np.testing.assert_array_equal(back.experts, tr.experts)
    assert back.meta.extra["synth"]["cross_layer"] == 3.0


def test_every_preset_generates_a_valid_trace(tmp_path):
    assert set(SYNTH_PRESETS) == set(MODEL_PRESETS)
    for name, shape in MODEL_PRESETS.items():
        tr = generate(preset_config(name, tokens=50, sequences=2))
        assert tr.experts.shape == (50, shape.num_layers, shape.top_k)
        assert tr.meta.expert_bytes == shape.expert_bytes and tr.meta.model == name
        write_trace(tr, tmp_path / f"{name}.parquet")


def test_locality_raises_overlap():
    overlaps = [adjacent_overlap(generate(small(locality=p))).mean() for p in (0.0, 0.4, 0.8)]
    assert overlaps[0] < overlaps[1] < overlaps[2]
    assert overlaps[0] == pytest.approx(4 / 16, abs=0.04)  # independent tokens: k/E
    assert adjacent_overlap(generate(small(locality=1.0, cross_layer=0.0))).mean() == pytest.approx(1.0)


def test_skew_raises_max_share():
    shares = [popularity(generate(small(skew=s)))[0].mean() for s in (0.0, 0.7, 1.5)]
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] < 1.3  # uniform popularity: max share near the uniform share


def test_cross_layer_raises_predictability():
    from traces.stats import cross_layer_recall

    recalls = [cross_layer_recall(generate(small(cross_layer=b)))[0].mean() for b in (0.0, 1.5, 4.0)]
    assert recalls[0] < recalls[1] < recalls[2]


def test_bad_config_is_rejected():
    with pytest.raises(TraceError, match="locality"):
        generate(small(locality=1.5))
    with pytest.raises(TraceError, match="skew"):
        generate(small(skew=[0.1, 0.2]))
    with pytest.raises(TraceError, match="top_k"):
        generate(small(top_k=17))


def test_cli_preset_with_overrides(tmp_path, capsys):
    out = tmp_path / "q.parquet"
    argv = ["synth", "--preset", "qwen3-30b-a3b", "--tokens", "40", "--sequences", "2", "--seed", "3",
            "--layers", "5", "--locality", "0.3", "-o", str(out)]
    assert main(argv) == 0
    tr = read_trace(out)
    assert tr.experts.shape == (40, 5, 8) and tr.meta.num_experts == [128] * 5
    assert tr.meta.extra["synth"]["locality"] == 0.3 and tr.meta.extra["synth"]["seed"] == 3
    assert main(argv[:-1] + [str(tmp_path / "q2.parquet")]) == 0
    np.testing.assert_array_equal(read_trace(tmp_path / "q2.parquet").experts, tr.experts)


def test_mixtral_preset_matches_published_statistics():
    t = TARGETS["mixtral-8x7b"]
    stats = measure(generate(calibration_config("mixtral-8x7b", tokens=3000, seed=1)), t["capacities"])
    assert abs(stats["overlap"] - t["overlap"]) <= 5.0  # 0.05 of 0.376
    np.testing.assert_allclose(stats["lru"], t["lru"], atol=5.0)
    np.testing.assert_allclose(stats["belady"], t["belady"], atol=5.0)
    assert 1.08 <= stats["max_over_uniform"] <= 1.78


def test_qwen3_preset_matches_published_statistics():
    t = TARGETS["qwen3-30b-a3b"]
    stats = measure(generate(calibration_config("qwen3-30b-a3b", seed=1)), t["capacities"], True)
    np.testing.assert_allclose(stats["lru"], t["lru"], atol=5.0)
    np.testing.assert_allclose(stats["belady"], t["belady"], atol=5.0)
    assert abs(stats["overlap"] - t["overlap"]) <= 5.0
    assert 54.0 <= stats["top16_share"] <= 62.0
