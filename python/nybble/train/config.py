"""The settings of a fine-tuning run and the values each may take: the one source of the
trainer's defaults and of ``nybble finetune``'s defaults and choices. Imports neither torch
nor transformers, so that the command line can read it without them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: Base-weight quantization methods (``--quant``).
QUANT_METHODS = ("nf4", "fp4", "int8")
#: Optimizers (``--optim``): paged or not, 32-bit or 8-bit states.
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit")
#: Learning-rate schedules after the warmup (``--schedule``).
SCHEDULES = ("constant", "linear", "cosine")
#: Compute dtypes (``--dtype``); auto is bf16 on the GPU, float32 on the CPU.
DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class FinetuneConfig:
    """QLoRA paper defaults (Dettmers et al., 2023): NF4 + double quant, r=64, alpha=16 on
    all linear layers, paged AdamW, lr 2e-4, max grad norm 0.3, constant schedule with 3%
    warmup, gradient checkpointing, bf16 compute on the GPU (float32 on the CPU)."""

    model_dir: str
    data: str
    output_dir: str
    quant: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    optim: str = "paged_adamw_32bit"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.03
    schedule: str = "constant"
    batch_size: int = 4
    grad_accum: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    max_length: int = 512
    gradient_checkpointing: bool = True
    fsdp: bool = False  # under torchrun: FSDP2 shards of the packed base (nybble.train.fsdp), not DDP
    fsdp_offload: bool = False  # FSDP2's CPU offload of the shards (with fsdp)
    dtype: str = "auto"
    device: str = "auto"
    save_steps: int = 0
    resume: str | None = None
    seed: int = 42
    log_every: int = 10
    progress: bool = True


def config_defaults() -> dict:
    """FinetuneConfig's default of every field that has one, by field name."""
    return {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}
