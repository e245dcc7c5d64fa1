"""LoRA adapters (Hu et al., 2021) over any Linear: plain, 4-bit or LLM.int8().

``y = base(x) + s * B(A(dropout(x)))`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
A starts random (Kaiming-uniform as PEFT does, or Gaussian), B at zero, so a fresh adapter
leaves the model unchanged. Only A and B train (float32 parameters; with 16-bit activations
the adapter matmuls run in that dtype, as under torch.autocast); the base layer is frozen.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .linear4bit import Linear4bit
from .linear8bit import Linear8bitLt

#: Base layers whose forward takes the adapter (``lora=``) into its own autograd Function.
_FUSED_BASES = (Linear4bit, Linear8bitLt)


class LoraLinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
    ):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        in_f, out_f = base_layer.in_features, base_layer.out_features
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = in_f, out_f
        self.r = r
        self.configure(alpha, use_rslora, dropout)
        device = next((t.device for t in base_layer.buffers()), None) or next(
            (p.device for p in base_layer.parameters()), None
        )
        dtype = torch.float32
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters(init)
        self.disabled = False

    def configure(self, alpha: float, use_rslora: bool = False, dropout: float = 0.0) -> None:
        """Sets the scaling (``alpha / r``, rsLoRA ``alpha / sqrt(r)``) and the dropout."""
        self.alpha, self.use_rslora = float(alpha), use_rslora
        self.scaling = self.alpha / (math.sqrt(self.r) if use_rslora else self.r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_lora_parameters(self, init: str = "kaiming", dense_weight: torch.Tensor | None = None,
                              iters: int = 1) -> None:
        """``"kaiming"`` / ``"gaussian"``: random A, zero B. ``"loftq"`` / ``"pissa"`` (and
        ``"pissa_niter_<n>"``) fit the adapters to ``dense_weight``, the original (out, in)
        weight of a quantized base (:mod:`nybble.lora_init`; LoftQ alternates ``iters``
        times, re-quantizing the base after the first; PiSSA re-quantizes the residual)."""
        if init in ("loftq", "pissa") or init.startswith("pissa_niter_"):
            from .. import lora_init

            if dense_weight is None:
                raise ValueError(f"init={init!r} needs the layer's original dense weight (dense_weight=...)")
            if init == "loftq":
                a, b = lora_init.loftq(self.base_layer, dense_weight, self.r, self.scaling, iters)
            else:
                niter = int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None
                a, b = lora_init.pissa(self.base_layer, dense_weight, self.r, self.scaling, niter)
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
            return
        if init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            raise ValueError(f"init {init!r} is not 'kaiming', 'gaussian', 'loftq' or 'pissa'")
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        a, b = self.lora_A.weight, self.lora_B.weight
        # Mixed precision as torch.autocast does it: float32 master weights, matmuls in the
        # activations' 16-bit dtype (bf16 compute on the GPU); float32 inputs stay float32.
        dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else a.dtype
        h = self.lora_dropout(x)
        x_lora = None if (h is x and dtype == x.dtype) else h.to(dtype)
        if isinstance(self.base_layer, _FUSED_BASES):
            # A quantized base: base and adapter in one autograd Function (the fused QLoRA path).
            return self.base_layer(x, lora=(a.to(dtype), b.to(dtype), self.scaling, x_lora))
        out = self.base_layer(x)
        h = h.to(dtype)
        delta = nn.functional.linear(nn.functional.linear(h, a.to(dtype)), b.to(dtype)) * self.scaling
        return out + delta.to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``s * B A`` (out, in) in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        base = self.base_layer
        if hasattr(base, "dequantized_weight"):
            return base.dequantized_weight(dtype)
        return base.weight.detach().to(dtype)

    def merged_linear(self, dtype: torch.dtype = torch.bfloat16) -> nn.Linear:
        """A dense nn.Linear holding base + adapter (nothing is added while disabled)."""
        w = self.base_weight(torch.float32)
        if not self.disabled:
            w = w + self.delta_weight()
        bias = getattr(self.base_layer, "bias", None)
        lin = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=w.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w.to(dtype))
            if bias is not None:
                lin.bias.copy_(bias.detach().to(dtype))
        return lin

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, disabled={self.disabled}"
