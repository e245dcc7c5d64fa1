#!/usr/bin/env python3
"""Checks and times nybble's CUDA kernels on one GPU; writes bench_gpu.json and bench_gpu.md.

    python benches/bench_gpu.py [--out DIR] [--quick]     # on a CUDA machine with CuPy
    python benches/bench_gpu.py --dry-run --out /tmp/b     # CPU, tiny shapes: the logic only

Measured (median of timed repeats, CUDA events):
  * correctness first: every kernel against the float64 torch reference on random inputs
    (the QLoRA ops included: GEMV with the LoRA epilogue, the transposed backward GEMV,
    multi-adapter rows, the LLM.int8() LoRA epilogue);
  * fused / dequant+cuBLAS 4-bit matmul vs bf16 torch.matmul (and bitsandbytes if importable)
    for weights 4096x4096, 4096x11008, 11008x4096, 8192x28672 and M = 1, 16, 512, 4096;
  * decode with an unmerged adapter (rank 16): nybble's GEMV + LoRA epilogue vs bf16
    torch.matmul + the two LoRA matmuls, vs nybble's plain GEMV + torch LoRA matmuls, and vs
    bitsandbytes + the LoRA matmuls, at M = 1, 16, 64 on 4096x4096, 4096x11008, 8192x28672;
  * the backward GEMV dX = g W + s (g B) A at M = 1, 16, 64 vs bf16 torch (two matmuls);
  * many adapters over one base (16 rows, 8 adapters) vs one adapter, and vs gathered bmm;
  * LLM.int8() with LoRA at M = 1, 16: the fused epilogue vs the op composition + torch LoRA;
  * dequantize bandwidth vs device-to-device copy bandwidth;
  * QLoRA layer forward + backward at M = 16 and 4096 vs the same LoRA layer on a bf16 base;
  * the registers / local memory / shared memory the device's compile gave each kernel.
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
LORA_WEIGHTS = [(4096, 4096), (4096, 11008), (8192, 28672)]
LORA_MS = [1, 16, 64]
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
    return float(((got.detach().double() - expected).abs() / (scale + 1e-12)).max())


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
    run_qlora_checks(device, g, record)
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


def run_qlora_checks(device: torch.device, g: torch.Generator, record) -> None:
    """The QLoRA ops (through the layer Function / the ops, as the modules call them) against
    float64 math: forward and input gradient across the small-M kernels and the large-M path."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_f, in_f = 515, 640
    w = (torch.randn(out_f, in_f, generator=g) * 0.02).to(device)
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", torch.float64)
    ms = DRY_MS if device.type == "cpu" else (1, 7, 16, 33, 64, 65, 300)
    for rank in (1, 8, 64):
        a = (torch.randn(rank, in_f, generator=g) * 0.05).to(device, dtype)
        b = (torch.randn(out_f, rank, generator=g) * 0.05).to(device, dtype)
        a64, b64 = a.double(), b.double()
        for m in ms:
            x = torch.randn(m, in_f, generator=g).to(device, dtype).requires_grad_()
            out = kernels.lora_linear_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4", a, b, 2.0)
            gout = torch.randn(m, out_f, generator=g).to(device, dtype)
            out.backward(gout)
            x64 = x.detach().double()
            exp = x64 @ w64.t() + 2.0 * (x64 @ a64.t()) @ b64.t()
            mag = x64.abs() @ w64.abs().t() + 2.0 * (x64.abs() @ a64.abs().t()) @ b64.abs().t()
            err = max_rel_err(out, exp, mag)
            record(f"QLoRA forward r={rank} M={m}", err < 2**-6, f"max rel err {err:.2e}")
            g64 = gout.double()
            gx = g64 @ w64 + 2.0 * (g64 @ b64) @ a64
            gmag = g64.abs() @ w64.abs() + 2.0 * (g64.abs() @ b64.abs()) @ a64.abs()
            err = max_rel_err(x.grad, gx, gmag)
            record(f"QLoRA grad_x r={rank} M={m}", err < 2**-6, f"max rel err {err:.2e}")
    # Many adapters over one base: each row its adapter, -1 none.
    adapters, rank = 3, 8
    sa = (torch.randn(adapters, rank, in_f, generator=g) * 0.05).to(device, dtype)
    sb = (torch.randn(adapters, out_f, rank, generator=g) * 0.05).to(device, dtype)
    idx = torch.tensor([2, -1, 0, 1, 2, 0, 1], device=device)
    x = torch.randn(idx.numel(), in_f, generator=g).to(device, dtype)
    scales = torch.tensor([1.0, 0.5, 2.0], device=device)
    got = kernels.multi_lora_linear_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4", sa, sb, idx, 1.5, scales)
    exp, _ = ref.matmul_4bit_lora(x.double(), packed, absmax, (out_f, in_f), 64, "nf4", None, None, sa.double(),
                                  sb.double(), 1.5, idx, scales)
    err = max_rel_err(got, exp, x.double().abs() @ w64.abs().t() + exp.abs())
    record("multi-adapter rows", err < 2**-6, f"max rel err {err:.2e}")
    # LLM.int8() base with the LoRA term (outlier columns at threshold 6).
    q_w = torch.randint(-127, 128, (out_f, in_f), generator=g, dtype=torch.int8).to(device)
    scb = (torch.rand(out_f, generator=g) * 0.05 + 0.01).to(device)
    a = (torch.randn(8, in_f, generator=g) * 0.05).to(device, dtype)
    b = (torch.randn(out_f, 8, generator=g) * 0.05).to(device, dtype)
    for m in (DRY_MS if device.type == "cpu" else (1, 16, 64, 300)):
        x = torch.randn(m, in_f, generator=g).to(device, dtype)
        x[:, 3] = 8.0
        from nybble.kernels import linear_8bit

        got = linear_8bit(x, q_w, scb, None, 6.0, lora_a=a, lora_b=b, scale=2.0)
        exp, _ = ref.int8_linear_lora(x.float(), q_w, scb, None, 6.0, None, a.float(), b.float(), 2.0)
        err = float(((got.float() - exp).abs() / (exp.abs() + 1.0)).max())
        record(f"LLM.int8() + LoRA M={m}", err < 2**-5, f"max err {err:.2e}")


