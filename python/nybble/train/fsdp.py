"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over models with nybble's packed layers.

The packed base weights are sharded and all-gathered **as their bytes**: :func:`shard_model`
turns each quantized layer's packed tensors into frozen ``nn.Parameter`` s of an integer
dtype (4-bit codes as uint8 whatever the layer's ``quant_storage``, LLM.int8() weights as
int8, float32 constants as their int32 bit patterns), which ``fully_shard`` shards on dim 0
like any parameter. FSDP2 never casts an integer parameter (its mixed-precision policy applies
to floating ones only), copies mixed dtypes through one uint8 buffer, and the layers read
``self.weight`` at every call, so the gathered bytes are decoded exactly as before: no tensor
subclass, no ``fsdp_pre_all_gather`` hook. What travels and what stays (ARCHITECTURE.md,
"FSDP2"):

- sharded (``SHARDED_TENSORS``): 4-bit codes (4 bits/param), their per-block constants
  (DQ absmax codes: 8 bits per 64 params; without DQ the float32 absmax), LLM.int8()
  weights and row scales; every other parameter (embeddings, norms, head, the LoRA A / B);
- replicated buffers: the nested absmax (32 bits per 64 x 256 params), the 256-entry DQ
  code table, the 16-entry 4-bit code table, the offset: under 1.1 KB per layer.

Also here: the full (gathered) state dict in bitsandbytes' layout, adapters gathered for
saving and loaded into shards, gradient clipping and micro-batch accumulation over shards,
resident bytes per rank and the memory arithmetic of a sharded QLoRA run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .. import formats
from ..nn import Linear4bit, Linear8bitLt
from . import memory as _memory

