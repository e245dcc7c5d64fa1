"""FSDP2 vs DDP for QLoRA fine-tuning: tokens/s and memory per rank, same model, data and
steps (``nybble finetune`` with and without ``--fsdp``), each under its own torchrun launch.

    python benches/bench_fsdp.py                          # CPU, gloo, 2 processes, example Llama
    python benches/bench_fsdp.py --hidden 256 --layers 4 --steps 12 --nproc 2
    python benches/bench_fsdp.py --device cuda --nproc 4  # on a machine with several GPUs

Per rank: tokens/s (the step loop only), resident bytes between all-gathers (packed base
weights, other parameters, optimizer states: nybble.train.fsdp.resident_bytes), and peak
memory (CUDA: max_memory_allocated; CPU: the process's peak RSS, which also counts torch and
the interpreter). Also the wire format choice: one all-gather of a 4096 x 4096 layer's
shards as packed NF4 bytes + absmax codes vs as bf16 (what gathering dequantized weights
would send), timed on the same process group. On the CPU the figures are ratios between two
runs on the same cores, not GPU numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from nybble.train import fsdp
    from nybble.train.trainer import FinetuneConfig, TrainingRun

    cfg = FinetuneConfig(model_dir=args.model_dir, data=args.data, output_dir=args.out, fsdp=args.mode == "fsdp",
                         device=args.device, r=16, alpha=32, dropout=0.0, lr=1e-3, batch_size=args.batch,
                         grad_accum=1, max_steps=args.steps, max_length=args.seq, progress=False, log_every=0,
                         optim="adamw_32bit", warmup_ratio=0.0)
    run = TrainingRun(cfg, log=lambda _msg: None)
    res = run.run()
    rank = dist.get_rank()
    resident = fsdp.resident_bytes(run.model)
    resident["optimizer"] = sum(v.numel() * v.element_size() for st in run.optimizer.state.values()
                                for v in st.values() if torch.is_tensor(v))
    if run.device.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(run.device))
    else:  # before the wire timing's buffers
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wire = {}
    if args.mode == "fsdp":
        wire = _wire_timing(run.device)
    with open(Path(args.out) / f"bench_rank{rank}.json", "w") as f:
        json.dump({"tokens_per_s": res.tokens / max(res.seconds, 1e-9) / dist.get_world_size(),
                   "tokens": res.tokens, "seconds": res.seconds, "resident": resident, "peak": peak, **wire}, f)


def _wire_timing(device, n_out: int = 4096, n_in: int = 4096, reps: int = 5) -> dict:
    """One layer's all-gather: packed NF4 + DQ absmax codes (uint8) vs dense bf16."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    n = n_out * n_in
    packed = torch.zeros((n // 2 + n // 64) // world, dtype=torch.uint8, device=device)
    dense = torch.zeros(n // world, dtype=torch.bfloat16, device=device)
    out = {}
    for name, shard in (("packed", packed), ("bf16", dense)):
        full = torch.empty(shard.numel() * world, dtype=shard.dtype, device=device)
        dist.all_gather_into_tensor(full, shard)  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            dist.all_gather_into_tensor(full, shard)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out[f"gather_{name}_s"] = (time.perf_counter() - t0) / reps
        out[f"gather_{name}_bytes"] = full.numel() * full.element_size()
    return out


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--worker", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.mode = args.worker
        worker(args)
        return
    from nybble.train import example

    with tempfile.TemporaryDirectory(prefix="nybble-bench-fsdp-") as tmp:
        tmp = Path(tmp)
        model_dir = example.build_model_dir(tmp / "llama", hidden=args.hidden, layers=args.layers)
        data = example.make_dataset(tmp / "train.jsonl", n=max(64, 2 * args.nproc * args.batch * args.steps))
        results = {}
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
        for mode in ("ddp", "fsdp"):
            out = tmp / mode
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
                   "--master_addr", "127.0.0.1", "--master_port", str(_port()), __file__, "--worker", mode,
                   "--model-dir", str(model_dir), "--data", str(data), "--out", str(out), "--steps",
                   str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
            results[mode] = json.loads((out / "bench_rank0.json").read_text())
    d, f = results["ddp"], results["fsdp"]
    print(f"example Llama hidden {args.hidden}, {args.layers} layers, {args.nproc} ranks on {args.device}, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} steps, LoRA r=16, AdamW 32-bit")
    print(f"{'per rank (rank 0)':<34}{'DDP':>14}{'FSDP2':>14}{'FSDP2/DDP':>11}")

    def row(name, a, b, fmt="{:,.0f}"):
        print(f"{name:<34}{fmt.format(a):>14}{fmt.format(b):>14}{b / a if a else float('nan'):>11.3f}")

    row("tokens/s", d["tokens_per_s"], f["tokens_per_s"])
    for key in ("packed", "replicated", "other", "buffers", "optimizer"):
        row(f"resident {key} (bytes)", d["resident"][key], f["resident"][key])
    row("resident total (bytes)", sum(d["resident"].values()), sum(f["resident"].values()))
    row("peak memory (bytes)", d["peak"], f["peak"])
    print(f"wire, one 4096x4096 layer all-gather: packed NF4+absmax {f['gather_packed_bytes']:,} B in "
          f"{f['gather_packed_s'] * 1e3:.2f} ms vs bf16 {f['gather_bf16_bytes']:,} B in "
          f"{f['gather_bf16_s'] * 1e3:.2f} ms (bf16/packed time {f['gather_bf16_s'] / f['gather_packed_s']:.2f}x)")


if __name__ == "__main__":
    main()
