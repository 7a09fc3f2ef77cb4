"""Cache-biased routing, an explicit opt-in: add ``bias`` to the router logits of experts already resident, so
tokens prefer them. It raises the hit rate but changes the model's output; this module measures by how much.

``python -m executor router-bias --model data/reference-moe/model --trace data/reference-moe/test.parquet``
replays the trace's sequences through the model (teacher forcing), once unbiased and once per bias value.
One forward per sequence is exact: the residency of layer l only depends on earlier tokens' choices at layer
l, and causal attention keeps later tokens out of earlier ones, so the router handles a layer's rows in token
order. Residency is a per-layer LRU of ``--slots`` experts driven through the same
``policies.cache.ExpertCache`` the simulator uses (on-demand: a routed expert that is not resident is loaded).
Bias only changes *which* experts are chosen; the chosen experts' weights stay the model's own softmax
probabilities, renormalised over the top-k as the router does. Reported per bias: expert hit rate, next-token
perplexity, and agreement of the biased model's greedy (argmax) token with the unbiased one's.

Mixtral-style routers (``*TopKRouter`` with a ``weight`` and ``top_k``, softmax then top-k) are supported.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from policies.base import CacheContext
from policies.cache import ExpertCache, partitions_for
from policies.eviction.lru import LRU
from traces.cli import plain
from traces.io import atomic_path


class RouterBiasError(ValueError):
    """A setting or input router-bias cannot measure with; the CLI prints it on one line and exits with code 2."""


class BiasedRouting:
    """Replaces the forward of every router of ``model`` while active (a context manager)."""

    def __init__(self, model, bias: float, slots: int):
        import torch.nn.functional as F

        from traces.collect import find_routers

        self.routers = [r for _, r in find_routers(model)]
        for r in self.routers:
            if not (hasattr(r, "weight") and hasattr(r, "top_k")):
                raise RouterBiasError(f"router-bias: {type(r).__name__} is not a softmax-top-k router (needs .weight, .top_k)")
            if not getattr(r, "norm_topk_prob", True):  # we renormalise the top-k weights, as Mixtral's router does
                raise RouterBiasError(f"router-bias: {type(r).__name__} does not renormalise its top-k weights; not supported")
            if slots < r.top_k:
                raise RouterBiasError(f"router-bias: --slots {slots} is below the router's top-k {r.top_k}")
        self.bias, self._F = float(bias), F
        E = [int(r.weight.shape[0]) for r in self.routers]
        self.offsets = np.concatenate([[0], np.cumsum(E)[:-1]])
        self.cache = ExpertCache(LRU(), CacheContext(E, partitions_for(E, "per_layer"), [slots] * len(E)))
        self.now = 0

    def _forward(self, layer: int, router):
        import torch

        F, cache, off, L = self._F, self.cache, int(self.offsets[layer]), len(self.routers)

        def forward(hidden_states):
            h = hidden_states.reshape(-1, router.weight.shape[1])
            logits = F.linear(h, router.weight)
            probs = torch.softmax(logits.float(), dim=-1)
            out_w, out_i = [], []
            for row in range(h.shape[0]):  # tokens in order: each sees the residency the previous ones left
                now = (self.now + row) * L + layer
                resident = torch.tensor([cache.is_resident(off + e) for e in range(logits.shape[1])])
                score = logits[row].float() + self.bias * resident.float()
                idx = torch.topk(score, router.top_k).indices
                w = probs[row, idx]
                out_w.append(w / w.sum())
                out_i.append(idx)
                keys = [off + int(e) for e in idx]
                for k in keys:
                    if cache.use(k, now) == "miss":
                        cache.reserve(k, now, set(keys))
                        cache.complete(k)
            if layer == L - 1:
                self.now += h.shape[0]
            return logits, torch.stack(out_w).to(logits.dtype), torch.stack(out_i)

        return forward

    def __enter__(self):
        for layer, r in enumerate(self.routers):
            r.forward = self._forward(layer, r)
        return self

    def __exit__(self, *exc) -> None:
        for r in self.routers:
            del r.forward  # back to the class's forward

    def hit_rate(self) -> float:
        st = self.cache.stats
        return st.hits / max(1, st.hits + st.misses)


def teacher_forced_logits(model, ids: list[int]):
    """Next-token logits [len(ids), V] of the sequence ``ids`` (one causal forward)."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()


