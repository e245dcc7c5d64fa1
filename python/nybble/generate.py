"""Text generation from packed models (``nybble generate``): load a causal LM (a packed
checkpoint as it is, a dense one quantized at load), optionally apply a LoRA adapter
unmerged, stream the new tokens as transformers' ``generate`` (KV cache) produces them, and
measure prefill / decode speed and peak memory.

Prompts are tokenized the way ``nybble finetune`` tokenizes its training prompts: the
tokenizer's BOS (or CLS) token, then the prompt's tokens without other special tokens; the
tokens it stops at are the EOS (or SEP) the trainer appends plus the model's own
``eos_token_id``. Only ``input_ids`` and ``attention_mask`` reach the model, so tokenizers
that also return ``token_type_ids`` (BERT's) work with any causal LM.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from .train.data import bos_id, eos_id

#: ``--dtype`` names.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}

#: Prompts of the built-in example (``nybble finetune --example`` trains on this format).
EXAMPLE_PROMPTS = ("3 plus 4 is", "12 minus 5 is")


class GenerateError(ValueError):
    """A model, adapter, tokenizer or argument ``generate`` cannot use; the message says which."""


@dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  #: from the call to the first new token (prompt forward + first sample)
    decode_s: float  #: from the first new token to the last
    text: str = ""
    token_ids: list[int] | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.new_tokens - 1  # the first new token comes out of the prefill
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


# ---------------------------------------------------------------------- loading


def _read_config(path: Path) -> dict:
    from . import _files

    cfg_path = path / "config.json"
    if not path.is_dir():
        raise GenerateError(f"{path}: no such model folder")
    if not cfg_path.is_file():
        raise GenerateError(f"{path}: not a model folder (no config.json)")
    try:
        cfg = _files.read_json_file(cfg_path)
    except (OSError, ValueError) as err:
        raise GenerateError(f"{cfg_path}: {err}") from None
    if not isinstance(cfg, dict):
        raise GenerateError(f"{cfg_path}: not a JSON object")
    return cfg


def resolve_dtype(name: str, config: dict) -> torch.dtype:
    """``--dtype``: a name of :data:`DTYPES`, or ``auto``: the dtype config.json records
    (``dtype`` / ``torch_dtype``) when it is a 16/32-bit float, else float32."""
    if name != "auto":
        if name not in DTYPES:
            raise GenerateError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    recorded = config.get("dtype") or config.get("torch_dtype")
    return DTYPES.get(str(recorded), torch.float32)


def resolve_device(name: str) -> torch.device:
    try:
        dev = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                           "cpu" if name == "auto" else name)
    except RuntimeError as err:
        raise GenerateError(f"device {name!r}: {err}") from None
    if dev.type not in ("cpu", "cuda"):
        raise GenerateError(f"device {name!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"device {name!r}: CUDA is not available")
    return dev


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: str | torch.dtype = "auto",
               quant: str | None = None, blocksize: int = 64, double_quant: bool = True):
    """A causal LM ready for ``generate``: a packed checkpoint (nybble's or transformers +
    bitsandbytes') through :func:`nybble.load_quantized`, a dense one quantized as it loads
    (``quant``, default nf4, through :class:`nybble.NybbleConfig`: the dense weights are never
    all in memory at once). ``dtype`` is the compute dtype and that of the dense tensors."""
    import transformers

    from .checkpoint import CheckpointError
    from .model import load_quantized

    path = Path(path)
    cfg = _read_config(path)
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, cfg)
    device = torch.device(device) if isinstance(device, str) else device
    packed = "quantization_config" in cfg
    if packed:
        if quant is not None:
            from . import formats

            try:
                qc = formats.parse_quantization_config(cfg["quantization_config"])
            except ValueError as err:
                raise GenerateError(f"{path / 'config.json'}: {err}") from None
            stored = ("int8" if not qc.load_in_4bit else qc.quant_type) or "nf4"
            if quant != stored:
                raise GenerateError(f"{path} is already packed ({stored}); --quant {quant} applies to dense models")
        try:
            model = load_quantized(path, transformers.AutoModelForCausalLM, compute_dtype=torch_dtype,
                                   dtype=torch_dtype)
        except CheckpointError as err:
            raise GenerateError(str(err)) from None
    else:
        from .integrations.transformers import NybbleConfig

        qconfig = NybbleConfig(quant=quant or "nf4", blocksize=blocksize, double_quant=double_quant,
                               compute_dtype=torch_dtype)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype,
                                                                      quantization_config=qconfig)
        except (OSError, ValueError, KeyError) as err:
            raise GenerateError(f"{path}: cannot load a causal LM from it: {type(err).__name__}: {err}") from None
    if not hasattr(model, "generate"):
        raise GenerateError(f"{path}: {type(model).__name__} cannot generate text (not a causal LM)")
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = True
    return model


def apply_adapter(model, adapter: str | os.PathLike):
    """Applies a PEFT / nybble LoRA adapter, unmerged (:func:`nybble.load_adapter`)."""
    from .checkpoint import CheckpointError
    from .errors import CorruptFileError, NonFiniteError
    from .model import load_adapter

    adapter = Path(adapter)
    if not adapter.is_dir():
        raise GenerateError(f"{adapter}: no such adapter folder")
    device = next(model.parameters()).device
    try:
        load_adapter(model, adapter)
    except (CheckpointError, CorruptFileError, NonFiniteError, FileNotFoundError, ValueError, KeyError) as err:
        raise GenerateError(f"adapter {adapter}: {err}") from None
    model.to(device)
    model.eval()
    return model


def load_tokenizer(path: str | os.PathLike):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GenerateError(f"{path}: no tokenizer transformers can load ({type(err).__name__}: {err})") from None


# ---------------------------------------------------------------------- tokens


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """BOS (or CLS) + the prompt's tokens: the prompt part of ``nybble finetune``'s examples."""
    bos = bos_id(tokenizer)
    ids = ([] if bos is None else [bos]) + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if not ids:
        raise GenerateError("the prompt is empty and the tokenizer has no BOS token to start from")
    return ids


def stop_ids(tokenizer, model) -> list[int]:
    """The tokens generation stops at: the tokenizer's EOS (or SEP, what the trainer appends)
    and the model's ``eos_token_id`` (one or a list); empty when neither has one."""
    ids = []
    tok = eos_id(tokenizer)
    if tok is not None:
        ids.append(tok)
    gen = getattr(model, "generation_config", None)
    own = getattr(gen, "eos_token_id", None) if gen is not None else None
    for t in ([] if own is None else own if isinstance(own, (list, tuple)) else [own]):
        if int(t) not in ids:
            ids.append(int(t))
    return ids


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped :func:`generate`; ``stats``: the tokens produced until then
    (their text was streamed, and the line ended)."""

    def __init__(self, stats: "GenerationStats"):
        super().__init__(f"interrupted after {stats.new_tokens} new tokens")
        self.stats = stats


class _Streamer:
    """transformers' ``TextStreamer`` writing to ``out`` (flushed at each piece of text),
    noting the time of the first new token and the new token ids. The first ``put`` is the
    prompt."""

    def __init__(self, tokenizer, out: TextIO):
        from transformers import TextStreamer

        streamer = self

        class _Text(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False):
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

            def put(self, value):
                if not self.next_tokens_are_prompt:
                    if streamer.first_token_at is None:
                        streamer.first_token_at = time.perf_counter()
                    streamer.token_ids.extend(int(t) for t in value.reshape(-1).tolist())
                super().put(value)

        self.first_token_at: float | None = None
        self.token_ids: list[int] = []
        self.text = _Text(tokenizer, skip_prompt=True, skip_special_tokens=True)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, greedy: bool = True,
             temperature: float = 1.0, top_p: float = 1.0, out: TextIO | None = None,
             ignore_eos: bool = False) -> GenerationStats:
    """Generates up to ``max_new_tokens`` after ``prompt`` with transformers' ``generate`` (KV
    cache), streaming the text to ``out`` (default stdout) as it is produced. Greedy, or
    sampling with ``temperature`` and nucleus ``top_p``. ``ignore_eos``: exactly
    ``max_new_tokens`` (benchmarks)."""
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and (not temperature > 0 or not 0 < top_p <= 1):
        raise GenerateError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    ids = prompt_ids(tokenizer, prompt)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    stops = [] if ignore_eos else stop_ids(tokenizer, model)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else (stops[0] if stops else 0)
    streamer = _Streamer(tokenizer, out if out is not None else sys.stdout)
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if ignore_eos else 0,
                  streamer=streamer.text, use_cache=True, eos_token_id=stops or None, pad_token_id=pad)
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    start = time.perf_counter()

    def stats(new: list[int], end: float) -> GenerationStats:
        first = streamer.first_token_at if streamer.first_token_at is not None else end
        return GenerationStats(prompt_tokens=len(ids), new_tokens=len(new), prefill_s=first - start,
                               decode_s=end - first, text=tokenizer.decode(new, skip_special_tokens=True),
                               token_ids=new)

    try:
        with torch.no_grad():
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except KeyboardInterrupt:
        # What was produced stays: the streamer's held-back text is written and the line ended.
        end = time.perf_counter()
        streamer.text.end()
        raise GenerationInterrupted(stats(list(streamer.token_ids), end)) from None
    return stats(output[0, len(ids):].tolist(), time.perf_counter())


def peak_memory(device: torch.device) -> str:
    """Peak resident memory of this process (and torch's peak CUDA allocation on a GPU)."""
    from .cli import human_bytes

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    text = f"peak RSS {human_bytes(rss)}"
    if device.type == "cuda":
        text += f", peak CUDA allocated {human_bytes(torch.cuda.max_memory_allocated(device))}"
    return text


def format_stats(stats: GenerationStats) -> str:
    decode = (f"{stats.new_tokens - 1} tokens in {stats.decode_s:.3f} s ({stats.decode_tokens_per_s:.1f} tokens/s)"
              if stats.new_tokens > 1 else "no tokens after the first")
    return (f"prefill: {stats.prompt_tokens} tokens in {stats.prefill_s:.3f} s "
            f"({stats.prefill_tokens_per_s:.1f} tokens/s); decode: {decode}")


def example_model_dir() -> Path:
    """The built-in example model (``nybble finetune --example``'s), built once."""
    from .train import example

    try:
        return example.build_model_dir()
    except RuntimeError as err:
        raise GenerateError(str(err)) from None


__all__ = ["DTYPES", "EXAMPLE_PROMPTS", "GenerateError", "GenerationInterrupted", "GenerationStats", "apply_adapter",
           "example_model_dir", "format_stats", "generate", "load_model", "load_tokenizer", "peak_memory", "prompt_ids",
           "stop_ids"]
