"""``python -m executor model``: generate with a transformers MoE model whose routed experts are offloaded.

Every sparse MoE block is replaced by an offloaded one (``executor/model_mode.py``): the experts are packed into
one file on disk (``--store``, the executor's tier format, read with O_DIRECT by I/O threads), and only
``--slots-per-layer`` of each MoE layer's experts sit in RAM slots, chosen by the simulator's policy objects
(``--eviction``, ``--predictor``, ``--prefetch-distance``). Greedy generation; with ``--check`` the unmodified
model generates too (a copy is kept, so twice the memory) and the run fails (exit 1) unless the tokens are the
same and the logits over the whole generated sequence agree within ``--atol``.

``--backend cuda`` runs the model on the current CUDA device: the routed experts in pinned host memory,
``--slots-per-layer`` GPU slots per MoE layer, ``--io-threads`` copy streams ordered by the CUDA backend's copy
schedule (demand before prefetch), the compute waiting on each expert's copy event; ``--check`` then compares
with the unmodified model on the same GPU. Without a CUDA device it stops before any work (exit 2).

``--model`` is a local Hugging Face checkpoint directory (its tokenizer if it has one, else UTF-8 bytes as in
``traces collect``, as for ``data/reference-moe/model``) or a model type for a tiny random model (``mixtral``,
``qwen2_moe``, ``qwen3_moe``, ``olmoe``, ...; byte tokens). Writes ``OUT/results.json`` atomically: the run's
settings, the generated ids and text, the metrics (``hit_rate``, ``bytes_moved``, ``expert_requests``,
``stall_s``, ``total_s``, ``tokens_per_s``, loads, evictions, ...) and the check.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

from traces.cli import plain

EVICTIONS = {"lru": "policies.eviction.lru:LRU", "lfu": "policies.eviction.lfu:LFU",
             "lfru": "policies.eviction.lfru:LFRU"}
PREDICTORS = {"none": "policies.predictors.none:NoPredictor",
              "last_token": "policies.predictors.last_token:LastTokenPredictor"}
SCHEMA = "expertflow.model-mode/1"


def _new(spec: str):
    import importlib

    mod, _, cls = spec.partition(":")
    return getattr(importlib.import_module(mod), cls)()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m executor model", description=plain(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory, or a model type for a tiny random model")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (left padded)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--slots-per-layer", type=int, required=True,
                   help="RAM slots per MoE layer, 1 .. experts-1 (fewer than experts, so experts are evicted)")
    p.add_argument("--out", type=Path, required=True, help="output directory (results.json)")
    p.add_argument("--check", action="store_true", help="also run the unmodified model and compare (exit 1 if not equal)")
    p.add_argument("--atol", type=float, default=1e-4, help="logit tolerance of --check (default 1e-4)")
    p.add_argument("--eviction", choices=sorted(EVICTIONS), default="lru")
    p.add_argument("--predictor", choices=sorted(PREDICTORS), default="none")
    p.add_argument("--prefetch-distance", type=int, default=0, help="layers ahead to prefetch (0: on demand)")
    p.add_argument("--store", type=Path, help="packed expert file (default OUT/model.experts)")
    p.add_argument("--reuse-store", action="store_true", help="use an existing --store instead of writing it")
    p.add_argument("--backend", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: experts read from --store into RAM slots; cuda: pinned host memory -> GPU slots")
    p.add_argument("--io-threads", type=int, default=1, help="I/O threads (cpu) or copy streams (cuda)")
    p.add_argument("--odirect", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--dtype", default=None, help="dtype to load a checkpoint in (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0, help="seed of a tiny random model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads (default: torch's; 1 leaves a core to the I/O threads)")
    return p


def load(spec: str, dtype: str | None, seed: int):
    """(model, encode, decode) for a checkpoint directory or a tiny model type."""
    import torch

    from traces.collect import byte_tokens, tiny_model
    from traces.schema import TraceError

    def bytes_decode(ids: list[int]) -> str:
        return bytes((t - 1) % 256 for t in ids if t > 0).decode("utf-8", "replace")

    path = Path(spec)
    if not path.is_dir():
        try:
            model = tiny_model(spec, seed)
        except TraceError as exc:
            raise TraceError(f"--model {spec!r}: neither a checkpoint directory nor a model type transformers knows "
                             "(e.g. mixtral, qwen2_moe, qwen3_moe, olmoe)") from exc
        return model, lambda s: byte_tokens([s], model.config.vocab_size)[0], bytes_decode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return model, lambda s: byte_tokens([s], model.config.vocab_size)[0], bytes_decode
    return model, lambda s: tok(s)["input_ids"], lambda ids: tok.decode(ids, skip_special_tokens=True)


def generate(model, inp, mask, n: int, pad: int):
    import torch

    with torch.no_grad():
        return model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=pad)


def run(args: argparse.Namespace) -> int:
    import torch

    from executor.model_mode import offload_model
    from policies.horizons.fixed import FixedHorizon

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.backend == "cuda":  # stop before any work on a machine without a GPU
        from executor.cuda_backend import require_cuda

        require_cuda()
        device = torch.device("cuda", torch.cuda.current_device())
    model, encode, decode = load(args.model, args.dtype, args.seed)
    # inference needs no auxiliary router loss, and transformers' load-balancing loss fails on a padded batch
    # (several --prompt of different lengths); the logits do not depend on it
    model.config.output_router_logits = False
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = [encode(p) or [pad] for p in args.prompt]
    B, P = len(ids), max(len(x) for x in ids)
    inp, mask = torch.full((B, P), pad, dtype=torch.long), torch.zeros((B, P), dtype=torch.long)
    for b, x in enumerate(ids):
        inp[b, P - len(x):], mask[b, P - len(x):] = torch.tensor(x), 1
    ref = copy.deepcopy(model).to(device) if args.check else None
    store = args.store or args.out / "model.experts"
    store.parent.mkdir(parents=True, exist_ok=True)
    odirect = {"auto": None, "on": True, "off": False}[args.odirect]
    with offload_model(model, store, args.slots_per_layer, eviction=_new(EVICTIONS[args.eviction]),
                       predictor=_new(PREDICTORS[args.predictor]), horizon=FixedHorizon(args.prefetch_distance),
                       io_threads=args.io_threads, odirect=odirect, reuse_store=args.reuse_store,
                       backend=args.backend) as off:
        model.to(device)  # after the offload: the routed experts never go to the device whole
        inp, mask = inp.to(device), mask.to(device)
        t0 = time.perf_counter()
        out = generate(model, inp, mask, args.max_new_tokens, pad)
        total = time.perf_counter() - t0
        new = out[:, P:]
        metrics = off.metrics(total_s=total, new_tokens=int(new.numel()))
        check = None
        if ref is not None:
            t1 = time.perf_counter()
            want = generate(ref, inp, mask, args.max_new_tokens, pad)
            ref_s = time.perf_counter() - t1
            full_mask = torch.cat([mask, torch.ones_like(new)], dim=1)  # logits over the offloaded run's tokens
            with torch.no_grad():
                diff = (model(out, attention_mask=full_mask).logits.float()
                        - ref(out, attention_mask=full_mask).logits.float()).abs().max().item()
            same = want.shape == out.shape and bool(torch.equal(want, out))
            check = {"tokens_equal": same, "max_abs_logit_diff": diff, "atol": args.atol,
                     "passed": same and diff <= args.atol, "reference_total_s": ref_s}
    results = {
        "schema": SCHEMA,
        "run": {"driver": "executor-model", "model": args.model, "model_type": model.config.model_type,
                "dtype": str(next(model.parameters()).dtype).removeprefix("torch."), "prompts": args.prompt,
                "max_new_tokens": args.max_new_tokens, "eviction": args.eviction, "predictor": args.predictor,
                "prefetch_distance": args.prefetch_distance, "io_threads": args.io_threads, "store": str(store),
                "backend": args.backend},
        **metrics,
        "generated_ids": new.tolist(),
        "generated_text": [decode(row) for row in new.tolist()],
        "check": check,
    }
    from traces.io import atomic_path

    res_path = args.out / "results.json"
    with atomic_path(res_path) as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    hr = metrics["hit_rate"]
    print(f"{args.model}: {new.numel()} tokens, hit rate {hr:.3f}, {metrics['loads']} loads, "
          f"{metrics['evictions']} evictions, {metrics['bytes_moved'] / 2**20:.1f} MiB moved, "
          f"stall {metrics['stall_s']:.3f}s of {total:.3f}s -> {res_path}")
    if check is not None:
        print(f"check: tokens {'equal' if check['tokens_equal'] else 'DIFFER'}, max |logit diff| "
              f"{check['max_abs_logit_diff']:.3g} (atol {args.atol:g}): {'passed' if check['passed'] else 'FAILED'}")
        return 0 if check["passed"] else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from policies.base import PolicyConfigError
    from traces.schema import TraceError

    from .tier import TierError

    args = parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens: expected >= 1", file=sys.stderr)
        return 2
    try:
        return run(args)
    except (TierError, PolicyConfigError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
