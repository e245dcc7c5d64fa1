"""CPU layer benchmark of the fused 4-bit matmul (issue 16): nybble vs dense bf16 / fp32
``F.linear`` vs bitsandbytes' CPU path, for decode-sized inputs.

    python benches/bench_cpu_decode.py [--threads 2] [--reps 15] [--ms 1,4,8,16,64]
                                       [--shapes 4096x4096,11008x4096,4096x11008]
                                       [--no-flush] [--crossover] [--int8] [--json PATH]

Shapes are ``out x in`` (W is out x in, bitsandbytes' layout), activations bf16, NF4. For each
shape and M, every method runs once per round, the rounds interleaved, and the table gives
medians. As in a model whose layers do not fit in the last-level cache, each method cycles
through enough copies of its weight (or module) to fill 1.25x that cache, so every call reads
its weight from DRAM while the interpreter and x stay cached (this machine's L3 can be
hundreds of MB: reading a fixed buffer between calls would leave the weights in it, and a
buffer larger than it would also evict what a real model keeps cached). ``--no-flush``: one
copy each (warm cache).

Methods:

* ``dense bf16`` / ``dense fp32``: ``torch.nn.functional.linear`` on the dense weight.
* ``nybble``: ``nybble.kernels.matmul_4bit`` (float32 absmax): the ``nybble::matmul_4bit`` op
  on CPU, i.e. the fused Rust kernel up to ``FUSED_4BIT_MAX_M`` rows, dequantize + BLAS above.
* ``nybble module``: ``nybble.nn.Linear4bit`` (NF4, double quant, bf16 compute) under no_grad.
* ``nybble avx2``: ``nybble.kernels.matmul_4bit`` with ``NYBBLE_SIMD=avx2`` (the AVX2 path forced).
* ``bnb``: ``bitsandbytes.nn.Linear4bit`` (NF4, double quant, bf16 compute) in ``.eval()`` under
  no_grad, which is bitsandbytes' fastest CPU path; the path it took is printed.

GB/s counts the bytes the nybble kernel actually reads from the weight: packed codes plus
the float32 absmax (the module decodes its double-quantized absmax once and caches it, so it
reads the same bytes); "% bw" relates it to the machine's read bandwidth,
measured in the same run by a large ``torch.sum`` on the same threads.

``--crossover`` measures the fused kernel against dequantize + BLAS for a range of M (the
measurement behind ``nybble.kernels._cpu.FUSED_4BIT_MAX_M``); ``--int8`` compares the fused
LLM.int8() kernel with the op composition it replaced.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from _common import cpu_line, last_level_cache_bytes

import nybble
from nybble import _core, kernels
from nybble.kernels import _cpu

class Flusher:
    """Reads a buffer larger than the last-level cache before each call (the --crossover and
    --int8 tables; the layer table rotates weight copies instead, see the module docstring)."""

    def __init__(self, enabled: bool):
        llc = last_level_cache_bytes() or 64 * 2**20
        self.buf = torch.ones(max(64 * 2**20, int(1.25 * llc)) // 4) if enabled else None

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.sum()


def copies_for(nbytes: int, enabled: bool) -> int:
    """Copies of an ``nbytes`` weight that together fill 1.25x the last-level cache."""
    if not enabled:
        return 1
    llc = last_level_cache_bytes() or 64 * 2**20
    return max(2, -(-int(1.25 * llc) // max(1, nbytes)))


class Rotation:
    """Calls ``f(copy)`` on the next of ``copies`` in turn."""

    def __init__(self, copies: list, f):
        self.copies, self.f, self.i = copies, f, 0

    def __call__(self):
        self.i = (self.i + 1) % len(self.copies)
        return self.f(self.copies[self.i])

    def warm(self) -> None:
        """One call on every copy: first-call work (bitsandbytes' CPU repack, nybble's absmax
        decode, lazy allocations) stays out of the timed calls."""
        for c in self.copies:
            self.f(c)


def read_bandwidth(threads: int) -> float:
    """GB/s of a large torch.sum over float32 on ``threads`` threads (median of 7)."""
    x = torch.ones(256 * 2**20)  # 1 GiB
    x.sum()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts) / 1e9


def interleaved(methods: dict, reps: int, flush=lambda: None) -> dict[str, float]:
    """Median seconds per method, the methods run in turn each round, the order rotated from round
    to round (after a warm-up)."""
    for f in methods.values():
        getattr(f, "warm", f)()
    times = {name: [] for name in methods}
    names = list(methods)
    for r in range(reps):
        # Each round starts one method later: what runs before a call (and so what it leaves in
        # the caches and TLBs) is not always the same method.
        for name in names[r % len(names):] + names[:r % len(names)]:
            f = methods[name]
            flush()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def bnb_layer(w: torch.Tensor):
    """A bitsandbytes Linear4bit (NF4 + DQ, bf16 compute) holding ``w``, or None."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None, "bitsandbytes not installed"
    out_f, in_f = w.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(w.float(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu").eval()
    with torch.no_grad():
        layer(torch.zeros(1, in_f, dtype=torch.bfloat16))
    qs = layer.weight.quant_state
    repacked = bool(getattr(qs, "packing_format_for_cpu", False))
    try:
        from bitsandbytes.backends.cpu import ops as bcpu

        hub = getattr(bcpu, "gemm_4bit_forward_kernel", None) is not None
    except ImportError:
        hub = False
    if repacked:
        kernel = ("kernels-community gemm_4bit_forward (hub)" if hub
                  else "libbitsandbytes_cpu gemv_4bit_inference_cpu_nf4_bf16 (C++, AVX512-BF16)")
        path = f"bnb {bnb.__version__}: Linear4bit.eval() repacked the weight for CPU -> F.gemv_4bit -> {kernel}"
    else:
        path = f"bnb {bnb.__version__}: Linear4bit.eval() without CPU repack -> gemm_4bit (dequantize + matmul)"
    return layer, path


def layer_table(args) -> list[dict]:
    rotate = not args.no_flush
    rows = []
    bnb_path = None
    for shape in args.shapes:
        out_f, in_f = shape
        g = torch.Generator().manual_seed(out_f * 7 + in_f)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        w_bf16, w_f32 = w.bfloat16(), w.bfloat16().float()
        packed, absmax = kernels.quantize_4bit(w_bf16, 64, "nf4")
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w_f32)
        module = nybble.nn.Linear4bit.from_linear(lin, quant_type="nf4", blocksize=64, double_quant=True,
                                                  compute_dtype=torch.bfloat16).eval()
        nblocks = absmax.numel()
        kernel_bytes = packed.numel() + 4 * nblocks
        module_bytes = kernel_bytes  # the DQ absmax is decoded once, at the first call (cached)
        n_packed = copies_for(kernel_bytes, rotate)
        bf16s = [w_bf16.clone() for _ in range(copies_for(w_bf16.numel() * 2, rotate))]
        f32s = [w_f32.clone() for _ in range(copies_for(w_f32.numel() * 4, rotate))]
        packs = [(packed.clone(), absmax.clone()) for _ in range(n_packed)]
        modules = [module] + [copy.deepcopy(module) for _ in range(n_packed - 1)]
        bnb_mods = []
        for _ in range(0 if args.no_bnb else n_packed):
            bnb_mod, bnb_path = bnb_layer(w_bf16)
            if bnb_mod is None:
                break
            bnb_mods.append(bnb_mod)
        del w, w_f32
        for m in args.ms:
            x = torch.randn(m, in_f, generator=g).bfloat16()
            xf = x.float()

            def nyb(pa, x=x):
                return kernels.matmul_4bit(x, pa[0], pa[1], (out_f, in_f), 64, "nf4")

            def nyb_avx2(pa, x=x):
                os.environ["NYBBLE_SIMD"] = "avx2"
                try:
                    kernels.matmul_4bit(x, pa[0], pa[1], (out_f, in_f), 64, "nf4")
                finally:
                    os.environ.pop("NYBBLE_SIMD", None)

            methods = {
                "dense bf16": Rotation(bf16s, lambda wb, x=x: F.linear(x, wb)),
                "dense fp32": Rotation(f32s, lambda wf, xf=xf: F.linear(xf, wf)),
                "nybble": Rotation(packs, nyb),
                "module": Rotation(modules, lambda mod, x=x: mod(x)),
            }
            if "avx2" in _core.simd_levels():
                methods["avx2"] = Rotation(packs, nyb_avx2)
            if bnb_mods:
                methods["bnb"] = Rotation(bnb_mods, lambda mod, x=x: mod(x))
            with torch.no_grad():
                t = interleaved(methods, args.reps)
            row = {"shape": f"{out_f}x{in_f}", "m": m, "ms": {k: v * 1e3 for k, v in t.items()},
                   "fused": m <= (_cpu.fused_4bit_max_m(torch.bfloat16) or m),
                   "gbs": kernel_bytes / t["nybble"] / 1e9, "module_gbs": module_bytes / t["module"] / 1e9,
                   "copies": {"packed": n_packed, "bf16": len(bf16s), "fp32": len(f32s)}}
            rows.append(row)
            print(format_row(row, args.bandwidth), flush=True)
        del bf16s, f32s, packs, modules, bnb_mods
    if bnb_path:
        print(f"\nbitsandbytes path: {bnb_path}")
    return rows


HEADER = ("| layer | M | dense bf16 ms | dense fp32 ms | nybble ms | nybble vs bf16 | vs fp32 | module vs bf16 "
          "| avx2 vs bf16 | bnb vs bf16 | nybble vs bnb | nybble GB/s (% bw) | module GB/s |")


def format_row(r: dict, bw: float) -> str:
    t = r["ms"]
    bf = t["dense bf16"]

    def ratio(name, ref=bf):
        return f"{ref / t[name]:.2f}x" if name in t else "-"

    fused = "" if r["fused"] else " (deq+BLAS)"
    return (f"| {r['shape']} | {r['m']} | {bf:.3f} | {t['dense fp32']:.3f} | {t['nybble']:.3f}{fused} | "
            f"{ratio('nybble')} | {ratio('nybble', t['dense fp32'])} | {ratio('module')} | {ratio('avx2')} | "
            f"{ratio('bnb')} | {(t['bnb'] / t['nybble']) if 'bnb' in t else float('nan'):.2f}x | "
            f"{r['gbs']:.1f} ({100 * r['gbs'] / bw:.0f}%) | {r['module_gbs']:.1f} |")


def crossover(args) -> list[dict]:
    """Fused kernel vs dequantize + BLAS (what ``matmul_4bit`` does above the threshold)."""
    flush = Flusher(not args.no_flush)
    rows = []
    print("\n| layer | M | fused ms | dequant+BLAS ms | dequant+BLAS in f32 ms | fused speed-up | vs f32 BLAS |")
    print("|---|---|---|---|---|---|---|")
    for out_f, in_f in args.shapes:
        g = torch.Generator().manual_seed(1)
        w = (torch.randn(out_f, in_f, generator=g) * 0.02).bfloat16()
        packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
        shape = [out_f, in_f]
        for m in args.crossover_ms:
            x = torch.randn(m, in_f, generator=g).bfloat16()

            def deq(x=x):
                wd = _cpu.dequantize_4bit(packed, absmax, shape, 64, "nf4", x.dtype)
                return F.linear(x, wd)

            def deq32(x=x):  # the weight decoded to float32 and a float32 GEMM, rounded once
                wd = _cpu.dequantize_4bit(packed, absmax, shape, 64, "nf4", torch.float32)
                return F.linear(x.float(), wd).to(x.dtype)

            t = interleaved({"fused": lambda x=x: _cpu.matmul_4bit_fused(x, packed, absmax, shape, 64, "nf4", None),
                             "deq": deq, "deq32": deq32}, args.reps, flush)
            rows.append({"shape": f"{out_f}x{in_f}", "m": m, "fused_ms": t["fused"] * 1e3, "deq_ms": t["deq"] * 1e3,
                         "deq32_ms": t["deq32"] * 1e3})
            print(f"| {out_f}x{in_f} | {m} | {t['fused'] * 1e3:.3f} | {t['deq'] * 1e3:.3f} | {t['deq32'] * 1e3:.3f} | "
                  f"{t['deq'] / t['fused']:.2f}x | {t['deq32'] / t['fused']:.2f}x |", flush=True)
    return rows


def int8_table(args) -> list[dict]:
    """The fused LLM.int8() kernel vs the op composition it replaced (and dense bf16)."""
    from nybble.kernels import ops

    flush = Flusher(not args.no_flush)
    rows = []
    print("\n| layer | M | dense bf16 ms | composition ms | fused int8 ms | fused vs bf16 | fused vs composition |")
    print("|---|---|---|---|---|---|---|")
    for out_f, in_f in args.shapes:
        g = torch.Generator().manual_seed(2)
        w = (torch.randn(out_f, in_f, generator=g) * 0.02).bfloat16()
        qw = nybble.int8.quantize_absmax(w.float(), "row")
        q, scb = qw.q, qw.absmax
        for m in args.ms:
            x = torch.randn(m, in_f, generator=g).bfloat16()
            t = interleaved({"dense": lambda x=x: F.linear(x, w),
                             "comp": lambda x=x: ops._int8_linear(x, q, scb, None, 6.0),
                             "fused": lambda x=x: _cpu.int8_linear(x, q, scb, None, 6.0)}, max(3, args.reps // 3), flush)
            rows.append({"shape": f"{out_f}x{in_f}", "m": m, **{k: v * 1e3 for k, v in t.items()}})
            print(f"| {out_f}x{in_f} | {m} | {t['dense'] * 1e3:.3f} | {t['comp'] * 1e3:.3f} | {t['fused'] * 1e3:.3f} | "
                  f"{t['dense'] / t['fused']:.2f}x | {t['comp'] / t['fused']:.2f}x |", flush=True)
    return rows


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--ms", default="1,4,8,16,64")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    p.add_argument("--no-flush", action="store_true", help="do not evict the caches before each timed call")
    p.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    p.add_argument("--crossover", action="store_true", help="also measure fused vs dequantize + BLAS")
    p.add_argument("--crossover-ms", default="1,8,16,32,48,64,96,128,192,256")
    p.add_argument("--int8", action="store_true", help="also time the fused LLM.int8() kernel")
    p.add_argument("--skip-layers", action="store_true", help="only the --crossover / --int8 tables")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.ms = [int(v) for v in args.ms.split(",")]
    args.crossover_ms = [int(v) for v in args.crossover_ms.split(",")]
    args.shapes = parse_shapes(args.shapes)
    torch.set_num_threads(args.threads)
    _core.set_num_threads(args.threads)
    print(cpu_line())
    print(f"torch {torch.__version__}, {args.threads} threads, {args.reps} interleaved rounds, medians; "
          f"{'weights from DRAM (copies rotated past the last-level cache)' if not args.no_flush else 'warm cache'}; "
          f"nybble fused (bf16 x) up to M = {_cpu.fused_4bit_max_m(torch.bfloat16)}")
    args.bandwidth = read_bandwidth(args.threads)
    print(f"read bandwidth (torch.sum of 1 GiB float32, {args.threads} threads): {args.bandwidth:.1f} GB/s\n")
    results: dict = {"cpu": cpu_line(), "threads": args.threads, "bandwidth_gbs": args.bandwidth}
    if not args.skip_layers:
        print(HEADER)
        print("|" + "---|" * (HEADER.count("|") - 1))
        results["layers"] = layer_table(args)
    if args.crossover:
        results["crossover"] = crossover(args)
    if args.int8:
        results["int8"] = int8_table(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
