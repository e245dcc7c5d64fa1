"""End-to-end CPU decode benchmark (issue 16): greedy generation of a Llama-shaped model
(random init from a transformers ``LlamaConfig``, bf16) with

* ``nybble``: the packed NF4 + DQ checkpoint (``nybble quantize``'s output) through
  ``nybble.generate`` (what ``nybble generate`` runs: ``load_quantized``, the fused kernels),
* ``dense bf16``: transformers on the dense bf16 checkpoint,
* ``bnb nf4``: transformers + bitsandbytes NF4 + DQ (bf16 compute, ``.eval()``), loaded from
  the checkpoint transformers + bitsandbytes saved,

all through the same timing code (transformers' ``generate`` with its KV cache, a streamer
noting the first token). Each run is its own subprocess (clean peak RSS), the methods
interleaved round by round; the table gives medians over rounds.

    python benches/bench_generate.py [--size 1b|small|tiny] [--rounds 3] [--new-tokens 64]
                                     [--prompt-tokens 32] [--threads 2] [--json PATH]

``--size 1b`` is TinyLlama-1.1B's shape (hidden 2048, 22 layers, GQA 32/4 heads,
intermediate 5632; 1.1 B parameters with the 30522-token vocabulary of the example
tokenizer); ``small`` is hidden 1024, 8 layers; ``tiny`` hidden 256, 2 layers (a smoke run).
The checkpoints are built once under ``--cache`` (default ``~/.cache/nybble/bench-generate``).
Besides wall-clock tokens/s the table gives CPU seconds per decoded token (user + sys of the
whole process during decode): on a shared machine the ratio of those is steadier.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {
    "1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632),
    "small": dict(hidden=1024, layers=8, heads=16, kv_heads=4, intermediate=2816),
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=768),  # bnb: N % 32 == 0
}
METHODS = ("nybble", "dense bf16", "bnb nf4")


def build(size: str, cache: Path) -> dict[str, Path]:
    """The dense bf16 checkpoint, nybble's packed one and transformers + bitsandbytes' one."""
    import torch
    import transformers

    from nybble.checkpoint import quantize_checkpoint
    from nybble.train.example import tokenizer_dir

    root = cache / size
    dense, packed, bnb = root / "dense-bf16", root / "nybble-nf4", root / "bnb-nf4"
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    if not (dense / "model.safetensors").is_file() and not (dense / "model.safetensors.index.json").is_file():
        s = SIZES[size]
        cfg = transformers.LlamaConfig(
            vocab_size=len(tok), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
            max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, dtype="bfloat16")
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
        model = model.to_empty(device="cpu").to(torch.bfloat16)
        with torch.no_grad():  # random weights, std 0.02 (transformers' init), norms at 1
            for name, p in model.named_parameters():
                p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its buffers were on meta
        model.save_pretrained(str(dense), max_shard_size="20GB")
        tok.save_pretrained(str(dense))
        n = sum(p.numel() for p in model.parameters())
        print(f"built {dense}: {n / 1e9:.3f} B parameters in {time.perf_counter() - t0:.0f} s", flush=True)
        del model
    if not (packed / "config.json").is_file():
        quantize_checkpoint(dense, packed, compute_dtype="bfloat16", error_stats=False)
    if not (bnb / "config.json").is_file():
        qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        m = transformers.AutoModelForCausalLM.from_pretrained(str(dense), quantization_config=qc, device_map="cpu",
                                                              dtype=torch.bfloat16)
        m.save_pretrained(str(bnb))
        tok.save_pretrained(str(bnb))
        del m
    return {"nybble": packed, "dense bf16": dense, "bnb nf4": bnb}


def worker(method: str, path: str, threads: int, prompt_tokens: int, new_tokens: int) -> dict:
    """One run in this process: load, warm up, generate; prints one JSON line."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    from _common import peak_rss, reset_peak_rss

    from nybble import generate as G

    reset_peak_rss()  # this run's peak, not the parent's at fork

    t0 = time.perf_counter()
    if method == "nybble":
        model = G.load_model(path, "cpu", torch.bfloat16)
    else:  # transformers alone (dense) or with bitsandbytes (its quantization_config in config.json)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
        model.eval()
    load_s = time.perf_counter() - t0
    tok = G.load_tokenizer(path)
    words = "the quick brown fox jumps over the lazy dog and".split()
    prompt = " ".join(words[i % len(words)] for i in range(prompt_tokens - 1))  # + BOS: prompt_tokens
    sink = open(os.devnull, "w")
    G.generate(model, tok, prompt, max_new_tokens=4, out=sink, ignore_eos=True)  # warm-up
    cpu0 = os.times()
    stats = G.generate(model, tok, prompt, max_new_tokens=new_tokens, out=sink, ignore_eos=True)
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    # CPU time of the decode part: the whole call's CPU time scaled by the decode share of
    # its wall time (the streamer notes the boundary in wall time only).
    wall = stats.prefill_s + stats.decode_s
    out = {"method": method, "load_s": load_s, "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens,
           "prefill_tps": stats.prefill_tokens_per_s, "decode_tps": stats.decode_tokens_per_s,
           "decode_cpu_s_per_token": cpu * (stats.decode_s / wall) / max(1, stats.new_tokens - 1),
           "peak_rss_mb": peak_rss() / 2**20}
    linear_types = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
    out["linear_types"] = linear_types
    print("RESULT " + json.dumps(out), flush=True)
    return out


