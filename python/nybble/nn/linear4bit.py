"""4-bit (NF4 / FP4) Linear holding its packed weight, state-dict compatible with
bitsandbytes / transformers checkpoints."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

from .. import kernels
from ..codebooks import code_4bit

_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__{}"


def _f32_bits(t: torch.Tensor) -> torch.Tensor:
    # float32 constants live in int32 buffers so module.to(dtype) cannot round them.
    return t.detach().to(torch.float32).contiguous().view(torch.int32)


class _Dequant4bitLinear(torch.autograd.Function):
    """y = x W^T + b with W decoded on the fly. Backward decodes W again for dX instead of
    keeping a dense copy alive between forward and backward; W and b are frozen."""

    @staticmethod
    def forward(ctx, x, module, bias):
        ctx.module = module
        if x.is_cuda:
            # Small M takes the fused kernel that reads the packed weight once.
            shape = (module.out_features, module.in_features)
            return kernels.matmul_4bit(x, module.weight, module.float_absmax(), shape, module.blocksize,
                                       module.quant_type, bias)
        w = module.dequantized_weight(x.dtype)
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = ctx.module.dequantized_weight(grad_out.dtype)
            grad_x = grad_out @ w
        return grad_x, None, None


class Linear4bit(nn.Module):
    """A frozen Linear whose weight is stored block-wise in 4 bits.

    State-dict keys follow bitsandbytes: ``weight`` (packed uint8), ``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and
    ``weight.quant_state.bitsandbytes__nf4`` (JSON), so checkpoints written by
    transformers + bitsandbytes load directly.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type {quant_type!r} is not 'nf4' or 'fp4'")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype  # dtype of the original weight (quant_state "dtype")
        n = in_features * out_features
        nblocks = math.ceil(n / blocksize)
        self.register_buffer("weight", torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8, device=device))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(nblocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax_bits", torch.zeros(math.ceil(nblocks / 256), dtype=torch.int32, device=device))
            self.register_buffer("nested_code_bits", torch.zeros(256, dtype=torch.int32, device=device))
            self.register_buffer("offset_bits", torch.zeros((), dtype=torch.int32, device=device))
            self.absmax_bits = None
        else:
            self.register_buffer("absmax_bits", torch.zeros(nblocks, dtype=torch.int32, device=device))
            self.absmax_codes = self.nested_absmax_bits = self.nested_code_bits = self.offset_bits = None
        self.register_buffer("quant_map_bits", _f32_bits(torch.from_numpy(code_4bit(quant_type))).to(device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    # ------------------------------------------------------------------ building

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> "Linear4bit":
        w = linear.weight.detach()
        m = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            weight_dtype=w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32,
            device=w.device,
        )
        m.set_weight(w)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantizes a dense (out, in) weight into this module."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} != ({self.out_features}, {self.in_features})")
        packed, absmax = kernels.quantize_4bit(w, self.blocksize, self.quant_type)
        self.weight = packed.to(self.weight.device)
        if self.double_quant:
            codes, nested = kernels.double_quantize(absmax)
            self.absmax_codes = codes.to(self.weight.device)
            self.nested_absmax_bits = _f32_bits(nested["nested_absmax"]).to(self.weight.device)
            self.nested_code_bits = _f32_bits(nested["nested_code"]).to(self.weight.device)
            self.offset_bits = _f32_bits(torch.tensor(nested["offset"])).to(self.weight.device)
        else:
            self.absmax_bits = _f32_bits(absmax).to(self.weight.device)

    # ------------------------------------------------------------------ decoding

    def float_absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax_bits.view(torch.float32)
        # The offset stays a tensor on the module's device: no host sync per forward.
        return kernels.decode_absmax(self.absmax_codes, self.nested_absmax_bits.view(torch.float32),
                                     self.nested_code_bits.view(torch.float32), self.offset_bits.view(torch.float32),
                                     256)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.compute_dtype or self.weight_dtype
        decode_dtype = dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
        w = kernels.dequantize_4bit(
            self.weight, self.float_absmax(), (self.out_features, self.in_features),
            self.blocksize, self.quant_type, decode_dtype,
        )
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Dequant4bitLinear.apply(x, self, bias).to(in_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}")

    # ------------------------------------------------------------------ state dict (bnb layout)

    def quant_state_json(self) -> dict:
        d = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.weight_dtype).replace("torch.", ""),
            "shape": [self.out_features, self.in_features],
        }
        if self.double_quant:
            d.update(nested_blocksize=256, nested_dtype="float32",
                     nested_offset=float(self.offset_bits.view(torch.float32)))
        return d

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + "weight"] = self.weight.detach()
        if self.double_quant:
            destination[prefix + "weight.absmax"] = self.absmax_codes.detach()
            destination[prefix + "weight.nested_absmax"] = self.nested_absmax_bits.view(torch.float32).detach()
            destination[prefix + "weight.nested_quant_map"] = self.nested_code_bits.view(torch.float32).detach()
        else:
            destination[prefix + "weight.absmax"] = self.absmax_bits.view(torch.float32).detach()
        destination[prefix + "weight.quant_map"] = self.quant_map_bits.view(torch.float32).detach()
        blob = json.dumps(self.quant_state_json()).encode()
        destination[prefix + _QUANT_STATE_KEY.format(self.quant_type)] = torch.frombuffer(
            bytearray(blob), dtype=torch.uint8
        ).to(self.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + _QUANT_STATE_KEY.format(self.quant_type)
        other = prefix + _QUANT_STATE_KEY.format("fp4" if self.quant_type == "nf4" else "nf4")
        if other in state_dict:
            error_msgs.append(f"{prefix}weight: checkpoint is {'fp4' if self.quant_type == 'nf4' else 'nf4'}, module is {self.quant_type}")
            return
        needed = [prefix + "weight", prefix + "weight.absmax", key]
        absent = [k for k in needed if k not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        qs = json.loads(bytes(state_dict[key].cpu().numpy().tobytes()).decode())
        if list(qs["shape"]) != [self.out_features, self.in_features] or int(qs["blocksize"]) != self.blocksize:
            error_msgs.append(f"{prefix}weight: checkpoint shape {qs['shape']} blocksize {qs['blocksize']} "
                              f"!= module ({self.out_features}, {self.in_features}) blocksize {self.blocksize}")
            return
        dq = "nested_blocksize" in qs
        if dq != self.double_quant:
            error_msgs.append(f"{prefix}weight: checkpoint double_quant={dq}, module double_quant={self.double_quant}")
            return
        dev = self.weight.device

        def take(name):
            return state_dict[prefix + name].to(dev)

        self.weight = take("weight").view(torch.uint8).reshape(-1, 1).contiguous()
        self.weight_dtype = getattr(torch, qs.get("dtype", "float32"))
        if dq:
            self.absmax_codes = take("weight.absmax").to(torch.uint8).contiguous()
            self.nested_absmax_bits = _f32_bits(take("weight.nested_absmax"))
            self.nested_code_bits = _f32_bits(take("weight.nested_quant_map"))
            self.offset_bits = _f32_bits(torch.tensor(float(qs["nested_offset"]), device=dev))
        else:
            self.absmax_bits = _f32_bits(take("weight.absmax"))
        if prefix + "weight.quant_map" in state_dict:
            self.quant_map_bits = _f32_bits(take("weight.quant_map"))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias = nn.Parameter(take("bias").detach().clone(), requires_grad=False)
            else:
                missing_keys.append(prefix + "bias")
        known = {prefix + k for k in ("weight", "bias", "weight.absmax", "weight.quant_map",
                                      "weight.nested_absmax", "weight.nested_quant_map")} | {key}
        # The module has no children: any other key under its prefix is not ours.
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
