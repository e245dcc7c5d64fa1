"""``nybble quantize --method gptq``: a checkpoint folder -> GPTQ -> a packed checkpoint folder
in exactly the layout of ``nybble quantize`` (the round-to-nearest Rust converter).

The tensors to quantize are chosen by the converter's rule (:func:`nybble.checkpoint.select_tensors`,
``--skip`` / ``--only`` included), and the output plan (tensor order, keys, dtypes, shapes,
shards) is the Rust converter's own: it is asked for its plan and never run. Packed weights
come from :func:`nybble.gptq.quantize_model` (keys and quant_state JSON from
:mod:`nybble.formats`, padded as the Rust writer pads them), every other tensor is copied byte
for byte, ``config.json`` gets the same ``quantization_config``, tokenizer and side files are
copied. The safetensors metadata records ``quantization_method: gptq`` and the GPTQ settings
(``nybble inspect`` shows them).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import _core, outputs
from . import checkpoint as ck
from . import formats as fmt

__all__ = ["calibration_batches", "load_model", "quantize_checkpoint_gptq", "read_calibration_texts"]



def read_calibration_texts(path: str | os.PathLike, samples: int | None = None) -> list[str]:
    """Calibration samples from a text file: one sample per non-empty line, or JSON lines with
    a ``"text"`` field (a ``.jsonl`` / ``.json`` file, or one whose first line is a JSON
    object). ``samples``: the first that many."""
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    as_json = path.suffix in (".jsonl", ".json") or (bool(lines) and lines[0].lstrip().startswith("{"))
    texts = []
    for i, line in enumerate(lines, 1):
        if as_json:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not a JSON object ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{i}: expected a JSON object with a string \"text\" field")
            line = obj["text"]
        if line.strip():
            texts.append(line)
        if samples is not None and len(texts) >= samples:
            break
    if not texts:
        raise ValueError(f"{path}: no calibration samples")
    return texts


def calibration_batches(tokenizer, texts: Iterable[str], seq_len: int = 512, batch_size: int = 8) -> list[dict]:
    """Tokenized batches (``input_ids``, ``attention_mask``, ...; samples truncated to
    ``seq_len`` tokens, padded within a batch) for :func:`nybble.gptq.quantize_model`."""
    texts = list(texts)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                        return_tensors="pt")
        batches.append(dict(enc))
    return batches


def load_model(path: str | os.PathLike, dtype=None):
    """The float model of a checkpoint folder with transformers: the class its config names
    (``architectures``), else ``AutoModelForCausalLM`` for a causal-LM config, else
    ``AutoModel``."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    cls = None
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            break
    if cls is None:
        causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        cls = transformers.AutoModelForCausalLM if config.model_type in causal else transformers.AutoModel
    return cls.from_pretrained(str(path), dtype=dtype or torch.float32).eval()


