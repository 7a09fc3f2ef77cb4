"""``python -m traces collect``: record the routing of a Hugging Face MoE causal LM while it generates.

Routers are found generically: in transformers (5.x) every MoE block of the decoder-only MoE families calls
a router module (``*TopKRouter`` / ``*TopkRouter``) that returns ``(router_logits, top_k_weights,
top_k_indices)``; JetMoE's ``*TopKGating`` returns its choice sorted by expert (the dispatch order), from which
each token's top-k in rank order is put back exactly. JetMoE's mixture-of-attention routers (inside its
attention blocks) route attention heads, not MoE FFN experts, and are not recorded. A forward hook on each records, per token, the experts and gate weights exactly as the
router returned them (DeepSeek-V3's include its routed scaling factor), and the router's input, i.e. the
normed hidden state entering the MoE block (the sidecar, with ``--hidden-states``). Switch Transformers'
``*Top1Router`` returns a capacity-masked dispatch mask instead: we record its choice (the arg-max of its
logits) and the probability it scales the expert output by. Encoder-decoder models get two traces: the
decoder stack's in OUT (one token per generation step) and the encoder stack's in ``OUT.encoder.parquet`` (the
prompt tokens); ``layer_names`` say which stack each layer is in. Tested on tiny configs of mixtral,
qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3, olmoe, phimoe, gpt_oss, jetmoe and switch_transformers. A model
without such routers (a dense model) stops with an error naming its model type.

Prompts are processed in batches; each batch is written as a shard (``OUT.parquet.shards/``) as soon as it is
done, a rerun skips finished shards, and the shards are merged into OUT (atomically) at the end. The shard
directory's ``manifest.json`` records the run's inputs (model config and weights, prompts, generation
settings, batch size, dtype, device); a rerun whose inputs differ stops with an error naming them instead of
mixing shards of two runs. Once merged, the shards are deleted (the manifest last) and so are outputs of an
earlier run into the same OUT that this run does not write (a hidden-state sidecar, an encoder stack), so
nothing stale sits beside the new trace.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .cli import plain
from .io import read_trace, write_trace
from .schema import PHASE_DECODE, PHASE_PREFILL, Trace, TraceError, TraceMeta
from .shards import check_manifest, checkpoint_id, run_settings
from .sidecar import sidecar_path, write_hidden

TINY = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512,
            num_local_experts=8, num_experts=8, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=16,
            q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=2, topk_group=1,
            first_k_dense_replace=0, n_shared_experts=1, shared_expert_intermediate_size=32, pad_token_id=0,
            eos_token_id=None, bos_token_id=None, tie_word_embeddings=False)
TINY_OVERRIDES = {  # MLA models: rotary dims follow qk_rope_head_dim; no grouped KV heads
    "deepseek_v2": {"num_key_value_heads": 4},
    "deepseek_v3": {"head_dim": 8, "num_key_value_heads": 4},
    # fields JetMoE does not have, which model_meta would read: its experts are intermediate_size wide, and it
    # has no shared expert
    "jetmoe": {"moe_intermediate_size": None, "n_shared_experts": None, "shared_expert_intermediate_size": None},
}


TINY_SWITCH = dict(d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16, num_experts=8,
                   vocab_size=256, encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=1024,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)


def tiny_model(arch: str, seed: int = 0):
    """A randomly initialised tiny model of ``arch`` (a transformers model type), for tests and demos."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "switch_transformers":
        from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

        torch.manual_seed(seed)
        return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**TINY_SWITCH)).eval()
    try:
        cfg = AutoConfig.for_model(arch, **{**TINY, **TINY_OVERRIDES.get(arch, {})})
    except ValueError as exc:
        raise TraceError(f"--tiny-arch: unknown model type {arch!r} ({exc})") from exc
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


ROUTER_SUFFIXES = ("topkrouter", "top1router", "topkgating")


