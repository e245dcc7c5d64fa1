"""PEFT's LoRA over nybble's quantized layers.

:class:`LoraNybbleLinear` is a PEFT LoRA layer (``peft.tuners.lora.LoraLayer``) whose base is
a :class:`nybble.nn.Linear4bit` or :class:`nybble.nn.Linear8bitLt`. One plain LoRA adapter
runs nybble's fused QLoRA path (``base(x, lora=(A, B, scale, x_lora))``: the base and the
adapter in one autograd Function, the packed weight decoded again for the backward pass);
several adapters, ``lora_bias`` and DoRA add their terms after the base, as PEFT does.

It is registered through PEFT's custom-module API (``LoraConfig._register_custom_module``).
So that a plain ``peft.get_peft_model(model, LoraConfig(target_modules="all-linear"))`` works
over a model with nybble layers, importing this module wraps ``LoraModel._prepare_model``
(PEFT calls it on every adapter injection, before matching modules): when the model holds
nybble layers it registers them on the config (unless the config maps them already) and, for
``"all-linear"``, adds nybble's layers to the dense Linear layers PEFT selects (PEFT's rule
only knows ``nn.Linear`` / ``Conv1D``). Nothing changes for models without nybble layers.

* ``use_rslora``, ``lora_dropout``, several adapters, ``lora_bias``: as PEFT's ``lora.Linear``.
* ``use_dora=True``: DoRA with the magnitude initialised from, and the per-forward weight
  norm computed on, the packed weight decoded a block of rows at a time
  (:func:`nybble.lora_init.row_norms`), never a dense copy of W.
* ``merge_and_unload()`` returns **dense** ``nn.Linear`` layers (W decoded to float32, plus
  each adapter, cast to the base's compute dtype), the same weights as
  :func:`nybble.merge_adapters`. ``merge_adapter()`` without unloading re-quantizes
  ``W + delta`` into the packed base (lossy, as PEFT does for bitsandbytes) and
  ``unmerge_adapter()`` re-quantizes back.
* ``init_lora_weights="loftq"`` (with ``loftq_config``), ``"pissa"`` / ``"pissa_niter_<n>"``:
  nybble's LoftQ / PiSSA over the packed base (:mod:`nybble.lora_init`), reading each layer's
  dense weight from the checkpoint a ``NybbleConfig`` load quantized it from.
  OLoRA, CorDA, MiCA, LoRA-GA and orthogonal init need a dense base weight and are refused.

Tested with peft 0.21.2.
"""

from __future__ import annotations

import warnings
from typing import Any

import peft
import torch
from peft.tuners.adalora import AdaLoraConfig
from peft.tuners.lora import LoraConfig, LoraLayer, LoraModel
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraVariant
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .. import lora_init
from ..model import _base_dtype
from ..nn import Linear4bit, Linear8bitLt

__all__ = ["LoraNybbleLinear", "NybbleDoraVariant", "register_custom_modules"]

NYBBLE_LAYERS = (Linear4bit, Linear8bitLt)


def _adapter_dtype(x: torch.Tensor, a: torch.Tensor) -> torch.dtype:
    # As nybble.nn.LoraLinear: float32 master weights, matmuls in 16-bit activations' dtype.
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else a.dtype


# ------------------------------------------------------------------------ DoRA


class NybbleDoraLayer(DoraLinearLayer):
    """PEFT's DoRA magnitude (``weight``: one per output row, saved as PEFT saves it) over a
    packed base: ``||W + s B A||`` per row from :func:`nybble.lora_init.row_norms`."""

    def update_layer(self, *, base_layer, lora_A, lora_B, scaling, place_on_cpu=False) -> None:
        norms = lora_init.row_norms(base_layer, lora_B.float(), lora_A.float(), scaling)
        self.weight = nn.Parameter(norms.to(lora_A.dtype), requires_grad=True)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default"):
        """DoRA's extra term over the base output (``base_result`` includes the bias; without
        it the base term of ``x`` is recomputed through the packed layer)."""
        with torch.no_grad():  # DoRA section 4.3: the norm is a constant for backprop
            norm = lora_init.row_norms(base_layer, lora_B.weight, lora_A.weight, scaling)
        scale = (self.weight / norm.to(self.weight.dtype)).view(1, -1)
        if base_result is None:
            base_result = base_layer(x)
        bias = getattr(base_layer, "bias", None)
        base_term = base_result if bias is None else base_result - bias.to(base_result.dtype)
        lora_result = lora_B(lora_A(x.to(lora_A.weight.dtype)))
        return (scale - 1) * base_term + scale * lora_result * scaling

    def __repr__(self) -> str:
        return "nybble.lora.dora." + nn.Module.__repr__(self)


