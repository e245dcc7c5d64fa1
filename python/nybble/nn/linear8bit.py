"""LLM.int8() Linear (Dettmers et al., 2022): int8 weight with per-row scales, int8 x int8
matmul for the regular features, 16-bit matmul for the outlier feature columns."""

from __future__ import annotations

import torch
from torch import nn

from .. import formats, kernels
from ..kernels import _cpu

# State-dict keys under the module's prefix (nybble.formats spells the layout).
_SCB, _WEIGHT_FORMAT = formats.SCB, formats.WEIGHT_FORMAT


class Linear8bitLt(nn.Module):
    """A frozen LLM.int8() Linear. State-dict keys follow bitsandbytes: ``weight`` int8
    (out, in), ``SCB`` float32 (out,) row absmax, ``weight_format`` uint8 0 (row-major)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0, device=None):
        super().__init__()
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        self.in_features, self.out_features, self.threshold = in_features, out_features, float(threshold)
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        # float32 row scales kept as int32 bits so module.to(dtype) cannot round them.
        self.register_buffer("scb_bits", torch.zeros(out_features, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @property
    def SCB(self) -> torch.Tensor:  # noqa: N802 - bitsandbytes' name
        return self.scb_bits.view(torch.float32)

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> "Linear8bitLt":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, linear.weight.device)
        m.set_weight(linear.weight)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        q, scb, _ = kernels.int8_vectorwise_quant(w.detach(), 0.0)
        self.weight = q.to(self.weight.device)
        self.scb_bits = scb.float().contiguous().view(torch.int32).to(self.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) weight: bitsandbytes' ``int8_vectorwise_dequant`` rule in
        float32 (:func:`nybble.formats.int8_dequantize`), then cast to ``dtype``."""
        return formats.int8_dequantize(self.weight, self.SCB).to(dtype)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """``x W^T + bias`` through the one LLM.int8() autograd path; ``lora = (A, B, scale,
        x_lora)`` (from :class:`LoraLinear`) adds the adapter term in the same Function."""
        a = b = x_lora = None
        scale = 1.0
        if lora is not None:
            a, b, scale, x_lora = lora
        return kernels.linear_8bit(x, self.weight, self.SCB, self.bias, self.threshold, lora_a=a, lora_b=b,
                                   scale=scale, x_lora=x_lora)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + _SCB] = self.SCB.detach()
        destination[prefix + _WEIGHT_FORMAT] = torch.tensor(formats.WEIGHT_FORMAT_ROW, dtype=torch.uint8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for k in ("weight", _SCB):
            if prefix + k not in state_dict:
                missing_keys.append(prefix + k)
        if any(prefix + k not in state_dict for k in ("weight", _SCB)):
            return
        w = state_dict[prefix + "weight"]
        if w.dtype != torch.int8 or tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix}weight: expected int8 ({self.out_features}, {self.in_features}), "
                              f"got {w.dtype} {tuple(w.shape)}")
            return
        # SCB (shape, finite, >= 0) and weight_format by the one format module.
        try:
            formats.check_int8_tensors(w, state_dict[prefix + _SCB], state_dict.get(prefix + _WEIGHT_FORMAT))
        except ValueError as err:
            error_msgs.append(f"{prefix}weight: {err}")
            return
        dev = w.device if self.weight.is_meta else self.weight.device  # meta-built: see Linear4bit
        self.weight = w.to(dev).contiguous()
        self.scb_bits = _cpu.aligned_float32(state_dict[prefix + _SCB].to(dev)).view(torch.int32)
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias = nn.Parameter(state_dict[prefix + "bias"].to(dev).clone(), requires_grad=False)
            else:
                missing_keys.append(prefix + "bias")
        known = {prefix + k for k in ("weight", "bias", _SCB, _WEIGHT_FORMAT)}
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
