"""Model-level API: quantize any torch model in place, add / merge / save LoRA adapters in
PEFT's format, and build a model straight from a packed checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .nn import Linear4bit, Linear8bitLt, LoraLinear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_QUANTIZED = (Linear4bit, Linear8bitLt)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _name_matches(name: str, patterns: Iterable[str]) -> bool:
    """PEFT's rule: a pattern names a module by its full path or its last components."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_layer_names(model: nn.Module) -> set[str]:
    names = {"lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is not None:
        names |= {n for n, m in model.named_modules() if m is out}
    return names


def quantize_model(
    model: nn.Module,
    quant: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] = ("lm_head",),
    threshold: float = 6.0,
) -> nn.Module:
    """Replaces every ``nn.Linear`` (but the output layer and ``skip_modules``) with a
    :class:`Linear4bit` (``quant="nf4"|"fp4"``) or :class:`Linear8bitLt` (``"int8"``), in place."""
    if quant not in ("nf4", "fp4", "int8"):
        raise ValueError(f"quant {quant!r} is not one of 'nf4', 'fp4', 'int8'")
    skip = set(skip_modules) | _output_layer_names(model)
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _name_matches(n, skip)]
    for name, lin in targets:
        if quant == "int8":
            new = Linear8bitLt.from_linear(lin, threshold=threshold)
        else:
            new = Linear4bit.from_linear(lin, quant, blocksize, double_quant, compute_dtype)
        _set_module(model, name, new)
    return model


def _lora_targets(model: nn.Module, target_modules) -> list[str]:
    linear_types = (nn.Linear, *_QUANTIZED)
    out_names = _output_layer_names(model)
    names = []
    for n, m in model.named_modules():
        if not isinstance(m, linear_types) or isinstance(m, LoraLinear) or ".base_layer" in n or n.endswith("lora_A") or n.endswith("lora_B"):
            continue
        if target_modules == "all-linear":
            if not _name_matches(n, out_names):
                names.append(n)
        elif _name_matches(n, [target_modules] if isinstance(target_modules, str) else target_modules):
            names.append(n)
    return names


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    target_modules: str | Iterable[str] = "all-linear",
    dropout: float = 0.0,
    use_rslora: bool = False,
    init: str = "kaiming",
) -> nn.Module:
    """Wraps the target Linear layers (plain or quantized) in :class:`LoraLinear` and freezes
    everything but the adapters. ``"all-linear"``: every Linear but the output layer."""
    names = _lora_targets(model, target_modules)
    if not names:
        raise ValueError(f"no Linear layer matches target_modules={target_modules!r}")
    _freeze_all_but_adapters(model)
    for n in names:
        _set_module(model, n, LoraLinear(model.get_submodule(n), r, alpha, dropout, use_rslora, init))
    model._nybble_lora = {"r": r, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora,
                          "target_modules": target_modules if isinstance(target_modules, str) else sorted(set(target_modules))}
    return model


def _freeze_all_but_adapters(model: nn.Module) -> None:
    """Freezes every parameter except those of LoRA layers already in the model."""
    adapter_params = {id(p) for m in lora_layers(model).values() for p in (m.lora_A.weight, m.lora_B.weight)}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for m in lora_layers(model).values():
        m.disabled = not enabled


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    set_adapters_enabled(model, False)
    try:
        yield
    finally:
        set_adapters_enabled(model, True)


