"""CPU throughput of NF4 + double-quant quantize / dequantize against bitsandbytes' CPU path,
measured in the same run on the same bfloat16 weights.

    python benches/bench_cpu_quantize.py [--threads 2] [--repeats 5] [--json out.json]

Throughput is GB/s of bfloat16 weight (2 bytes per parameter) processed; the median of
``--repeats`` interleaved runs is reported for each side. nybble runs at the SIMD level it
detects (``NYBBLE_SIMD`` forces one); the ``memcpy`` row is a numpy copy of the same bf16
bytes into a reused buffer, the machine's bandwidth bound in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import torch

import nybble
from _common import cpu_model

SHAPES = [(4096, 4096), (4096, 11008)]


def median_times(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, runs interleaved so load changes hit all alike."""
    for fn in fns.values():
        fn()  # warm-up (thread pool start, first-touch page faults, bnb's lazy init)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    import bitsandbytes.functional as F

    torch.set_num_threads(args.threads)
    nybble.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape in SHAPES:
        w = torch.randn(shape, dtype=torch.float32).to(torch.bfloat16)
        gb = w.numel() * 2 / 1e9

        def bnb_q():
            return F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

        def nyb_q():
            return nybble.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)

        qb, sb = bnb_q()
        qn, sn = nyb_q()

        def bnb_dq():
            return F.dequantize_4bit(qb, sb)

        def nyb_dq():
            return nybble.dequantize_4bit(qn, sn)

        buffer = torch.empty(shape, dtype=torch.bfloat16)
        src_bytes = w.view(torch.int16).numpy()
        copy_dst = np.empty_like(src_bytes)

        def memcpy():
            np.copyto(copy_dst, src_bytes)

        def nyb_dq_out():
            # A reused output buffer: no allocation, no first-touch page faults.
            return nybble.dequantize_4bit(qn, sn, out=buffer)

        # Same packed codes on both sides: timing different work would be meaningless.
        assert torch.equal(qn, qb.reshape(qn.shape))
        t = median_times(
            {"bnb_quantize": bnb_q, "nybble_quantize": nyb_q, "bnb_dequantize": bnb_dq, "nybble_dequantize": nyb_dq,
             "nybble_dequantize_out": nyb_dq_out, "memcpy": memcpy},
            args.repeats,
        )
        row = {"shape": list(shape), **{k + "_gbps": gb / v for k, v in t.items()}}
        row["quantize_speedup"] = t["bnb_quantize"] / t["nybble_quantize"]
        row["dequantize_speedup"] = t["bnb_dequantize"] / t["nybble_dequantize"]
        row["dequantize_out_speedup"] = t["bnb_dequantize"] / t["nybble_dequantize_out"]
        rows.append(row)

    print(f"# CPU: {cpu_model()}, {args.threads} threads, nybble SIMD level {nybble._core.simd_level()}, "
          f"torch {torch.__version__}, bitsandbytes {__import__('bitsandbytes').__version__}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| weight (bf16) | op | bitsandbytes GB/s | nybble GB/s | nybble / bnb |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        s = "x".join(map(str, r["shape"]))
        print(f"| {s} | NF4+DQ quantize | {r['bnb_quantize_gbps']:.3f} | {r['nybble_quantize_gbps']:.2f} | {r['quantize_speedup']:.1f}x |")
        print(f"| {s} | NF4+DQ dequantize | {r['bnb_dequantize_gbps']:.3f} | {r['nybble_dequantize_gbps']:.2f} | {r['dequantize_speedup']:.1f}x |")
        print(f"| {s} | NF4+DQ dequantize, `out=` buffer | {r['bnb_dequantize_gbps']:.3f} | {r['nybble_dequantize_out_gbps']:.2f} | {r['dequantize_out_speedup']:.1f}x |")
        print(f"| {s} | memcpy of the bf16 bytes (bound) | | {r['memcpy_gbps']:.2f} | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
