"""The QLoRA fine-tuning loop behind ``nybble finetune``."""

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

from . import data as _data
from . import memory as _memory

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_8bit")
SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    dtype: str = "auto"
    device: str = "auto"
    save_steps: int = 0
    resume: str | None = None
    seed: int = 42
    log_every: int = 10
    progress: bool = True


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


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
             and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


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


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, config: FinetuneConfig, rank: int,
                    world: int, scaler=None) -> None:
    """Adapter (PEFT format) + optimizer + scheduler + step (rank 0), RNG state (every rank)."""
    from ..model import save_adapter

    path.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_adapter(model, path, base_model_name_or_path=str(config.model_dir))
        opt_state = optimizer.state_dict()
        opt_state = {**opt_state, "state": {k: {kk: (vv.cpu() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
                                            for k, v in opt_state["state"].items()}}
        torch.save({"optimizer": opt_state, "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, path / "optimizer.pt")
    torch.save(_rng_state(), path / f"rng_rank{rank}.pt")
    _barrier(world)
    if rank == 0:
        # Written last and renamed into place: a folder without it (an interrupted save) is
        # never taken for a checkpoint.
        tmp = path / ".trainer_state.json.tmp"
        tmp.write_text(json.dumps({"step": step, "world_size": world, "config": asdict(config)}, indent=2) + "\n")
        os.replace(tmp, path / "trainer_state.json")


#: Settings a resumed run must share with its checkpoint: they fix the data order and
#: position, and the shape of the adapters and optimizer states.
RESUME_MUST_MATCH = ("model_dir", "data", "batch_size", "grad_accum", "seed", "max_length", "quant", "double_quant",
                     "blocksize", "r", "alpha", "target_modules", "optim")


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


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


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
    """Ctrl-C stopped training after a whole step; ``checkpoint`` holds the run to resume."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class _StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop after the step in progress, which is then saved
    as a checkpoint: nothing trained is lost. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
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


# ---------------------------------------------------------------------- the loop


def finetune(config: FinetuneConfig, log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tunes LoRA adapters on a quantized causal LM; writes checkpoints and the final
    adapter (PEFT format) to ``config.output_dir``. Under torchrun it runs DDP over the
    adapter parameters (gloo on the CPU, NCCL on GPUs); rank 0 logs and saves."""
    import transformers

    from ..model import add_lora, load_adapter

    rank, local_rank, world = dist_info()
    dist = torch.distributed
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and config.device != "cpu" else "gloo"
        dist.init_process_group(backend)
    device = resolve_device(config.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, device)
    is_main = rank == 0
    say = log if is_main else (lambda _msg: None)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(config.model_dir))
    examples = _data.tokenize(_data.load_jsonl(config.data), tokenizer, config.max_length)
    batches = _Batches(examples, config.batch_size, _data.pad_id(tokenizer), rank, world, config.seed)
    steps_per_epoch = max(1, batches.per_epoch // config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))

    model = load_model(config.model_dir, device, dtype, config.quant, config.blocksize, config.double_quant)
    # Seeded here, after the load: loading a dense model and a packed one draw different
    # amounts of randomness, and the adapters' initial values should not depend on which.
    torch.manual_seed(config.seed)
    add_lora(model, r=config.r, alpha=config.alpha, target_modules=config.target_modules, dropout=config.dropout)
    model.to(device)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config.optim, config.lr, tuple(config.betas), config.weight_decay)
    scheduler = make_schedule(optimizer, config.schedule, total_steps, config.warmup_ratio)

    # fp16 gradients need loss scaling; bf16 / fp32 do not.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    start = 0
    resume = config.resume
    if resume is not None:
        ckpt = latest_checkpoint(config.output_dir) if resume in ("latest", "auto", "") else Path(resume)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint-* folder in {config.output_dir}")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state.get("world_size", 1) != world:
            raise ValueError(f"{ckpt} was written by {state.get('world_size')} processes, resuming with {world}")
        _check_resumable(ckpt, state.get("config", {}), config)
        if int(state["step"]) >= total_steps:
            raise ValueError(f"{ckpt} is at step {state['step']}, not before the last step {total_steps}: "
                             "nothing left to train (raise --max-steps or --epochs)")
        load_adapter(model, ckpt)
        saved = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _apply_hyperparameters(optimizer, scheduler, config, say)
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        start = int(state["step"])
        _set_rng_state(torch.load(ckpt / f"rng_rank{rank}.pt", weights_only=False))
        say(f"resumed from {ckpt} at step {start}")

    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,  # the quantized weights are frozen buffers: nothing to sync
            find_unused_parameters=False)
    model.train()

    result = FinetuneResult()
    result.memory = _memory.measure(model, None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stream = batches.iterate(skip=start * config.grad_accum)
    say(f"fine-tuning {total_steps - start} steps: {world} process(es) on {device.type}, {dtype}, "
        f"batch {config.batch_size} x accum {config.grad_accum} x {world}, lr {config.lr}, {config.optim}")

    bar_ctx = contextlib.nullcontext(None)
    if is_main and config.progress:
        import click

        bar_ctx = click.progressbar(length=total_steps - start, label="finetune", show_pos=True,
                                    item_show_func=lambda s: s, file=None)
    t0 = time.perf_counter()
    tokens_total = 0
    bad_in_a_row = 0
    with bar_ctx as bar, _StopRequest() as stop_request:
        for step in range(start, total_steps):
            micro_batches = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(config.grad_accum)]
            # The loss is the mean over every label token of the optimizer step (all
            # micro-batches, all ranks), as with one big batch: each micro-batch adds its
            # summed token losses / the step's token count. DDP averages gradients over
            # ranks, hence the factor world.
            counts = torch.stack([_label_tokens(b["labels"]) for b in micro_batches]).sum()
            counts = torch.stack([counts, sum(b["attention_mask"].sum() for b in micro_batches)]).to(torch.float64)
            if world > 1:
                dist.all_reduce(counts)
            label_tokens = counts[0].clamp(min=1)
            step_loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for micro, batch in enumerate(micro_batches):
                sync = micro == config.grad_accum - 1 or world == 1
                ctx = contextlib.nullcontext() if sync else train_model.no_sync()
                meter = _memory.SavedTensorMeter(model) if step == start and micro == 0 else None
                with ctx:
                    with meter or contextlib.nullcontext():
                        logits = train_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                        loss_sum = token_loss_sum(logits, batch["labels"])
                    loss = loss_sum * (world / label_tokens).to(loss_sum.dtype)
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                del logits
                if meter is not None:
                    result.memory.activation_bytes = meter.bytes
                step_loss_sum += loss_sum.detach().double()
            if world > 1:
                dist.all_reduce(step_loss_sum)
            if scaler is not None:
                scaler.unscale_(optimizer)
            # Clipping also yields the total gradient norm (identical on every rank after the
            # all-reduce), whose finiteness decides the step for all ranks alike.
            total_norm = torch.nn.utils.clip_grad_norm_(
                params, config.max_grad_norm if config.max_grad_norm and config.max_grad_norm > 0 else math.inf)
            lr_now = scheduler.get_last_lr()[0]
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
                scheduler.step()
                bad_in_a_row = 0
            else:
                # Skipped: the model, the optimizer and the schedule stay where they were.
                result.skipped_steps += 1
            if bad:
                bad_in_a_row += 1
                say(f"step {step + 1}: non-finite {'loss' if not finite_loss else 'gradient norm'} "
                    f"({float(step_loss_sum / label_tokens) if not finite_loss else float(total_norm)}); "
                    "step skipped")
                if bad_in_a_row >= MAX_NON_FINITE_STEPS:
                    optimizer.zero_grad(set_to_none=True)
                    ckpt = Path(config.output_dir) / f"checkpoint-{step + 1:06d}"
                    save_checkpoint(ckpt, model, optimizer, scheduler, step + 1, config, rank, world, scaler)
                    raise NonFiniteGradientError(
                        f"gradients were non-finite for {bad_in_a_row} steps in a row (up to step {step + 1}); "
                        f"the adapter as of the last good step is saved in {ckpt}. Lower --lr or use bf16 / fp32.")
            optimizer.zero_grad(set_to_none=True)
            loss_value = float(step_loss_sum / label_tokens)  # one host sync per step
            result.losses.append(loss_value)
            tokens_total += int(counts[1])
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.update(1, f"loss {loss_value:.4f}  {tokens_total / max(elapsed, 1e-9):,.0f} tok/s")
            if config.log_every and (step == start or (step + 1) % config.log_every == 0 or step + 1 == total_steps) and not config.progress:
                say(f"step {step + 1}/{total_steps}  loss {loss_value:.4f}  lr {lr_now:.2e}  "
                    f"{tokens_total / max(elapsed, 1e-9):,.0f} tok/s")
            if config.save_steps and (step + 1) % config.save_steps == 0 and step + 1 < total_steps:
                save_checkpoint(Path(config.output_dir) / f"checkpoint-{step + 1:06d}", model, optimizer, scheduler,
                                step + 1, config, rank, world, scaler)
            if stop_request.agreed(world, device) and step + 1 < total_steps:
                ckpt = Path(config.output_dir) / f"checkpoint-{step + 1:06d}"
                if not (ckpt / "trainer_state.json").is_file():
                    save_checkpoint(ckpt, model, optimizer, scheduler, step + 1, config, rank, world, scaler)
                raise TrainingInterrupted(f"interrupted after step {step + 1} of {total_steps}; the run is saved in "
                                          f"{ckpt}: continue it with --resume latest", ckpt)
    result.seconds = time.perf_counter() - t0
    result.tokens = tokens_total
    result.steps = total_steps - start

    out_dir = Path(config.output_dir)
    if config.save_steps:
        save_checkpoint(out_dir / f"checkpoint-{total_steps:06d}", model, optimizer, scheduler, total_steps, config,
                        rank, world, scaler)
    if is_main:
        from ..model import save_adapter

        save_adapter(model, out_dir, base_model_name_or_path=str(config.model_dir))
        result.adapter_dir = str(out_dir)
    _barrier(world)

    act = result.memory.activation_bytes
    result.memory = _memory.measure(model, optimizer)
    result.memory.activation_bytes = act
    mem = result.memory
    if device.type == "cuda":
        mem.peak_bytes = int(torch.cuda.max_memory_allocated(device))
        from ..optim import paged

        if paged.managed_bytes():
            mem.notes.append(f"peak allocated counts torch's allocations only; the paged optimizer holds "
                             f"{paged.managed_bytes() / 1e6:.1f} MB more in CUDA managed memory")
    if config.quant in ("nf4", "fp4"):
        est = _memory.paper_estimate(mem.base_quantized_params, mem.adapter_params,
                                     8 if config.optim.endswith("8bit") else 32, blocksize=config.blocksize,
                                     double_quant=config.double_quant)
        bits = _memory.weight_bits_per_param(config.blocksize, config.double_quant)
        mem.notes.append(f"paper arithmetic: {mem.base_quantized_params:,} x {bits:.3f} bits = "
                         f"{est['weights'] / 1e6:.3f} MB of quantized weights (+ ~1 KB of code tables per layer); "
                         f"adapters, gradients and optimizer states on the {mem.adapter_params:,} adapter params "
                         f"only ({mem.adapter_params / max(mem.adapter_params + mem.base_quantized_params + mem.base_other_params, 1):.2%} "
                         f"of all parameters)")
    say(mem.format())
    if result.losses:
        say(f"loss: first step {result.losses[0]:.4f}, last step {result.losses[-1]:.4f}")
    say(f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f} s "
        f"({result.tokens_per_second:,.0f} tokens/s); adapter in {out_dir}")
    return result
