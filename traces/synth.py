"""Synthetic routing traces with tunable popularity skew, temporal locality and cross-layer correlation.

``python -m traces synth --preset NAME --tokens N --sequences S --seed K -o OUT.parquet``

Model (per layer ``l``, token ``t``): every expert gets a score

    score[t, l, e] = -skew_l * log(1 + rank_l(e))        # Zipf popularity, rank_l a random permutation
                     + G[t, l, e]                          # "sticky" Gumbel noise
                     + cross_layer * [e in pi_l(S[t, l-1])]  # bonus for the images of layer l-1's experts

and the token takes the ``top_k`` highest scores, in score order (Gumbel-top-k: without the other terms
this samples k distinct experts from the Zipf popularity). The noise of each (layer, expert) is redrawn
with probability ``1 - locality_l`` at each token and otherwise carried over from the previous token of
the same sequence, so ``locality`` is the probability that an expert's preference persists to the next
token: 0 gives independent tokens, 1 repeats the previous token's experts. ``pi_l`` is a fixed random
permutation per layer, so layer l's experts make specific layer-(l+1) experts likely (cross-layer
structure that a predictor can learn by id). Gate weights are the softmax of the chosen scores.

Vectorised over tokens: the carried-over noise is a forward fill, so the only Python loop is over layers
(each layer needs the previous layer's choices). Model presets live in :data:`SYNTH_PRESETS`; each says in
its ``source`` (copied into the trace's metadata) whose routing statistics its knobs were fitted to.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import write_trace
from .presets import MODEL_PRESETS, get_preset
from .schema import PHASE_DECODE, Trace, TraceError


@dataclass
class SynthConfig:
    """Knobs of the generator. Scalars apply to every layer; a list gives one value per layer."""

    model: str = "synthetic"  # model name written into the trace metadata (a preset name fills the shape)
    num_layers: int = 4  # MoE layers
    num_experts: int = 8  # routed experts per layer
    top_k: int = 2  # experts chosen per token per layer
    tokens: int = 1000  # total tokens over all sequences
    sequences: int = 1  # number of sequences; tokens are split evenly (lengths differ by at most 1)
    seed: int = 0  # seed of every random draw; same seed -> identical trace
    skew: float | list[float] = 0.0  # Zipf exponent of the per-layer popularity (0 = uniform)
    locality: float | list[float] = 0.0  # probability an expert's noise persists to the next token (0..1)
    cross_layer: float = 0.0  # score bonus (logits) for pi_l(experts of layer l-1); 0 = layers independent
    drift: float | list[float] = 0.0  # std (logits) of a slowly drifting per-sequence popularity offset
    drift_locality: float = 0.98  # probability the drift offset of an expert persists to the next token
    expert_bytes: int = 1 << 20  # bytes of one expert (metadata only)
    hidden_size: int = 0  # model hidden size (metadata only)
    intermediate_size: int = 0  # expert FFN width (metadata only)
    shared_experts: int = 0  # always-active shared experts per layer (metadata only)
    source: str = "synthetic: knobs set by hand"  # the trace metadata's `source`: what the knobs were fitted to

    def per_layer(self, name: str) -> np.ndarray:
        """A knob as float [num_layers], checking list lengths."""
        value = getattr(self, name)
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
        if arr.size == 1:
            return np.full(self.num_layers, float(arr[0]))
        if arr.size != self.num_layers:
            raise TraceError(f"synth config: field '{name}' has {arr.size} values, expected 1 or {self.num_layers}")
        return arr

    def validate(self) -> None:
        def bad(fld: str, expected: str) -> TraceError:
            return TraceError(f"synth config: field '{fld}' = {getattr(self, fld)!r}, expected {expected}")

        if self.num_layers < 1:
            raise bad("num_layers", "a positive integer")
        if not 1 <= self.top_k <= self.num_experts:
            raise bad("top_k", f"an integer in 1..num_experts ({self.num_experts})")
        if self.num_experts > np.iinfo(np.int16).max:
            raise bad("num_experts", "at most 32767 (int16 ids)")
        if self.tokens < 1:
            raise bad("tokens", "a positive number of tokens")
        if not 1 <= self.sequences <= self.tokens:
            raise bad("sequences", f"1..tokens ({self.tokens}) with tokens >= 1")
        loc = self.per_layer("locality")
        if ((loc < 0) | (loc > 1)).any():
            raise bad("locality", "probabilities in [0, 1]")
        for name in ("skew", "drift"):
            if (self.per_layer(name) < 0).any():
                raise bad(name, "non-negative values")
        if not 0 <= self.drift_locality <= 1:
            raise bad("drift_locality", "a probability in [0, 1]")


def layer_profile(num_layers: int, anchors: dict[int, float]) -> list[float]:
    """One value per layer, linear between the anchor layers (where a knob was fitted) and constant beyond
    the first and last anchor."""
    at = sorted(anchors)
    return [round(float(v), 4) for v in np.interp(np.arange(num_layers), at, [anchors[a] for a in at])]


@dataclass(frozen=True)
class SynthPreset:
    """A model's synthetic routing: generator knobs and what they were fitted to."""

    knobs: dict  # SynthConfig fields: skew, locality, cross_layer, drift, drift_locality
    source: str  # the trace metadata's `source`: the shape's model and whose routing statistics the knobs match