def run_one(method: str, path: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--model", str(path), "--threads", str(args.threads),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{method} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nybble" / "bench-generate")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.model, args.threads, args.prompt_tokens, args.new_tokens)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import cpu_line

    methods = [m.strip() for m in args.methods.split(",")]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    paths = build(args.size, args.cache)
    print(cpu_line())
    print(f"load average before: {os.getloadavg()}; size {args.size}, {args.threads} threads, prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens greedy, {args.rounds} interleaved rounds",
          flush=True)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods if r % 2 == 0 else reversed(methods):
            res = run_one(m, paths[m], args)
            runs[m].append(res)
            print(f"round {r + 1} {m}: decode {res['decode_tps']:.2f} tok/s, "
                  f"{res['decode_cpu_s_per_token'] * 1e3:.0f} CPU ms/token, prefill {res['prefill_tps']:.1f} tok/s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB, load {res['load_s']:.1f} s ({', '.join(res['linear_types'])})",
                  flush=True)
    med = {m: {k: statistics.median(r[k] for r in runs[m])
               for k in ("decode_tps", "prefill_tps", "decode_cpu_s_per_token", "peak_rss_mb", "load_s")}
           for m in methods}
    print(f"load average after: {os.getloadavg()}\n")
    ref = med.get("dense bf16")
    print("| method | decode tok/s | vs dense bf16 | CPU ms / token | CPU-time vs dense | prefill tok/s "
          "| peak RSS MB | RSS vs dense |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in methods:
        v = med[m]
        rel = (f"{v['decode_tps'] / ref['decode_tps']:.2f}x", f"{ref['decode_cpu_s_per_token'] / v['decode_cpu_s_per_token']:.2f}x",
               f"{v['peak_rss_mb'] / ref['peak_rss_mb']:.2f}") if ref else ("-", "-", "-")
        print(f"| {m} | {v['decode_tps']:.2f} | {rel[0]} | {v['decode_cpu_s_per_token'] * 1e3:.0f} | {rel[1]} | "
              f"{v['prefill_tps']:.1f} | {v['peak_rss_mb']:.0f} | {rel[2]} |")
    if "nybble" in med and "bnb nf4" in med:
        n, b = med["nybble"], med["bnb nf4"]
        print(f"\nnybble vs bnb: decode {n['decode_tps'] / b['decode_tps']:.2f}x (wall), "
              f"{b['decode_cpu_s_per_token'] / n['decode_cpu_s_per_token']:.2f}x (CPU time)")
    results = {"cpu": cpu_line(), "size": args.size, "threads": args.threads, "runs": runs, "medians": med}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
