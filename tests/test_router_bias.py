"""Cache-biased routing on the reference model: off by default (bias 0 is the model itself), and its effect on
hit rate and on the model's output is measured, not assumed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT

from executor.router_bias import BiasedRouting, main, measure, sequences_of
from traces import read_trace

MODEL = ROOT / "data" / "reference-moe" / "model"
TEST = ROOT / "data" / "reference-moe" / "test.parquet"


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


def test_bias_trades_output_fidelity_for_hits(model):
    rows = measure(model, sequences_of(read_trace(TEST), 300), [0.0, 1.0, 4.0], slots=3)
    zero, one, four = rows
    assert zero["token_agreement"] == 1.0 and zero["perplexity"] == zero["perplexity_unbiased"]
    assert zero["hit_rate"] < one["hit_rate"] < four["hit_rate"]
    assert four["token_agreement"] < 0.97 and four["perplexity"] > four["perplexity_unbiased"]


def test_one_forward_equals_token_by_token(model):
    ids = sequences_of(read_trace(TEST), 40)[0]
    with torch.no_grad():
        with BiasedRouting(model, 2.0, 3) as br:
            full = model(input_ids=torch.tensor([ids])).logits[0]
            full_hits = br.hit_rate()
        rows, pkv = [], None
        with BiasedRouting(model, 2.0, 3) as br:
            for t in ids:
                out = model(input_ids=torch.tensor([[t]]), past_key_values=pkv, use_cache=True)
                pkv = out.past_key_values
                rows.append(out.logits[0, -1])
            step_hits = br.hit_rate()
    assert step_hits == full_hits
    torch.testing.assert_close(torch.stack(rows), full, atol=1e-4, rtol=1e-4)
    # leaving the context restores the model's own router
    assert "forward" not in vars(br.routers[0])


def test_cli_writes_results_and_rejects_bad_model(tmp_path, capsys):
    assert main(["--model", str(MODEL), "--trace", str(TEST), "--max-tokens", "120", "--bias", "0,2",
                 "--slots", "2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "router_bias.json").read_text())
    assert [r["bias"] for r in doc["rows"]] == [0.0, 2.0]
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "nope"), "--trace", str(TEST)]) == 2
    assert capsys.readouterr().err == f"error: --model {tmp_path / 'nope'}: not a model directory\n"


@pytest.mark.parametrize("args, msg", [
    (["--trace", "/nonexist.parquet"], "error: /nonexist.parquet: no such trace file"),
    (["--bias", "0,x"], "error: --bias: 'x' is not a finite number; expected a comma list of numbers"),
    (["--bias", "0,nan"], "error: --bias: 'nan' is not a finite number"),
    (["--slots", "0"], "error: --slots: expected an integer >= 1, got 0"),
    (["--max-tokens", "1"], "error: --max-tokens: expected an integer >= 2"),
    (["--slots", "1"], "error: router-bias: --slots 1 is below the router's top-k 2"),  # after loading the model
])
def test_cli_bad_input_is_a_one_line_error(tmp_path, capsys, args, msg):
    argv = ["--model", str(MODEL), "--trace", str(TEST), "--max-tokens", "40", "--out", str(tmp_path / "o"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err  # the model's loading progress may come first
    assert err.splitlines()[-1].startswith(msg) and err.count("error") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_unsupported_settings_are_refused(model):
    with pytest.raises(ValueError, match="below the router's top-k"):
        BiasedRouting(model, 1.0, slots=1)