def find_routers(model) -> list[tuple[str, object]]:
    """The MoE FFN routers, in module order; routers inside attention blocks (JetMoE's mixture of attention
    heads) are not MoE FFN layers."""
    routers = [(n, m) for n, m in model.named_modules()
               if type(m).__name__.lower().endswith(ROUTER_SUFFIXES)
               and not any("attn" in part or "attention" in part for part in n.split("."))]
    if not routers:
        raise TraceError(f"no MoE router found in model type {model.config.model_type!r}: nothing to record")
    return routers


def router_choice(module, out) -> tuple:
    """(weights [N, k], indices [N, k]) from a router's output, whatever its family returns."""
    if type(module).__name__.endswith("Top1Router"):  # Switch: (dispatch mask, top probability, logits)
        logits = out[2].reshape(-1, out[2].shape[-1])
        return out[1].reshape(-1, 1), logits.argmax(-1, keepdim=True)
    if type(module).__name__.endswith("TopKGating"):
        return gating_choice(module, out)
    return out[1], out[2]


def gating_choice(module, out) -> tuple:
    """JetMoE's gating returns ``(index_sorted_experts, batch_index, batch_gates, expert_size, logits)``: the
    flat (token, rank) slots sorted by expert, their gates in that order, and how many slots each expert got.
    Scattering the experts and gates back to their slots gives each token's top-k in rank order."""
    import torch

    slots, _, gates, sizes, logits = out
    n, k = logits.shape[0], module.top_k
    experts = torch.repeat_interleave(torch.arange(len(sizes), device=slots.device),
                                      torch.as_tensor(sizes, device=slots.device))
    idx = torch.empty(n * k, dtype=torch.long, device=slots.device)
    w = torch.empty(n * k, dtype=gates.dtype, device=slots.device)
    idx[slots], w[slots] = experts, gates
    return w.view(n, k), idx.view(n, k)


def stacks(routers: list[tuple[str, object]]) -> dict[str, list[tuple[str, object]]]:
    """Routers grouped by stack: ``{"": all}`` for decoder-only models, else encoder / decoder."""
    groups: dict[str, list] = {}
    for name, r in routers:
        key = "encoder" if "encoder." in name else "decoder" if "decoder." in name else ""
        groups.setdefault(key, []).append((name, r))
    return groups


def expert_bytes_of(router_parent) -> int:
    experts = getattr(router_parent, "experts", None)
    if experts is None:  # JetMoE: every expert's matrices stacked in *ParallelExperts modules
        parts = [m for m in router_parent.children() if type(m).__name__.endswith("ParallelExperts")]
        return int(sum(p.numel() * p.element_size() for m in parts for p in m.parameters()) // parts[0].num_experts) if parts else 0
    if hasattr(experts, "values") or isinstance(experts, list) or type(experts).__name__ == "ModuleList":
        first = next(iter(experts.values() if hasattr(experts, "values") else experts))
        return int(sum(p.numel() * p.element_size() for p in first.parameters()))
    params = list(experts.parameters())
    n = getattr(experts, "num_experts", None) or params[0].shape[0]
    return int(sum(p.numel() * p.element_size() for p in params) // n)


def model_meta(model, routers, model_path: str) -> TraceMeta:
    c = model.config
    parent = model.get_submodule(routers[0][0].rsplit(".", 1)[0])
    num_experts = [int(getattr(r, "num_experts", 0) or r.weight.shape[0]) for _, r in routers]
    shared = int(getattr(c, "n_shared_experts", 0) or (1 if getattr(c, "shared_expert_intermediate_size", 0) else 0))
    return TraceMeta(
        model=str(getattr(c, "_name_or_path", "") or c.model_type), num_layers=len(routers), num_experts=num_experts,
        top_k=int(getattr(c, "num_experts_per_tok", 1)), expert_bytes=max(1, expert_bytes_of(parent)),
        hidden_size=int(c.hidden_size),
        intermediate_size=int(getattr(c, "moe_intermediate_size", 0) or getattr(c, "intermediate_size", 0)
                              or getattr(c, "d_ff", 0)),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), shared_experts=shared,
        model_path=model_path, source=f"collect:{c.model_type}", layer_names=[n for n, _ in routers],
    )


def read_prompts(path: Path) -> list[str]:
    if not path.exists():
        raise TraceError(f"--prompts: no such file {path}")
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}: line {n}: not valid JSON ({exc.msg})") from exc
            text = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise TraceError(f"{path}: line {n}: expected a string field 'prompt' or 'text'")
            prompts.append(text)
        else:
            prompts.append(line)
    if not prompts:
        raise TraceError(f"{path}: no prompts")
    return prompts