def _base_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a dense replacement of ``layer`` should have to fit its model."""
    if isinstance(layer, Linear4bit):
        return layer.compute_dtype or layer.weight_dtype
    if isinstance(layer, Linear8bitLt):
        return layer.bias.dtype if layer.bias is not None else torch.float16
    return layer.weight.dtype


def merge_adapters(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Folds each enabled adapter into its base layer, leaving dense ``nn.Linear`` layers
    (a quantized base is decoded first): the merged model to export. ``dtype`` defaults to
    the base layer's dtype (its compute dtype for 4-bit layers); pass ``torch.bfloat16`` for
    a 16-bit export."""
    for n, m in lora_layers(model).items():
        _set_module(model, n, m.merged_linear(dtype or _base_dtype(m.base_layer)))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replaces quantized Linear layers by dense ones of ``dtype`` (after merging adapters)."""
    merge_adapters(model, dtype)
    for n, m in [(n, m) for n, m in model.named_modules() if isinstance(m, _QUANTIZED)]:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=dtype, device=m.weight.device)
        with torch.no_grad():
            lin.weight.copy_(m.dequantized_weight(torch.float32).to(dtype))
            if m.bias is not None:
                lin.bias.copy_(m.bias.to(dtype))
        _set_module(model, n, lin)
    return model


# ---------------------------------------------------------------------- PEFT format


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights under PEFT's key names (``base_model.model.<path>.lora_A.weight``)."""
    out = {}
    for n, m in lora_layers(model).items():
        out[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
    ``peft.PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters")
    first = next(iter(layers.values()))
    if any((m.r, m.alpha, m.use_rslora) != (first.r, first.alpha, first.use_rslora) for m in layers.values()):
        raise ValueError("adapters with different r / alpha cannot share one PEFT config")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": _target_module_names(model, layers),
        "bias": "none",
        "use_rslora": first.use_rslora,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_dora": False,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    # Each file written aside and renamed into place: a full disk or Ctrl-C leaves the
    # previous adapter, never a truncated one.
    for name, write in ((ADAPTER_WEIGHTS, lambda f: save_file(tensors, str(f), metadata={"format": "pt"})),
                        (ADAPTER_CONFIG, lambda f: f.write_text(json.dumps(config, indent=2) + "\n"))):
        tmp = path / f".{name}.tmp"
        try:
            write(tmp)
            os.replace(tmp, path / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _target_module_names(model: nn.Module, layers: dict[str, LoraLinear]) -> list[str]:
    """Short names (``q_proj``) when they pick exactly the adapted layers, else full paths:
    PEFT re-applies ``target_modules`` by suffix when it builds a trainable model."""
    short = {n.rsplit(".", 1)[-1] for n in layers}
    linear_types = (nn.Linear, *_QUANTIZED, LoraLinear)
    matched = {
        n for n, m in model.named_modules()
        if isinstance(m, linear_types) and n.rsplit(".", 1)[-1] in short
        and not any(part in ("lora_A", "lora_B", "base_layer") for part in n.split("."))
    }
    return sorted(short) if matched == set(layers) else sorted(layers)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a PEFT LoRA adapter (from nybble or PEFT) into ``model``, adding LoRA layers
    where the model has none yet."""
    from safetensors.torch import load_file

    path = Path(path)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise ValueError(f"{path}: DoRA adapters are not supported")
    weights = load_file(str(path / ADAPTER_WEIGHTS))
    layer_names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in weights if k.startswith(PEFT_PREFIX)})
    if not layer_names:
        raise ValueError(f"{path}: no LoRA weights under {PEFT_PREFIX!r}")
    existing = lora_layers(model)
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora"))
    dropout = float(config.get("lora_dropout") or 0.0)
    # Validate every layer before changing the model, so a bad adapter leaves it untouched.
    plan = []
    for n in layer_names:
        a = weights.get(f"{PEFT_PREFIX}{n}.lora_A.weight")
        b = weights.get(f"{PEFT_PREFIX}{n}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{path}: layer {n!r} lacks lora_A or lora_B weights")
        try:
            target = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"{path}: adapter layer {n!r} is not in the model") from None
        base = target.base_layer if isinstance(target, LoraLinear) else target
        if not hasattr(base, "in_features"):
            raise ValueError(f"{path}: {n!r} is a {type(base).__name__}, not a Linear layer")
        r = a.shape[0]  # per-layer rank (PEFT's rank_pattern) is in the weight shapes
        if tuple(a.shape) != (r, base.in_features) or tuple(b.shape) != (base.out_features, r):
            raise ValueError(
                f"{path}: {n}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                f"({base.out_features}, {base.in_features}) layer"
            )
        alpha = next((float(v) for k, v in alpha_pattern.items() if n == k or n.endswith("." + k)),
                      float(config["lora_alpha"]))
        plan.append((n, base, r, alpha, a, b))
    for n, base, r, alpha, a, b in plan:
        layer = existing.get(n)
        if layer is not None and layer.r == r:
            # Same rank: load in place, so optimizers holding these parameters (a resumed
            # run) keep training them; the file's alpha / rsLoRA / dropout replace the layer's.
            layer.configure(alpha, use_rslora, dropout)
        else:
            layer = LoraLinear(base, r, alpha, dropout, use_rslora)
            layer.disabled = existing[n].disabled if n in existing else False
            _set_module(model, n, layer)
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    _freeze_all_but_adapters(model)
    return model


# ---------------------------------------------------------------------- packed checkpoints


@contextlib.contextmanager
def _linear_weights_on_meta() -> Iterator[None]:
    """While building a model, nn.Linear layers allocate nothing (their weights arrive packed)."""
    original = nn.Linear.__init__

    def init(self, in_features, out_features, bias=True, device=None, dtype=None):
        original(self, in_features, out_features, bias, device="meta", dtype=dtype)

    nn.Linear.__init__ = init
    try:
        yield
    finally:
        nn.Linear.__init__ = original


def load_quantized(
    path: str | os.PathLike,
    model_class=None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Builds a model from a packed checkpoint folder (written by ``nybble quantize`` or by
    transformers + bitsandbytes) without materializing 16-bit Linear weights.

    ``model_class`` defaults to ``transformers.AutoModel``; any class with ``from_config``
    works. Non-quantized tensors load in ``dtype``."""
    from . import formats
    from .checkpoint import Checkpoint

    path = Path(path)
    ckpt = Checkpoint(path)
    cfg = ckpt.config()
    if cfg is None or "quantization_config" not in cfg:
        raise ValueError(f"{path}: config.json with a quantization_config is required")
    qc = formats.parse_quantization_config(cfg["quantization_config"])
    if model_class is None:
        import transformers

        model_class = transformers.AutoModel
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _linear_weights_on_meta():
        model = model_class.from_config(config, dtype=dtype) if hasattr(model_class, "from_config") else model_class(config)
    model.eval()
    four_bit = qc.load_in_4bit
    if compute_dtype is None and four_bit:
        compute_dtype = getattr(torch, qc.compute_dtype or "float32")

    names = set(ckpt.entries)
    for n, lin in [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]:
        weight = f"{n}.weight"
        qs_key = next((k for k in (formats.quant_state_key(weight, t) for t in formats.QUANT_TYPES) if k in names), None)
        scb_key = formats.int8_keys(weight)[1]
        if four_bit and qs_key is not None:
            qs = formats.parse_quant_state(ckpt.read_json(qs_key))
            # The storage each weight was written with (bnb_4bit_quant_storage, per tensor).
            storage = formats.quant_storage_of(ckpt.entries[weight].dtype) if weight in names else None
            new = Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, qs.quant_type,
                             qs.blocksize, qs.double_quant, compute_dtype,
                             quant_storage=storage or qc.quant_storage)
        elif not four_bit and scb_key in names:
            new = Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None, qc.threshold)
        else:
            continue
        _set_module(model, n, new)

    state = {}
    for name in names:
        arr = ckpt.read(name)
        if arr.dtype.name == "bfloat16":
            state[name] = torch.from_numpy(arr.view(np.int16).copy()).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(arr.copy())
    model.load_state_dict(state, strict=False, assign=True)
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise ValueError(f"{path}: checkpoint lacks tensors for {still_meta[:5]}{'...' if len(still_meta) > 5 else ''}")
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model
