#!/usr/bin/env python3
"""Checks and times nybble's CUDA kernels on one GPU; writes bench_gpu.json and bench_gpu.md.

    python benches/bench_gpu.py [--out DIR] [--quick]     # on a CUDA machine with CuPy
    python benches/bench_gpu.py --dry-run --out /tmp/b     # CPU, tiny shapes: the logic only

Measured (median of timed repeats, CUDA events):
  * correctness first: every kernel against the float64 torch reference on random inputs;
  * fused / dequant+cuBLAS 4-bit matmul vs bf16 torch.matmul (and bitsandbytes if importable)
    for weights 4096x4096, 4096x11008, 11008x4096, 8192x28672 and M = 1, 16, 512, 4096;
  * dequantize bandwidth vs device-to-device copy bandwidth;
  * QLoRA layer forward + backward at M = 4096 vs the same LoRA layer on a bf16 base.
The output folder defaults to $OUT, else benches/results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from nybble import kernels
from nybble.kernels import reference as ref

WEIGHTS = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
MS = [1, 16, 512, 4096]
DRY_WEIGHTS = [(64, 96), (33, 128)]
DRY_MS = [1, 3, 70]


def timer(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def max_rel_err(got: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor) -> float:
    return float(((got.double() - expected).abs() / (scale + 1e-12)).max())


def run_checks(device: torch.device, quick: bool) -> list[dict]:
    """Each op on fresh random inputs vs the float64 reference (bitwise where it must be)."""
    g = torch.Generator(device="cpu").manual_seed(int.from_bytes(os.urandom(4), "little"))
    checks = []

    def record(name, ok, detail=""):
        checks.append({"check": name, "ok": bool(ok), "detail": detail})

    for quant_type in ("nf4", "fp4"):
        w = (torch.randn(1000, 333, generator=g) * 0.02).to(device)
        packed, absmax = kernels.quantize_4bit(w, 64, quant_type)
        p_ref, a_ref = ref.quantize_4bit(w.cpu(), 64, quant_type)
        record(f"quantize_4bit {quant_type} bit-identical", torch.equal(packed.cpu(), p_ref) and torch.equal(absmax.cpu(), a_ref))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            got = kernels.dequantize_4bit(packed, absmax, w.shape, 64, quant_type, dtype)
            exp = ref.dequantize_4bit(p_ref, a_ref, w.shape, 64, quant_type, torch.float64).to(dtype)
            record(f"dequantize_4bit {quant_type} {dtype} bit-identical", torch.equal(got.cpu(), exp))
        for m in (DRY_MS if device.type == "cpu" else (1, 7, 16, 33, 64, 65, 300)):
            k_in = 320
            wm = (torch.randn(257, k_in, generator=g) * 0.02).to(device)
            pm, am = kernels.quantize_4bit(wm, 64, quant_type)
            x = torch.randn(m, k_in, generator=g).to(device, torch.bfloat16)
            w64 = ref.dequantize_4bit(pm, am, wm.shape, 64, quant_type, torch.float64)
            exp = x.double() @ w64.t()
            got = kernels.matmul_4bit(x, pm, am, wm.shape, 64, quant_type)
            err = max_rel_err(got, exp, x.double().abs() @ w64.abs().t())
            record(f"matmul_4bit {quant_type} M={m}", err < 2**-6, f"max rel err {err:.2e}")
    x = (torch.randn(40, 256, generator=g) * 2).to(device, torch.float16)
    q, ra, cols = kernels.int8_vectorwise_quant(x, 6.0)
    q_r, ra_r, cols_r = ref.int8_vectorwise_quant(x.cpu(), 6.0)
    record("int8_vectorwise_quant exact", torch.equal(q.cpu(), q_r) and torch.equal(ra.cpu(), ra_r) and torch.equal(cols.cpu(), cols_r))
    qb = torch.randint(-127, 128, (72, 256), generator=g, dtype=torch.int8).to(device)
    sb = torch.rand(72, generator=g).to(device)
    got = kernels.int8_matmul_dequant(q, qb, ra, sb, None, torch.float32)
    exp = ref.int8_matmul_dequant(q.cpu(), qb.cpu(), ra.cpu(), sb.cpu(), None, torch.float64)
    err = float((got.cpu().double() - exp).abs().max() / (exp.abs().max() + 1e-12))
    record("int8_matmul_dequant", err < 1e-5, f"max err {err:.2e}")
    return checks


def bench_matmul(device, weights, ms, repeats) -> list[dict]:
    bnbf = None
    if device.type == "cuda":
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf
        except Exception:  # any import failure means "not available" here
            bnbf = None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for out_f, in_f in weights:
        w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
        packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
        bnb_state = None
        if bnbf is not None and device.type == "cuda":
            bnb_w, bnb_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        for m in ms:
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            row = {"weight": f"{out_f}x{in_f}", "M": m}
            row["nybble_s"] = timer(lambda: kernels.matmul_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4"), device, repeats)
            row["path"] = "fused" if (device.type == "cuda" and m <= kernels.FUSED_MAX_M and kernels.cuda_available()) else "dequant+matmul"
            row["dense_s"] = timer(lambda: torch.matmul(x, w.t()), device, repeats)
            if bnb_state is not None:
                row["bnb_s"] = timer(lambda: bnb.matmul_4bit(x, bnb_w.t(), quant_state=bnb_state), device, repeats)
            flops = 2.0 * m * out_f * in_f
            row["nybble_tflops"] = flops / row["nybble_s"] / 1e12
            row["weight_read_gbs"] = (out_f * in_f / 2 + absmax.numel() * 4) / row["nybble_s"] / 1e9
            rows.append(row)
    return rows


def bench_dequant_bandwidth(device, weights, repeats) -> list[dict]:
    rows = []
    for out_f, in_f in weights:
        n = out_f * in_f
        w = torch.randn(out_f, in_f, device=device) * 0.02
        packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
        t = timer(lambda: kernels.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", torch.bfloat16), device, repeats)
        dense = w.to(torch.bfloat16)
        t_copy = timer(lambda: dense.clone(), device, repeats)
        moved = n / 2 + absmax.numel() * 4 + n * 2
        rows.append({
            "weight": f"{out_f}x{in_f}", "dequant_s": t, "dequant_gbs": moved / t / 1e9,
            "copy_s": t_copy, "copy_gbs": 2 * n * 2 / t_copy / 1e9,
        })
    return rows


def bench_qlora_layer(device, shape, m, repeats, rank=16) -> dict:
    out_f, in_f = shape
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    a = (torch.randn(rank, in_f, device=device) * 0.01).to(dtype).requires_grad_()
    b = torch.zeros(out_f, rank, device=device, dtype=dtype).requires_grad_()
    x = torch.randn(m, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(m, out_f, device=device, dtype=dtype)

    def qlora():
        kernels.lora_linear_4bit(x, packed, absmax, shape, 64, "nf4", a, b, 2.0).backward(grad)

    def bf16_lora():
        (torch.matmul(x, w.t()) + 2.0 * torch.matmul(torch.matmul(x, a.t()), b.t())).backward(grad)

    return {"weight": f"{out_f}x{in_f}", "M": m, "rank": rank, "qlora_s": timer(qlora, device, repeats),
            "bf16_lora_s": timer(bf16_lora, device, repeats)}


def markdown(results: dict) -> str:
    lines = [f"# nybble GPU benchmark ({results['device']})", ""]
    lines += ["## Checks", "", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |" for c in results["checks"]]
    lines += ["", "## 4-bit matmul (NF4, blocksize 64)", "",
              "| weight | M | path | nybble ms | bf16 matmul ms | bnb ms | nybble / bf16 | weight GB/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["matmul"]:
        bnb = f"{r['bnb_s'] * 1e3:.3f}" if "bnb_s" in r else "-"
        lines.append(f"| {r['weight']} | {r['M']} | {r['path']} | {r['nybble_s'] * 1e3:.3f} | {r['dense_s'] * 1e3:.3f} | "
                     f"{bnb} | {r['nybble_s'] / r['dense_s']:.2f} | {r['weight_read_gbs']:.0f} |")
    lines += ["", "## Dequantize bandwidth (NF4 -> bf16)", "",
              "| weight | dequant GB/s | copy GB/s | ratio |", "|---|---|---|---|"]
    for r in results["dequant"]:
        lines.append(f"| {r['weight']} | {r['dequant_gbs']:.0f} | {r['copy_gbs']:.0f} | {r['dequant_gbs'] / r['copy_gbs']:.2f} |")
    q = results["qlora"]
    lines += ["", "## QLoRA layer forward + backward", "",
              "| weight | M | rank | QLoRA ms | bf16-base LoRA ms | ratio |", "|---|---|---|---|---|---|",
              f"| {q['weight']} | {q['M']} | {q['rank']} | {q['qlora_s'] * 1e3:.3f} | {q['bf16_lora_s'] * 1e3:.3f} | "
              f"{q['qlora_s'] / q['bf16_lora_s']:.2f} |", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else benches/results)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercise the logic without a GPU")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    args = p.parse_args(argv)
    out_dir = args.out or Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.dry_run:
        device, weights, ms, repeats, qlora_shape, qlora_m = torch.device("cpu"), DRY_WEIGHTS, DRY_MS, 2, (64, 96), 8
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu: no CUDA device (use --dry-run to exercise the script on CPU)")
        if not kernels.cuda_available():
            sys.exit("bench_gpu: CuPy is not importable; install cupy-cuda12x or cupy-cuda13x")
        device = torch.device("cuda")
        weights = WEIGHTS[:2] if args.quick else WEIGHTS
        ms, repeats, qlora_shape, qlora_m = MS, (10 if args.quick else 30), (4096, 4096), 4096

    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                     "torch": torch.__version__, "dry_run": args.dry_run}
    if device.type == "cuda":
        from nybble.kernels import _cupy, _source

        t0 = time.perf_counter()
        for name in _source.KERNELS:
            _cupy.get_module(name, device.index or 0)
        results["compile_s"] = time.perf_counter() - t0
        import cupy

        results["cupy"] = cupy.__version__
    results["checks"] = run_checks(device, args.quick)
    results["matmul"] = bench_matmul(device, weights, ms, repeats)
    results["dequant"] = bench_dequant_bandwidth(device, weights, repeats)
    results["qlora"] = bench_qlora_layer(device, qlora_shape, qlora_m, repeats)

    (out_dir / "bench_gpu.json").write_text(json.dumps(results, indent=2))
    (out_dir / "bench_gpu.md").write_text(markdown(results))
    print(markdown(results))
    if not all(c["ok"] for c in results["checks"]):
        print("bench_gpu: some checks FAILED", file=sys.stderr)
    return results


if __name__ == "__main__":
    res = main()
    sys.exit(0 if all(c["ok"] for c in res["checks"]) else 1)
