"""Where the modules' heavy ops run: the Rust core for CPU tensors, nybble.kernels (CuPy
kernels, or their torch references) for CUDA tensors."""

from __future__ import annotations

import numpy as np
import torch

from .. import _core

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _np(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a contiguous CPU tensor (16-bit floats as uint16)."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


# The CPU ops are torch custom ops so torch.compile treats them as opaque calls instead of
# breaking the graph at the Rust extension.


@torch.library.custom_op("nybble::decode_absmax", mutates_args=())
def _decode_absmax_cpu(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor, blocksize: int
) -> torch.Tensor:
    # The offset arrives as a 0-d tensor: reading it as a Python float here, inside the op,
    # keeps torch.compile from tracing a data-dependent scalar.
    out = _core.double_dequantize(_np(codes), _np(nested_absmax), float(offset), _np(nested_code), blocksize)
    return torch.from_numpy(out)


@_decode_absmax_cpu.register_fake
def _(codes, nested_absmax, nested_code, offset, blocksize):
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.custom_op("nybble::dequantize_4bit", mutates_args=())
def _dequantize_4bit_cpu(
    packed: torch.Tensor, absmax: torch.Tensor, rows: int, cols: int, blocksize: int, quant_type: str, dtype: torch.dtype
) -> torch.Tensor:
    core_dtype = _DTYPE_NAMES[dtype]
    flat = _core.dequantize_4bit(_np(packed), _np(absmax), rows * cols, blocksize, quant_type, core_dtype)
    out = torch.from_numpy(flat) if core_dtype == "float32" else torch.from_numpy(flat.view(np.int16)).view(dtype)
    return out.reshape(rows, cols)


@_dequantize_4bit_cpu.register_fake
def _(packed, absmax, rows, cols, blocksize, quant_type, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


def decode_absmax(absmax: torch.Tensor, nested: dict | None) -> torch.Tensor:
    """float32 absmax per block, decoding the double quantization if present."""
    if nested is None:
        return absmax
    offset = nested["offset"]
    if absmax.is_cuda:
        from .. import kernels

        return kernels.decode_absmax(
            absmax, nested["nested_absmax"], nested["nested_code"], float(offset), nested["blocksize"]
        )
    if not isinstance(offset, torch.Tensor):
        offset = torch.tensor(float(offset), dtype=torch.float32)
    return _decode_absmax_cpu(absmax, nested["nested_absmax"], nested["nested_code"], offset, int(nested["blocksize"]))


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Decodes a packed 4-bit weight (float32 absmax) into a dense tensor of ``dtype``."""
    if packed.is_cuda:
        from .. import kernels

        return kernels.dequantize_4bit(packed, absmax, tuple(shape), blocksize, quant_type, dtype)
    rows, cols = shape
    decode = dtype if dtype in _DTYPE_NAMES else torch.float32
    return _dequantize_4bit_cpu(packed, absmax, rows, cols, blocksize, quant_type, decode).to(dtype)


def quantize_4bit(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs a dense weight: (uint8 ((n+1)//2, 1), float32 absmax)."""
    if w.is_cuda:
        from .. import kernels

        return kernels.quantize_4bit(w, blocksize, quant_type)
    w = w.detach()
    if w.dtype not in _DTYPE_NAMES:
        w = w.float()
    packed, absmax = _core.quantize_4bit(_np(w), _DTYPE_NAMES[w.dtype], blocksize, quant_type)
    return torch.from_numpy(packed).reshape(-1, 1), torch.from_numpy(absmax)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, dict]:
    code = torch.from_numpy(_core.dynamic_map(True))
    codes, nested_absmax, offset = _core.double_quantize(_np(absmax.cpu()), _np(code), 256)
    nested = {
        "nested_absmax": torch.from_numpy(nested_absmax).to(absmax.device),
        "nested_code": code.to(absmax.device),
        "offset": float(offset),
        "blocksize": 256,
    }
    return torch.from_numpy(codes).to(absmax.device), nested


def int8_vectorwise_quant(x: torch.Tensor, threshold: float):
    """LLM.int8() quantization of a (rows, cols) matrix: (q int8, row_absmax f32, outlier_cols)."""
    if x.is_cuda:
        from .. import kernels

        return kernels.int8_vectorwise_quant(x, threshold)
    x = x.detach()
    if x.dtype not in _DTYPE_NAMES:
        x = x.float()
    rows, cols = x.shape
    q, stats, oc = _core.int8_vectorwise_quant(_np(x), _DTYPE_NAMES[x.dtype], rows, cols, float(threshold))
    return torch.from_numpy(q).reshape(rows, cols), torch.from_numpy(stats), torch.from_numpy(oc)


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (N, K)^T -> int32 (M, N), exact."""
    if a.is_cuda:
        from ..kernels import _int_mm_padded

        # torch._int_mm wants rows > 16 and dims in multiples of 8: zero padding is exact.
        return _int_mm_padded(a, b)[: a.shape[0], : b.shape[0]]
    # float64 holds every int32 accumulation exactly (|acc| < 2^53).
    return (a.double() @ b.double().t()).to(torch.int32)
