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

FSDP2
-----
``nybble finetune ... --fsdp`` under torchrun shards the packed base with FSDP2
(:mod:`nybble.train.fsdp`: the packed bytes become frozen integer parameters that
``fully_shard`` shards and all-gathers as they are; ARCHITECTURE.md, "FSDP2", says why and
what is replicated). Checkpoints: the gathered adapter (rank 0) and one optimizer file per
rank. FSDP1's single-dtype ``FlatParameter`` (bitsandbytes' bf16 ``quant_storage`` route) is
not used.
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
    "shard_model": "fsdp",
    "FinetuneResult": "trainer",
    "NonFiniteGradientError": "trainer",
    "TrainingInterrupted": "trainer",
    "finetune": "trainer",
    "latest_checkpoint": "trainer",
    "load_model": "trainer",
}

#: Submodules that ``import nybble.train`` used to load eagerly, still reachable as attributes.
_SUBMODULES = ("data", "fsdp", "memory", "trainer")


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
    "shard_model",
    "tokenize",
    "weight_bits_per_param",
]