def _model_names(model, names: Iterable[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the model's name for it (the checkpoint may carry the base
    model prefix, ``bert.``, that the model lacks, or lack one it has)."""
    own = set(model.state_dict().keys())
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name in names:
        for cand in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                     f"{prefix}.{name}" if prefix else None):
            if cand is not None and cand in own:
                out[name] = cand
                break
    return out


def _raw(ckpt: ck.Checkpoint, name: str) -> np.ndarray:
    e = ckpt.entries[name]
    with open(e.file, "rb") as f:
        data = os.pread(f.fileno(), e.nbytes, e.offset)
    if len(data) != e.nbytes:
        raise ck.CheckpointError(f"{e.file}: tensor {name!r}: file shrank while reading")
    return np.frombuffer(data, dtype=np.uint8)


def _u8(t) -> np.ndarray:
    """The little-endian bytes of a CPU tensor as a 1-D uint8 array."""
    import torch

    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()


def _four_bit_entries(name: str, layer, source_dtype: str, quant: str, double_quant: bool) -> list[tuple]:
    """The output entries of one packed weight from its :class:`Linear4bit`, keys and order
    from :func:`nybble.formats.four_bit_keys`, quant_state JSON padded as the Rust writer
    pads it (so sizes equal the converter's plan)."""
    import torch

    shape = (layer.out_features, layer.in_features)
    n = shape[0] * shape[1]
    nb = -(-n // layer.blocksize)
    storage = fmt.quant_storage_name(layer.weight.dtype)
    offset = float(layer.offset_bits.view(torch.float32)) if double_quant else None
    blob = fmt.encode_quant_state(fmt.quant_state_dict(quant, layer.blocksize, fmt.dtype_name(source_dtype), shape,
                                                       offset), padded=True)
    data = {
        "weight": (fmt.QUANT_STORAGES[storage][0], list(fmt.packed_shape(n, storage)), _u8(layer.weight)),
        fmt.QUANT_MAP: ("F32", [16], _u8(layer.quant_map_bits)),
        "quant_state": ("U8", [len(blob)], np.frombuffer(blob, dtype=np.uint8)),
    }
    if double_quant:
        data[fmt.ABSMAX] = ("U8", [nb], _u8(layer.absmax_codes))
        data[fmt.NESTED_ABSMAX] = ("F32", [int(layer.nested_absmax_bits.numel())], _u8(layer.nested_absmax_bits))
        data[fmt.NESTED_QUANT_MAP] = ("F32", [256], _u8(layer.nested_code_bits))
    else:
        data[fmt.ABSMAX] = ("F32", [nb], _u8(layer.absmax_bits))
    entries = []
    for key in fmt.four_bit_keys(name, quant, double_quant):
        part = "weight" if key == name else ("quant_state" if fmt.split_quant_state_key(key) else key[len(name) + 1:])
        st, shp, raw = data[part]
        entries.append((key, st, shp, raw))
    return entries


def quantize_checkpoint_gptq(
    src: str | os.PathLike,
    out: str | os.PathLike,
    calibration: str | os.PathLike,
    *,
    samples: int = 128,
    seq_len: int = 512,
    batch_size: int = 8,
    quant: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    damp: float = 0.01,
    act_order: bool = False,
    block_size_gptq: int = 128,
    absmax_search: int = 0,
    threads: int | None = None,
    overwrite: bool = False,
    skip: Iterable[str] = (),
    only: Iterable[str] = (),
    max_shard_size: str | int = "5GB",
    quant_storage: Any = "uint8",
    device: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_block: Callable[[int, int, float], None] | None = None,
    on_layer: Callable[[Any], None] | None = None,
):
    """GPTQ-quantizes the model folder ``src`` (safetensors weights, config.json, tokenizer)
    into ``out``. Returns ``(QuantizeSummary, GptqSummary)``. ``on_start(n_blocks)`` is
    called once the model is loaded and calibrated inputs are ready, ``on_block`` /
    ``on_layer`` as in :func:`nybble.gptq.quantize_model`."""
    import torch

    from . import gptq
    from .nn import Linear4bit

    if quant not in fmt.QUANT_TYPES:
        raise ValueError(f"GPTQ writes 4-bit weights ({' / '.join(fmt.QUANT_TYPES)}), not {quant!r}")
    blocksize = fmt.check_blocksize(blocksize)
    quant_storage = fmt.quant_storage_name(quant_storage)
    compute_dtype = ck.COMPUTE_DTYPES.get(compute_dtype, compute_dtype)
    if compute_dtype not in ck.COMPUTE_DTYPES.values():
        raise ValueError(f"compute dtype {compute_dtype!r} is not one of {list(ck.COMPUTE_DTYPES)}")
    if samples < 1 or seq_len < 1 or batch_size < 1:
        raise ValueError("samples, seq_len and batch_size must be >= 1")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ck.CheckpointError(f"{src}: GPTQ needs a model folder (config.json, tokenizer, weights), not a file")
    max_shard_bytes = ck.parse_size(max_shard_size)
    started = time.perf_counter()
    ckpt = ck.Checkpoint(src)
    outputs.check_output(out, ck.input_paths(ckpt), overwrite)
    already = [k for k in ckpt.entries if fmt.split_quant_state_key(k) or k.endswith("." + fmt.SCB)]
    if already:
        raise ck.CheckpointError(f"{src} is already quantized ({already[0]!r}); dequantize it first")
    config = ckpt.config()
    if config is None:
        raise ck.CheckpointError(f"{src}: GPTQ needs config.json to build the model")
    listing = [(e.name, e.dtype, list(e.shape)) for e in ckpt.entries.values()]
    chosen = ck.select_tensors(listing, only, skip)
    if not chosen:
        what = f"--only {' '.join(only)}" if list(only) else "the default rule (2-D float .weight of linear layers)"
        raise ck.CheckpointError(f"{src}: no tensor to quantize matches {what}")
    for name in sorted(chosen):
        e = ckpt.entries[name]
        try:
            fmt.packed_shape(int(np.prod(e.shape, dtype=np.int64)), quant_storage)
        except ValueError as err:
            raise ck.CheckpointError(f"{e.file}: tensor {name!r} {list(e.shape)}: {err}") from None
    texts = read_calibration_texts(calibration, samples)

    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(src))
    model = load_model(src)
    batches = calibration_batches(tokenizer, texts, seq_len, batch_size)
    names = _model_names(model, chosen)
    modules = dict(model.named_modules())
    # GPTQ every chosen weight that is a plain nn.Linear of the model; the rest (a Conv1D, a
    # weight the model does not use) is rounded to nearest, as the converter would.
    gptq_targets = {t: names[t].removesuffix(".weight") for t in chosen
                    if t in names and names[t].endswith(".weight")
                    and type(modules.get(names[t].removesuffix(".weight"))) is torch.nn.Linear}
    wanted = set(gptq_targets.values())
    skip_modules = [n for n, m in modules.items() if type(m) is torch.nn.Linear and n not in wanted]
    if on_start is not None:
        found = gptq.find_blocks(model)
        on_start(len(found[1]) if found else 0)
    dev = None if device in (None, "auto") else device
    if device == "auto" and torch.cuda.is_available():
        dev = "cuda"
    model, gsum = gptq.quantize_model(
        model, batches, quant=quant, blocksize=blocksize, double_quant=double_quant, damp=damp,
        act_order=act_order, block_size_gptq=block_size_gptq, compute_dtype=getattr(torch, compute_dtype),
        skip_modules=skip_modules, absmax_search=absmax_search, device=dev, threads=threads,
        quant_storage=getattr(torch, quant_storage), on_block=on_block, on_layer=on_layer)
    modules = dict(model.named_modules())
    fallback = sorted(t for t in chosen if not isinstance(modules.get(gptq_targets.get(t, "")), Linear4bit))
    if fallback:
        warnings.warn(f"GPTQ: {len(fallback)} selected tensors are not weights of nn.Linear layers the calibration "
                      f"reached ({', '.join(fallback[:3])}{', ...' if len(fallback) > 3 else ''}); they are rounded "
                      "to nearest", stacklevel=2)
    gsum.settings.update(calibration=Path(calibration).name, samples=len(texts), seq_len=seq_len,
                         rtn_fallback=len(fallback))

    def packed_layer(tensor: str):
        mod = modules.get(gptq_targets.get(tensor, ""))
        if isinstance(mod, Linear4bit):
            return mod
        # Not reached by GPTQ: round to nearest, as the Rust converter does.
        w = torch.from_numpy(np.array(ckpt.read(tensor), dtype=np.float32))
        layer = Linear4bit(w.shape[1], w.shape[0], bias=False, quant_type=quant, blocksize=blocksize,
                           double_quant=double_quant, quant_storage=getattr(torch, quant_storage))
        layer.set_weight(w)
        return layer

    metadata = dict(ckpt.metadata)
    metadata.update({"format": "pt", "quantization_method": "gptq",
                     "gptq": json.dumps({k: v for k, v in gsum.settings.items() if v is not None}, sort_keys=True)})
    with ck.staged_output(out, overwrite, ck.input_paths(ckpt), "quantize") as staging:
        conv = _core.Converter([str(f) for f in ckpt.files], str(staging), chosen, method=quant,
                               blocksize=blocksize, double_quant=double_quant, max_shard_bytes=max_shard_bytes,
                               error_stats=False, threads=threads, quant_storage=quant_storage)
        try:
            plan, shard_names = conv.plan(), conv.shard_names()
        finally:
            conv.abort()  # only its plan is used: nothing was written
        weight_map = {}
        for shard, shard_name in enumerate(shard_names):
            entries = []
            for t in (t for t in plan if t["shard"] == shard):
                if t["quantize"]:
                    part = _four_bit_entries(t["name"], packed_layer(t["name"]), t["dtype"], quant, double_quant)
                    if sum(raw.size for *_, raw in part) != t["out_bytes"]:
                        raise AssertionError(f"{t['name']}: output size differs from the converter's plan")
                else:
                    part = [(t["name"], t["dtype"], list(t["shape"]), _raw(ckpt, t["name"]))]
                entries += part
                weight_map.update({key: shard_name for key, *_ in part})
            _core.write_safetensors_file(str(staging / shard_name), entries, metadata)
        if len(shard_names) > 1:
            index = {"metadata": {"total_size": sum(t["out_bytes"] for t in plan)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (staging / ck.INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        ck.copy_side_files(src, staging)
        kept = sorted({t["name"].removesuffix(".weight") for t in plan if not t["quantize"] and len(t["shape"]) == 2}
                      | {"lm_head"})
        config["quantization_config"] = fmt.quantization_config(quant, double_quant, compute_dtype, kept,
                                                                quant_storage)
        (staging / ck.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    quantized = [t for t in plan if t["quantize"]]
    summary = ck.QuantizeSummary(
        output=out, method=quant, tensors=len(plan), quantized=len(quantized),
        params_quantized=sum(int(np.prod(t["shape"], dtype=np.int64)) for t in quantized),
        bytes_in=sum(t["in_bytes"] for t in plan), bytes_out=sum(t["out_bytes"] for t in plan),
        bytes_quantized_out=sum(t["out_bytes"] for t in quantized), seconds=time.perf_counter() - started,
        shards=list(shard_names),
    )
    return summary, gsum
