"""Dispatch layer the torch modules call: one function per operation, on CPU or CUDA tensors.

* CUDA tensors, CuPy importable: the NVRTC-compiled kernels in ``cuda/`` (see ``_cupy``),
  launched on torch's current stream; outputs are allocated by torch.
* CUDA tensors without CuPy (or ``NYBBLE_KERNELS=torch``): the torch reference on the GPU.
* CPU tensors: the Rust core for (de)quantization (decoding as torch custom ops, see
  ``_cpu``), torch for the rest.

``reference`` holds the pure-torch semantics every path is tested against.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from . import _cpu, reference
from .reference import check_blocksize, check_quant_type

__all__ = [
    "LoRALinear4bitFunction",
    "cuda_available",
    "decode_absmax",
    "dequantize_4bit",
    "double_quantize",
    "int8_linear",
    "int8_matmul",
    "int8_matmul_dequant",
    "int8_vectorwise_quant",
    "lora_linear_4bit",
    "matmul_4bit",
    "quantize_4bit",
    "reference",
]

#: Largest number of rows of x that takes the fused dequant-matmul kernel; beyond it the
#: weight is dequantized to scratch and multiplied by cuBLAS (torch.matmul).
FUSED_MAX_M = 64


@lru_cache(maxsize=1)
def _cupy_backend():
    """The ``_cupy`` module, or None when CuPy is missing or disabled."""
    if os.environ.get("NYBBLE_KERNELS", "").lower() == "torch":
        return None
    try:
        from . import _cupy
    except ImportError:
        return None
    return _cupy


def cuda_available() -> bool:
    """True when CUDA tensors will run nybble's CuPy kernels (not the torch fallback)."""
    return torch.cuda.is_available() and _cupy_backend() is not None


def _kernels_for(t: torch.Tensor):
    return _cupy_backend() if t.is_cuda else None


def _contiguous_aligned(t: torch.Tensor, align: int) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % align == 0 else t.clone()


