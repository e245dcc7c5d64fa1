"""The QLoRA fine-tuning loop behind ``nybble finetune``.

One call of :func:`finetune` is one :class:`TrainingRun`, in four parts:

- **setup** (:meth:`TrainingRun.setup`): processes (torchrun / DDP), device, dtype, seeds,
  the output folder (checked, claimed and locked: nybble.outputs), data and the number of steps, the quantized model with its adapters, the optimizer, the
  schedule and (fp16) the gradient scaler;
- **resume** (:meth:`TrainingRun.resume`): find a checkpoint, check it fits this run, restore
  the adapters, optimizer, schedule, scaler and RNG state;
- **step** (:meth:`TrainingRun.optimizer_step`): one optimizer step over ``grad_accum``
  micro-batches: the loss, backward, clipping, the step or its skip on non-finite values;
- **save** (:meth:`TrainingRun.save_checkpoint`, :meth:`TrainingRun.save_final`):
  checkpoints, the final adapter.

:class:`CheckpointPaths` is the one place that names a checkpoint's folder and files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import outputs
from . import data as _data
from . import memory as _memory
from .config import DTYPES, OPTIMIZERS, QUANT_METHODS, SCHEDULES, FinetuneConfig, config_defaults

__all__ = [
    "DTYPES",
    "MAX_NON_FINITE_STEPS",
    "OPTIMIZERS",
    "QUANT_METHODS",
    "RESUME_MUST_MATCH",
    "SCHEDULES",
    "CheckpointPaths",
    "FinetuneConfig",
    "FinetuneResult",
    "NonFiniteGradientError",
    "TrainingInterrupted",
    "TrainingRun",
    "config_defaults",
    "dist_info",
    "enable_gradient_checkpointing",
    "find_checkpoint",
    "finetune",
    "latest_checkpoint",
    "load_model",
    "make_optimizer",
    "make_schedule",
    "resolve_device",
    "resolve_dtype",
    "save_checkpoint",
    "token_loss_sum",
]


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    memory: _memory.MemoryReport | None = None
    adapter_dir: str | None = None
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite gradient norm

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------------- setup


FSDP_NEEDS_PROCESSES = "--fsdp shards the model over processes: run it under torchrun with --nproc_per_node 2 or more"


def dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
            "fp32": torch.float32, "float32": torch.float32}[name]


def load_model(model_dir: str | os.PathLike, device: torch.device, dtype: torch.dtype, quant: str = "nf4",
               blocksize: int = 64, double_quant: bool = True):
    """A causal LM with its Linear layers quantized: packed checkpoints load as they are
    (nybble.load_quantized), dense ones are quantized at load (nybble.quantize_model)."""
    import transformers

    from ..model import load_quantized, quantize_model

    cfg_path = Path(model_dir) / "config.json"
    packed = cfg_path.is_file() and "quantization_config" in json.loads(cfg_path.read_text())
    if packed:
        model = load_quantized(model_dir, transformers.AutoModelForCausalLM, compute_dtype=dtype, dtype=dtype)
        model.to(device)
    else:
        # Quantized on the CPU (the Rust core, bit-identical to the GPU kernels) before the
        # move, so the GPU never holds the dense model: a 70B model fits where its 4-bit
        # weights fit.
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        quantize_model(model, quant, blocksize, double_quant, compute_dtype=dtype)
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "config"):
        model.config.use_cache = False
    return model


def enable_gradient_checkpointing(model) -> bool:
    """HF's non-reentrant activation checkpointing (``activation_checkpointing_enable`` in
    transformers >= 5, ``gradient_checkpointing_enable`` before)."""
    fn = getattr(model, "activation_checkpointing_enable", None)
    if callable(fn):
        fn(activation_checkpointing_kwargs={"use_reentrant": False})
        return True
    fn = getattr(model, "gradient_checkpointing_enable", None)
    if callable(fn):
        fn(gradient_checkpointing_kwargs={"use_reentrant": False})
        return True
    return False


def make_optimizer(params, name: str, lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0):
    from ..optim import AdamW

    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is not one of {OPTIMIZERS}")
    return AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                 optim_bits=8 if name.endswith("8bit") else 32, paged=name.startswith("paged"))


def make_schedule(optimizer, schedule: str, total_steps: int, warmup_ratio: float):
    warmup = math.ceil(warmup_ratio * total_steps) if warmup_ratio > 0 else 0
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------- checkpoints

#: A checkpoint folder's name: ``checkpoint-`` and the optimizer steps done (written 6 digits wide).
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: ``--resume`` values that mean the newest complete checkpoint in the output folder.
RESUME_LATEST = ("latest", "auto", "")


@dataclass(frozen=True)
class CheckpointPaths:
    """The one place that names a checkpoint's folder and the files inside it.

    ``OUTPUT_DIR/checkpoint-NNNNNN/`` (NNNNNN: the optimizer steps done) holds the adapter in
    PEFT format and ``optimizer.pt`` (optimizer, schedule and gradient-scaler states), both
    written by rank 0 (under FSDP one ``optimizer_rank{R}.pt`` per rank, the states of its
    shards, and the adapter gathered first), one ``rng_rank{R}.pt`` per rank, and ``trainer_state.json`` (step, world
    size, config), written last by rank 0 through ``.trainer_state.json.tmp``: a folder
    without it (an interrupted save) is never taken for a checkpoint."""

    folder: Path

    @classmethod
    def at_step(cls, output_dir: str | os.PathLike, step: int) -> CheckpointPaths:
        return cls(Path(output_dir) / f"checkpoint-{step:06d}")

    @staticmethod
    def step_of(folder: str | os.PathLike) -> int | None:
        """The step in a checkpoint folder's name; None for any other name."""
        m = CHECKPOINT_RE.match(Path(folder).name)
        return int(m.group(1)) if m else None

    @property
    def adapter(self) -> Path:
        """Where ``save_adapter`` / ``load_adapter`` write and read the adapter files."""
        return self.folder

    @property
    def optimizer(self) -> Path:
        return self.folder / "optimizer.pt"

    def optimizer_shard(self, rank: int) -> Path:
        """A rank's optimizer states under FSDP (each rank holds the states of its shards)."""
        return self.folder / f"optimizer_rank{rank}.pt"

    def rng(self, rank: int) -> Path:
        return self.folder / f"rng_rank{rank}.pt"

    @property
    def trainer_state(self) -> Path:
        return self.folder / "trainer_state.json"

    @property
    def trainer_state_tmp(self) -> Path:
        return self.folder / ".trainer_state.json.tmp"

    def is_complete(self) -> bool:
        return self.trainer_state.is_file()


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint folder of ``output_dir`` with the most steps, or None."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = [(step, p) for p in out.iterdir() if (step := CheckpointPaths.step_of(p)) is not None and p.is_dir()
             and CheckpointPaths(p).is_complete()]
    return max(found)[1] if found else None


