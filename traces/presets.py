"""Model shapes (from the models' configs, sizes in bf16; see REFERENCE.md) used to fill trace metadata and
to size the synthetic generator and the simulator's compute model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .schema import TraceError, TraceMeta


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int  # MoE layers
    num_experts: int  # routed experts per layer
    top_k: int
    hidden_size: int
    intermediate_size: int  # one routed expert's FFN width
    matrices: int = 3  # 3 for SwiGLU (gate, up, down); 2 for Switch's plain FFN
    shared_experts: int = 0
    dtype_bytes: int = 2  # bf16

    @property
    def expert_bytes(self) -> int:
        return self.matrices * self.hidden_size * self.intermediate_size * self.dtype_bytes

    def meta(self, source: str = "") -> TraceMeta:
        return TraceMeta(
            model=self.name,
            num_layers=self.num_layers,
            num_experts=[self.num_experts] * self.num_layers,
            top_k=self.top_k,
            expert_bytes=self.expert_bytes,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            shared_experts=self.shared_experts,
            dtype="bfloat16",
            source=source,
        )


MODEL_PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("mixtral-8x7b", 32, 8, 2, 4096, 14336),
        ModelShape("deepseek-v2-lite", 26, 64, 6, 2048, 1408, shared_experts=2),
        ModelShape("qwen1.5-moe-a2.7b", 24, 60, 4, 2048, 1408, shared_experts=1),
        ModelShape("qwen3-30b-a3b", 48, 128, 8, 2048, 768),
        ModelShape("olmoe-1b-7b", 16, 64, 8, 2048, 1024),
        ModelShape("switch-base-128", 12, 128, 1, 768, 3072, matrices=2),
    )
}


def get_preset(name: str) -> ModelShape:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise TraceError(f"--model-preset: unknown preset {name!r}; expected one of {sorted(MODEL_PRESETS)}") from None


def select_layers(meta: TraceMeta, layer_ids: list[int], where: str) -> TraceMeta:
    """A whole model's metadata restricted to the model layers ``layer_ids`` (distinct, increasing), which
    ``layer_names`` then name: loggers often record a subset of a model's layers."""
    bad = [x for x in layer_ids if not 0 <= x < meta.num_layers]
    if bad:
        raise TraceError(f"{where}: layer {bad[0]} is outside the model's layers 0..{meta.num_layers - 1} ({meta.model})")
    if list(layer_ids) != sorted(set(layer_ids)):
        raise TraceError(f"{where}: layers {list(layer_ids)}: expected distinct layer ids in increasing (model) order")
    return dataclasses.replace(meta, num_layers=len(layer_ids), num_experts=[meta.num_experts[x] for x in layer_ids],
                               layer_names=[str(x) for x in layer_ids])