def _dense_lora(x, w, a, b, scale):
    return torch.matmul(x, w.t()) + scale * torch.matmul(torch.matmul(x, a.t()), b.t())


def bench_lora_decode(device, weights, ms, repeats, rank=16) -> list[dict]:
    """Decode with an unmerged adapter: the fused GEMV + LoRA epilogue against its peers."""
    bnb, bnbf = _bitsandbytes(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for out_f, in_f in weights:
        w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
        packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
        a = (torch.randn(rank, in_f, device=device) * 0.02).to(dtype)
        b = (torch.randn(out_f, rank, device=device) * 0.02).to(dtype)
        bnb_w = bnb_state = None
        if bnbf is not None:
            bnb_w, bnb_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        for m in ms:
            x = torch.randn(m, in_f, device=device, dtype=dtype)
            row = {"weight": f"{out_f}x{in_f}", "M": m, "rank": rank}
            with torch.no_grad():
                row["fused_s"] = timer(
                    lambda: kernels.lora_linear_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4", a, b, 2.0), device,
                    repeats)
                row["unfused_s"] = timer(
                    lambda: kernels.matmul_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4")
                    + 2.0 * torch.matmul(torch.matmul(x, a.t()), b.t()), device, repeats)
                row["dense_s"] = timer(lambda: _dense_lora(x, w, a, b, 2.0), device, repeats)
                if bnb_state is not None:
                    row["bnb_s"] = timer(lambda: bnb.matmul_4bit(x, bnb_w.t(), quant_state=bnb_state)
                                         + 2.0 * torch.matmul(torch.matmul(x, a.t()), b.t()), device, repeats)
            row["weight_read_gbs"] = (out_f * in_f / 2 + absmax.numel() * 4) / row["fused_s"] / 1e9
            rows.append(row)
    return rows


def bench_lora_backward(device, weights, ms, repeats, rank=16) -> list[dict]:
    """dX = g W + s (g B) A for small M: the transposed GEMV (+ LoRA epilogue) vs bf16 torch."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for out_f, in_f in weights:
        w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
        packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
        a = (torch.randn(rank, in_f, device=device) * 0.02).to(dtype)
        b = (torch.randn(out_f, rank, device=device) * 0.02).to(dtype)
        for m in ms:
            g = torch.randn(m, out_f, device=device, dtype=dtype)
            row = {"weight": f"{out_f}x{in_f}", "M": m, "rank": rank}

            def fused():
                gxa = 2.0 * torch.matmul(g, b)
                return torch.ops.nybble.matmul_4bit_grad_input(g, packed, absmax, [out_f, in_f], 64, "nf4", gxa, a)

            def dense():
                return torch.matmul(g, w) + torch.matmul(2.0 * torch.matmul(g, b), a)

            def dequant_then_matmul():
                wd = kernels.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", dtype)
                return torch.matmul(g, wd) + torch.matmul(2.0 * torch.matmul(g, b), a)

            row["fused_s"] = timer(fused, device, repeats)
            row["dense_s"] = timer(dense, device, repeats)
            row["dequant_s"] = timer(dequant_then_matmul, device, repeats)
            rows.append(row)
    return rows


def bench_multi_adapter(device, shape, m, adapters, repeats, rank=16) -> dict:
    """Serving many adapters over one base: each row its adapter, in one fused call."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_f, in_f = shape
    w = (torch.randn(out_f, in_f, device=device) * 0.02).to(dtype)
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    sa = (torch.randn(adapters, rank, in_f, device=device) * 0.02).to(dtype)
    sb = (torch.randn(adapters, out_f, rank, device=device) * 0.02).to(dtype)
    idx = torch.randint(0, adapters, (m,), device=device)
    scales = torch.ones(adapters, device=device)
    x = torch.randn(m, in_f, device=device, dtype=dtype)

    def gathered():  # the bf16 base plus per-row gathered adapters (bmm)
        xa = torch.bmm(x[:, None, :], sa[idx].transpose(1, 2))
        return torch.matmul(x, w.t()) + 2.0 * torch.bmm(xa, sb[idx].transpose(1, 2))[:, 0]

    with torch.no_grad():
        multi = timer(lambda: kernels.multi_lora_linear_4bit(x, packed, absmax, shape, 64, "nf4", sa, sb, idx, 2.0,
                                                             scales, check_index=False), device, repeats)
        single = timer(lambda: kernels.lora_linear_4bit(x, packed, absmax, shape, 64, "nf4", sa[0], sb[0], 2.0),
                       device, repeats)
        dense = timer(gathered, device, repeats)
    return {"weight": f"{out_f}x{in_f}", "M": m, "adapters": adapters, "rank": rank, "multi_s": multi,
            "single_s": single, "gathered_bf16_s": dense}


def bench_int8_lora(device, shape, ms, repeats, rank=16) -> list[dict]:
    """LLM.int8() + LoRA: the fused epilogue (small M) vs the op composition + torch LoRA."""
    from nybble.kernels import linear_8bit

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out_f, in_f = shape
    q_w = torch.randint(-127, 128, (out_f, in_f), device=device, dtype=torch.int8)
    scb = torch.rand(out_f, device=device) * 0.05 + 0.01
    a = (torch.randn(rank, in_f, device=device) * 0.02).to(dtype)
    b = (torch.randn(out_f, rank, device=device) * 0.02).to(dtype)
    rows = []
    for m in ms:
        x = torch.randn(m, in_f, device=device, dtype=dtype)
        with torch.no_grad():
            fused = timer(lambda: linear_8bit(x, q_w, scb, None, 6.0, lora_a=a, lora_b=b, scale=2.0), device, repeats)
            composed = timer(lambda: kernels.int8_linear(x, q_w, scb, None, 6.0)
                             + 2.0 * torch.matmul(torch.matmul(x, a.t()), b.t()), device, repeats)
        rows.append({"weight": f"{out_f}x{in_f}", "M": m, "rank": rank, "fused_s": fused, "composed_s": composed})
    return rows


def kernel_resources(device) -> list[dict]:
    """Registers, local (spill) memory and static shared memory of every launched kernel as the
    device's NVRTC compiled it (CuPy's function attributes), with the occupancy they imply."""
    from nybble.kernels import _cupy, _source

    rows = []
    dev = device.index or 0
    cc = torch.cuda.get_device_capability(dev)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    for file, names in _source.KERNELS.items():
        for name in names:
            attrs = _cupy.get_function(file, name, dev).attributes
            threads = _source.block_threads(name)
            warps = -(-threads // 32)
            regs_per_warp = -(-max(attrs["num_regs"], 1) * 32 // 256) * 256
            blocks = min((65536 // regs_per_warp) // warps, 2048 // threads, 32)
            rows.append({"kernel": name, "sm": f"{cc[0]}{cc[1]}", "threads": threads, "regs": attrs["num_regs"],
                         "local_bytes": attrs["local_size_bytes"], "smem_bytes": attrs["shared_size_bytes"],
                         "occupancy_regs_threads": blocks * warps / 64, "sms": sms})
    return rows


def _bitsandbytes(device):
    if device.type != "cuda":
        return None, None
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception:  # any import failure means "not available" here
        return None, None
    return bnb, bnbf


def bench_matmul(device, weights, ms, repeats) -> list[dict]:
    bnb, bnbf = _bitsandbytes(device)
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


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def markdown(results: dict) -> str:
    lines = [f"# nybble GPU benchmark ({results['device']})", ""]
    if results.get("interrupted"):
        lines += ["**Stopped by its time limit: the sections below are the ones that finished.**", ""]
    lines += ["## Checks", "", "| check | ok | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'yes' if c['ok'] else 'NO'} | {c['detail']} |" for c in results.get("checks", [])]
    lines += ["", "## 4-bit matmul (NF4, blocksize 64)", "",
              "| weight | M | path | nybble ms | bf16 matmul ms | bnb ms | nybble / bf16 | weight GB/s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results.get("matmul", []):
        bnb = f"{r['bnb_s'] * 1e3:.3f}" if "bnb_s" in r else "-"
        lines.append(f"| {r['weight']} | {r['M']} | {r['path']} | {r['nybble_s'] * 1e3:.3f} | {r['dense_s'] * 1e3:.3f} | "
                     f"{bnb} | {r['nybble_s'] / r['dense_s']:.2f} | {r['weight_read_gbs']:.0f} |")
    lines += ["", "## Dequantize bandwidth (NF4 -> bf16)", "",
              "| weight | dequant GB/s | copy GB/s | ratio |", "|---|---|---|---|"]
    for r in results.get("dequant", []):
        lines.append(f"| {r['weight']} | {r['dequant_gbs']:.0f} | {r['copy_gbs']:.0f} | {r['dequant_gbs'] / r['copy_gbs']:.2f} |")
    lines += ["", "## Decode with an unmerged adapter (NF4, rank 16)", "",
              "| weight | M | fused ms | GEMV + torch LoRA ms | bf16 + LoRA ms | bnb + LoRA ms | bf16 / fused | "
              "bnb / fused | weight GB/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results.get("lora_decode", []):
        bnb = f"{r['bnb_s'] / r['fused_s']:.2f}" if "bnb_s" in r else "-"
        lines.append(f"| {r['weight']} | {r['M']} | {_ms(r['fused_s'])} | {_ms(r['unfused_s'])} | {_ms(r['dense_s'])} | "
                     f"{_ms(r.get('bnb_s'))} | {r['dense_s'] / r['fused_s']:.2f} | {bnb} | {r['weight_read_gbs']:.0f} |")
    lines += ["", "## Backward through the packed weight, small M (dX = g W + s (g B) A)", "",
              "| weight | M | transposed GEMV ms | bf16 matmuls ms | dequant + matmuls ms | bf16 / GEMV |",
              "|---|---|---|---|---|---|"]
    for r in results.get("lora_backward", []):
        lines.append(f"| {r['weight']} | {r['M']} | {_ms(r['fused_s'])} | {_ms(r['dense_s'])} | {_ms(r['dequant_s'])} | "
                     f"{r['dense_s'] / r['fused_s']:.2f} |")
    lines += ["", "## Many adapters over one base", "",
              "| weight | M | adapters | multi ms | one adapter ms | bf16 + gathered bmm ms |", "|---|---|---|---|---|---|"]
    if "multi_adapter" in results:
        mu = results["multi_adapter"]
        lines.append(f"| {mu['weight']} | {mu['M']} | {mu['adapters']} | {_ms(mu['multi_s'])} | {_ms(mu['single_s'])} | "
                     f"{_ms(mu['gathered_bf16_s'])} |")
    lines += ["", "## LLM.int8() + LoRA", "", "| weight | M | fused epilogue ms | composition + torch LoRA ms | ratio |",
              "|---|---|---|---|---|"]
    for r in results.get("int8_lora", []):
        lines.append(f"| {r['weight']} | {r['M']} | {_ms(r['fused_s'])} | {_ms(r['composed_s'])} | "
                     f"{r['composed_s'] / r['fused_s']:.2f} |")
    lines += ["", "## QLoRA layer forward + backward", "",
              "| weight | M | rank | QLoRA ms | bf16-base LoRA ms | ratio |", "|---|---|---|---|---|---|"]
    for q in results.get("qlora", []):
        lines.append(f"| {q['weight']} | {q['M']} | {q['rank']} | {q['qlora_s'] * 1e3:.3f} | "
                     f"{q['bf16_lora_s'] * 1e3:.3f} | {q['qlora_s'] / q['bf16_lora_s']:.2f} |")
    if results.get("resources"):
        lines += ["", "## Kernel resources on this device (bf16 NF4 / bf16 kernels)", "",
                  "| kernel | threads | regs | local bytes | smem bytes | occupancy (regs, threads) |",
                  "|---|---|---|---|---|---|"]
        for r in results["resources"]:
            if ("bf16" in r["kernel"] and "fp4" not in r["kernel"]) or r["local_bytes"]:
                lines.append(f"| {r['kernel']} | {r['threads']} | {r['regs']} | {r['local_bytes']} | {r['smem_bytes']} | "
                             f"{r['occupancy_regs_threads']:.0%} |")
    lines.append("")
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
        lora_weights, lora_ms, qlora_ms = DRY_WEIGHTS, DRY_MS[:2], (3, qlora_m)
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_gpu: no CUDA device (use --dry-run to exercise the script on CPU)")
        if not kernels.cuda_available():
            sys.exit("bench_gpu: CuPy is not importable; install cupy-cuda12x or cupy-cuda13x")
        device = torch.device("cuda")
        weights = WEIGHTS[:2] if args.quick else WEIGHTS
        ms, repeats, qlora_shape, qlora_m = MS, (10 if args.quick else 30), (4096, 4096), 4096
        lora_weights, lora_ms, qlora_ms = (LORA_WEIGHTS[:1] if args.quick else LORA_WEIGHTS), LORA_MS, (16, qlora_m)

    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                     "torch": torch.__version__, "dry_run": args.dry_run}
    # Most telling first; the files are rewritten after each section, so a run stopped by its
    # time limit (SIGINT) still leaves every finished section behind.
    sections = [("resources", lambda: compile_all(device, results))] if device.type == "cuda" else []
    sections += [
        ("checks", lambda: run_checks(device, args.quick)),
        ("lora_decode", lambda: bench_lora_decode(device, lora_weights, lora_ms, repeats)),
        ("lora_backward", lambda: bench_lora_backward(device, lora_weights[:2], lora_ms, repeats)),
        ("qlora", lambda: [bench_qlora_layer(device, qlora_shape, m, repeats) for m in qlora_ms]),
        ("matmul", lambda: bench_matmul(device, weights, ms, repeats)),
        ("dequant", lambda: bench_dequant_bandwidth(device, weights, repeats)),
        ("multi_adapter", lambda: bench_multi_adapter(device, lora_weights[0], lora_ms[1], 8, repeats)),
        ("int8_lora", lambda: bench_int8_lora(device, lora_weights[0], lora_ms[:2], repeats)),
    ]
    try:
        for key, run in sections:
            t0 = time.perf_counter()
            results[key] = run()
            results.setdefault("section_s", {})[key] = time.perf_counter() - t0
            _write(out_dir, results)
    except KeyboardInterrupt:
        results["interrupted"] = True
        print("bench_gpu: interrupted (time limit); writing the finished sections", file=sys.stderr)
    _write(out_dir, results)
    print(markdown(results))
    if not all(c["ok"] for c in results.get("checks", [])):
        print("bench_gpu: some checks FAILED", file=sys.stderr)
    return results


def compile_all(device, results: dict) -> list[dict]:
    """Compiles every kernel file (NVRTC through CuPy, timed), then reads their resources."""
    import cupy

    from nybble.kernels import _cupy, _source

    t0 = time.perf_counter()
    for name in _source.KERNELS:
        _cupy.get_module(name, device.index or 0)
    results["compile_s"] = time.perf_counter() - t0
    results["cupy"] = cupy.__version__
    results["nvrtc_options"] = list(_cupy.nvrtc_options())
    return kernel_resources(device)


def _write(out_dir: Path, results: dict) -> None:
    (out_dir / "bench_gpu.json").write_text(json.dumps(results, indent=2))
    (out_dir / "bench_gpu.md").write_text(markdown(results))


if __name__ == "__main__":
    res = main()
    sys.exit(0 if res.get("checks") and all(c["ok"] for c in res["checks"]) and not res.get("interrupted") else 1)