def sequences_of(trace, max_tokens: int | None) -> list[list[int]]:
    seqs, n = [], 0
    for s in dict.fromkeys(trace.seq_id.tolist()):
        ids = [int(t) for t in trace.token_id[trace.seq_id == s]]
        if min(ids) < 0:
            raise RouterBiasError(f"router-bias: {trace.meta.model}: sequence {s} has no token ids")
        if max_tokens is not None and n + len(ids) > max_tokens:
            ids = ids[: max_tokens - n]
        if len(ids) > 1:
            seqs.append(ids)
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            break
    return seqs


def measure(model, seqs: list[list[int]], biases: list[float], slots: int) -> list[dict]:
    """One row per bias: hit rate, perplexity, greedy agreement with the unbiased model."""
    import torch

    def nll(logits: list) -> float:  # summed next-token negative log-likelihood over all sequences
        return sum(float(torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(ids[1:]), reduction="sum"))
                   for ids, lg in zip(seqs, logits))

    base = [teacher_forced_logits(model, ids) for ids in seqs]
    preds = sum(len(ids) - 1 for ids in seqs)
    tokens = sum(len(ids) for ids in seqs)
    base_ppl = float(np.exp(nll(base) / preds))
    rows = []
    for b in biases:
        with BiasedRouting(model, b, slots) as br:
            biased = [teacher_forced_logits(model, ids) for ids in seqs]
        agree = sum(int((lb.argmax(-1) == lg.argmax(-1)).sum()) for lb, lg in zip(biased, base))
        rows.append({"bias": b, "slots_per_layer": slots, "hit_rate": br.hit_rate(),
                     "perplexity": float(np.exp(nll(biased) / preds)), "perplexity_unbiased": base_ppl,
                     "token_agreement": agree / tokens, "tokens": tokens})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m executor router-bias", description=plain(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a local transformers MoE model directory")
    ap.add_argument("--trace", type=Path, required=True, help="a trace with token ids (its sequences are replayed)")
    ap.add_argument("--slots", type=int, default=4, help="resident experts per layer (LRU)")
    ap.add_argument("--bias", default="0,0.5,1,2,4", help="comma list of logit biases for resident experts")
    ap.add_argument("--max-tokens", type=int, default=None, help="replay at most this many tokens")
    ap.add_argument("--out", type=Path, help="write router_bias.json here")
    args = ap.parse_args(argv)
    from traces import TraceError

    try:
        return _run(args)
    except (RouterBiasError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def parse_biases(text: str) -> list[float]:
    out = []
    for b in text.split(","):
        try:
            out.append(float(b))
        except ValueError:
            out.append(math.nan)
        if not math.isfinite(out[-1]):
            raise RouterBiasError(f"--bias: {b.strip()!r} is not a finite number; expected a comma list of "
                                  "numbers, e.g. 0,0.5,1")
    return out


def _run(args: argparse.Namespace) -> int:
    """Every argument and the trace are checked before the model is loaded."""
    biases = parse_biases(args.bias)
    if args.slots < 1:
        raise RouterBiasError(f"--slots: expected an integer >= 1, got {args.slots}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise RouterBiasError(f"--max-tokens: expected an integer >= 2 (one prediction needs two tokens), got {args.max_tokens}")
    if not args.model.is_dir():
        raise RouterBiasError(f"--model {args.model}: not a model directory")
    from traces import read_trace

    seqs = sequences_of(read_trace(args.trace), args.max_tokens)
    if not seqs:
        raise RouterBiasError(f"--trace {args.trace}: no sequence of two or more tokens to replay")
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:  # no config / weights, or a model type transformers does not know
        raise RouterBiasError(f"--model {args.model}: cannot load it ({(str(exc).splitlines() or [type(exc).__name__])[0]})") from exc
    rows = measure(model, seqs, biases, args.slots)
    print(f"{'bias':>6} {'hit rate':>9} {'perplexity':>11} {'agreement':>10}")
    for r in rows:
        print(f"{r['bias']:>6g} {r['hit_rate']:>9.3f} {r['perplexity']:>11.3f} {r['token_agreement']:>10.3f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / "router_bias.json") as tmp:
            tmp.write_text(json.dumps({"model": str(args.model), "trace": str(args.trace), "rows": rows}, indent=2))
    return 0