#: The tensors of each quantized layer kind that FSDP2 shards (as frozen integer parameters).
SHARDED_TENSORS = {
    Linear4bit: lambda m: ("weight", "absmax_codes" if m.double_quant else "absmax_bits"),
    Linear8bitLt: lambda m: ("weight", "scb_bits"),
}


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (storage shared), or ``t`` itself."""
    return t.to_local() if isinstance(t, _dtensor_type()) else t


def _sharded_names(m: nn.Module) -> tuple[str, ...]:
    for kind, names in SHARDED_TENSORS.items():
        if isinstance(m, kind):
            return names(m)
    return ()


def _view_storage_hook(module: Linear4bit, state_dict, prefix, local_metadata) -> None:
    # The packed codes are a uint8 parameter while sharded; the state dict keeps bitsandbytes'
    # layout in the layer's quant_storage (DTensor shards are re-viewed by full_state_dict).
    key = prefix + "weight"
    t = state_dict.get(key)
    if t is not None and not isinstance(t, _dtensor_type()) and t.dtype != module.quant_storage:
        state_dict[key] = formats.packed_as_storage(t, module.quant_storage)


def prepare_packed(model: nn.Module) -> int:
    """Makes the packed tensors of every quantized layer frozen parameters (integer dtypes,
    the 4-bit codes as uint8 ``((n+1)//2, 1)``), so ``fully_shard`` shards them; returns the
    number of layers changed. Idempotent. The module's outputs and state dict are unchanged."""
    changed = 0
    for m in model.modules():
        names = _sharded_names(m)
        if not names or all(n in m._parameters for n in names):
            continue
        for name in names:
            t = m._buffers.pop(name)
            if isinstance(m, Linear4bit) and name == "weight":
                t = formats.packed_as_uint8(t)
            m.register_parameter(name, nn.Parameter(t, requires_grad=False))
        if isinstance(m, Linear4bit):
            m._register_state_dict_hook(_view_storage_hook)
            # A decoded float32 absmax kept between calls would be a whole, unsharded copy
            # (an eighth of the packed bytes): decode it per call from the gathered codes.
            m.cache_absmax = False
        changed += 1
    return changed


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: modules whose class the model names in
    ``_no_split_modules`` (transformers' own list of blocks never to split across devices)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    # By class in the MRO: fully_shard makes a block an instance of FSDP<Block>, a subclass.
    blocks = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules = "
                         f"{sorted(names)}); pass blocks= to shard_model")
    return blocks


def shard_model(model: nn.Module, *, blocks: Iterable[nn.Module] | None = None, mesh=None,
                reshard_after_forward: bool = True, offload: bool = False, mp_policy=None) -> nn.Module:
    """Applies FSDP2 to a model with nybble layers (LoRA or not): :func:`prepare_packed`, one
    ``fully_shard`` per transformer block (:func:`transformer_blocks` unless ``blocks``), then
    one on the root for the rest (embeddings, final norm, head). ``offload``: FSDP2's
    ``CPUOffloadPolicy`` (shards kept in host memory, all-gathered to the device). Needs an
    initialised process group (torchrun); returns ``model``, now an FSDP module."""
    import torch.distributed as dist
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialised (run under torchrun)")
    blocks = list(transformer_blocks(model) if blocks is None else blocks)
    if not blocks:
        raise ValueError("blocks is empty: nothing to shard")
    prepare_packed(model)
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
              "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ---------------------------------------------------------------------- state dicts


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, _dtensor_type()) else t


def full_state_dict(model: nn.Module, cpu: bool = True) -> dict[str, torch.Tensor]:
    """The model's whole state dict, every shard gathered (a collective: all ranks call it),
    in bitsandbytes' layout (4-bit codes in each layer's quant_storage): what an unsharded
    model's ``state_dict()`` holds, loadable into one with ``load_state_dict``."""
    storage = {f"{n}.weight" if n else "weight": m.quant_storage for n, m in model.named_modules()
               if isinstance(m, Linear4bit)}
    out = {}
    for k, v in model.state_dict().items():
        v = _full(v.detach())
        if k in storage and v.dtype != storage[k]:
            v = formats.packed_as_storage(v, storage[k])
        out[k] = v.cpu() if cpu else v
    return out


def full_adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under PEFT's key names, gathered (all ranks call it), on the CPU."""
    from ..model import adapter_state_dict

    return {k: _full(v).cpu() for k, v in adapter_state_dict(model).items()}


@contextlib.contextmanager
def loading_into_shards() -> Iterator[None]:
    """Plain tensors copied into sharded parameters (``load_adapter`` on a sharded model)
    count as replicated: each rank keeps its own slice; no communication."""
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        yield


# ---------------------------------------------------------------------- training


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded gradients: the global 2-norm (float32
    local sums of squares, one all-reduce), the same clip coefficient on every rank; returns
    the norm, a plain tensor identical on all ranks (inf / nan when a gradient is)."""
    import torch.distributed as dist

    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sq = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
    if dist.is_initialized():
        dist.all_reduce(sq)
    total = sq.sqrt()
    if math.isfinite(max_norm):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.detach().mul_(coef.to(g.dtype))
    return total


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Gradients accumulate in the unsharded buffers without a reduce-scatter (DDP's
    ``no_sync``): for every micro-batch but the last of an optimizer step."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ---------------------------------------------------------------------- memory


def resident_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds between all-gathers: ``packed`` (the quantized layers' sharded
    tensors: codes and block constants), ``replicated`` (their remaining buffers: code tables,
    nested absmax), ``other`` (every other parameter, adapters included), ``buffers`` (the
    model's other buffers, which FSDP never shards); local shards of DTensors only."""
    out = {"packed": 0, "replicated": 0, "other": 0, "buffers": 0}
    seen: set[int] = set()
    for m in model.modules():
        names = _sharded_names(m)
        if not names:
            continue
        for n in names:
            t = getattr(m, n)
            seen.add(id(t))
            out["packed"] += _memory._tensor_bytes([local_tensor(t)])
        for b in m.buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                out["replicated"] += _memory._tensor_bytes([b])
    for key, tensors in (("other", model.parameters()), ("buffers", model.buffers())):
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                out[key] += _memory._tensor_bytes([local_tensor(t)])
    return out


@dataclass(frozen=True)
class ModelShapes:
    """Parameter counts of a decoder-only model, from its shapes (a meta-device model)."""

    quantized: int  # the Linear layers of the blocks (quantized)
    other: int  # embeddings, norms, head (kept in 16 bits)
    adapter: int  # LoRA A + B on every quantized layer at rank r
    layers: int  # quantized Linear layers
    largest_block: int  # quantized params of the largest block (one all-gather)


def model_shapes(config, r: int = 64) -> ModelShapes:
    """:class:`ModelShapes` of a transformers config (``LlamaConfig(...)`` etc.): the model is
    built on the meta device (no memory), its blocks' Linear layers counted as quantized."""
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    blocks = transformer_blocks(model)
    quantized = adapter = layers = largest = 0
    for b in blocks:
        q = 0
        for m in b.modules():
            if isinstance(m, nn.Linear):
                q += m.in_features * m.out_features
                adapter += r * (m.in_features + m.out_features)
                layers += 1
        quantized += q
        largest = max(largest, q)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings / head counted once
    return ModelShapes(quantized, total - quantized, adapter, layers, largest)


@dataclass(frozen=True)
class ShardedEstimate:
    """Bytes per rank of a QLoRA run sharded over ``world`` ranks (no activations)."""

    world: int
    weights: float  # 4-bit codes + constants, the rank's shard
    other: float  # 16-bit embeddings / norms / head, the rank's shard
    adapters: float  # float32 LoRA weights, gradients and optimizer states, the rank's shard
    gathered: float  # the largest block's packed weights while all-gathered (transient)
    replicated: float  # per-layer code tables kept by every rank

    @property
    def total(self) -> float:
        return self.weights + self.other + self.adapters + self.gathered + self.replicated


def sharded_estimate(shapes: ModelShapes, world: int, optim_bits: int = 32, blocksize: int = 64,
                     double_quant: bool = True, other_bytes_per_param: int = 2) -> ShardedEstimate:
    """The QLoRA paper's per-parameter arithmetic (:func:`nybble.train.memory.paper_estimate`:
    4 + 0.127 bits per base weight, float32 adapters + gradients + AdamW states), each term
    divided over ``world`` ranks, plus what FSDP2 adds: the largest block all-gathered
    (codes + absmax codes) and the replicated code tables."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    est = _memory.paper_estimate(shapes.quantized, shapes.adapter, optim_bits, blocksize=blocksize,
                                 double_quant=double_quant)
    bits = _memory.weight_bits_per_param(blocksize, double_quant)
    # Replicated: nested absmax (DQ) + 256-entry nested code table + 16-entry code table + offset.
    nested = 32 / (blocksize * formats.NESTED_BLOCKSIZE) if double_quant else 0.0
    sharded_bits = bits - nested
    replicated = shapes.quantized * nested / 8 + shapes.layers * (4 * (16 + (257 if double_quant else 0)))
    return ShardedEstimate(
        world=world,
        weights=shapes.quantized * sharded_bits / 8 / world,
        other=shapes.other * other_bytes_per_param / world,
        adapters=(est["adapters"] + est["grads"] + est["optimizer"]) / world,
        gathered=shapes.largest_block * sharded_bits / 8 if world > 1 else 0.0,  # one process: nothing gathered
        replicated=replicated,
    )