# Knobs per model, found by traces.calibration (`python -m traces.calibration`: a coordinate search that
# minimises the squared error to the target statistics in calibration.TARGETS, each with its source, on a
# seed-0 trace of the size the targets were measured on). Values not searched say so. Only mixtral-8x7b,
# qwen3-30b-a3b and qwen1.5-moe-a2.7b are fitted to per-token statistics of their own model; the others borrow
# another model's knobs for what their model has no published data on, and their `source` says whose.
SYNTH_PRESETS: dict[str, SynthPreset] = {
    # Real Mixtral decode: overlap 0.376, LRU 49.6/61.2/71.3/80.9, Belady 60.5/73.9/82.9/89.4 at 3-6 of 8,
    # top expert 1.08-1.78x uniform share.
    # Search over (skew, locality) at cross_layer 1.0, which gives the in-sample cross-layer recall of the
    # real decode trace (0.44 synthetic vs 0.46 real, traces.stats.cross_layer_recall).
    "mixtral-8x7b": SynthPreset(
        dict(skew=0.35, locality=0.27, cross_layer=1.0),
        "synthetic: Mixtral-8x7B shape, fitted to real Mixtral-8x7B decode routing (speculative-moe traces: "
        "adjacent-token overlap, LRU/Belady hit rates, cross-layer recall)",
    ),
    # Qwen3-30B-A3B: overlap 0.427 (layer 0: 0.079), LRU 42.4/64.7/81.0/91.8, Belady 60.8/78.4/88.8/92.9
    # at 8/16/32/64 of 128, top-16 experts take 54-62% of selections; measured by moe-trace on 25 prompts
    # (3,225 tokens) with caches reset per prompt and an oracle that may drop current experts, so the search
    # used that setting (traces.calibration.TARGETS). The fit put almost all locality into the slow drift.
    # Layer 0 (overlap 0.079, random 0.0625) is set by hand, not searched: no drift or locality, skew 0.4
    # (measured overlap 0.08). cross_layer 1.0 is Mixtral's, not searched (no published cross-layer figure).
    "qwen3-30b-a3b": SynthPreset(
        dict(skew=[0.4] + [1.35] * 47, locality=[0.0] + [0.0125] * 47, cross_layer=1.0,
             drift=[0.0] + [1.5625] * 47, drift_locality=0.998),
        "synthetic: Qwen3-30B-A3B shape, fitted to published Qwen3-30B-A3B routing statistics (moe-trace: "
        "adjacent-token overlap, LRU/Belady hit rates, top-16 share); cross-layer bonus borrowed from Mixtral-8x7B",
    ),
    # No published per-token routing: the Qwen3-30B-A3B knobs (same class of fine-grained top-k routing).
    "deepseek-v2-lite": SynthPreset(
        dict(skew=[0.4] + [1.35] * 25, locality=[0.0] + [0.0125] * 25, cross_layer=1.0,
             drift=[0.0] + [1.5625] * 25, drift_locality=0.998),
        "synthetic: DeepSeek-V2-Lite shape, routing statistics borrowed from Qwen3-30B-A3B "
        "(no published DeepSeek-V2-Lite traces)",
    ),
    # Real Qwen1.5-MoE-A2.7B decode (vLLM, 25 GSM8K questions, issue 19; TARGETS has the figures): overlap
    # 8.3-13.2% per layer (random 6.7%), top expert 1.47-2.09x uniform, LRU 18.2/30.8/56.6/81.0 and LFU
    # 20.5/34.4/60.6/82.2 at 8/15/30/45 of 60. Searched: skew, drift, and locality at each measured layer
    # (0, 8, 12, 18, 23), interpolated linearly over the layers between them (layer_profile). cross_layer 1.0
    # and drift_locality 0.998 not searched (no cross-layer figure was measured).
    "qwen1.5-moe-a2.7b": SynthPreset(
        dict(skew=0.225, locality=layer_profile(24, {0: 0.0, 8: 0.075, 12: 0.05, 18: 0.05, 23: 0.075}),
             cross_layer=1.0, drift=0.4, drift_locality=0.998),
        "synthetic: Qwen1.5-MoE-A2.7B shape, fitted to real Qwen1.5-MoE-A2.7B decode routing (vLLM, 25 GSM8K "
        "questions, layers 0/8/12/18/23: adjacent-token overlap, popularity, LRU/LFU hit rates); cross-layer "
        "bonus borrowed from Mixtral-8x7B",
    ),
    # OLMoE counts: top expert 2.5-7.8x uniform, top 8 of 64 take 20-51% (skew fitted to those counts).
    # Locality and cross-layer borrowed from Mixtral (the one model with real per-token data); skew searched.
    "olmoe-1b-7b": SynthPreset(
        dict(skew=0.7, locality=0.27, cross_layer=1.0),
        "synthetic: OLMoE-1B-7B shape, popularity fitted to OLMoE-1B-7B expert counts; temporal locality and "
        "cross-layer bonus borrowed from Mixtral-8x7B (no usable per-token OLMoE-1B-7B traces: the one log at "
        "hand is layer 0 only, in batch order)",
    ),
    # Switch-base-128 counts: top expert 6-31x uniform (skew fitted to those counts); top-1 routing.
    "switch-base-128": SynthPreset(
        dict(skew=0.8, locality=0.27, cross_layer=1.0),
        "synthetic: Switch-base-128 shape, popularity fitted to Switch-base-128 expert counts; temporal locality "
        "and cross-layer bonus borrowed from Mixtral-8x7B (no published per-token Switch-base-128 traces)",
    ),
}
# Fields that change the routing statistics: overriding one makes a preset's trace no longer match its fit.
ROUTING_FIELDS = ("skew", "locality", "cross_layer", "drift", "drift_locality", "num_layers", "num_experts", "top_k")