class NybbleDoraVariant(LoraVariant):
    """DoRA for :class:`LoraNybbleLinear` (PEFT's DoraLinearVariant with the packed weight)."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs: Any) -> None:
        if not module.lora_magnitude_vector:
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        dora = NybbleDoraLayer(fan_in_fan_out=False)
        dora.update_layer(base_layer=module.get_base_layer(), lora_A=module.lora_A[adapter_name].weight,
                          lora_B=module.lora_B[adapter_name].weight, scaling=module.scaling[adapter_name])
        module.lora_magnitude_vector[adapter_name] = dora

    @staticmethod
    def merged_weight(module, active_adapter: str, w: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s B A|| * (W + s B A)`` in float32."""
        delta = module.get_delta_weight(active_adapter).float()
        w = w + delta
        norm = torch.linalg.vector_norm(w, dim=1, keepdim=True)
        return module.lora_magnitude_vector[active_adapter].weight.detach().float().view(-1, 1) / norm * w

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return NybbleDoraVariant.merged_weight(module, active_adapter, orig_weight)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data = NybbleDoraVariant.merged_weight(module, active_adapter, orig_weight)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("unmerging DoRA from a re-quantized nybble layer is not supported")

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result = result
        else:
            x = dropout(x)
            base_result = None
        extra = module.lora_magnitude_vector[active_adapter](
            x, lora_A=module.lora_A[active_adapter], lora_B=module.lora_B[active_adapter],
            scaling=module.scaling[active_adapter], base_layer=module.get_base_layer(), base_result=base_result,
            adapter_name=active_adapter)
        return result + extra.to(result.dtype)


# ------------------------------------------------------------------------ the LoRA layer


