"""Model-level API: quantize any torch model in place, add / merge / save LoRA adapters in
PEFT's format, and build a model straight from a packed checkpoint."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import outputs
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
    *,
    dense_weights=None,
    loftq_iter: int = 1,
) -> nn.Module:
    """Wraps the target Linear layers (plain or quantized) in :class:`LoraLinear` and freezes
    everything but the adapters. ``"all-linear"``: every Linear but the output layer.

    ``init``: ``"kaiming"`` (PEFT's default) or ``"gaussian"`` (random A, zero B), or
    ``"loftq"`` / ``"pissa"`` / ``"pissa_niter_<n>"`` over quantized layers
    (:mod:`nybble.lora_init`): these read each layer's original dense weight from
    ``dense_weights`` (a safetensors file or model folder, a dict or a callable by module name;
    by default the checkpoint a ``NybbleConfig`` load quantized it from), one layer at a time.
    LoftQ runs ``loftq_iter`` alternations (1 keeps the packed base as it is)."""
    names = _lora_targets(model, target_modules)
    if not names:
        raise ValueError(f"no Linear layer matches target_modules={target_modules!r}")
    fitted = init in ("loftq", "pissa") or init.startswith("pissa_niter_")
    if fitted:
        from . import lora_init

        source = None if dense_weights is None else lora_init.DenseWeights(
            dense_weights, getattr(model, "base_model_prefix", ""))
    _freeze_all_but_adapters(model)
    for n in names:
        base = model.get_submodule(n)
        if not fitted or not isinstance(base, _QUANTIZED):
            # A dense target has no quantization error to fit: PEFT's default init.
            _set_module(model, n, LoraLinear(base, r, alpha, dropout, use_rslora, init if not fitted else "kaiming"))
            continue
        w = lora_init.source_weight(base) if source is None else source.get(n)
        if w is None:
            raise ValueError(f"init={init!r}: no dense weight for {n!r}; pass dense_weights= (the original "
                             f"checkpoint folder, or a dict of weights)")
        layer = LoraLinear(base, r, alpha, dropout, use_rslora)
        layer.reset_lora_parameters(init, dense_weight=w, iters=loftq_iter)
        _set_module(model, n, layer)
        del w
    model._nybble_lora = {"r": r, "alpha": alpha, "dropout": dropout, "use_rslora": use_rslora, "init": init,
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


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None, *,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
    ``peft.PeftModel.from_pretrained`` loads.

    ``path`` must be a new or empty folder (it gets nybble's ``.nybble-output.json``
    marker), or one that nybble's save_adapter / finetune wrote; a folder holding other files,
    or overlapping the local ``base_model_name_or_path``, is refused
    (:class:`nybble.outputs.OutputError`). Files get the umask's mode. ``tensors``: the
    adapter weights when the model's own are shards (FSDP: ``nybble.train.fsdp.full_adapter_state_dict``);
    their keys must be :func:`adapter_state_dict`'s."""
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
    # The output policy (nybble.outputs): a new or empty folder, or one nybble's save_adapter /
    # finetune wrote; never the base model's folder.
    base = base_model_name_or_path
    outputs.claim_folder(path, "save_adapter", inputs=[base] if base and os.path.exists(base) else [])
    if tensors is None:
        tensors = adapter_state_dict(model)
    else:
        expected = {n + s for n in (f"{PEFT_PREFIX}{k}" for k in layers) for s in (".lora_A.weight", ".lora_B.weight")}
        if set(tensors) != expected:
            raise ValueError(f"tensors= holds {len(tensors)} weights whose keys are not the model's {len(expected)} "
                             "adapter weights (adapter_state_dict's keys)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # Each file written aside and renamed into place: a full disk or Ctrl-C leaves the
    # previous adapter, never a truncated one.
    for name, write in ((ADAPTER_WEIGHTS, lambda f: save_file(tensors, str(f), metadata={"format": "pt"})),
                        (ADAPTER_CONFIG, lambda f: f.write_text(json.dumps(config, indent=2) + "\n"))):
        tmp = path / f".{name}.tmp"
        try:
            write(tmp)
            outputs.honour_umask(tmp)  # safetensors writes 0600 through a temporary file
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


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _peft_targets(name: str, target_modules) -> bool:
    """PEFT's ``check_target_module_exists``: a string is a regular expression the full module
    name must match (``"all-linear"`` aside), a list names modules by full path or suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return _name_matches(name, target_modules)


def _adapter_config(config, where: Path) -> dict:
    """The fields of an adapter_config.json nybble uses, validated: types (booleans are JSON
    booleans, not ``"false"``), ranges, and refusal of the PEFT features nybble would
    otherwise silently drop (DoRA, fan_in_fan_out, trained biases, modules_to_save)."""
    from .checkpoint import CheckpointError

    def bad(msg):
        return CheckpointError(f"{where}: {msg}")

    if not isinstance(config, dict):
        raise bad(f"expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise bad(f"peft_type {peft_type!r} is not LORA")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise bad(f"{key} must be true or false, got {config[key]!r}")
    if config.get("use_dora"):
        raise bad("DoRA adapters are not supported")
    if config.get("fan_in_fan_out"):
        raise bad("fan_in_fan_out adapters (transposed Conv1D weights) are not supported")
    if config.get("bias", "none") not in ("none", None):
        raise bad(f"bias {config['bias']!r} is not supported (nybble adapters train no biases)")
    if config.get("modules_to_save"):
        raise bad(f"modules_to_save {config['modules_to_save']!r} is not supported")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad(f"r must be a positive integer, got {r!r}")
    alpha = config.get("lora_alpha")
    if not _is_number(alpha):
        raise bad(f"lora_alpha must be a finite number, got {alpha!r}")
    dropout = config.get("lora_dropout")
    dropout = 0.0 if dropout is None else dropout
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise bad(f"lora_dropout must be a number in [0, 1), got {config.get('lora_dropout')!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as err:
                raise bad(f"target_modules {targets!r} is not a valid regular expression: {err}") from None
    elif not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise bad(f"target_modules must be a string or a non-empty list of strings, got {targets!r}")
    patterns = {}
    for key, check, what in (("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                              "positive integers"), ("alpha_pattern", _is_number, "finite numbers")):
        value = config.get(key) or {}
        if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
            raise bad(f"{key} must map module names to {what}, got {config.get(key)!r}")
        patterns[key] = value
    # PEFT features that select a subset of the matching layers: then only the weights are
    # checked against target_modules, not the reverse.
    partial = any(config.get(k) not in (None, [], "") for k in ("layers_to_transform", "layers_pattern",
                                                                  "exclude_modules"))
    return {"r": r, "alpha": float(alpha), "dropout": float(dropout), "use_rslora": bool(config.get("use_rslora")),
            "target_modules": targets, "partial": partial, **patterns}


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a PEFT LoRA adapter (from nybble or PEFT) into ``model``, adding LoRA layers
    where the model has none yet.

    The adapter is validated before the model changes (errors name the file and tensor:
    :class:`~nybble.checkpoint.CheckpointError`, :class:`~nybble.errors.CorruptFileError`
    for a damaged or non-regular file, :class:`~nybble.errors.NonFiniteError` for NaN / Inf
    weights): adapter_config.json's fields (:func:`_adapter_config`) and the weights against
    them: each layer's rank is ``r`` (or its ``rank_pattern``), each adapted layer matches
    ``target_modules`` and every Linear layer ``target_modules`` names has weights, the
    file holds LoRA A / B weights only, 2-D floats, finite."""
    from . import _files
    from .checkpoint import Checkpoint, CheckpointError
    from .errors import CorruptFileError, NonFiniteError

    path = Path(path)
    cfg_path = path / ADAPTER_CONFIG
    try:
        raw = _files.read_json_file(cfg_path)
    except CorruptFileError:
        raise
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    cfg = _adapter_config(raw, cfg_path)
    weights_path = path / ADAPTER_WEIGHTS
    ckpt = Checkpoint(weights_path)  # a validated header; CorruptFileError with the path otherwise
    weights = {}
    for key, e in ckpt.entries.items():
        where = f"{weights_path}: tensor {key!r}"
        if not (key.startswith(PEFT_PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))):
            raise CheckpointError(f"{where}: not a LoRA A / B weight under {PEFT_PREFIX!r} (nybble loads "
                                  f"nothing else)")
        if e.dtype not in ("F32", "F16", "BF16") or len(e.shape) != 2:
            raise CheckpointError(f"{where}: {e.dtype} {list(e.shape)}; expected a 2-D float tensor")
        arr = ckpt.read(key).astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(arr.reshape(-1)))
        if bad.size:
            i = int(bad[0])
            raise NonFiniteError(f"{where}: holds a non-finite value ({arr.reshape(-1)[i]}) at flat index {i}",
                                 index=i, value=float(arr.reshape(-1)[i]), tensor=key, path=weights_path)
        weights[key] = torch.from_numpy(arr)
    layer_names = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in weights})
    if not layer_names:
        raise CheckpointError(f"{weights_path}: no LoRA weights under {PEFT_PREFIX!r}")
    existing = lora_layers(model)
    use_rslora, dropout = cfg["use_rslora"], cfg["dropout"]
    targets = cfg["target_modules"]
    linear_types = (nn.Linear, *_QUANTIZED, LoraLinear)
    adaptable = [n for n, m in model.named_modules() if isinstance(m, linear_types)
                 and not any(part in ("lora_A", "lora_B", "base_layer") for part in n.split("."))]
    if targets == "all-linear":  # PEFT's: every Linear but the output layer
        wanted = set(adaptable) - _output_layer_names(model)
    else:
        wanted = {n for n in adaptable if _peft_targets(n, targets)}
    # Validate every layer before changing the model, so a bad adapter leaves it untouched.
    plan = []
    for n in layer_names:
        a = weights.get(f"{PEFT_PREFIX}{n}.lora_A.weight")
        b = weights.get(f"{PEFT_PREFIX}{n}.lora_B.weight")
        if a is None or b is None:
            raise CheckpointError(f"{weights_path}: layer {n!r} lacks lora_A or lora_B weights")
        try:
            target = model.get_submodule(n)
        except AttributeError:
            raise CheckpointError(f"{weights_path}: adapter layer {n!r} is not in the model") from None
        base = target.base_layer if isinstance(target, LoraLinear) else target
        if not hasattr(base, "in_features"):
            raise CheckpointError(f"{weights_path}: {n!r} is a {type(base).__name__}, not a Linear layer")
        if n not in wanted:
            raise CheckpointError(f"{weights_path}: layer {n!r} has weights, but {cfg_path.name}'s target_modules "
                                  f"{targets!r} does not name it")
        r = a.shape[0]
        expected_r = next((v for k, v in cfg["rank_pattern"].items() if n == k or n.endswith("." + k)), cfg["r"])
        if r != expected_r:
            raise CheckpointError(f"{weights_path}: {n}: lora_A has rank {r}, but {cfg_path.name} says r = "
                                  f"{expected_r}")
        if tuple(a.shape) != (r, base.in_features) or tuple(b.shape) != (base.out_features, r):
            raise CheckpointError(
                f"{weights_path}: {n}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit a "
                f"({base.out_features}, {base.in_features}) layer"
            )
        alpha = next((float(v) for k, v in cfg["alpha_pattern"].items() if n == k or n.endswith("." + k)),
                     cfg["alpha"])
        plan.append((n, base, r, alpha, a, b))
    if not cfg["partial"]:
        lacking = sorted(wanted - set(layer_names))
        if lacking:
            raise CheckpointError(f"{cfg_path}: target_modules {targets!r} names {len(lacking)} layer(s) the "
                                  f"adapter has no weights for: {lacking[:5]}")
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
def _weights_on_meta() -> Iterator[None]:
    """While building a model, nn.Linear and nn.Embedding layers allocate nothing: their
    weights arrive from the checkpoint (Linear ones packed), and a random init of them would
    only raise the peak memory."""
    originals = {cls: cls.__init__ for cls in (nn.Linear, nn.Embedding)}

    def on_meta(original):
        def init(self, *args, **kwargs):
            kwargs["device"] = "meta"
            original(self, *args, **kwargs)
        return init

    for cls, original in originals.items():
        cls.__init__ = on_meta(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.__init__ = original


def load_quantized(
    path: str | os.PathLike,
    model_class=None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype | str = "auto",
) -> nn.Module:
    """Builds a model from a packed checkpoint folder (written by ``nybble quantize`` or by
    transformers + bitsandbytes) without materializing 16-bit Linear weights.

    ``model_class`` defaults to ``transformers.AutoModel``; any class with ``from_config``
    works. Non-quantized tensors (embeddings, norms, an untied ``lm_head``) load in ``dtype``:
    a float torch dtype (or its name, ``"bfloat16"``), or ``"auto"`` (as transformers'
    ``dtype="auto"``): the dtype ``config.json`` records (``dtype`` / ``torch_dtype``), else
    that of the checkpoint's first non-quantized float tensor, else float32.

    The checkpoint must match the model exactly, or :class:`~nybble.checkpoint.CheckpointError`
    names the file and tensors: every packed weight is validated (quant_state fields, tensor
    layouts and values; :mod:`nybble.formats`), every tensor the model expects must be in the
    checkpoint and every tensor of the checkpoint must be used. Allowed, by name: a tensor the
    model ties to one that was loaded (``lm_head.weight`` tied to the input embeddings, checked
    by identity after ``tie_weights()``), and checkpoint tensors for the model's non-persistent
    buffers, which it recomputes (``embeddings.position_ids``) or that its class lists in
    ``_keys_to_ignore_on_load_unexpected``."""
    from . import formats
    from .checkpoint import Checkpoint, CheckpointError, packed_weights

    path = Path(path)
    ckpt = Checkpoint(path)
    cfg = ckpt.config()
    if cfg is None or "quantization_config" not in cfg:
        raise CheckpointError(f"{path}: config.json with a quantization_config is required")
    try:
        qc = formats.parse_quantization_config(cfg["quantization_config"])
    except ValueError as err:
        raise CheckpointError(f"{ckpt.folder / 'config.json'}: {err}") from None
    weights = packed_weights(ckpt)  # every quant_state and layout checked, errors name file + tensor
    dtype = _resolve_load_dtype(dtype, ckpt, weights)
    if model_class is None:
        import transformers

        model_class = transformers.AutoModel
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with _weights_on_meta():
            model = (model_class.from_config(config, dtype=dtype) if hasattr(model_class, "from_config")
                     else model_class(config))
    except Exception as err:  # transformers / torch on a config.json they cannot use
        raise CheckpointError(f"{ckpt.folder / 'config.json'}: cannot build a model from it: "
                              f"{type(err).__name__}: {err}") from err
    model.eval()
    four_bit = qc.load_in_4bit
    if compute_dtype is None and four_bit:
        compute_dtype = getattr(torch, qc.compute_dtype or "float32")

    def where(name: str) -> str:
        return f"{ckpt.entries[name].file}: tensor {name!r}"

    linears = {f"{n}.weight": (n, m) for n, m in model.named_modules() if type(m) is nn.Linear}
    for weight, w in weights.items():
        kind = "4-bit" if w.format in formats.QUANT_TYPES else "int8"
        if (kind == "4-bit") != four_bit:
            raise CheckpointError(f"{where(weight)}: a {w.format} weight, but quantization_config says "
                                  f"{'4-bit' if four_bit else '8-bit'}")
        if weight not in linears:
            raise CheckpointError(f"{where(weight)}: a packed weight, but the model has no Linear layer "
                                  f"{weight.removesuffix('.weight')!r}")
        n, lin = linears[weight]
        if tuple(w.shape) != (lin.out_features, lin.in_features):
            raise CheckpointError(f"{where(weight)}: shape {list(w.shape)}, but the model's layer is "
                                  f"({lin.out_features}, {lin.in_features})")
        if kind == "4-bit":
            new = Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, w.format,
                             w.blocksize, w.double_quant, compute_dtype,
                             # The storage each weight was written with (bnb_4bit_quant_storage, per tensor).
                             quant_storage=w.quant_storage or qc.quant_storage, device="meta")
        else:
            new = Linear8bitLt(lin.in_features, lin.out_features, lin.bias is not None, qc.threshold, device="meta")
        _set_module(model, n, new)

    state = {}
    for name in ckpt.entries:
        arr = ckpt.read(name)  # writable and its own: no copy
        if arr.dtype.name == "bfloat16":
            state[name] = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        else:
            state[name] = torch.from_numpy(arr)
    # The values of every packed weight's constants, before any module takes them.
    for weight, w in weights.items():
        try:
            if w.format == "int8":
                formats.check_int8_tensors(*(state.get(k) for k in formats.int8_keys(weight)))
            else:
                info = formats.parse_quant_state(formats.decode_quant_state(state[w.keys[-1]]), w.format)
                formats.check_4bit_tensors(
                    info, packed=state[weight], absmax=state[f"{weight}.{formats.ABSMAX}"],
                    quant_map=state[f"{weight}.{formats.QUANT_MAP}"],
                    nested_absmax=state.get(f"{weight}.{formats.NESTED_ABSMAX}"),
                    nested_quant_map=state.get(f"{weight}.{formats.NESTED_QUANT_MAP}"))
        except ValueError as err:
            raise CheckpointError(f"{where(weight)}: {err}") from None
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # size mismatches, the modules' own error messages
        raise CheckpointError(f"{path}: {err}") from None
    loaded = {id(t) for n, t in _named_tensors(model) if n in state}
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    tensors = dict(_named_tensors(model))
    # Missing: allowed only where the model ties the name to a tensor loaded from the file.
    missing = [k for k in result.missing_keys if not (k in tensors and id(tensors[k]) in loaded)]
    recomputed = {f"{mn}.{b}" if mn else b for mn, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = [k for k in result.unexpected_keys if k not in recomputed and not any(p.search(k) for p in ignore)]
    if missing or unexpected:
        def listing(keys):
            return ", ".join(repr(k) for k in sorted(keys)[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"the model expects {len(missing)} tensor(s) the checkpoint lacks: {listing(missing)}")
        if unexpected:
            parts.append(f"the checkpoint has {len(unexpected)} tensor(s) the model does not use: {listing(unexpected)}")
        raise CheckpointError(f"{path}: " + "; ".join(parts))
    still_meta = [n for n, p in _named_tensors(model) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{path}: checkpoint lacks tensors for {still_meta[:5]}{'...' if len(still_meta) > 5 else ''}")
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _resolve_load_dtype(dtype: torch.dtype | str, ckpt, weights) -> torch.dtype:
    """``load_quantized``'s ``dtype``: a float torch dtype as given, or ``"auto"`` resolved
    from the checkpoint (see there)."""
    from . import formats

    if dtype != "auto":
        named = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if not (isinstance(named, torch.dtype) and named.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch dtype (or its name) or 'auto', not {dtype!r}")
        return named
    recorded = ckpt.model_dtype()
    if recorded is not None:
        return getattr(torch, recorded)
    packed = {key for w in weights.values() for key in w.keys} | set(weights)
    for name, entry in ckpt.entries.items():
        long_name = formats.dtype_name(entry.dtype)
        if name not in packed and long_name in formats.FLOAT_SAFETENSORS_NAMES:
            return getattr(torch, long_name)
    return torch.float32


def _named_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under each of its names (tied ones under all of theirs)."""
    return (list(model.named_parameters(remove_duplicate=False))
            + list(model.named_buffers(remove_duplicate=False)))
