"""CUDA implementations of the ``nybble::`` ops: the NVRTC-compiled kernels of ``cuda/``
(launchers in ``_cupy``), on torch's current stream, outputs allocated by torch.

Each function has the op's signature and serves CUDA tensors; without CuPy it falls back to
the torch reference on the GPU (same results: the references round as the kernels do).
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch

from . import optim as kopt
from . import reference

#: Largest number of rows of x that takes the fused dequant-matmul kernel; beyond it the
#: weight is dequantized to scratch and multiplied by cuBLAS (torch.matmul).
FUSED_MAX_M = 64

_NATIVE = (torch.float32, torch.float16, torch.bfloat16)


@lru_cache(maxsize=1)
def cupy_backend():
    """The ``_cupy`` launcher module, or None when CuPy is missing or ``NYBBLE_KERNELS=torch``."""
    if os.environ.get("NYBBLE_KERNELS", "").strip().lower() == "torch":
        return None
    try:
        from . import _cupy
    except ImportError:
        return None
    return _cupy


def _contiguous_aligned(t: torch.Tensor, align: int) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % align == 0 else t.clone()


def decode_absmax(codes, nested_absmax, nested_code, offset, nested_blocksize):
    k = cupy_backend()
    if k is None:
        return reference.decode_absmax(codes, nested_absmax, nested_code, offset, nested_blocksize)
    codes = codes.contiguous().reshape(-1)
    out = torch.empty(codes.numel(), dtype=torch.float32, device=codes.device)
    k.launch_decode_absmax(
        codes,
        nested_absmax.to(codes.device, torch.float32).contiguous(),
        nested_code.to(codes.device, torch.float32).contiguous(),
        offset.to(codes.device, torch.float32).reshape(1).contiguous(),
        out,
        nested_blocksize,
    )
    return out


def dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype):
    k = cupy_backend()
    if k is None or dtype not in _NATIVE:
        return reference.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    k.launch_dequantize_4bit(
        _contiguous_aligned(packed, 16), absmax.to(packed.device, torch.float32).contiguous(), out, blocksize, quant_type
    )
    return out


def quantize_4bit(w, blocksize, quant_type):
    k = cupy_backend()
    if k is None:
        return reference.quantize_4bit_checked(w, blocksize, quant_type)
    x = w.detach().contiguous()
    n = x.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=x.device)
    k.launch_quantize_4bit(x, packed, absmax, blocksize, quant_type)
    # The kernel marks a block holding NaN / Inf with a NaN absmax. One sync: fine at load time.
    reference.check_finite_absmax(absmax, blocksize)
    return packed, absmax


def matmul_4bit(x, packed, absmax, shape, blocksize, quant_type, bias):
    out_features, in_features = shape
    k = cupy_backend()
    x2 = x.reshape(-1, in_features)
    if k is not None and 0 < x2.shape[0] <= FUSED_MAX_M and in_features % 32 == 0 and x.dtype in _NATIVE:
        x2 = _contiguous_aligned(x2, 16)
        out = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
        b = None if bias is None else bias.to(x.dtype).contiguous()
        k.launch_gemv_4bit(x2, _contiguous_aligned(packed, 16), absmax.contiguous(), b, out, blocksize, quant_type)
        return out.reshape(*x.shape[:-1], out_features)
    # Large M: decode W once (kernel), then cuBLAS.
    w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, x.dtype)
    out = torch.matmul(x, w.t())
    return out if bias is None else out + bias.to(out.dtype)


def int8_vectorwise_quant(x, threshold):
    k = cupy_backend()
    if k is None or x.dtype not in _NATIVE:
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


def int_mm_padded(q_a: torch.Tensor, q_b: torch.Tensor) -> torch.Tensor:
    """int32 ``q_a @ q_b^T`` through torch._int_mm; zero padding (exact) meets its shape rules
    (rows > 16, inner and output dims multiples of 8). May return extra rows / columns."""
    m, kdim = q_a.shape
    n = q_b.shape[0]
    round8 = lambda v: -(-v // 8) * 8  # noqa: E731
    mp, kp, np_ = (32 if m <= 16 else m), round8(kdim), round8(n)
    return torch._int_mm(_pad_to(q_a, mp, kp), _pad_to(q_b, np_, kp).t())


def int8_matmul(a, b):
    return int_mm_padded(a, b)[: a.shape[0], : b.shape[0]].contiguous()


def int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype):
    k = cupy_backend()
    if k is None or dtype not in _NATIVE:
        return reference.int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype)
    a2 = q_a.reshape(-1, q_a.shape[-1])
    acc = int_mm_padded(a2, q_b)
    out = torch.empty((a2.shape[0], q_b.shape[0]), dtype=dtype, device=q_a.device)
    b = None if bias is None else bias.to(dtype).contiguous()
    k.launch_int8_mm_dequant(
        acc, row_scale_a.reshape(-1).float().contiguous(), row_scale_b.reshape(-1).float().contiguous(), b, out
    )
    return out.reshape(*q_a.shape[:-1], q_b.shape[0])


def _optimizer_codes_ok() -> bool:
    return cupy_backend() is not None and kopt.cupy_available()


def adamw_8bit(p, g, state1, state2, absmax1, absmax2, code1, code2, c: kopt.AdamWConstants) -> None:
    if _optimizer_codes_ok():
        kopt.launch_adamw_8bit(p, g, state1, state2, absmax1, absmax2, code1, code2, c)
    else:
        kopt.adamw_8bit_reference(p, g, state1, state2, absmax1, absmax2, code1, code2, c)


def adamw_32bit(p, g, exp_avg, exp_avg_sq, c: kopt.AdamWConstants) -> None:
    if _optimizer_codes_ok():
        kopt.launch_adamw_32bit(p, g, exp_avg, exp_avg_sq, c)
    else:
        kopt.adamw_32bit_reference(p, g, exp_avg, exp_avg_sq, c)
