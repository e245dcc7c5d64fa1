"""``nybble quantize --method gptq``: the command's GPTQ half (options are declared in
:mod:`nybble.cli`; the work is :func:`nybble.gptq_checkpoint.quantize_checkpoint_gptq`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.core import ParameterSource

#: Options that only mean something with --method gptq.
GPTQ_ONLY = ("calibration", "samples", "seq_len", "damp", "act_order", "block_size_gptq", "absmax_search", "device")


def reject_gptq_options(options: dict) -> None:
    """--calibration and friends given without --method gptq: a usage error, not ignored."""
    ctx = click.get_current_context()
    given = [name for name in GPTQ_ONLY if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
    if given:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        raise click.UsageError(f"{flags} only apply with --method gptq")


def quantize_gptq(src: Path, output: Path, method: str, blocksize: int, double_quant: bool, compute_dtype: str,
                  threads, overwrite: bool, skip, only, max_shard_size, stats: bool, quant_storage: str,
                  options: dict) -> None:
    from . import formats as fmt
    from .cli import _Fail, _interrupted, _run, human_bytes

    if options["calibration"] is None:
        raise click.UsageError("--method gptq needs --calibration FILE (text, one sample per line, or jsonl)")
    if method not in fmt.QUANT_TYPES:
        raise click.UsageError(f"--method gptq writes 4-bit weights: use --quant {' or '.join(fmt.QUANT_TYPES)}")
    try:
        from .gptq_checkpoint import quantize_checkpoint_gptq
    except ImportError as e:
        raise _Fail(f"--method gptq needs torch and transformers ({e})") from None
    bar = None

    def on_start(blocks: int) -> None:
        nonlocal bar
        bar = click.progressbar(length=max(blocks, 1), label="GPTQ", file=sys.stderr, show_pos=True, show_eta=True)
        bar.__enter__()

    def on_block(index: int, total: int, seconds: float) -> None:
        if bar is not None:
            bar.label = f"GPTQ block {index + 1}/{total} ({seconds:.1f} s)"
            bar.update(1)

    try:
        summary, gsum = _run(
            quantize_checkpoint_gptq, src, output, options["calibration"],
            samples=options["samples"], seq_len=options["seq_len"], quant=method, blocksize=blocksize,
            double_quant=double_quant, compute_dtype=compute_dtype, damp=options["damp"],
            act_order=options["act_order"], block_size_gptq=options["block_size_gptq"],
            absmax_search=options["absmax_search"], threads=threads, overwrite=overwrite, skip=skip, only=only,
            max_shard_size=max_shard_size, quant_storage=quant_storage, device=options["device"],
            on_start=on_start, on_block=on_block,
        )
    except KeyboardInterrupt as e:
        raise _interrupted(e, output) from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if stats:
        click.echo("calibration output error |XW^T - XW_hat^T| / |XW^T| per layer, RTN vs GPTQ:", err=True)
        click.echo(gsum.table(), err=True)
    s = summary
    click.echo(f"wrote {s.output} ({', '.join(s.shards)})")
    stored = "" if fmt.quant_storage_name(quant_storage) == "uint8" else f", stored as {fmt.quant_storage_name(quant_storage)}"
    click.echo(f"  tensors      {s.quantized} quantized ({method}, GPTQ{stored}) of {s.tensors}; "
               f"{s.params_quantized:,} parameters packed")
    click.echo(f"  size         {human_bytes(s.bytes_in)} -> {human_bytes(s.bytes_out)} "
               f"({s.bytes_in / max(s.bytes_out, 1):.2f}x smaller)")
    click.echo(f"  bits/param   {s.bits_per_parameter:.3f} over the quantized tensors (constants included)")
    rtn = f", {gsum.settings['rtn_fallback']} rounded to nearest" if gsum.settings.get("rtn_fallback") else ""
    click.echo(f"  calibration  {gsum.settings['samples']} samples (<= {gsum.settings['seq_len']} tokens each), "
               f"{len(gsum.layers)} layers by GPTQ{rtn}")
    click.echo(f"  error        mean output error RTN {gsum.mean_rtn_error:.4f} -> GPTQ {gsum.mean_gptq_error:.4f} "
               f"({100 * gsum.mean_reduction:.1f}% lower)")
    click.echo(f"  time         {s.seconds:.2f} s")
