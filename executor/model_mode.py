"""Model mode: a transformers MoE model whose sparse MoE blocks run with offloaded experts.

:func:`offload_model` packs every routed expert into one file on disk (``executor/model_store.py``, the
executor's tier format), drops the experts' weights from the model and replaces each sparse MoE block by an
:class:`OffloadedMoE`. The router (``gate``) and everything else of the block (Qwen2-MoE's shared expert, the
family's normalisation of the top-k weights) stay on the fast side and run the family's own code; only the
block's ``experts`` call is served from ``slots_per_layer`` slots per MoE layer (``executor/model_slots.py``):
RAM slots filled by the executor's :class:`~executor.transfer.TransferEngine` (``backend="cpu"``: O_DIRECT reads
by I/O threads, see ``executor/tier.py``), or GPU slots filled from pinned host memory by copies on CUDA copy
streams (``backend="cuda"``: the CUDA backend's copy schedule, compute waiting on each expert's copy event).

Which experts are resident is decided by the same policy objects as the simulator and the trace executor: a
:class:`~policies.runtime.PolicyRuntime` over a :class:`~policies.cache.ExpertCache` (eviction policy, default
LRU), a predictor (default none) and a horizon (default 0: on demand). PolicyRuntime was written for replays,
where the routing is known up front, but it only ever reads the routing of the layer being decided (through
``experts[tokens, layer]``); so it fits a live model unchanged: each forward pass appends its tokens to a
growing routing table, each block writes the router's choice for its layer into that table just before
``begin_layer``, and each block's forward runs one layer-step of the driver loop the simulator and the trace
executor run (:class:`replay.driver.LayerDriver`: sync landed copies, submit demand and prefetch copies,
compute resident experts first, wait for the others, ``release``, ``end_layer``), with the executor's copies
and this model's experts as its compute (:class:`SlotCompute`). Clairvoyant
policies (Belady, the oracle predictor) cannot run: a live model has no future index, and they say so.

The routed experts are computed from the slot weights with the arithmetic of the model's own experts
implementation (``config._experts_implementation``): ``eager`` adds each expert's weighted output, cast to the
model's dtype, in ascending expert order; ``grouped_mm`` / ``batched_mm`` sum the top-k weighted outputs in the
routing weights' dtype (float32) and cast once. Tokens go to each expert in the same order as there. So the
offloaded model's logits equal the original's (bit for bit in the tests: Mixtral, Qwen2-MoE, OLMoE, float32
and bfloat16, eager and grouped_mm; ``batched_mm`` differs by ~1e-7, its batched matmul rounds differently).
``grouped_mm`` experts are computed with transformers' own grouped matmul (one group per expert), so on a GPU
they run the same kernel as the model's; ``eager`` ones with ``F.linear``, as the model's eager code does.

A failed expert read is raised (TierError) from the model's forward; the offload is then unusable: ``close``
it. The routing table grows by ``MoE layers x top-k`` ints per token for the life of the offload.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from policies.base import EvictionPolicy, Horizon, Predictor
from policies.cache import ExpertCache, capacities_for, partitions_for
from policies.horizons.fixed import FixedHorizon
from policies.predictors.none import NoPredictor
from policies.runtime import PolicyRuntime, RuntimeConfig, contexts
from replay.backends import ComputeBackend
from replay.driver import LayerDriver

from .backends import WallClock
from .cuda_backend import WINDOW, require_cuda
from .link import MeasuredLink
from .model_slots import DiskSlots, GpuSlots
from .model_store import OffloadError, check_store, find_moe_blocks, layout_of, write_model_store
from .tier import ExpertReader, StoreLayout

NO_END = 2**62  # a live model has no known last layer-step (bounds how far ahead prefetches may target)


class _Growing:
    """An array that grows along axis 0 (the routing table / token ids PolicyRuntime indexes by token)."""

    def __init__(self, tail: tuple[int, ...]):
        self.a = np.full((64, *tail), -1, dtype=np.int64)
        self.n = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n, *self.a.shape[1:])

    def __getitem__(self, idx):
        return self.a[idx]

    def extend(self, n: int) -> np.ndarray:
        while self.n + n > len(self.a):
            self.a = np.concatenate([self.a, np.full_like(self.a, -1)])
        self.n += n
        return np.arange(self.n - n, self.n)


class ExpertOffload:
    """The fast side of all offloaded blocks: slots, copies, the policy runtime and the metrics. ``fast`` (a
    :class:`~executor.model_slots.DiskSlots` or ``GpuSlots`` of ``sum(capacities)`` slots) is owned and closed."""

    def __init__(self, layout: StoreLayout, fast: DiskSlots | GpuSlots, slots_per_layer: int, top_k: int,
                 eviction: EvictionPolicy, predictor: Predictor, horizon: Horizon, link_budget: bool = True,
                 admission: bool = True):
        ne = list(layout.num_experts)
        self.layout, self.fast, self.L = layout, fast, len(ne)
        caps = capacities_for(ne, "per_layer", slots_per_layer, None)
        cctx, pctx, hctx = contexts(ne, partitions_for(ne, "per_layer"), caps, top_k, layout.stride_bytes, 1,
                                    future=None)  # live: no future, so clairvoyant policies refuse to start
        predictor.reset(pctx)
        horizon.reset(hctx)
        self.cache = ExpertCache(eviction, cctx)
        # PolicyRuntime reads routing as experts[tokens, layer]: each pass appends its tokens and each layer writes
        # its router's choice before begin_layer, so the runtime sees what a replay of this generation shows it.
        self.routes, self.token_ids = _Growing((self.L, top_k)), _Growing(())
        rcfg = RuntimeConfig(self.L, ne, layout.stride_bytes, link_budget=link_budget, admission=admission)
        self.runtime = PolicyRuntime(self.cache, predictor, horizon, rcfg, self.routes, self.token_ids)
        self.slots_per_layer = slots_per_layer
        self.slots, self.transfer = fast.slots, fast.transfer
        self.step, self._last_layer = -1, self.L
        self._tokens = np.zeros(0, dtype=np.int64)
        self.next_token_ids: np.ndarray | None = None  # set by the embedding hook for the next forward pass
        self.requests = 0
        self.t0 = time.perf_counter()
        # the driver loop of the simulator and the trace executor, one layer-step per MoE block forward; the
        # model runs its dense parts itself, so the loop's dense part is empty
        clock = WallClock()
        self.slot_compute = SlotCompute(self, clock)
        copies = fast.copies(self.cache)
        copies.preload(sorted(self.cache.policy.pinned()))  # a pinning policy's experts, into their slots first
        # what the runtime's link budget and prefetch review read: the copies' measured timing and backlog
        self.driver = LayerDriver(self.runtime, clock, copies, self.slot_compute, MeasuredLink(self.transfer), self.L)
        self.hooks: list = []  # removed by close()

    # ------------------------------------------------------------------------------------- one MoE layer
    def _begin_step_rows(self, layer: int, n: int) -> np.ndarray:
        """Trace-token indices of this forward pass; a new pass starts when the layer index does not grow."""
        if layer <= self._last_layer:
            self.step += 1
            self._tokens = self.routes.extend(n)
            self.token_ids.extend(n)
            ids, self.next_token_ids = self.next_token_ids, None
            if ids is not None and len(ids) == n:
                self.token_ids.a[self._tokens] = ids
        self._last_layer = layer
        if len(self._tokens) != n:
            raise OffloadError(f"MoE layer {layer} routed {n} tokens, layer 0 of this pass {len(self._tokens)}")
        return self._tokens

    def run_layer(self, layer: int, experts: SlotExperts, x: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' output for ``x`` [N, H], as the model's experts module would compute it."""
        idx = top_k_index.detach().cpu().numpy().astype(np.int64)
        tokens = self._begin_step_rows(layer, idx.shape[0])
        self.routes.a[tokens, layer] = idx
        self.slot_compute.bind(experts, x, idx, top_k_weights, int(self.runtime.offsets[layer]))
        plan = self.driver.layer_step(self.step, layer, tokens, NO_END)
        self.requests += sum(plan.uses.values())
        return self.slot_compute.combine()

    # ------------------------------------------------------------------------------------------ results
    def metrics(self, total_s: float | None = None, new_tokens: int | None = None) -> dict:
        """Counters with the simulator's key names where they apply. ``total_s`` defaults to the wall time
        since the offload was set up; ``tokens_per_s`` needs ``new_tokens`` (generated tokens, all sequences)."""
        st, req = self.cache.stats, self.requests
        total = time.perf_counter() - self.t0 if total_s is None else total_s
        return {
            "hit_rate": st.hits / req if req else None,
            "late_hit_rate": st.late_hits / req if req else None,
            "miss_rate": st.misses / req if req else None,
            "expert_requests": req, "hits": st.hits, "late_hits": st.late_hits, "misses": st.misses,
            "loads": st.inserts, "evictions": st.evictions, "prefetch_issued": st.prefetch_inserts,
            "bytes_moved": self.transfer.bytes_started, "copies": self.transfer.copies_started,
            "stall_s": self.driver.stall_s, "expert_compute_s": self.driver.compute_s, "total_s": total,
            "tokens_per_s": new_tokens / total if new_tokens and total > 0 else None,
            "steps": self.step + 1, "moe_layers": self.L, "slots_per_layer": self.slots_per_layer,
            "expert_bytes": self.layout.stride_bytes, "tier": self.fast.tier, "device": self.fast.device,
            "copy_bandwidth_bytes_per_s": self._copy_bandwidth(),
        }

    def _copy_bandwidth(self) -> float | None:
        """Bytes over the summed durations of every copy so far (each copy's own rate; None before any)."""
        recs = self.transfer.records
        busy = sum(r.end_s - r.start_s for r in recs)
        return sum(r.nbytes for r in recs) / busy if recs and busy > 0 else None

    def close(self) -> None:
        """Stop the copy threads and release the slots' tier (the model cannot run afterwards)."""
        for h in self.hooks:
            h.remove()
        self.fast.close()

    def __enter__(self) -> ExpertOffload:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SlotCompute(ComputeBackend):
    """The driver loop's compute in model mode: each routed expert of the block being run, from its slot's
    weights, with the arithmetic of the model's own experts implementation; :meth:`combine` sums the outputs."""

    def __init__(self, owner: ExpertOffload, clock: WallClock):
        self.owner, self.clock = owner, clock

    def bind(self, experts: SlotExperts, x: torch.Tensor, idx: np.ndarray, weights: torch.Tensor, offset: int) -> None:
        """The block about to run: its experts module, input [N, H], routing [N, K], top-k weights, first key."""
        self.experts, self.x, self.idx, self.weights, self.offset = experts, x, idx, weights, offset
        self.outs: dict[int, tuple] = {}

    def dense(self, ntok: int) -> float:
        return 0.0  # the model runs its own dense parts, outside the MoE block

    def expert(self, key: int, ntok: int) -> float:
        t0 = time.perf_counter()
        experts, x, idx, e = self.experts, self.x, self.idx, key - self.offset
        if experts.implementation == "eager":  # eager takes an expert's tokens rank-major (torch.where over [K, N])
            pos, tok = np.nonzero(idx.T == e)
        else:  # grouped/batched: token-major (a sort of the flattened [N * K] routing)
            tok, pos = np.nonzero(idx == e)
        tok_t, pos_t = torch.from_numpy(tok).to(x.device), torch.from_numpy(pos).to(x.device)
        slot, fast, linear = self.owner.cache.slot_of[key], self.owner.fast, experts.linear
        fast.before_expert(slot)  # on a GPU: the compute stream waits for the slot's copy event
        gu, dn = self.weights_of(key, experts.dtype, x.device)
        gate, up = linear(x[tok_t].to(experts.dtype), gu).chunk(2, dim=-1)
        out = linear(experts.act_fn(gate) * up, dn) * self.weights[tok_t, pos_t, None]
        fast.after_expert(slot)  # the next copy into the slot waits until this expert has read it
        self.outs[e] = (tok_t, pos_t, out)
        return time.perf_counter() - t0

    def resident(self, keys: list[int], total_uses: int, uses: dict[int, int], layer: int, events: list | None) -> float:
        return sum(self.expert(k, uses[k]) for k in keys)

    def weights_of(self, key: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up [2I, H] and down [H, I] of a resident key, read in place from its slot (a cast copy when the
        model is not float32: exact, the file holds the model's weights widened to float32)."""
        owner = self.owner
        h, i = owner.layout.hidden, owner.layout.intermediate
        base = owner.cache.slot_of[key] * (owner.layout.stride_bytes // 4)
        gu = owner.slots[base:base + 2 * i * h].view(2 * i, h)
        dn = owner.slots[base + 2 * i * h:base + 3 * i * h].view(h, i)
        return gu.to(device, dtype), dn.to(device, dtype)

    def combine(self) -> torch.Tensor:
        """The block's routed output from the experts computed since :meth:`bind`."""
        x, outs = self.x, self.outs
        if self.experts.implementation == "eager":
            y = torch.zeros_like(x)
            for e in sorted(outs):
                tok_t, _, out = outs[e]
                y.index_add_(0, tok_t, out.to(y.dtype))
            return y
        first = next(iter(outs.values()))[2]
        w = torch.zeros((x.shape[0], self.idx.shape[1], x.shape[1]), dtype=first.dtype, device=x.device)
        for tok_t, pos_t, out in outs.values():
            w[tok_t, pos_t] = out
        return w.sum(dim=1).to(x.dtype)


def linear_of(implementation: str):
    """``f(x [n, in], w [out, in]) = x @ w.T`` as the model's experts implementation computes it: ``grouped_mm``
    through transformers' grouped matmul with one group (the same kernel as the model's, on a GPU too), the others
    with ``F.linear`` (eager's own call; ``batched_mm`` rounds differently anyway, see the module's docstring)."""
    if implementation != "grouped_mm":
        return F.linear
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:  # a transformers without it: F.linear (the same numbers on a CPU)
        return F.linear

    def grouped(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        offs = torch.full((1,), x.shape[0], dtype=torch.int32, device=x.device)
        return _grouped_linear(x, w.unsqueeze(0), offs)

    return grouped


class SlotExperts(nn.Module):
    """Stands in for a block's experts module (same call); holds no weights, asks the :class:`ExpertOffload`."""

    def __init__(self, layer: int, owner: ExpertOffload, act_fn: nn.Module, implementation: str, dtype: torch.dtype):
        super().__init__()
        self.layer, self.act_fn, self.implementation, self.dtype = layer, act_fn, implementation, dtype
        self.linear = linear_of(implementation)
        self.__dict__["owner"] = owner  # a plain reference, not a submodule

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return self.owner.run_layer(self.layer, self, hidden_states, top_k_index, top_k_weights)


class OffloadedMoE(nn.Module):
    """A sparse MoE block with offloaded experts: the original block (router and any shared expert, on the fast
    side) running its own forward, with its ``experts`` replaced by a :class:`SlotExperts`."""

    def __init__(self, block: nn.Module, layer: int, owner: ExpertOffload):
        super().__init__()
        old = block.experts
        impl = str(getattr(getattr(old, "config", None), "_experts_implementation", None) or "eager")
        block.experts = SlotExperts(layer, owner, old.act_fn, impl, old.gate_up_proj.dtype)  # the weights go with ``old``
        self.block, self.layer = block, layer

    @property
    def gate(self) -> nn.Module:
        return self.block.gate

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.block(hidden_states, *args, **kwargs)


def offload_model(model: nn.Module, store: str | Path, slots_per_layer: int, *, eviction: EvictionPolicy | None = None,
                  predictor: Predictor | None = None, horizon: Horizon | None = None, io_threads: int = 1,
                  odirect: bool | None = None, reuse_store: bool = False, backend: str = "cpu",
                  copy_window: int = WINDOW, make_ops=None, link_budget: bool = True,
                  admission: bool = True) -> ExpertOffload:
    """Offload ``model``'s routed experts in place; returns the :class:`ExpertOffload` (metrics, ``close``).

    ``store``: the packed expert file, written from the model's weights (or, with ``reuse_store``, an existing
    one, checked against the model's shapes: a missing, short or foreign file raises). ``slots_per_layer``:
    slots per MoE layer, 1 .. experts - 1. Policies default to LRU, no predictor, horizon 0.
    ``backend="cpu"``: RAM slots, ``io_threads`` I/O threads reading the file (``odirect``: None = O_DIRECT where
    the filesystem allows it, else buffered reads with a warning). ``backend="cuda"``: GPU slots on the current
    device, the experts in pinned host memory, ``io_threads`` copy streams with ``copy_window`` copies each
    enqueued ahead; the caller moves the rest of the model to that device (offload first: the experts never go
    there). ``make_ops(host, slots, streams)``: a device standing in for CUDA (tests).
    ``link_budget``: queue only prefetches that can land before their layer (:mod:`policies.link_budget`);
    ``admission``: a prefetch evicts only a victim predicted less likely than it (:mod:`policies.admission`)."""
    from policies.eviction.lru import LRU

    if backend not in ("cpu", "cuda"):
        raise OffloadError(f"backend: expected cpu or cuda, got {backend!r}")
    if backend == "cuda" and make_ops is None:
        require_cuda()  # before any work
    blocks = find_moe_blocks(model)
    layout = layout_of(blocks)
    capacities_for(layout.num_experts, "per_layer", slots_per_layer, None)  # fail before writing anything
    top_k = int(getattr(model.config, "num_experts_per_tok", 0) or getattr(blocks[0][1].gate, "top_k", 0))
    if top_k < 1:
        raise OffloadError("cannot tell the model's top-k (config.num_experts_per_tok)")
    if reuse_store:
        check_store(store, layout)
    else:
        write_model_store(store, blocks, str(getattr(model.config, "_name_or_path", "") or model.config.model_type))
    n_slots = sum(capacities_for(layout.num_experts, "per_layer", slots_per_layer, None))
    if backend == "cuda":
        fast = GpuSlots.build(Path(store), layout, n_slots, io_threads, copy_window, make_ops)
    else:
        reader = ExpertReader(store, direct=odirect)
        try:
            fast = DiskSlots(reader, n_slots, io_threads)
        except BaseException:
            reader.close()
            raise
    try:
        owner = ExpertOffload(layout, fast, slots_per_layer, top_k, eviction or LRU(), predictor or NoPredictor(),
                              horizon or FixedHorizon(0), link_budget, admission)
    except BaseException:
        fast.close()
        raise
    for layer, (name, block) in enumerate(blocks):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, OffloadedMoE(block, layer, owner))
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    if emb is not None:  # token ids for predictors that use them (-1 where unknown)

        def record_ids(_module, args):
            owner.next_token_ids = args[0].detach().reshape(-1).cpu().numpy()

        owner.hooks.append(emb.register_forward_pre_hook(record_ids))
    return owner