def find_checkpoint(resume: str, output_dir: str | os.PathLike) -> Path:
    """The checkpoint folder ``--resume`` names: a folder, or the latest of ``output_dir``."""
    ckpt = latest_checkpoint(output_dir) if resume in RESUME_LATEST else Path(resume)
    if ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {output_dir}")
    return ckpt


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: Path | CheckpointPaths, model, optimizer, scheduler, step: int, config: FinetuneConfig,
                    rank: int, world: int, scaler=None) -> None:
    """Adapter (PEFT format) + optimizer + scheduler + step (rank 0), RNG state (every rank)."""
    from ..model import save_adapter

    paths = path if isinstance(path, CheckpointPaths) else CheckpointPaths(Path(path))
    if rank == 0:
        # Created and marked as nybble's (nybble.outputs) before any rank writes into it.
        outputs.claim_folder(paths.folder, "finetune")
    _barrier(world)
    paths.folder.mkdir(parents=True, exist_ok=True)  # ranks on another node's own file system
    tensors = _gathered_adapter(model, config)
    if rank == 0 or config.fsdp:
        opt_state = optimizer.state_dict()
        opt_state = {**opt_state, "state": {k: {kk: (vv.cpu() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                                            for k, v in opt_state["state"].items()}}
        torch.save({"optimizer": opt_state, "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None},
                   paths.optimizer_shard(rank) if config.fsdp else paths.optimizer)
    if rank == 0:
        save_adapter(model, paths.adapter, base_model_name_or_path=str(config.model_dir), tensors=tensors)
    torch.save(_rng_state(), paths.rng(rank))
    _barrier(world)
    if rank == 0:
        # Written last and renamed into place: a folder without it (an interrupted save) is
        # never taken for a checkpoint.
        tmp = paths.trainer_state_tmp
        tmp.write_text(json.dumps({"step": step, "world_size": world, "config": asdict(config)}, indent=2) + "\n")
        os.replace(tmp, paths.trainer_state)


def _gathered_adapter(model, config: FinetuneConfig):
    """Under FSDP the adapter's shards gathered (every rank takes part), else None (rank 0
    reads its own full copy)."""
    if not config.fsdp:
        return None
    from .fsdp import full_adapter_state_dict

    return full_adapter_state_dict(model)


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _written_by_finetune(name: str) -> bool:
    """Whether finetune writes the entry ``name`` of its output folder."""
    from ..model import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    return (name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, outputs.MARKER) or name.startswith((".adapter_", ".nybble"))
            or CHECKPOINT_RE.match(name) is not None)


def check_output_dir(config: FinetuneConfig) -> None:
    """The output policy (nybble.outputs) for a fine-tuning run: the output folder is not the
    model folder, inside it or around it; it is not the checkpoint resumed from or inside it;
    and the data file is not where finetune writes (it may live in the output folder, as the
    example's does)."""
    out = Path(config.output_dir)
    outputs.check_overlap(out, [config.model_dir])
    if config.resume is not None and config.resume not in RESUME_LATEST:
        outputs.check_overlap(out, [config.resume], may_contain=True)
    outputs.check_overlap(out, [config.data], may_contain=True)
    real_out, real_data = Path(os.path.realpath(out)), Path(os.path.realpath(config.data))
    if real_out in real_data.parents and _written_by_finetune(real_data.relative_to(real_out).parts[0]):
        raise outputs.OutputError(f"--data {config.data} is inside the output {out}, where finetune writes its "
                                  "adapter and checkpoints: move it or choose another output")


# ---------------------------------------------------------------------- resume checks

#: Settings a resumed run must share with its checkpoint: they fix the data order and
#: position, and the shape of the adapters and optimizer states.
RESUME_MUST_MATCH = ("model_dir", "data", "batch_size", "grad_accum", "seed", "max_length", "quant", "double_quant",
                     "blocksize", "r", "alpha", "target_modules", "optim", "fsdp")


def _check_resumable(ckpt: Path, saved: dict, config: FinetuneConfig) -> None:
    now = asdict(config)
    diffs = [f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in RESUME_MUST_MATCH
             if k in saved and _resume_key(k, saved[k]) != _resume_key(k, now[k])]
    if diffs:
        raise ValueError(f"cannot resume from {ckpt}: " + "; ".join(diffs))


def _resume_key(name: str, value):
    """What must be equal: the same files, the same set of modules, the same state layout."""
    if name in ("model_dir", "data"):
        return str(Path(value).resolve())
    if name == "target_modules":
        return sorted(value) if isinstance(value, (list, tuple)) else value
    if name == "optim":  # paged or not, the states are the same tensors
        return 8 if str(value).endswith("8bit") else 32
    return value


def _apply_hyperparameters(optimizer, scheduler, config: FinetuneConfig, say) -> None:
    """A resumed run trains with this run's lr / weight decay / betas (a checkpoint's state
    dicts would silently bring back the old ones); the schedule keeps its position."""
    old = optimizer.param_groups[0]
    changed = [f"lr {scheduler.base_lrs[0]} -> {config.lr}"] if scheduler.base_lrs[0] != config.lr else []
    if old["weight_decay"] != config.weight_decay:
        changed.append(f"weight_decay {old['weight_decay']} -> {config.weight_decay}")
    if tuple(old["betas"]) != tuple(config.betas):
        changed.append(f"betas {tuple(old['betas'])} -> {tuple(config.betas)}")
    scheduler.base_lrs = [config.lr for _ in optimizer.param_groups]
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=config.lr, lr=config.lr * factor(scheduler.last_epoch),
                     weight_decay=config.weight_decay, betas=tuple(config.betas))
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports
    if changed:
        say("resume with new hyper-parameters: " + ", ".join(changed))



# ---------------------------------------------------------------------- data order


class _Batches:
    """Micro-batches in a deterministic order (seed, epoch), sharded over ranks; resumable by
    skipping the micro-batches already consumed."""

    def __init__(self, examples, batch_size: int, pad_id: int, rank: int, world: int, seed: int):
        from torch.utils.data import DistributedSampler

        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.sampler = DistributedSampler(examples, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=world > 1)
        if len(self.sampler) == 0:
            raise ValueError(f"{len(examples)} training examples cannot be split over {world} processes "
                             "(each needs at least one)")
        self.per_epoch = max(1, len(self.sampler) // batch_size)

    def iterate(self, skip: int = 0):
        epoch, skip_in_epoch = divmod(skip, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            idx = list(self.sampler)
            for b in range(skip_in_epoch, self.per_epoch):
                chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
                yield _data.collate([self.examples[i] for i in chunk], self.pad_id)
            skip_in_epoch = 0
            epoch += 1


# ---------------------------------------------------------------------- loss

#: Optimizer steps in a row with a non-finite gradient norm before the run stops.
MAX_NON_FINITE_STEPS = 10


class NonFiniteGradientError(RuntimeError):
    """Gradients stayed NaN / Inf for MAX_NON_FINITE_STEPS optimizer steps in a row."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C (or SIGTERM / SIGHUP) stopped training after a whole step; ``checkpoint`` holds
    the run to resume, ``signum`` the signal (the CLI exits 128 + signum)."""

    def __init__(self, message: str, checkpoint: Path, signum: int = signal.SIGINT):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signum = int(signum)


class _StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the step in progress, which is then saved
    as a checkpoint: nothing trained is lost. SIGTERM and SIGHUP do the same where they are
    left at their default action (an ignored SIGHUP, under nohup, stays ignored). A second
    signal interrupts at once."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)):
                if sig is not None and (sig == signal.SIGINT or signal.getsignal(sig) == signal.SIG_DFL):
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt if signum == signal.SIGINT else outputs.OutputInterrupted(signum)
        self.requested = True
        self.signum = signum

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        return False

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether to stop now; under DDP every rank stops at the same step (a rank that saw
        no signal follows the others)."""
        if world == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item() > 0)


def _label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens a causal LM is scored on: labels shifted by one, -100 excluded."""
    return (labels[:, 1:] != _data.IGNORE_INDEX).sum()


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over the labelled positions; 0 with a
    gradient path when there are none."""
    # Shift the labels, not the logits: slicing the (B, T, V) logits would copy them once more.
    targets = torch.nn.functional.pad(labels, (0, 1), value=_data.IGNORE_INDEX)[:, 1:]
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=_data.IGNORE_INDEX, reduction="sum")


# ---------------------------------------------------------------------- the run


@dataclass
class _StepStats:
    """What one optimizer step reports: its loss (mean over its label tokens), the tokens it
    read (attention mask, all ranks) and the learning rate it used."""

    loss: float
    tokens: int
    lr: float


class TrainingRun:
    """One fine-tuning run (one call of :func:`finetune`): :meth:`setup`, :meth:`resume`,
    then :meth:`train` (:meth:`optimizer_step` per step, checkpoints on the way), then
    :meth:`save_final` and :meth:`report`. Under DDP every rank runs one."""

    def __init__(self, config: FinetuneConfig, log: Callable[[str], None] = print):
        self.config = config
        self.log = log
        self.start = 0  # steps already done (by the checkpoint resumed from)
        self.result = FinetuneResult()
        self._bad_in_a_row = 0  # optimizer steps in a row with a non-finite loss / gradient norm
        self._lock: outputs.OutputLock | None = None  # rank 0's lock on the output folder

    def run(self) -> FinetuneResult:
        try:
            self.setup()
            self.start = self.resume()
            self._prepare_training()
            self.train()
            self.save_final()
            self.report()
            return self.result
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything before the first step or a resume, in this order (which fixes the
        random draws, hence the adapters' initial values and the data order)."""
        self._setup_processes()
        self._setup_output()
        self._setup_data()
        self._setup_model()
        self._setup_optimizer()

    def _setup_processes(self) -> None:
        cfg = self.config
        self.rank, self.local_rank, self.world = dist_info()
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
            torch.distributed.init_process_group(backend)
        self.device = resolve_device(cfg.device, self.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.is_main = self.rank == 0
        self.say = self.log if self.is_main else (lambda _msg: None)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)

    def _setup_output(self) -> None:
        """The output folder, by nybble's output policy (nybble.outputs): checked against the
        inputs, created or accepted (new, empty or finetune's own) by each node's first
        process, and locked by rank 0 for the whole run (a second run on it fails at once)."""
        cfg = self.config
        check_output_dir(cfg)
        if self.local_rank == 0:
            outputs.claim_folder(cfg.output_dir, "finetune")
        if self.rank == 0:
            self._lock = outputs.OutputLock(cfg.output_dir).acquire()

    def _setup_data(self) -> None:
        import transformers

        cfg = self.config
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(cfg.model_dir))
        examples = _data.tokenize(_data.load_jsonl(cfg.data), tokenizer, cfg.max_length)
        self.batches = _Batches(examples, cfg.batch_size, _data.pad_id(tokenizer), self.rank, self.world, cfg.seed)
        steps_per_epoch = max(1, self.batches.per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    def _setup_model(self) -> None:
        from ..model import add_lora

        cfg = self.config
        model = load_model(cfg.model_dir, self.device, self.dtype, cfg.quant, cfg.blocksize, cfg.double_quant)
        # Seeded here, after the load: loading a dense model and a packed one draw different
        # amounts of randomness, and the adapters' initial values should not depend on which.
        torch.manual_seed(cfg.seed)
        add_lora(model, r=cfg.r, alpha=cfg.alpha, target_modules=cfg.target_modules, dropout=cfg.dropout)
        model.to(self.device)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if cfg.fsdp:
            # Before the optimizer: fully_shard replaces the parameters by their shards.
            from .fsdp import shard_model

            if self.world < 2:
                raise ValueError(FSDP_NEEDS_PROCESSES)
            shard_model(model, offload=cfg.fsdp_offload)
        elif cfg.fsdp_offload:
            raise ValueError("--fsdp-offload needs --fsdp")
        self.model = model
        self.train_model = model  # the DDP wrapper under torchrun (_prepare_training)

    def _setup_optimizer(self) -> None:
        cfg = self.config
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg.optim, cfg.lr, tuple(cfg.betas), cfg.weight_decay)
        self.scheduler = make_schedule(self.optimizer, cfg.schedule, self.total_steps, cfg.warmup_ratio)
        # fp16 gradients need loss scaling; bf16 / fp32 do not.
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None

    # ------------------------------------------------------------------ resume

    def resume(self) -> int:
        """Restores the checkpoint ``config.resume`` names (adapters, optimizer, schedule,
        gradient scaler, this rank's RNG state) after checking that it fits this run; returns
        the steps it has done (0 without ``resume``)."""
        from ..model import load_adapter

        cfg = self.config
        if cfg.resume is None:
            return 0
        ckpt = find_checkpoint(cfg.resume, cfg.output_dir)
        paths = CheckpointPaths(ckpt)
        state = json.loads(paths.trainer_state.read_text())
        if state.get("world_size", 1) != self.world:
            raise ValueError(f"{ckpt} was written by {state.get('world_size')} processes, resuming with {self.world}")
        _check_resumable(ckpt, state.get("config", {}), cfg)
        if int(state["step"]) >= self.total_steps:
            raise ValueError(f"{ckpt} is at step {state['step']}, not before the last step {self.total_steps}: "
                             "nothing left to train (raise --max-steps or --epochs)")
        if cfg.fsdp:
            from .fsdp import loading_into_shards

            with loading_into_shards():  # each rank keeps its slice of the adapter
                load_adapter(self.model, paths.adapter)
        else:
            load_adapter(self.model, paths.adapter)
        saved = torch.load(paths.optimizer_shard(self.rank) if cfg.fsdp else paths.optimizer, map_location="cpu",
                           weights_only=False)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        _apply_hyperparameters(self.optimizer, self.scheduler, cfg, self.say)
        if self.scaler is not None and saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        start = int(state["step"])
        _set_rng_state(torch.load(paths.rng(self.rank), weights_only=False))
        self.say(f"resumed from {ckpt} at step {start}")
        return start

    # ------------------------------------------------------------------ training

    def _prepare_training(self) -> None:
        self._no_sync = contextlib.nullcontext
        if self.config.fsdp:
            from . import fsdp

            self._no_sync = lambda: fsdp.no_sync(self.model)
        elif self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # the quantized weights are frozen buffers: nothing to sync
                find_unused_parameters=False)
            self._no_sync = self.train_model.no_sync
        self.model.train()
        self.result.memory = _memory.measure(self.model, None)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def train(self) -> None:
        """Steps ``start`` .. ``total_steps``: logs, the progress bar, periodic checkpoints;
        Ctrl-C stops after a whole step, saved (:class:`TrainingInterrupted`)."""
        cfg, start, total_steps = self.config, self.start, self.total_steps
        stream = self.batches.iterate(skip=start * cfg.grad_accum)
        self.say(f"fine-tuning {total_steps - start} steps: {self.world} process(es) on {self.device.type}, "
                 f"{self.dtype}, batch {cfg.batch_size} x accum {cfg.grad_accum} x {self.world}, lr {cfg.lr}, "
                 f"{cfg.optim}")

        bar_ctx = contextlib.nullcontext(None)
        if self.is_main and cfg.progress:
            import click

            bar_ctx = click.progressbar(length=total_steps - start, label="finetune", show_pos=True,
                                        item_show_func=lambda s: s, file=None)
        t0 = time.perf_counter()
        tokens_total = 0
        with bar_ctx as bar, _StopRequest() as stop_request:
            for step in range(start, total_steps):
                stats = self.optimizer_step(step, stream)
                self.result.losses.append(stats.loss)
                tokens_total += stats.tokens
                elapsed = time.perf_counter() - t0
                tok_s = tokens_total / max(elapsed, 1e-9)
                if bar is not None:
                    bar.update(1, f"loss {stats.loss:.4f}  {tok_s:,.0f} tok/s")
                if self._log_this_step(step):
                    self.say(f"step {step + 1}/{total_steps}  loss {stats.loss:.4f}  lr {stats.lr:.2e}  "
                             f"{tok_s:,.0f} tok/s")
                if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < total_steps:
                    self.save_checkpoint(step + 1)
                # Asked every step: under DDP it is a collective every rank joins.
                if stop_request.agreed(self.world, self.device) and step + 1 < total_steps:
                    paths = CheckpointPaths.at_step(cfg.output_dir, step + 1)
                    if not paths.is_complete():
                        self.save_checkpoint(step + 1)
                    how = "" if stop_request.signum in (None, signal.SIGINT) else \
                        f" by {signal.Signals(stop_request.signum).name}"
                    raise TrainingInterrupted(f"interrupted{how} after step {step + 1} of {total_steps}; the run "
                                              f"is saved in {paths.folder}: continue it with --resume latest",
                                              paths.folder, stop_request.signum or signal.SIGINT)
        self.result.seconds = time.perf_counter() - t0
        self.result.tokens = tokens_total
        self.result.steps = total_steps - start

    def _log_this_step(self, step: int) -> bool:
        """A log line for the first step, every ``log_every``-th and the last, when no
        progress bar is shown."""
        cfg = self.config
        return bool(cfg.log_every and (step == self.start or (step + 1) % cfg.log_every == 0
                                       or step + 1 == self.total_steps) and not cfg.progress)

    # ------------------------------------------------------------------ step

    def optimizer_step(self, step: int, stream) -> _StepStats:
        """Step ``step`` (0-based): ``grad_accum`` micro-batches from ``stream``, their loss
        and gradients, clipping, then the optimizer step, or its skip when the loss or the
        gradient norm is not finite (after MAX_NON_FINITE_STEPS skips in a row: a checkpoint
        and :class:`NonFiniteGradientError`)."""
        cfg, world, device = self.config, self.world, self.device
        model, train_model, scaler, optimizer = self.model, self.train_model, self.scaler, self.optimizer
        micro_batches = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(cfg.grad_accum)]
        # The loss is the mean over every label token of the optimizer step (all
        # micro-batches, all ranks), as with one big batch: each micro-batch adds its
        # summed token losses / the step's token count. DDP (and FSDP's reduce-scatter)
        # averages gradients over ranks, hence the factor world.
        counts = torch.stack([_label_tokens(b["labels"]) for b in micro_batches]).sum()
        counts = torch.stack([counts, sum(b["attention_mask"].sum() for b in micro_batches)]).to(torch.float64)
        if world > 1:
            torch.distributed.all_reduce(counts)
        label_tokens = counts[0].clamp(min=1)
        step_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for micro, batch in enumerate(micro_batches):
            sync = micro == cfg.grad_accum - 1 or world == 1
            ctx = contextlib.nullcontext() if sync else self._no_sync()
            meter = _memory.SavedTensorMeter(model) if step == self.start and micro == 0 else None
            with ctx:
                with meter or contextlib.nullcontext():
                    logits = train_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    loss_sum = token_loss_sum(logits, batch["labels"])
                loss = loss_sum * (world / label_tokens).to(loss_sum.dtype)
                (scaler.scale(loss) if scaler is not None else loss).backward()
            del logits
            if meter is not None:
                self.result.memory.activation_bytes = meter.bytes
            step_loss_sum += loss_sum.detach().double()
        if world > 1:
            torch.distributed.all_reduce(step_loss_sum)
        if scaler is not None:
            scaler.unscale_(optimizer)
        # Clipping also yields the total gradient norm (identical on every rank after the
        # all-reduce), whose finiteness decides the step for all ranks alike.
        clip = torch.nn.utils.clip_grad_norm_
        if cfg.fsdp:
            from .fsdp import clip_grad_norm_ as clip
        total_norm = clip(
            self.params, cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf)
        lr_now = self.scheduler.get_last_lr()[0]
        finite_loss = bool(torch.isfinite(step_loss_sum))
        if scaler is not None:
            scale = scaler.get_scale()
            scaler.step(optimizer)  # skips the step itself on inf / NaN gradients
            scaler.update()  # ... and lowers the scale after a skip
            stepped = scaler.get_scale() >= scale
            # An fp16 overflow is the scaler's business; a NaN loss, or a scale driven
            # below 1, is not something it can fix.
            bad = not stepped and (not finite_loss or scaler.get_scale() < 1.0)
        else:
            stepped = bool(torch.isfinite(total_norm))
            if stepped:
                optimizer.step()
            bad = not stepped
        if stepped:
            self.scheduler.step()
            self._bad_in_a_row = 0
        else:
            # Skipped: the model, the optimizer and the schedule stay where they were.
            self.result.skipped_steps += 1
        if bad:
            self._on_non_finite_step(step, finite_loss, step_loss_sum, label_tokens, total_norm)
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(step_loss_sum / label_tokens)  # one host sync per step
        return _StepStats(loss=loss_value, tokens=int(counts[1]), lr=lr_now)

    def _on_non_finite_step(self, step: int, finite_loss: bool, step_loss_sum, label_tokens, total_norm) -> None:
        self._bad_in_a_row += 1
        self.say(f"step {step + 1}: non-finite {'loss' if not finite_loss else 'gradient norm'} "
                 f"({float(step_loss_sum / label_tokens) if not finite_loss else float(total_norm)}); "
                 "step skipped")
        if self._bad_in_a_row >= MAX_NON_FINITE_STEPS:
            self.optimizer.zero_grad(set_to_none=True)
            ckpt = self.save_checkpoint(step + 1)
            raise NonFiniteGradientError(
                f"gradients were non-finite for {self._bad_in_a_row} steps in a row (up to step {step + 1}); "
                f"the adapter as of the last good step is saved in {ckpt}. Lower --lr or use bf16 / fp32.")

    # ------------------------------------------------------------------ save

    def save_checkpoint(self, step: int) -> Path:
        """Writes the checkpoint of ``step`` (every rank takes part); returns its folder."""
        paths = CheckpointPaths.at_step(self.config.output_dir, step)
        save_checkpoint(paths, self.model, self.optimizer, self.scheduler, step, self.config, self.rank, self.world,
                        self.scaler)
        return paths.folder

    def save_final(self) -> None:
        """The last checkpoint (with ``save_steps``) and the final adapter in the output folder."""
        out_dir = Path(self.config.output_dir)
        if self.config.save_steps:
            self.save_checkpoint(self.total_steps)
        tensors = _gathered_adapter(self.model, self.config)
        if self.is_main:
            from ..model import save_adapter

            save_adapter(self.model, out_dir, base_model_name_or_path=str(self.config.model_dir), tensors=tensors)
            self.result.adapter_dir = str(out_dir)
        _barrier(self.world)

    # ------------------------------------------------------------------ report

    def report(self) -> None:
        """Memory use (measured, and the paper's arithmetic), losses and throughput."""
        cfg, result, device = self.config, self.result, self.device
        act = result.memory.activation_bytes
        result.memory = _memory.measure(self.model, self.optimizer)
        result.memory.activation_bytes = act
        mem = result.memory
        if device.type == "cuda":
            mem.peak_bytes = int(torch.cuda.max_memory_allocated(device))
            from ..optim import paged

            if paged.managed_bytes():
                mem.notes.append(f"peak allocated counts torch's allocations only; the paged optimizer holds "
                                 f"{paged.managed_bytes() / 1e6:.1f} MB more in CUDA managed memory")
        if cfg.quant in ("nf4", "fp4"):
            est = _memory.paper_estimate(mem.base_quantized_params, mem.adapter_params,
                                         8 if cfg.optim.endswith("8bit") else 32, blocksize=cfg.blocksize,
                                         double_quant=cfg.double_quant)
            bits = _memory.weight_bits_per_param(cfg.blocksize, cfg.double_quant)
            all_params = mem.adapter_params + mem.base_quantized_params + mem.base_other_params
            mem.notes.append(f"paper arithmetic: {mem.base_quantized_params:,} x {bits:.3f} bits = "
                             f"{est['weights'] / 1e6:.3f} MB of quantized weights (+ ~1 KB of code tables per "
                             f"layer); adapters, gradients and optimizer states on the {mem.adapter_params:,} "
                             f"adapter params only ({mem.adapter_params / max(all_params, 1):.2%} "
                             f"of all parameters)")
        self.say(mem.format())
        if result.losses:
            self.say(f"loss: first step {result.losses[0]:.4f}, last step {result.losses[-1]:.4f}")
        self.say(f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f} s "
                 f"({result.tokens_per_second:,.0f} tokens/s); adapter in {Path(cfg.output_dir)}")


def finetune(config: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tunes LoRA adapters on a quantized causal LM; writes checkpoints and the final
    adapter (PEFT format) to ``config.output_dir``. Under torchrun it runs DDP over the
    adapter parameters (gloo on the CPU, NCCL on GPUs); rank 0 logs and saves."""
    return TrainingRun(config, log).run()
