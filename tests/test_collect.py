"""The collector on tiny random models of every supported architecture: exact routing, resume, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from traces import TraceError, read_trace
from traces.collect import byte_tokens, collect, find_routers, tiny_model

ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "phimoe", "gpt_oss", "jetmoe"]
PROMPTS = ["def add(a, b):", "import numpy as np", "x = 1"]


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_is_what_the_router_computed(arch, tmp_path):
    model = tiny_model(arch, seed=1)
    ids = byte_tokens(PROMPTS, model.config.vocab_size)
    tr = collect(model, ids, tmp_path / "t.parquet", max_new_tokens=4, batch_size=2, hidden=True)
    # every prompt token (no padding) plus the 3 generated tokens fed back (the 4th is never an input)
    assert tr.num_tokens == sum(len(x) for x in ids) + 3 * len(ids)
    assert (tr.phase == 0).sum() == sum(len(x) for x in ids)
    assert tr.meta.num_layers == 2 and tr.meta.top_k == 2 and tr.meta.expert_bytes > 0
    if arch == "jetmoe":  # 2 MoE FFN layers (its attention routers are not recorded); 3 float32 64x128 matrices
        assert tr.meta.expert_bytes == 3 * 64 * 128 * 4 and tr.meta.shared_experts == 0
    np.testing.assert_array_equal(tr.token_id[tr.phase == 0], np.concatenate(ids))
    hidden = tr.hidden_states()
    for layer, (_, router) in enumerate(find_routers(model)):
        with torch.no_grad():
            h = torch.from_numpy(np.asarray(hidden[:, layer], dtype=np.float32))
            if arch == "jetmoe":  # its gating returns the choice in dispatch order: recompute it from the logits
                top, idx = router.layer(h).float().topk(router.top_k, dim=1)
                w = torch.softmax(top, dim=1)
            else:
                _, w, idx = router(h)
        np.testing.assert_array_equal(idx.numpy(), tr.experts[:, layer])
        np.testing.assert_allclose(w.float().numpy(), tr.weights[:, layer], rtol=1e-5, atol=1e-6)


def test_resume_after_interruption_gives_the_same_trace(tmp_path, monkeypatch):
    import traces.collect as tc

    model = tiny_model("mixtral", seed=2)
    ids = byte_tokens(PROMPTS + ["class Cache:", "return None"], model.config.vocab_size)
    whole = collect(model, ids, tmp_path / "whole.parquet", 3, batch_size=2, hidden=True)
    with pytest.raises(RuntimeError, match="injected failure"):
        collect(model, ids, tmp_path / "r.parquet", 3, batch_size=2, hidden=True, fail_after=1)
    assert not (tmp_path / "r.parquet").exists()
    shards = tmp_path / "r.parquet.shards"
    (done,) = shards.glob("shard-*.parquet")
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (done, tc.sidecar_path(done))}
    batches, seen = [], []  # the first prompt of every batch the resumed run generates; the finished shard then
    real_batch = tc.collect_batch

    def spy(*a):
        batches.append(a[4])
        seen.append({p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (done, tc.sidecar_path(done))})
        return real_batch(*a)

    monkeypatch.setattr(tc, "collect_batch", spy)
    resumed = collect(model, ids, tmp_path / "r.parquet", 3, batch_size=2, hidden=True)
    assert batches == [2, 4]  # the finished batch (prompts 0-1) is not generated again ...
    assert seen == [before, before]  # nor rewritten
    assert not shards.exists()  # merged: the shards are gone
    for name in ("experts", "weights", "seq_id", "position", "phase", "token_id"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(whole, name), err_msg=name)
    np.testing.assert_array_equal(read_trace(tmp_path / "r.parquet").hidden_states(), whole.hidden_states())


def test_model_without_moe_is_a_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64))
    with pytest.raises(TraceError, match="no MoE router found in model type 'llama'"):
        collect(model, [[1, 2, 3]], tmp_path / "x.parquet", 2, 1, False)
    assert not (tmp_path / "x.parquet").exists()


def test_switch_transformers_records_both_stacks(tmp_path):
    model = tiny_model("switch_transformers", seed=1)
    ids = byte_tokens(PROMPTS, model.config.vocab_size)
    dec = collect(model, ids, tmp_path / "sw.parquet", max_new_tokens=4, batch_size=2, hidden=True)
    enc = read_trace(tmp_path / "sw.encoder.parquet")
    assert enc.num_tokens == sum(len(x) for x in ids) and (enc.phase == 0).all()
    assert dec.num_tokens == 4 * len(ids) and (dec.phase == 1).all()  # start token + 3 generated fed back
    assert all(n.startswith("encoder.") for n in enc.meta.layer_names)
    assert all(n.startswith("decoder.") for n in dec.meta.layer_names) and dec.meta.top_k == 1
    for tr, prefix in ((enc, "encoder."), (dec, "decoder.")):
        routers = [r for n, r in find_routers(model) if n.startswith(prefix)]
        hidden = tr.hidden_states()
        for layer, router in enumerate(routers):
            with torch.no_grad():
                _, probs, logits = router(torch.from_numpy(np.asarray(hidden[:, layer], np.float32)))
            np.testing.assert_array_equal(logits.argmax(-1).numpy(), tr.experts[:, layer, 0])
            np.testing.assert_allclose(probs.reshape(-1).numpy(), tr.weights[:, layer, 0], rtol=1e-5)


def test_cli(tmp_path, capsys):
    from traces.__main__ import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello"}\n{"text": "world"}\n')
    assert main(["collect", "--tiny-arch", "olmoe", "--prompts", str(prompts), "--max-new-tokens", "2",
                 "-o", str(tmp_path / "o.parquet")]) == 0
    assert read_trace(tmp_path / "o.parquet").num_tokens == 5 + 5 + 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    assert main(["collect", "--tiny-arch", "olmoe", "--prompts", str(bad), "-o", str(tmp_path / "b.parquet")]) == 2
    assert "bad.jsonl: line 1: expected a string field" in capsys.readouterr().err


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(TraceError, match="--tiny-arch: unknown model type 'nosuchmoe'"):
        tiny_model("nosuchmoe")


def test_resume_refuses_shards_of_a_run_with_other_inputs(tmp_path):
    """A rerun into the same -o with other prompts, generation settings, batch size or model must not reuse an
    interrupted run's shards (they were skipped by number and merged into a trace of no single run); the same
    inputs resume it; once merged, the shards are gone and any rerun starts afresh."""
    model = tiny_model("mixtral", seed=2)
    ids = byte_tokens(PROMPTS, model.config.vocab_size)
    out = tmp_path / "c.parquet"
    whole = collect(model, ids[:2], tmp_path / "whole.parquet", 2, batch_size=1, hidden=False)
    with pytest.raises(RuntimeError, match="injected failure"):
        collect(model, ids[:2], out, 2, batch_size=1, hidden=False, fail_after=1)
    with pytest.raises(TraceError, match=r"c\.parquet\.shards: .*max_new_tokens \(was 2, now 4\); prompts \(was '2 prompts.*"
                                         r"now '3 prompts.*pick another -o, or delete .*c\.parquet\.shards"):
        collect(model, ids, out, 4, batch_size=1, hidden=False)
    with pytest.raises(TraceError, match=r"batch_size \(was 1, now 2\)"):
        collect(model, ids[:2], out, 2, batch_size=2, hidden=False)
    with pytest.raises(TraceError, match=r"other settings: model weights \(was 'sha256 "):
        collect(tiny_model("mixtral", seed=3), ids[:2], out, 2, batch_size=1, hidden=False)
    again = collect(model, ids[:2], out, 2, batch_size=1, hidden=False)  # the same inputs resume
    np.testing.assert_array_equal(again.experts, whole.experts)
    assert not (tmp_path / "c.parquet.shards").exists()
    other = collect(model, ids, out, 4, batch_size=1, hidden=False)  # after a finished run: a new one
    fresh = collect(model, ids, tmp_path / "fresh.parquet", 4, batch_size=1, hidden=False)
    np.testing.assert_array_equal(read_trace(out).experts, fresh.experts)
    assert other.num_tokens == fresh.num_tokens > whole.num_tokens


def test_a_rerun_leaves_no_stale_output_beside_the_new_trace(tmp_path):
    """A finished run's sidecar and encoder stack do not survive a rerun into the same -o that writes neither:
    a predictor would read another model's hidden states, or an encoder trace of another run."""
    from traces.sidecar import sidecar_path

    out = tmp_path / "o.parquet"
    sw = tiny_model("switch_transformers", seed=1)
    collect(sw, byte_tokens(PROMPTS, sw.config.vocab_size), out, 3, batch_size=2, hidden=True)
    assert (tmp_path / "o.encoder.parquet").exists() and sidecar_path(out).exists()
    mx = tiny_model("mixtral", seed=3)
    tr = collect(mx, byte_tokens(PROMPTS, mx.config.vocab_size), out, 2, batch_size=2, hidden=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.parquet"]
    assert not read_trace(out).has_hidden_states() and tr.meta.model == "mixtral"


def test_stopped_before_any_shard_starts_afresh(tmp_path):
    """Interrupted before its first shard (only the manifest written), a run leaves nothing to resume: a rerun
    with other settings is not refused."""
    model = tiny_model("mixtral", seed=2)
    ids = byte_tokens(PROMPTS, model.config.vocab_size)
    with pytest.raises(RuntimeError, match="injected failure"):
        collect(model, ids, tmp_path / "c.parquet", 2, batch_size=2, hidden=False, fail_after=0)
    assert [p.name for p in (tmp_path / "c.parquet.shards").iterdir()] == ["manifest.json"]
    tr = collect(model, ids, tmp_path / "c.parquet", 3, batch_size=2, hidden=False)
    np.testing.assert_array_equal(tr.experts, collect(model, ids, tmp_path / "f.parquet", 3, 2, False).experts)


def test_shards_without_a_manifest_are_not_resumed(tmp_path):
    model = tiny_model("mixtral", seed=2)
    ids = byte_tokens(PROMPTS, model.config.vocab_size)
    with pytest.raises(RuntimeError, match="injected failure"):
        collect(model, ids, tmp_path / "c.parquet", 2, batch_size=2, hidden=False, fail_after=1)
    (tmp_path / "c.parquet.shards" / "manifest.json").unlink()
    with pytest.raises(TraceError, match=r"shards without a manifest\.json .*delete .*c\.parquet\.shards"):
        collect(model, ids, tmp_path / "c.parquet", 2, batch_size=2, hidden=False)


def test_cli_rerun_with_other_settings_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import traces.collect as tc
    from traces.__main__ import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\nworld\n")
    args = ["collect", "--tiny-arch", "mixtral", "--prompts", str(prompts), "--batch-size", "1",
            "-o", str(tmp_path / "o.parquet")]
    real_batch, calls = tc.collect_batch, []

    def dies_on_the_second_batch(*a):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_batch(*a)

    monkeypatch.setattr(tc, "collect_batch", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--max-new-tokens", "2"])
    capsys.readouterr()
    assert main([*args, "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "max_new_tokens (was 2, now 3)" in err


def test_checkpoint_identity_follows_its_files(tmp_path):
    """`collect --model DIR` identifies the weights by the checkpoint's files (hashing tens of GB would take
    minutes): a rewritten checkpoint is another model."""
    import os

    from traces.shards import checkpoint_id

    tiny_model("mixtral", seed=1).save_pretrained(tmp_path / "m")
    first = checkpoint_id(tmp_path / "m")
    assert checkpoint_id(tmp_path / "m") == first
    weights = next((tmp_path / "m").glob("*.safetensors"))
    os.utime(weights, ns=(0, weights.stat().st_mtime_ns + 1))
    assert checkpoint_id(tmp_path / "m") != first
