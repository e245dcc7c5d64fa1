"""QLoRA fine-tuning steps on a Llama-shaped causal LM: nybble vs transformers + peft +
bitsandbytes, same random model and batches, each side in its own process.

    python benches/bench_finetune.py --size 8b                 # GPU (default --device cuda)
    python benches/bench_finetune.py --size 1b --batch 4 --seq 1024
    python benches/bench_finetune.py --device cpu --tiny        # a few minutes on a laptop CPU
    python benches/bench_finetune.py --device cpu --size small  # CPU, quantized layers dominate

Both sides: NF4 + double quant (bf16 compute on the GPU, fp32 on the CPU), LoRA r=64
alpha=16 on every linear layer but the head, non-reentrant gradient checkpointing, causal-LM
loss, paged AdamW 32-bit (nybble.optim.PagedAdamW vs bitsandbytes' PagedAdamW; on the CPU
nybble's AdamW vs torch.optim.AdamW), max grad norm 0.3. The random model (LlamaConfig,
seed 0) is written once as a bf16/fp32 safetensors folder and each side quantizes it at load.
Figures: median step time after warm-up, tokens/s = batch * seq / step, peak memory
(torch.cuda.max_memory_allocated on the GPU, the child's peak RSS during the steps on the CPU).
The paged optimizers' states live in CUDA managed memory on both sides, outside
max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_bf16_features, peak_rss, reset_peak_rss  # benches/ is the script folder: on sys.path

SIDES = ("nybble", "peft+bnb")
SIZES = {
    # Llama 3.x shapes
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    # CPU-sized: the quantized linear layers (45M params) dominate the step, not the head.
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                  num_key_value_heads=4, vocab_size=8192),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=32000),
}


def build(size: str, path: Path, dtype_name: str) -> None:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    with torch.device("cuda" if torch.cuda.is_available() and dtype_name == "bfloat16" else "cpu"):
        model = transformers.LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(path), safe_serialization=True)





def child(side: str, path: str, device: str, steps: int, warmup: int, batch: int, seq: int, r: int,
          threads: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if side == "nybble":
        import nybble
        from nybble.optim import AdamW
        from nybble.train.trainer import enable_gradient_checkpointing, load_model

        model = load_model(path, dev, dtype)
        nybble.add_lora(model, r=r, alpha=16)
        model.to(dev)
        enable_gradient_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = AdamW(params, lr=2e-4, weight_decay=0.0, paged=dev.type == "cuda")
    else:
        import peft

        qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=qc, dtype=dtype, device_map={"": dev.index or 0} if dev.type == "cuda" else "cpu")
        # Not peft.prepare_model_for_kbit_training: it casts every non-4-bit weight (embeddings,
        # norms, head) to float32, which would run the baseline's residual stream, attention
        # and head in float32 against nybble's bf16. What it does besides, by hand:
        for p in model.parameters():
            p.requires_grad_(False)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        if dev.type == "cuda":
            import bitsandbytes as bnb

            opt = bnb.optim.PagedAdamW(params, lr=2e-4, weight_decay=0.0)
        else:
            opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    model.config.use_cache = False
    model.train()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [torch.randint(100, vocab, (batch, seq), generator=g) for _ in range(4)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        reset_peak_rss()  # the steps' peak, not the dense model's load
    times, losses = [], []
    for i in range(warmup + steps):
        ids = batches[i % len(batches)].to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        losses.append(float(out.loss.detach()))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    step = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else peak_rss()
    return {"side": side, "step_s": step, "tokens_per_s": batch * seq / step, "peak_mb": peak / 2**20,
            "trainable": sum(p.numel() for p in params), "loss_first": losses[0], "loss_last": losses[-1],
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu x{threads} threads"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="8b")
    ap.add_argument("--tiny", action="store_true", help="--size tiny with small CPU-friendly defaults")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--model-dir", default=None, help="reuse a saved random model folder")
    ap.add_argument("--child", choices=SIDES)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    if args.tiny:
        args.size = "tiny"
    cpu = args.device == "cpu"
    steps = args.steps or (5 if cpu else 10)
    batch = args.batch or (4 if cpu else 4)
    seq = args.seq or (128 if cpu else 1024)
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.device, steps, args.warmup, batch, seq, args.r,
                               args.threads)))
        return
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="nybble-bench-")
        model_dir = str(Path(tmp.name) / args.size)
        build(args.size, Path(model_dir), "float32" if cpu else "bfloat16")
    rows = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--child", side, "--model-dir", model_dir, "--device", args.device,
               "--steps", str(steps), "--warmup", str(args.warmup), "--batch", str(batch), "--seq", str(seq),
               "--r", str(args.r), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"{side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if tmp is not None:
        tmp.cleanup()
    print(f"# QLoRA fine-tuning step, Llama-shaped {args.size} (random init), batch {batch} x {seq} tokens, "
          f"NF4+DQ, LoRA r={args.r} all-linear, grad checkpointing, {rows[0]['device'] if rows else args.device}"
          + (f", {cpu_bf16_features()}" if cpu else ""))
    print("| stack | step (s) | tokens/s | peak memory (MiB) | trainable params | loss first -> last | vs peft+bnb |")
    print("|---|---:|---:|---:|---:|---|---:|")
    base = next((r for r in rows if r["side"] == "peft+bnb"), None)
    for r in rows:
        rel = f"{base['step_s'] / r['step_s']:.2f}x" if base else "n/a"
        print(f"| {r['side']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['peak_mb']:,.0f} | "
              f"{r['trainable']:,} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | {rel} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