def preset_config(name: str, **overrides) -> SynthConfig:
    """The config of a model preset (shape from traces.presets, knobs and source from SYNTH_PRESETS), with some
    fields overridden (None = keep); overriding a routing knob is recorded in the trace's source."""
    shape = get_preset(name)
    preset = SYNTH_PRESETS.get(name, SynthPreset({}, f"synthetic: {name} shape, default knobs (fitted to nothing)"))
    cfg = SynthConfig(
        model=shape.name,
        num_layers=shape.num_layers,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        expert_bytes=shape.expert_bytes,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        shared_experts=shape.shared_experts,
        source=preset.source,
        **preset.knobs,
    )
    overrides = {k: v for k, v in overrides.items() if v is not None}
    changed = sorted(k for k in overrides if k in ROUTING_FIELDS and overrides[k] != getattr(cfg, k))
    if changed:
        overrides.setdefault("source", f"{preset.source}; overridden: {', '.join(changed)} (no longer the fit)")
    return dataclasses.replace(cfg, **overrides)


def _sequence_starts(cfg: SynthConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """seq_id, position and a token-is-first-of-its-sequence mask, tokens split evenly over sequences."""
    lengths = np.full(cfg.sequences, cfg.tokens // cfg.sequences, dtype=np.int64)
    lengths[: cfg.tokens % cfg.sequences] += 1
    seq_id = np.repeat(np.arange(cfg.sequences, dtype=np.int32), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = (np.arange(cfg.tokens) - np.repeat(starts, lengths)).astype(np.int32)
    return seq_id, position, position == 0


def generate(cfg: SynthConfig) -> Trace:
    """Generate a trace from ``cfg``. Deterministic in ``cfg.seed``."""
    from .schema import TraceMeta

    cfg.validate()
    T, L, E, K = cfg.tokens, cfg.num_layers, cfg.num_experts, cfg.top_k
    skew, locality, drift = cfg.per_layer("skew"), cfg.per_layer("locality"), cfg.per_layer("drift")
    seq_id, position, first = _sequence_starts(cfg)
    # One independent stream per layer so a layer's draws do not depend on the other layers' sizes.
    layer_rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(L)]
    experts = np.empty((T, L, K), dtype=np.int16)
    weights = np.empty((T, L, K), dtype=np.float32)
    token_idx = np.arange(T, dtype=np.int32)[None, :]
    cross_factor = np.float32(np.exp(-cfg.cross_layer))
    prev: np.ndarray | None = None
    for layer, rng in enumerate(layer_rngs):
        # Work with cost = exp(-score) = Exp(1) noise / popularity: the k smallest costs are the k largest
        # scores, and no logarithm of the whole [T, E] array is needed.
        inv_pop = np.power(1.0 + rng.permutation(E), skew[layer]).astype(np.float32)  # 1 / Zipf weight
        perm = rng.permutation(E)
        # Sticky noise, laid out [E, T] so the forward fill runs along contiguous memory: redraw where fresh
        # (always at a sequence start), else carry the last fresh draw of the same expert.
        fresh = rng.random((E, T), dtype=np.float32) >= locality[layer]
        fresh[:, first] = True
        source = np.maximum.accumulate(np.where(fresh, token_idx, np.int32(0)), axis=1)
        noise = rng.standard_exponential((E, T), dtype=np.float32)
        cost = np.take_along_axis(noise, source, axis=1).T * inv_pop  # [T, E]
        if drift[layer]:
            # A second, slower sticky process: which experts are "in fashion" for a stretch of a sequence.
            fresh = rng.random((E, T), dtype=np.float32) >= cfg.drift_locality
            fresh[:, first] = True
            source = np.maximum.accumulate(np.where(fresh, token_idx, np.int32(0)), axis=1)
            offset = rng.standard_normal((E, T), dtype=np.float32) * np.float32(drift[layer])
            cost *= np.exp(-np.take_along_axis(offset, source, axis=1)).T
        if prev is not None and cfg.cross_layer:
            mapped = perm[prev]
            np.put_along_axis(cost, mapped, np.take_along_axis(cost, mapped, axis=1) * cross_factor, axis=1)
        chosen = np.argpartition(cost, K - 1, axis=1)[:, :K] if K < E else np.tile(np.arange(E), (T, 1))
        chosen_cost = np.take_along_axis(cost, chosen, axis=1)
        order = np.argsort(chosen_cost, axis=1, kind="stable")
        chosen = np.take_along_axis(chosen, order, axis=1)
        chosen_cost = np.maximum(np.take_along_axis(chosen_cost, order, axis=1), 1e-30)
        gate = chosen_cost[:, :1] / chosen_cost  # softmax of the scores -log(cost), relative to the top one
        experts[:, layer] = chosen
        weights[:, layer] = gate / gate.sum(axis=1, keepdims=True)
        prev = chosen

    knobs = {f: getattr(cfg, f) for f in ("skew", "locality", "cross_layer", "drift", "drift_locality", "seed")}
    meta = TraceMeta(
        model=cfg.model,
        num_layers=L,
        num_experts=[E] * L,
        top_k=K,
        expert_bytes=int(cfg.expert_bytes),
        hidden_size=int(cfg.hidden_size),
        intermediate_size=int(cfg.intermediate_size),
        shared_experts=int(cfg.shared_experts),
        source=cfg.source,
        extra={"synth": knobs},
    )
    return Trace(
        meta, experts, weights, seq_id, position,
        np.full(T, PHASE_DECODE, dtype=np.int8), np.full(T, -1, dtype=np.int32),
    )


def _floats(text: str) -> float | list[float]:
    """A knob on the command line: one number, or comma-separated numbers (one per layer)."""
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` subcommand."""
    presets = "\n".join(f"  {name}: {SYNTH_PRESETS[name].source}" for name in sorted(SYNTH_PRESETS))
    p = subparsers.add_parser(
        "synth", help="generate a synthetic routing trace (model presets; each says what it was fitted to)",
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets (written into the trace's metadata field source):\n{presets}",
    )
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), help="model shape and its fitted or borrowed knobs")
    p.add_argument("--tokens", type=int, default=1000, help="total tokens (default 1000)")
    p.add_argument("--sequences", type=int, default=1, help="sequences the tokens are split into (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, help="override the number of MoE layers")
    p.add_argument("--experts", type=int, help="override the routed experts per layer")
    p.add_argument("--top-k", type=int, help="override top-k")
    p.add_argument("--skew", type=_floats, help="Zipf exponent of popularity (one, or one per layer)")
    p.add_argument("--locality", type=_floats, help="noise persistence probability (one, or one per layer)")
    p.add_argument("--cross-layer", type=float, help="score bonus for layer l-1's mapped experts")
    p.add_argument("--drift", type=_floats, help="std of the slow per-sequence popularity drift (one, or per layer)")
    p.add_argument("--drift-locality", type=float, help="persistence probability of the drift per token")
    p.add_argument("-o", "--output", required=True, type=Path, help="output trace (.parquet)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = dict(
        tokens=args.tokens, sequences=args.sequences, seed=args.seed, num_layers=args.layers,
        num_experts=args.experts, top_k=args.top_k, skew=args.skew, locality=args.locality,
        cross_layer=args.cross_layer, drift=args.drift, drift_locality=args.drift_locality,
    )
    if args.preset:
        cfg = preset_config(args.preset, **overrides)
        for knob in ("skew", "locality", "drift"):
            value = getattr(cfg, knob)
            if args.layers is not None and getattr(args, knob, None) is None and isinstance(value, list):
                setattr(cfg, knob, [value[0]] + [value[-1]] * (args.layers - 1))
    else:
        cfg = dataclasses.replace(SynthConfig(), **{k: v for k, v in overrides.items() if v is not None})
    trace = generate(cfg)
    write_trace(trace, args.output)
    print(f"wrote {args.output}: {cfg.tokens} tokens x {cfg.num_layers} layers x top-{cfg.top_k} of {cfg.num_experts}")
    return 0


__all__ = ["SYNTH_PRESETS", "SynthConfig", "SynthPreset", "generate", "layer_profile", "preset_config", "register"]
