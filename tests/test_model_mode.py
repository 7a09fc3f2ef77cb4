"""Model mode (``executor/model_mode.py``): a transformers MoE model with offloaded experts generates exactly what
the unmodified model generates, while the cache really loads and evicts; bad input fails with a clear error.

Tolerance: logits within atol 1e-4 (float32 for the tiny models, bfloat16 for the reference model). The
offloaded experts redo the arithmetic of the model's own experts implementation (same weights, same token
order, same accumulation dtype), so in practice the logits are bit-identical; the tolerance only leaves room
for a BLAS that blocks a matmul differently, and is far below what would change a greedy token here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import ROOT

from executor.model_cli import main as cli_main
from executor.model_cli import parser
from executor.model_mode import offload_model
from executor.model_store import OffloadError
from executor.tier import HEADER_BYTES, StoreLayout, TierError, write_store
from policies.base import PolicyConfigError
from traces.collect import tiny_model

ATOL = 1e-4
REF_MODEL = ROOT / "data" / "reference-moe" / "model"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small matmuls: one thread is as fast here and does not spin against the I/O thread on 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prompts(vocab: int = 256, batch: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(3))


def greedy(model, ids: torch.Tensor, n: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)


def assert_equivalent(model, tmp_path, slots: int, n: int = 16, batch: int = 2, **kw) -> dict:
    """Offload ``model`` (a copy stays unmodified), generate greedily with both, compare; returns the metrics."""
    ref = copy.deepcopy(model)
    ids = prompts(model.config.vocab_size, batch)
    with offload_model(model, tmp_path / "m.experts", slots, **kw) as off:
        assert not any("gate_up_proj" in name for name, _ in model.named_parameters()), "expert weights left in model"
        got = greedy(model, ids, n)
        want = greedy(ref, ids, n)
        assert torch.equal(got, want), f"generated tokens differ:\n{got}\n{want}"
        with torch.no_grad():
            a, b = model(got).logits.float(), ref(got).logits.float()
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        m = off.metrics(new_tokens=got.shape[0] * n)
    L, k = m["moe_layers"], model.config.num_experts_per_tok
    prompt_tokens = ids.numel() * 2  # the generation's prefill and the logits pass (full sequence)
    assert m["expert_requests"] == (prompt_tokens + ids.shape[0] * (n - 1) + got.shape[0] * n) * L * k
    assert m["loads"] > 0 and m["evictions"] > 0 and m["misses"] > 0 and m["hits"] > 0, m
    assert m["bytes_moved"] == m["copies"] * m["expert_bytes"] > 0
    assert m["hits"] + m["late_hits"] + m["misses"] == m["expert_requests"]
    assert 0 < m["hit_rate"] < 1 and m["stall_s"] >= 0 and m["tokens_per_s"] > 0
    return m


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_tiny_mixtral_generates_identically(tmp_path, impl):
    model = tiny_model("mixtral", seed=0)
    model.config._experts_implementation = impl
    assert_equivalent(model, tmp_path, slots=3)


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
def test_other_families(tmp_path, arch):
    """Qwen2-MoE (shared expert, top-k not renormalised) and OLMoE run through the same code."""
    assert_equivalent(tiny_model(arch, seed=1), tmp_path, slots=2, n=6)


def test_prefetching_policies_keep_equivalence(tmp_path):
    from policies.eviction.lfu import LFU
    from policies.horizons.fixed import FixedHorizon
    from policies.predictors.last_token import LastTokenPredictor

    # this test is about outputs staying identical while prefetches run, so none is held back: the tiny model
    # computes a layer faster than the disk reads an expert (the link budget would queue no prefetch), and the
    # last token's experts are often all resident and all predicted (admission would let none evict another)
    m = assert_equivalent(tiny_model("mixtral", seed=2), tmp_path, slots=4, n=8, eviction=LFU(),
                          predictor=LastTokenPredictor(), horizon=FixedHorizon(1), link_budget=False,
                          admission=False)
    assert m["prefetch_issued"] > 0


def test_reference_model_generates_identically(tmp_path):
    from transformers import AutoModelForCausalLM

    if not (REF_MODEL / "config.json").is_file():  # shipped in the repository: missing is a broken checkout
        pytest.fail(f"reference model expected at {REF_MODEL} (committed; `python -m traces train-ref` rebuilds it)")
    model = AutoModelForCausalLM.from_pretrained(REF_MODEL).eval()  # bf16, 6 layers, 8 experts top-2
    assert model.dtype == torch.bfloat16
    m = assert_equivalent(model, tmp_path, slots=4, batch=1)  # bf16 matmuls are slow on CPUs: one sequence
    assert m["moe_layers"] == 6


def test_bad_capacity_fails_before_writing(tmp_path):
    for slots in (0, 8):
        with pytest.raises(PolicyConfigError, match="out of range"):
            offload_model(tiny_model("mixtral"), tmp_path / "m.experts", slots)
    assert not (tmp_path / "m.experts").exists()


def test_missing_short_or_foreign_store(tmp_path):
    model = tiny_model("mixtral")
    with pytest.raises(TierError, match="no such expert file"):
        offload_model(model, tmp_path / "absent.experts", 3, reuse_store=True)
    path = tmp_path / "m.experts"
    offload_model(copy.deepcopy(model), path, 3).close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 4096)
    with pytest.raises(TierError, match="short file"):
        offload_model(model, path, 3, reuse_store=True)
    foreign = write_store(tmp_path / "f.experts", StoreLayout([8, 8], hidden=32, intermediate=128))
    with pytest.raises(OffloadError, match="'hidden' = 32"):
        offload_model(model, foreign, 3, reuse_store=True)
    assert "gate_up_proj" in dict(model.model.layers[0].mlp.experts.named_parameters())  # untouched on error


def test_read_failure_during_generation_is_raised(tmp_path):
    model = tiny_model("mixtral")
    path = tmp_path / "m.experts"
    with offload_model(model, path, 3, odirect=False) as _:
        with open(path, "r+b") as f:
            f.truncate(HEADER_BYTES)  # every expert read now comes back short
        with pytest.raises(TierError, match="returned 0 bytes"):
            greedy(model, prompts(), 2)


def test_dense_model_is_refused(tmp_path):
    with pytest.raises(OffloadError, match="no MoE router"):
        offload_model(tiny_model("llama"), tmp_path / "m.experts", 3)


def test_cli_check_and_results(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(["--model", "mixtral", "--prompt", "offload me", "--prompt", "hi", "--max-new-tokens", "5",
                   "--slots-per-layer", "3", "--out", str(out), "--check"])
    assert rc == 0, capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    for key in ("hit_rate", "bytes_moved", "expert_requests", "stall_s", "total_s", "tokens_per_s"):
        assert res[key] is not None, key
    assert res["check"]["passed"] and res["check"]["tokens_equal"] and res["check"]["atol"] == ATOL
    assert res["loads"] > 0 and res["evictions"] > 0 and len(res["generated_ids"]) == 2
    assert not list(out.glob(".results.json.*"))  # written atomically, no temp left
    rc = cli_main(["--model", "mixtral", "--prompt", "x", "--slots-per-layer", "0", "--out", str(tmp_path / "bad")])
    assert rc == 2 and "cache capacity" in capsys.readouterr().err
    text = parser().format_help()
    assert "--slots-per-layer" in text and "--check" in text and "results.json" in text


def test_cli_batch_of_prompts_on_the_reference_model(tmp_path, capsys):
    """Prompts of different lengths (a left-padded batch) on a checkpoint whose config asks for router logits:
    transformers' auxiliary load-balancing loss fails on a padded batch, and inference does not need it."""
    out = tmp_path / "run"
    rc = cli_main(["--model", str(REF_MODEL), "--prompt", "def main():", "--prompt", "import torch as t", "--max-new-tokens",
                   "2", "--slots-per-layer", "4", "--out", str(out), "--check"])
    assert rc == 0, capsys.readouterr()
    res = json.loads((out / "results.json").read_text())
    assert res["check"]["passed"] and len(res["generated_ids"]) == 2
