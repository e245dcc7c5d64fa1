"""Peak memory of ``transformers.from_pretrained`` with ``nybble.NybbleConfig`` (each weight
quantized as it loads) against the plain dense load of the same checkpoint, each in its own
process: ``python benches/bench_hf_load.py [--hidden 1024 --layers 8]``.

Reports, as increases over the process before the load (after a warm-up load of a tiny
model the same way, so lazy imports are outside the window), sampled every millisecond: the
peak anonymous memory (``RssAnon``: what the load allocates), the peak file-backed RSS
(``RssFile``: the checkpoint pages transformers' safetensors reader maps; reclaimable page
cache, unmapped when the load ends) and what the process holds after one forward pass
(a dense bf16 load keeps its weights as views of the mapped file, read in on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(path: str, mode: str, warmup: str | None = None, dtype: str = "bfloat16") -> dict:
    """In this process: load ``path`` densely or with NybbleConfig; peak RSS / RssAnon deltas.
    ``warmup``: a tiny checkpoint loaded first the same way, so one-time costs (lazy imports,
    torch's op dispatch set-up) fall outside the measured window."""
    import torch
    import transformers

    import nybble

    dtype = getattr(torch, dtype)
    config = nybble.NybbleConfig(quant="nf4", compute_dtype=dtype) if mode == "nybble" else None
    kwargs = {"quantization_config": config} if config is not None else {}
    if warmup is not None:
        transformers.AutoModelForCausalLM.from_pretrained(warmup, dtype=dtype, device_map="cpu", **kwargs)
    import gc

    gc.collect()
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k in peak:
                peak[k] = max(peak[k], _status_kib(k))
            time.sleep(0.001)

    base = {k: _status_kib(k) for k in peak}
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kwargs)
    seconds = time.perf_counter() - start
    stop.set()
    t.join()
    after_load = {k: _status_kib(k) for k in peak}
    with torch.no_grad():  # touches every weight (a dense model's mmap-backed pages come in here)
        model(torch.zeros(1, 8, dtype=torch.long))
    after_forward = {k: _status_kib(k) for k in peak}
    held = sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers()))

    def mib(d):
        return {k: round((d[k] - base[k]) / 1024, 1) for k in d}

    return {"mode": mode, "seconds": seconds, "model_mib": held / 2**20, "peak_during_load": mib(peak),
            "after_load": mib(after_load), "after_forward": mib(after_forward)}


def build(path: Path, hidden: int, layers: int) -> Path:
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                                   num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", help="dtype to load in (the checkpoint is bfloat16)")
    ap.add_argument("--measure", nargs=4, metavar=("PATH", "MODE", "WARMUP", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp) / "model", args.hidden, args.layers)
        tiny = build(Path(tmp) / "tiny", 64, 1)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        rows = []
        for mode in ("dense", "nybble", "dense", "nybble"):
            out = subprocess.run([sys.executable, __file__, "--measure", str(path), mode, str(tiny), args.dtype], check=True,
                                 capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"checkpoint: {size:.0f} MiB bf16 (Llama, hidden {args.hidden}, {args.layers} layers), loaded as {args.dtype}")
    print("| load | seconds | model held (MiB) | peak anon during load | peak file-backed during load | "
          "anon + file after load and one forward (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        p, f = r["peak_during_load"], r["after_forward"]
        print(f"| {r['mode']} | {r['seconds']:.2f} | {r['model_mib']:.0f} | {p['RssAnon']:.0f} | {p['RssFile']:.0f} | "
              f"{f['RssAnon'] + f['RssFile']:.0f} |")


if __name__ == "__main__":
    main()