def _offset_tensor(offset: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(offset, torch.Tensor):
        return offset.detach().to(device, torch.float32).reshape(1).contiguous()
    return torch.tensor([float(offset)], dtype=torch.float32, device=device)


def decode_absmax(
    codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: float | torch.Tensor,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Float32 absmax (1-D, one per code) from double-quantized uint8 codes:
    ``nested_code[q] * nested_absmax[i // nested_blocksize] + offset``. ``offset`` may be a
    one-element tensor on the codes' device (the modules keep it so: no host sync)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"double-quantized absmax codes must be uint8, got {codes.dtype}")
    k = _kernels_for(codes)
    if k is None and not codes.is_cuda:
        return _cpu.decode_absmax(codes.reshape(-1), nested_absmax.to(torch.float32), nested_code.to(torch.float32),
                                  _offset_tensor(offset, codes.device), int(nested_blocksize))
    if k is None:
        return reference.decode_absmax(codes, nested_absmax, nested_code, offset, nested_blocksize)
    codes = codes.contiguous().reshape(-1)
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    k.launch_decode_absmax(
        codes,
        nested_absmax.to(codes.device, torch.float32).contiguous(),
        nested_code.to(codes.device, torch.float32).contiguous(),
        _offset_tensor(offset, codes.device),
        out,
        nested_blocksize,
    )
    return out


def double_quantize(absmax: torch.Tensor, nested_blocksize: int = 256) -> tuple[torch.Tensor, dict]:
    """Double quantization of a float32 absmax (in the Rust core; results on absmax's
    device): ``(uint8 codes, {"nested_absmax", "nested_code", "offset", "blocksize"})``."""
    codes, nested_absmax, code, offset = _cpu.double_quantize(absmax.detach().cpu(), nested_blocksize)
    nested = {
        "nested_absmax": nested_absmax.to(absmax.device),
        "nested_code": code.to(absmax.device),
        "offset": offset,
        "blocksize": nested_blocksize,
    }
    return codes.to(absmax.device), nested


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int = 64,
    quant_type: str = "nf4",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decodes a packed NF4 / FP4 tensor (absmax already float32) to ``dtype``, shaped ``shape``."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    shape = tuple([int(s) for s in shape])  # a list, not a generator: torch.compile traces it
    n = reference.numel(shape)
    if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"packed ({packed.numel()} bytes) / absmax ({absmax.numel()}) do not match shape {shape} "
            f"with blocksize {blocksize}"
        )
    native = dtype in (torch.float32, torch.float16, torch.bfloat16)
    k = _kernels_for(packed)
    if k is not None and native:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
        k.launch_dequantize_4bit(
            _contiguous_aligned(packed, 16), absmax.to(packed.device, torch.float32).contiguous(), out, blocksize,
            quant_type,
        )
        return out
    if not packed.is_cuda and native:
        cols = shape[-1] if shape else 1
        rows = n // cols if cols else 0
        out = _cpu.dequantize_4bit(packed, absmax.to("cpu", torch.float32), rows, cols, blocksize, quant_type, dtype)
        return out.reshape(shape)
    # Other dtypes (float64: the exact products) and CUDA without CuPy: the torch reference.
    return reference.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise NF4 / FP4 of ``w`` on its device (other float dtypes go through float32):
    ``(packed uint8 ((n+1)//2, 1), absmax float32 (nblocks,))``, bit-identical to
    ``nybble.quantize_4bit``. Raises ``NonFiniteError`` on NaN / Inf."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    from .._core import NonFiniteError

    if not w.is_floating_point():
        raise TypeError(f"cannot quantize a {w.dtype} tensor: expected floating point")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        w = w.float()  # float64 and others: through float32
    k = _kernels_for(w)
    if k is None and w.is_cuda:
        try:
            return reference.quantize_4bit(w, blocksize, quant_type)
        except ValueError as e:
            raise NonFiniteError(str(e)) from None
    if k is None:
        from ..quant import quantize_4bit as core_quantize

        packed, state = core_quantize(w.detach(), blocksize, quant_type)
        return packed.reshape(-1, 1), torch.from_numpy(state.absmax)
    x = w.detach().contiguous()
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    k.launch_quantize_4bit(x, packed, absmax, blocksize, quant_type)
    # One value per block to check (and one sync): fine when loading a checkpoint.
    if not bool(torch.isfinite(absmax).all()):
        block = int(torch.nonzero(~torch.isfinite(absmax))[0])
        raise NonFiniteError(f"non-finite value in block {block} (elements {block * blocksize}..)")
    return packed, absmax


class _MatMul4bit(torch.autograd.Function):
    """``x @ W^T + bias`` with the frozen packed W; gradients for x and bias only."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax, shape, blocksize, quant_type):
        ctx.save_for_backward(packed, absmax)
        ctx.meta = (shape, blocksize, quant_type, bias is not None)
        return _matmul_4bit_nograd(x, packed, absmax, shape, blocksize, quant_type, bias)

    @staticmethod
    def backward(ctx, grad_out):
        packed, absmax = ctx.saved_tensors
        shape, blocksize, quant_type, has_bias = ctx.meta
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, grad_out.dtype)
            grad_x = torch.matmul(grad_out, w)
        if has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None, None, None, None


def _matmul_4bit_nograd(x, packed, absmax, shape, blocksize, quant_type, bias):
    out_features, in_features = shape
    x2 = x.reshape(-1, in_features)
    k = _kernels_for(x)
    if (
        k is not None
        and 0 < x2.shape[0] <= FUSED_MAX_M
        and in_features % 32 == 0
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
    ):
        x2 = _contiguous_aligned(x2, 16)
        out = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
        b = None if bias is None else bias.to(x.dtype).contiguous()
        k.launch_gemv_4bit(x2, _contiguous_aligned(packed, 16), absmax.contiguous(), b, out, blocksize, quant_type)
        return out.reshape(*x.shape[:-1], out_features)
    # Large M: decode W once with the fastest dequantize here (kernel / Rust), then a GEMM.
    w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, x.dtype)
    out = torch.matmul(x, w.t())
    return out if bias is None else out + bias.to(out.dtype)


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int = 64,
    quant_type: str = "nf4",
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a packed W of ``shape = (out, in)``.

    On CUDA, up to FUSED_MAX_M rows take the fused kernel (reads the packed weight once,
    in_features % 32 == 0); larger inputs dequantize W to x's dtype and use torch.matmul.
    Differentiable with respect to x and bias (W is frozen)."""
    shape = (int(shape[0]), int(shape[1]))
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _MatMul4bit.apply(x, bias, packed, absmax, shape, blocksize, quant_type)
    return _matmul_4bit_nograd(x, packed, absmax, shape, blocksize, quant_type, bias)


class LoRALinear4bitFunction(torch.autograd.Function):
    """QLoRA linear: ``x W^T + bias + scale * (x A^T) B^T`` with W packed and frozen.

    Saves only x, the packed weight and the small ``x A^T`` (M x r); the backward pass
    dequantizes W once to the gradient's dtype for grad_x. Dropout on the LoRA branch, if
    wanted, is applied by the caller to x before the LoRA matmuls (pass ``x_lora``)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, packed, absmax, shape, blocksize, quant_type, scale, x_lora):
        base = _matmul_4bit_nograd(x, packed, absmax, shape, blocksize, quant_type, bias)
        xl = x if x_lora is None else x_lora
        out, xa = reference.lora_forward(xl, base, lora_a.to(x.dtype), lora_b.to(x.dtype), scale)
        ctx.save_for_backward(xl, xa, lora_a, lora_b, packed, absmax)
        ctx.meta = (shape, blocksize, quant_type, scale, bias is not None, x_lora is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        xl, xa, lora_a, lora_b, packed, absmax = ctx.saved_tensors
        shape, blocksize, quant_type, scale, has_bias, separate_lora_input = ctx.meta
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[10]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        gb = torch.matmul(g, lora_b.to(g.dtype)) * scale  # gradient reaching x A^T
        grad_a = torch.matmul(gb.t(), xl.reshape(-1, xl.shape[-1])).to(lora_a.dtype)
        grad_b = (torch.matmul(g.t(), xa.reshape(-1, xa.shape[-1])) * scale).to(lora_b.dtype)
        grad_x = grad_x_lora = None
        if need_x:
            lora_part = torch.matmul(gb, lora_a.to(g.dtype)).reshape(xl.shape)
            grad_x = None
            if ctx.needs_input_grad[0]:
                w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, g.dtype)
                grad_x = torch.matmul(grad_out, w)
                if not separate_lora_input:
                    grad_x = grad_x + lora_part
            if separate_lora_input:
                grad_x_lora = lora_part
        grad_bias = g.sum(0) if has_bias and ctx.needs_input_grad[3] else None
        return grad_x, grad_a, grad_b, grad_bias, None, None, None, None, None, None, grad_x_lora


def lora_linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int,
    quant_type: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """QLoRA forward (differentiable in x, A, B, bias): ``x W^T + bias + scale * B(A(x_lora))``
    with ``x_lora`` defaulting to x (pass ``dropout(x)`` for LoRA dropout)."""
    shape = (int(shape[0]), int(shape[1]))
    return LoRALinear4bitFunction.apply(
        x, lora_a, lora_b, bias, packed, absmax, shape, blocksize, quant_type, float(scale), x_lora
    )


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8() quantization of one operand: ``(q int8 like x, row_absmax float32,
    outlier_cols int64)``; equal to ``nybble.int8.vectorwise_quant`` on CPU."""
    if not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold {threshold} must be finite and >= 0")
    if not x.is_cuda:
        from .. import int8 as core_int8

        x = x.detach()
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            x = x.float()  # e.g. float64 in gradcheck: the codes come from its float32 values
        q, row_absmax, cols = core_int8.vectorwise_quant(x, threshold)
        return q, row_absmax, cols.to(torch.int64)
    k = _kernels_for(x)
    if k is None:
        return reference.int8_vectorwise_quant(x, threshold)
    cols = x.shape[-1]
    x2 = x.detach().contiguous().reshape(-1, cols)
    q = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    row_absmax = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    flags = None
    if threshold > 0:
        flags = torch.zeros(cols, dtype=torch.int32, device=x.device)
        k.launch_int8_outlier_flags(x2, flags, threshold)
    k.launch_int8_vectorwise_quant(x2, flags, q, row_absmax, threshold)
    outlier_cols = (
        torch.nonzero(flags).reshape(-1) if flags is not None else torch.zeros(0, dtype=torch.int64, device=x.device)
    )
    return q.reshape(x.shape), row_absmax, outlier_cols


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if t.shape == (rows, cols):
        return t.contiguous()
    out = torch.zeros((rows, cols), dtype=t.dtype, device=t.device)
    out[: t.shape[0], : t.shape[1]] = t
    return out


def _int_mm_padded(q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """int32 ``q_a @ q_b^T`` through torch._int_mm; zero padding (exact) meets its shape rules
    (rows > 16, inner and output dims multiples of 8). May return extra rows / columns."""
    m, kdim = q_a.shape
    n = q_b.shape[0]
    round8 = lambda v: -(-v // 8) * 8  # noqa: E731
    mp, kp, np_ = (32 if m <= 16 else m), round8(kdim), round8(n)
    return torch._int_mm(_pad_to(q_a, mp, kp), _pad_to(q_b, np_, kp).t())


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (N, K)^T -> int32 (M, N), exact."""
    if a.is_cuda:
        # torch._int_mm wants rows > 16 and dims in multiples of 8: zero padding is exact.
        return _int_mm_padded(a, b)[: a.shape[0], : b.shape[0]]
    # float64 holds every int32 accumulation exactly (|acc| < 2^53).
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_matmul_dequant(
    q_a: torch.Tensor,
    q_b: torch.Tensor,
    row_scale_a: torch.Tensor,
    row_scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``(q_a @ q_b^T) * row_scale_a[i] * row_scale_b[j] / 127^2 + bias`` in ``dtype``:
    int8 GEMM (torch._int_mm) and the dequantization epilogue kernel on CUDA."""
    k = _kernels_for(q_a)
    if k is None or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return reference.int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype)
    a2 = q_a.reshape(-1, q_a.shape[-1])
    acc = _int_mm_padded(a2, q_b)
    out = torch.empty((a2.shape[0], q_b.shape[0]), dtype=dtype, device=q_a.device)
    b = None if bias is None else bias.to(dtype).contiguous()
    k.launch_int8_mm_dequant(
        acc, row_scale_a.reshape(-1).float().contiguous(), row_scale_b.reshape(-1).float().contiguous(), b, out
    )
    return out.reshape(*q_a.shape[:-1], q_b.shape[0])


def int8_linear(
    x: torch.Tensor,
    q_w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """LLM.int8() linear layer (inference): int8 GEMM for regular columns, outlier input
    columns multiplied in x's dtype against the dequantized matching weight columns."""
    x2 = x.reshape(-1, x.shape[-1])
    q_x, row_absmax, cols = int8_vectorwise_quant(x2, threshold)
    out = int8_matmul_dequant(q_x, q_w, row_absmax, w_scale, bias, x.dtype)
    if cols.numel():
        w_cols = (q_w[:, cols].float() * (w_scale.float()[:, None] / 127.0)).to(x.dtype)
        out = out + torch.matmul(x2[:, cols], w_cols.t())
    return out.reshape(*x.shape[:-1], q_w.shape[0])
