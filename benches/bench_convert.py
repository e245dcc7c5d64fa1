"""End-to-end checkpoint conversion: `nybble quantize` (NF4 + double quant, blocksize 64)
against the plain peer pipeline (safetensors load_file + bitsandbytes CPU quantize_4bit with
compress_statistics per tensor + save_file), in the same run on the same synthetic
Llama-shaped bfloat16 checkpoint.

    python benches/bench_convert.py [--layers 6] [--dir /tmp] [--threads N]

Each side runs in its own child process, which reports its wall time and its peak RSS
(getrusage RUSAGE_SELF ru_maxrss, interpreter and imports included; the parent stays small
because Linux carries the peak across fork + exec). The checkpoint is
written first, so both sides read it from a warm page cache. nybble runs with --no-stats
(the peer measures no error either).

The `cp` rows copy the same input file on the same disk (page cache warm), once as `cp` alone
and once followed by an fsync of the copy (`sync FILE`), since nybble fsyncs each shard before
renaming it into place; "vs cp" is nybble's time over the copy's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE = 4096, 11008

NYBBLE = """
import json, resource, sys, time
from nybble.checkpoint import quantize_checkpoint
src, out, threads = sys.argv[1], sys.argv[2], (int(sys.argv[3]) or None)
t0 = time.perf_counter()
s = quantize_checkpoint(src, out, method="nf4", blocksize=64, double_quant=True, threads=threads, error_stats=False)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "quantized": s.quantized}))
"""

PEER = """
import json, os, resource, sys, time
import torch
import bitsandbytes.functional as F
from safetensors.torch import load_file, save_file
src, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
t0 = time.perf_counter()
tensors = load_file(os.path.join(src, "model.safetensors"))
packed = {}
n = 0
for name, t in tensors.items():
    if t.ndim == 2 and name.endswith(".weight") and "embed" not in name and "norm" not in name:
        q, state = F.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")
        packed[name] = q
        for k, v in state.as_dict(packed=True).items():
            packed[f"{name}.{k}"] = v
        n += 1
    else:
        packed[name] = t
os.makedirs(out, exist_ok=True)
save_file(packed, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "quantized": n}))
"""


def write_checkpoint(folder: Path, layers: int) -> int:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tensors = {}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            tensors[f"{p}.self_attn.{proj}.weight"] = (torch.randn(HIDDEN, HIDDEN) * 0.02).to(torch.bfloat16)
        tensors[f"{p}.mlp.gate_proj.weight"] = (torch.randn(INTERMEDIATE, HIDDEN) * 0.02).to(torch.bfloat16)
        tensors[f"{p}.mlp.up_proj.weight"] = (torch.randn(INTERMEDIATE, HIDDEN) * 0.02).to(torch.bfloat16)
        tensors[f"{p}.mlp.down_proj.weight"] = (torch.randn(HIDDEN, INTERMEDIATE) * 0.02).to(torch.bfloat16)
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    return (folder / "model.safetensors").stat().st_size


def run_side(code: str, src: Path, out: Path, threads: int) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, str(src), str(out), str(threads)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out_bytes"] = sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    return result


def time_cp(src: Path, dst: Path, fsync: bool) -> float:
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", str(src), str(dst)], check=True)
    if fsync:
        subprocess.run(["sync", str(dst)], check=True)
    dt = time.perf_counter() - t0
    dst.unlink()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6, help="Llama-7B-shaped decoder layers (~0.4 GB each)")
    ap.add_argument("--dir", type=str, default=tempfile.gettempdir())
    ap.add_argument("--threads", type=int, default=0, help="0: one per core")
    ap.add_argument("--write-checkpoint", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_checkpoint is not None:
        write_checkpoint(args.write_checkpoint, args.layers)
        return

    root = Path(tempfile.mkdtemp(prefix="nybble-bench-", dir=args.dir))
    try:
        src = root / "src"
        t0 = time.perf_counter()
        # In a child process: Linux carries a process's peak RSS across fork + exec, so this
        # parent must stay small for the children's ru_maxrss to be their own.
        subprocess.run(
            [sys.executable, __file__, "--write-checkpoint", str(src), "--layers", str(args.layers)],
            check=True,
        )
        size = (src / "model.safetensors").stat().st_size
        print(f"wrote {size / 1e9:.2f} GB checkpoint in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        cp = time_cp(src / "model.safetensors", root / "cp" / "model.safetensors", fsync=False)
        nyb = run_side(NYBBLE, src, root / "nybble", args.threads)
        cp_sync = time_cp(src / "model.safetensors", root / "cp" / "model.safetensors", fsync=True)
        peer = run_side(PEER, src, root / "peer", args.threads)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    cores = os.cpu_count()
    load = os.getloadavg()[0]
    print(f"\ncheckpoint: {args.layers} Llama-7B-shaped layers, {size / 1e9:.2f} GB bf16, "
          f"{nyb['quantized']} tensors quantized; {platform.processor() or platform.machine()}, {cores} cores, load average {load:.2f}\n")
    print("| pipeline | time (s) | speedup | peak RSS (MB) | peak RSS / checkpoint | output (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in [("nybble quantize (Rust, streaming)", nyb), ("safetensors + bitsandbytes CPU", peer)]:
        rss = r["maxrss_kb"] * 1024
        print(
            f"| {label} | {r['seconds']:.2f} | {peer['seconds'] / r['seconds']:.1f}x | {rss / 1e6:.0f} | "
            f"{rss / size:.3f} | {r['out_bytes'] / 1e6:.0f} |"
        )
    print("\n| copy of the same input | time (s) | nybble / copy |\n|---|---:|---:|")
    for label, t in [("`cp`", cp), ("`cp` + fsync of the copy", cp_sync)]:
        print(f"| {label} | {t:.2f} | {nyb['seconds'] / t:.2f}x |")


if __name__ == "__main__":
    main()