def byte_tokens(prompts: list[str], vocab: int) -> list[list[int]]:
    """Tokenizer for tiny random models: UTF-8 bytes folded into the vocabulary (0 is padding)."""
    return [[1 + b % (vocab - 1) for b in p.encode()] or [1] for p in prompts]


def collect_batch(model, routers, ids: list[list[int]], max_new_tokens: int, seq0: int, pad_id: int) -> dict:
    """Generate greedily for one batch (left padded); per stack, the routing rows and hidden states."""
    import torch

    B, P = len(ids), max(len(x) for x in ids)
    inp = torch.full((B, P), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P), dtype=torch.long)
    for b, x in enumerate(ids):
        inp[b, P - len(x):] = torch.tensor(x)
        mask[b, P - len(x):] = 1
    calls: dict[str, list] = {name: [] for name, _ in routers}

    def hook(name):
        def fn(module, args, out):
            w, idx = router_choice(module, out)
            calls[name].append((args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu(),
                                w.detach().float().cpu(), idx.detach().cpu()))
        return fn

    handles = [r.register_forward_hook(hook(name)) for name, r in routers]
    try:
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    finally:
        for h in handles:
            h.remove()
    result = {}
    for stack, group in stacks(routers).items():
        rows = []  # (seq, position, phase, token_id, call, row)
        n_calls = len(calls[group[0][0]])
        for b, x in enumerate(ids):
            if stack != "decoder":  # the prompt: one call over every (left-padded) position
                rows += [(seq0 + b, p, PHASE_PREFILL, x[p], 0, b * P + (P - len(x)) + p) for p in range(len(x))]
            if stack == "":  # decoder-only: each later call is one generated token fed back
                rows += [(seq0 + b, len(x) + s - 1, PHASE_DECODE, int(out[b, P + s - 1]), s, b) for s in range(1, n_calls)]
            elif stack == "decoder":  # seq2seq decoder: call s reads decoder input token s (start token first)
                rows += [(seq0 + b, s, PHASE_DECODE, int(out[b, s]), s, b) for s in range(n_calls)]
        names = [name for name, _ in group]
        def pick(i: int, names=names, rows=rows) -> np.ndarray:
            return np.stack([np.stack([calls[n][c][i][r].numpy() for n in names]) for *_, c, r in rows])

        result[stack] = (pick(2), pick(1), pick(0), np.array([r[:4] for r in rows], dtype=np.int64))
    return result


def stack_path(out: Path, stack: str) -> Path:
    """Where a stack's trace goes: OUT for the decoder (or the only stack), OUT.encoder.parquet for the encoder."""
    return out if stack in ("", "decoder") else out.with_name(out.name.removesuffix(".parquet") + f".{stack}.parquet")