class LoraNybbleLinear(nn.Module, LoraLayer):
    """PEFT LoRA layer over a nybble ``Linear4bit`` / ``Linear8bitLt`` (see the module doc)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                          target_name=kwargs.get("target_name", ""))

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    @property
    def lora_variants(self):
        return {(): None, ("use_dora",): NybbleDoraVariant}

    # -------------------------------------------------------------- inits needing the base weight

    def _dense_weight(self, what: str) -> torch.Tensor:
        w = lora_init.source_weight(self.get_base_layer())
        if w is None:
            raise ValueError(f"{what} over a nybble layer needs its original dense weight: load the model with "
                             f"from_pretrained(dense_path, quantization_config=nybble.NybbleConfig(...)), or use "
                             f"nybble.add_lora(..., init=..., dense_weights=path)")
        return w

    @torch.no_grad()
    def _set_adapter(self, adapter_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        self.lora_A[adapter_name].weight.data = a.to(self.lora_A[adapter_name].weight)
        self.lora_B[adapter_name].weight.data = b.to(self.lora_B[adapter_name].weight)

    def loftq_init(self, adapter_name, config: LoraConfig):
        base = self.get_base_layer()
        bits = 8 if isinstance(base, Linear8bitLt) else 4
        want = int((config.loftq_config or {}).get("loftq_bits", bits))
        if want != bits:
            raise ValueError(f"loftq_bits={want}, but the nybble base layer is {bits}-bit")
        iters = int((config.loftq_config or {}).get("loftq_iter", 1))
        a, b = lora_init.loftq(base, self._dense_weight("LoftQ"), self.r[adapter_name], self.scaling[adapter_name],
                               iters)
        self._set_adapter(adapter_name, a, b)

    def pissa_init(self, adapter_name, init_lora_weights):
        niter = None
        if init_lora_weights != "pissa":
            parts = init_lora_weights.split("_niter_")
            if len(parts) != 2:
                raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_<n>', got {init_lora_weights}")
            niter = int(parts[1])
        a, b = lora_init.pissa(self.get_base_layer(), self._dense_weight("PiSSA"), self.r[adapter_name],
                               self.scaling[adapter_name], niter)
        self._set_adapter(adapter_name, a, b)

    def _refuse(self, *args, **kwargs):
        raise ValueError("this LoRA initialisation needs a dense base weight and is not supported over nybble "
                         "layers (supported: True / 'gaussian' / 'loftq' / 'pissa')")

    olora_init = corda_init = mica_init = lora_ga_init = orthogonal_init = _refuse

    # -------------------------------------------------------------- merging

    def get_delta_weight(self, adapter) -> torch.Tensor:
        """``scaling * B A`` (out, in) in float32."""
        return (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()) * self.scaling[adapter]

    def _merged_dense(self, adapter_names: list[str], safe_merge: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self.get_base_layer()
        w = base.dequantized_weight(torch.float32)
        bias = None if base.bias is None else base.bias.detach().float()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                w = self.lora_variant[name].merge_safe(self, name, w)
            else:
                w = w + self.get_delta_weight(name)
            if self.lora_bias[name]:
                if bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                bias = bias + self.lora_B[name].bias.detach().float() * self.scaling[name]
            if safe_merge and not torch.isfinite(w).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        return w, bias

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names=None) -> nn.Module:
        """PEFT's ``merge_and_unload``: a dense ``nn.Linear`` (base decoded to float32 + the
        adapters, in the base's compute dtype); ``unload()``: the nybble base layer."""
        base = self.get_base_layer()
        if not merge:
            return base
        names = check_adapters_to_merge(self, adapter_names)
        w, bias = self._merged_dense(names, safe_merge)
        dtype = _base_dtype(base)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w.to(dtype))
            if bias is not None:
                lin.bias.copy_(bias.to(dtype))
        lin.requires_grad_(False)
        return lin

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Folds the adapters into the packed base by re-quantizing ``W + delta`` (lossy)."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        warnings.warn("Merging LoRA into a nybble quantized layer re-quantizes its weight (rounding errors).",
                      stacklevel=2)
        base = self.get_base_layer()
        w, bias = self._merged_dense(names, safe_merge)
        base.set_weight(w)
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        w = base.dequantized_weight(torch.float32)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            if name in self.lora_variant:
                self.lora_variant[name].unmerge(self, name, w)
            w = w - self.get_delta_weight(name)
            if self.lora_bias[name]:
                base.bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(base.bias.dtype)
        base.set_weight(w)

    # -------------------------------------------------------------- forward

    def _fused(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        dtype = _adapter_dtype(x, a)
        h = self.lora_dropout[name](x)
        x_lora = None if (h is x and dtype == x.dtype) else h.to(dtype)
        return self.get_base_layer()(x, lora=(a.to(dtype), b.to(dtype), self.scaling[name], x_lora))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        variant_kwargs = {k: kwargs.pop(k, None) for k in VARIANT_KWARG_KEYS}
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **variant_kwargs, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        active = [n for n in self.active_adapters if n in self.lora_A]
        if len(active) == 1 and active[0] not in self.lora_variant and not self.lora_bias[active[0]]:
            return self._fused(x, active[0])  # the fused QLoRA path
        result = base(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in active:
            a, b = self.lora_A[name], self.lora_B[name]
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, active_adapter=name, x=x, result=result,
                                                         **variant_kwargs, **kwargs)
            else:
                dtype = _adapter_dtype(x, a.weight)
                h = self.lora_dropout[name](x).to(dtype)
                delta = nn.functional.linear(nn.functional.linear(h, a.weight.to(dtype)), b.weight.to(dtype),
                                             None if b.bias is None else b.bias.to(dtype))
                result = result + (delta * self.scaling[name]).to(out_dtype)
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def dispatch_nybble(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
    """A PEFT dispatcher: a :class:`LoraNybbleLinear` for nybble layers, else ``None``."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, NYBBLE_LAYERS):
        return LoraNybbleLinear(target, adapter_name, config=config, **kwargs)
    return None


# ------------------------------------------------------------------------ registration


def register_custom_modules(config: LoraConfig) -> LoraConfig:
    """Registers nybble's layers on a LoraConfig (PEFT's ``_register_custom_module``), unless it
    maps them already; returns the config."""
    mapping = config._custom_modules or {}
    missing = {cls: LoraNybbleLinear for cls in NYBBLE_LAYERS if not any(issubclass(cls, k) for k in mapping)}
    if missing:
        config._register_custom_module(missing)
    return config


def _nybble_layer_names(model: nn.Module) -> set[str]:
    inside_tuners = set()
    for prefix, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            inside_tuners |= {f"{prefix}.{suffix}" for suffix, _ in module.named_modules() if suffix}
    return {n for n, m in model.named_modules() if isinstance(m, NYBBLE_LAYERS) and n not in inside_tuners}


def _include_nybble_layers(config, model: nn.Module, names: set[str]) -> None:
    """``target_modules="all-linear"``: PEFT's selection of dense Linear layers plus nybble's."""
    target = getattr(config, "target_modules", None)
    if not (isinstance(target, str) and target.lower() == peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND):
        return
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    _maybe_include_all_linear_layers(config, model)
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    excluded = {n for n, m in model.named_modules() if out is not None and m is out}
    config.target_modules = set(config.target_modules) | (names - excluded)


def _prepare_model(self, peft_config, model):
    LoraModel._nybble_original_prepare_model(self, peft_config, model)
    names = _nybble_layer_names(model)
    # LoRA proper only: AdaLoRA (a LoraModel subclass) builds its own layers.
    if names and isinstance(peft_config, LoraConfig) and not isinstance(peft_config, AdaLoraConfig):
        register_custom_modules(peft_config)
        _include_nybble_layers(peft_config, model, names)


def install() -> None:
    """Wraps ``LoraModel._prepare_model`` (idempotent; done on import)."""
    if not hasattr(LoraModel, "_nybble_original_prepare_model"):
        LoraModel._nybble_original_prepare_model = LoraModel._prepare_model
    LoraModel._prepare_model = _prepare_model


install()
