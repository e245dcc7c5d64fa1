"""QLoRA fine-tuning: data loading, the training loop behind ``nybble finetune``, memory
accounting, and a tiny offline example.

Multi-GPU (DDP)
---------------
Under ``torchrun --nproc_per_node N --no-python nybble finetune MODEL_DIR --data ... -o ...``
every process loads and quantizes its own copy of the base model; only
the LoRA parameters require gradients, so :class:`~torch.nn.parallel.DistributedDataParallel`
all-reduces just those (``broadcast_buffers=False``: the packed weights are frozen buffers).
Data are sharded with a ``DistributedSampler``; rank 0 logs and writes adapters and the
optimizer state; every rank saves its RNG state. Tested on the CPU with gloo and 2 processes.

What FSDP would need (not implemented)
--------------------------------------
- FSDP flattens every parameter of a wrapped unit into one ``FlatParameter`` of a single
  dtype. A :class:`~nybble.nn.Linear4bit` holds *buffers* of mixed dtypes (uint8 packed
  codes, uint8 absmax codes, int32-bit-pattern float32 constants) and a JSON quant state;
  buffers are not sharded by FSDP, so as written each rank would keep a full copy of the
  4-bit weights (fine for QLoRA's memory budget up to the card size, but no sharding).
- To shard the base weights, the packed weight must become a frozen ``nn.Parameter``
  (``requires_grad=False``) of a storage dtype FSDP can flatten together with its neighbours
  (bitsandbytes' ``bnb_4bit_quant_storage=bfloat16`` trick: the uint8 codes reinterpreted
  as bf16 so that they flatten with the bf16 norms/embeddings), and the block constants
  (absmax codes, nested absmax, offset, code tables) must travel as part of that parameter or
  be replicated per rank (they are 0.127 bits/param).
- ``use_orig_params=True`` is required so that frozen (quantized) and trainable (LoRA)
  parameters can share one FSDP unit and the optimizer sees the original LoRA tensors;
  alternatively wrap each decoder layer so LoRA params sit in their own units.
- The quantized Linear must rebuild its view of the packed weight after FSDP's all-gather
  (FSDP swaps ``.data`` of the original params to views into the gathered flat buffer), so
  the module may not cache pointers or decoded weights across forward calls.
- ``sync_module_states=True`` broadcasts the quantized weights from rank 0 (int-safe through
  the bf16 view), ``mixed_precision`` must leave the packed storage un-cast
  (``param_dtype`` only for the trainable LoRA params, or ``cast_forward_inputs`` only),
  and activation checkpointing must wrap inside the FSDP units (non-reentrant).
- State dicts: ``FULL_STATE_DICT`` with ``rank0_only`` gathering then re-viewing the storage
  as uint8 before writing bitsandbytes' keys; adapters saved from the LoRA params only.
- The paged optimizer pages the *sharded* LoRA states; nothing changes there.
- FSDP2 (``torch.distributed.fsdp.fully_shard``) shards per parameter as a DTensor instead of
  flattening, which removes the single-dtype constraint: the packed codes could be sharded
  as uint8 parameters directly. Linear4bit would then need DTensor-aware forward/backward
  (all-gather the packed shard before dequantizing, ``reshard_after_forward`` for the
  recompute in backward) and a ``state_dict`` hook that gathers to the bitsandbytes layout.
"""

from __future__ import annotations

import importlib

from .config import FinetuneConfig

# Everything but the config is loaded on first use: torch and transformers are optional, and
# the command line reads FinetuneConfig's defaults without them.
_LAZY = {
    "DataError": "data",
    "collate": "data",
    "load_jsonl": "data",
    "tokenize": "data",
    "MemoryReport": "memory",
    "dq_bits_per_param": "memory",
    "measure": "memory",
    "paper_estimate": "memory",
    "weight_bits_per_param": "memory",
    "FinetuneResult": "trainer",
    "NonFiniteGradientError": "trainer",
    "TrainingInterrupted": "trainer",
    "finetune": "trainer",
    "latest_checkpoint": "trainer",
    "load_model": "trainer",
}

#: Submodules that ``import nybble.train`` used to load eagerly, still reachable as attributes.
_SUBMODULES = ("data", "memory", "trainer")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = [
    "DataError",
    "FinetuneConfig",
    "FinetuneResult",
    "MemoryReport",
    "NonFiniteGradientError",
    "TrainingInterrupted",
    "collate",
    "dq_bits_per_param",
    "finetune",
    "latest_checkpoint",
    "load_jsonl",
    "load_model",
    "measure",
    "paper_estimate",
    "tokenize",
    "weight_bits_per_param",
]