def collect(model, prompts_ids: list[list[int]], out: Path, max_new_tokens: int, batch_size: int,
            hidden: bool, model_path: str = "", pad_id: int = 0, fail_after: int | None = None,
            hidden_dtype=np.float32, weights_id: str | None = None) -> Trace:
    """Record the routing of ``model`` on the prompts into ``out`` (shards first; resumable by a rerun with the
    same inputs). Returns the decoder's (or only) trace; an encoder stack's is written beside it.
    ``weights_id`` identifies the weights in the shards' manifest (default: a digest of the state dict)."""
    from tqdm import tqdm

    routers = find_routers(model)
    groups = stacks(routers)
    metas = {k: model_meta(model, g, model_path) for k, g in groups.items()}
    shard_dir = out.with_name(out.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(shard_dir, run_settings(model, prompts_ids, max_new_tokens, batch_size, hidden, hidden_dtype,
                                           model_path, pad_id, weights_id))
    batches = [list(range(i, min(i + batch_size, len(prompts_ids)))) for i in range(0, len(prompts_ids), batch_size)]
    shard = lambda n, stack: stack_path(shard_dir / f"shard-{n:05d}.parquet", stack)  # noqa: E731
    for n, batch in enumerate(tqdm(batches, desc="collecting", unit="batch")):
        if all(shard(n, k).exists() and (not hidden or sidecar_path(shard(n, k)).exists()) for k in groups):
            continue  # finished in an earlier run
        if fail_after is not None and n >= fail_after:
            raise RuntimeError(f"injected failure before shard {n}")
        got = collect_batch(model, routers, [prompts_ids[i] for i in batch], max_new_tokens, batch[0], pad_id)
        for stack, (ex, w, hid, cols) in got.items():
            tr = Trace(metas[stack], ex.astype(np.int16), w.astype(np.float32), cols[:, 0].astype(np.int32),
                       cols[:, 1].astype(np.int32), cols[:, 2].astype(np.int8), cols[:, 3].astype(np.int32))
            if hidden:
                write_hidden(shard(n, stack), hid, dtype=hidden_dtype)
            write_trace(tr, shard(n, stack))
    merged = {k: merge_shards([shard(n, k) for n in range(len(batches))], stack_path(out, k), hidden, hidden_dtype)
              for k in groups}
    stale = [sidecar_path(stack_path(out, k)) for k in groups if not hidden]
    if "encoder" not in groups:
        stale += [stack_path(out, "encoder"), sidecar_path(stack_path(out, "encoder"))]
    for f in stale:  # an earlier run's outputs this run does not replace
        f.unlink(missing_ok=True)
    # merged: nothing left to resume, so a rerun starts afresh; the manifest goes last, so an interrupted
    # deletion still leaves shards of a known run
    for f in sorted(shard_dir.iterdir(), key=lambda f: f.name == "manifest.json"):
        f.unlink()
    shard_dir.rmdir()
    return merged.get("", merged.get("decoder"))


def merge_shards(paths: list[Path], out: Path, hidden: bool, hidden_dtype=np.float32) -> Trace:
    parts = [read_trace(p) for p in paths]
    cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
    tr = Trace(parts[0].meta, cat("experts"), cat("weights"), cat("seq_id"), cat("position"), cat("phase"), cat("token_id"))
    if hidden:
        write_hidden(out, np.concatenate([p.hidden_states() for p in parts]), dtype=hidden_dtype)
    write_trace(tr, out)
    return read_trace(out)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("collect", help="record routing from a local HF MoE model while it generates",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="local path of a transformers MoE causal LM")
    src.add_argument("--tiny-arch", help="a tiny random model of this model type (e.g. mixtral), for tests/demos")
    p.add_argument("--prompts", type=Path, required=True, help=".txt (one per line) or .jsonl ('prompt' or 'text')")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--hidden-states", action="store_true", help="also write the MoE blocks' input hidden states")
    p.add_argument("--dtype", default="float32", help="model dtype when loading --model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    prompts = read_prompts(args.prompts)
    if args.model:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        if not args.model.exists():
            raise TraceError(f"--model: no such directory {args.model}")
        seq2seq = getattr(AutoConfig.from_pretrained(args.model), "is_encoder_decoder", False)
        cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
        model = cls.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        tok = AutoTokenizer.from_pretrained(args.model)
        ids = [tok(p)["input_ids"] for p in prompts]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        path, weights_id = str(args.model), checkpoint_id(args.model)
    else:
        model = tiny_model(args.tiny_arch, args.seed)
        ids, pad, path, weights_id = byte_tokens(prompts, model.config.vocab_size), 0, "", None

    tr = collect(model, ids, args.output, args.max_new_tokens, args.batch_size, args.hidden_states, path, pad,
                 weights_id=weights_id)
    print(f"wrote {args.output}: {tr.num_tokens} tokens of {len(prompts)} prompts, {tr.meta.num_layers} MoE layers, "
          f"top-{tr.meta.top_k} of {tr.meta.num_experts[0]} experts ({tr.meta.source})")
    return 0
