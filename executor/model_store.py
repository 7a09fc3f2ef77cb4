"""Model mode, slow side: find a transformers model's sparse MoE blocks and pack their routed experts into the
executor's expert file (``executor/tier.py`` format, read by :class:`~executor.tier.ExpertReader`).

Supported blocks are those of the transformers 5.x MoE families whose block calls
``self.experts(hidden [N, H], top_k_index [N, K], top_k_weights [N, K])`` on an experts module holding
``gate_up_proj [E, 2I, H]`` (gate rows then up rows) and ``down_proj [E, H, I]``, no biases, not transposed:
Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (tested). Routers are found as ``traces collect`` finds them.

In the file an expert block is ``gate_up_proj[e]`` then ``down_proj[e]``, i.e. W1 [I, H], W3 [I, H], W2 [H, I]
as the tier's header documents, in float32 whatever the model's dtype: bf16/fp16 widen to float32 exactly and
narrow back exactly when computed, so the weights the model computes with are bit-identical to the original
ones (the copies are twice a bf16 expert's bytes; ``bytes_moved`` counts what was actually read).
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
from torch import nn

from .tier import HEADER_BYTES, SCHEMA, StoreLayout, TierError, clean_stale_temps, locked_temp, read_layout


class OffloadError(TierError):
    """The model cannot be offloaded as asked: no supported MoE block, or an expert file that does not match."""


def _check_experts(name: str, experts: nn.Module | None) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a supported experts module; OffloadError naming what is wrong."""
    if type(experts).__name__ == "SlotExperts":
        raise OffloadError(f"{name}: already offloaded")
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if experts is None or gu is None or dn is None or gu.dim() != 3 or dn.dim() != 3:
        raise OffloadError(f"{name}: expected an experts module with 3-D gate_up_proj and down_proj, got "
                           f"{type(experts).__name__}")
    flags = {"is_transposed": False, "has_bias": False, "has_gate": True, "is_concatenated": True,
             "has_post_expert_norm": False}
    bad = {k: getattr(experts, k) for k, want in flags.items() if getattr(experts, k, want) != want}
    E, two_i, H = gu.shape
    if bad or two_i % 2 or tuple(dn.shape) != (E, H, two_i // 2):
        raise OffloadError(f"{name}: {type(experts).__name__} has an unsupported layout ({bad or 'shapes'}: "
                           f"gate_up_proj {tuple(gu.shape)}, down_proj {tuple(dn.shape)}); expected "
                           "[E, 2I, H] and [E, H, I], no bias, not transposed")
    return int(E), int(H), int(two_i // 2)


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(module name, block)`` of every sparse MoE block, in execution (module) order."""
    from traces.collect import find_routers
    from traces.schema import TraceError

    try:
        routers = find_routers(model)
    except TraceError as exc:
        raise OffloadError(str(exc)) from exc
    blocks = []
    for rname, _ in routers:
        name = rname.rsplit(".", 1)[0]
        block = model.get_submodule(name)
        _check_experts(name, getattr(block, "experts", None))
        blocks.append((name, block))
    return blocks


def layout_of(blocks: list[tuple[str, nn.Module]]) -> StoreLayout:
    """The packed file's layout for these blocks (one hidden and intermediate size across layers)."""
    shapes = [_check_experts(n, b.experts) for n, b in blocks]
    if len({(h, i) for _, h, i in shapes}) != 1:
        raise OffloadError(f"MoE blocks differ in expert shape {sorted({(h, i) for _, h, i in shapes})}; "
                           "one expert file needs a single hidden and intermediate size")
    return StoreLayout([e for e, _, _ in shapes], shapes[0][1], shapes[0][2], seed=0)


def write_model_store(path: str | Path, blocks: list[tuple[str, nn.Module]], model_name: str = "") -> StoreLayout:
    """Pack every block's routed experts into ``path`` (atomically); returns its layout."""
    path = Path(path)
    layout = layout_of(blocks)
    header = json.dumps({"schema": SCHEMA, "num_experts": layout.num_experts, "hidden": layout.hidden,
                         "intermediate": layout.intermediate, "dtype": "float32", "expert_bytes": layout.expert_bytes,
                         "stride_bytes": layout.stride_bytes, "seed": 0, "source": "model", "model": model_name,
                         "model_dtype": str(blocks[0][1].experts.gate_up_proj.dtype).removeprefix("torch.")}).encode()
    if len(header) > HEADER_BYTES:
        raise OffloadError(f"{path}: header of {len(header)} bytes does not fit in {HEADER_BYTES}")
    pad = bytes(layout.stride_bytes - layout.expert_bytes)
    clean_stale_temps(path.parent, f".{glob.escape(path.name)}.*.tmp")  # what an earlier, killed write of this file left
    with locked_temp(path) as f:
        f.write(header.ljust(HEADER_BYTES, b" "))
        for _, block in blocks:
            gu = block.experts.gate_up_proj.detach().float().cpu().numpy()
            dn = block.experts.down_proj.detach().float().cpu().numpy()
            for e in range(gu.shape[0]):
                f.write(np.ascontiguousarray(gu[e]).tobytes())
                f.write(np.ascontiguousarray(dn[e]).tobytes())
                f.write(pad)
    return layout


def check_store(path: str | Path, want: StoreLayout) -> StoreLayout:
    """The layout of an existing expert file, which must match the model's blocks (TierError if missing,
    short or foreign; OffloadError naming the field that differs)."""
    got = read_layout(path)
    for field in ("num_experts", "hidden", "intermediate"):
        if getattr(got, field) != getattr(want, field):
            raise OffloadError(f"{path}: header field {field!r} = {getattr(got, field)}, but the model's MoE blocks "
                               f"need {getattr(want, field)} (an expert file of another model?)")
    return got
