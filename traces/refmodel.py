"""``python -m traces train-ref``: train the project's small reference MoE and record its routing.

Why: learned predictors (pre-gating, ExpertFlow's) need real routing *with hidden states*, which the imported
real traces lack, and model hubs are out of reach. So we train a small Mixtral-style MoE language model on a
corpus every machine has, the Python standard library's own source files, deterministically from a seed, and
record its routing on held-out text with the collector.

Corpus: the stdlib's ``*.py`` files in sorted order (test suites and site-packages excluded); every 5th file
is held out for the test split. Tokens: UTF-8 bytes (``traces.collect.byte_tokens``). Artifacts (in
``data/reference-moe/`` by default): ``model/`` (config + safetensors, bf16), ``train.parquet`` and
``test.parquet`` with hidden-state sidecars (float16), ``training.json`` (settings and loss curve).
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cli import plain
from .collect import byte_tokens, collect
from .io import atomic_dir, atomic_path

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RefConfig:
    layers: int = 6  # MoE layers
    hidden: int = 128  # model width
    intermediate: int = 128  # expert FFN width
    experts: int = 8  # routed experts per layer
    top_k: int = 2  # experts per token
    heads: int = 4  # attention heads (2 KV heads)
    seq_len: int = 128  # training context in bytes
    batch: int = 16  # sequences per step
    steps: int = 1500  # optimizer steps (the shipped model: about 6 minutes on 2 cores)
    lr: float = 3e-3  # AdamW peak learning rate (cosine decay, 50 warm-up steps)
    seed: int = 0  # every random choice: data order, init
    prompt_bytes: int = 96  # length of each collection prompt
    new_tokens: int = 16  # greedy tokens generated per prompt
    train_prompts: int = 48  # prompts recorded for the train split
    test_prompts: int = 16  # prompts recorded for the test split
    max_files: int = 400  # corpus files read (sorted), enough text for minutes of training


def corpus_files(max_files: int) -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts
                   and "idlelib" not in p.parts)[:max_files]
    if len(files) < 10:
        raise FileNotFoundError(f"{root}: too few Python source files for a corpus ({len(files)})")
    return [f for i, f in enumerate(files) if i % 5], [f for i, f in enumerate(files) if i % 5 == 0]


def load_bytes(files: list[Path]) -> np.ndarray:
    data = b"\n".join(f.read_bytes() for f in files)
    return np.array(byte_tokens([data.decode("utf-8", "replace")], 256)[0], dtype=np.int64)


def build_model(cfg: RefConfig):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(cfg.seed)
    mc = MixtralConfig(vocab_size=256, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=2,
                       num_local_experts=cfg.experts, num_experts_per_tok=cfg.top_k, max_position_embeddings=512,
                       pad_token_id=0, eos_token_id=None, bos_token_id=None, tie_word_embeddings=True,
                       output_router_logits=True, router_aux_loss_coef=0.01)
    return MixtralForCausalLM(mc)


def train(cfg: RefConfig, log_every: int = 50) -> tuple[object, list[float]]:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(2)
    train_files, _ = corpus_files(cfg.max_files)
    data = torch.from_numpy(load_bytes(train_files))
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * min(s, cfg.steps) / cfg.steps)))
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in tqdm(range(cfg.steps), desc="training", unit="step"):
        start = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch,), generator=g)
        x = torch.stack([data[s:s + cfg.seq_len] for s in start.tolist()])
        out = model(input_ids=x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    return model.eval(), losses


def prompts_from(files: list[Path], n: int, length: int, seed: int) -> list[list[int]]:
    data = load_bytes(files)
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(len(data) - length, size=n, replace=False))
    return [data[s:s + length].tolist() for s in starts]


def recorded_model_path(model_dir: Path) -> str:
    """``model_dir`` as the traces' ``model_path``, in the form readers resolve it (relative paths against the
    project root, see ``policies/predictors/pregate.py``): relative to the project root when inside it, so the
    shipped traces say ``data/reference-moe/model`` whatever the working directory; absolute otherwise."""
    path = Path(model_dir).resolve()
    try:
        return path.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def build_reference(cfg: RefConfig, out_dir: Path) -> dict:
    import torch

    t0 = time.perf_counter()
    model, losses = train(cfg)
    model_dir = out_dir / "model"
    with atomic_dir(model_dir) as tmp:  # an interrupted save must not leave a half-written checkpoint
        model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    model = model.to(torch.float32)
    train_files, test_files = corpus_files(cfg.max_files)
    rel = recorded_model_path(model_dir)
    stats = {}
    for split, files, n, seed in (("train", train_files, cfg.train_prompts, cfg.seed),
                                  ("test", test_files, cfg.test_prompts, cfg.seed + 1)):
        ids = prompts_from(files, n, cfg.prompt_bytes, seed)
        tr = collect(model, ids, out_dir / f"{split}.parquet", cfg.new_tokens, batch_size=8, hidden=True,
                     model_path=rel, hidden_dtype=np.float16)
        stats[split] = tr.num_tokens
    info = {"config": asdict(cfg), "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
            "loss_curve_every_25": losses[::25], "tokens": stats, "seconds": time.perf_counter() - t0}
    with atomic_path(out_dir / "training.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-ref", help="train the small reference MoE on stdlib source and record its routing",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=RefConfig.steps)
    p.add_argument("--seed", type=int, default=RefConfig.seed)
    p.add_argument("-o", "--out-dir", type=Path, default=Path("data/reference-moe"),
                   help="where model/, the traces and training.json go; the traces' model_path names this model/ "
                        "(relative to the project root when inside it)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    info = build_reference(RefConfig(steps=args.steps, seed=args.seed), args.out_dir)
    print(f"trained in {info['seconds']:.0f} s: loss {info['loss_first_50']:.3f} -> {info['loss_last_50']:.3f}; "
          f"recorded {info['tokens']} tokens into {args.out_dir}")
    return 0
