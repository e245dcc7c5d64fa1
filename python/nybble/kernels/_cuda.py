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


# ---------------------------------------------------------------------- scratch

#: The reused dequantization buffers of the large-M paths, one per (device, stream): W is
#: decoded into it and consumed by cuBLAS on the same stream, so stream order alone keeps a
#: later decode from overwriting it while a GEMM still reads it. It grows to the largest
#: weight seen (2 MiB steps) and is never shrunk; :func:`release_scratch` frees it.
_SCRATCH: dict[tuple[int, int], torch.Tensor] = {}
_SCRATCH_STEP = 2 << 20


def _scratch_key(device: torch.device) -> tuple[int, int] | None:
    """(device, current stream), or None while a CUDA graph is being captured (the buffer
    would belong to the graph's private pool): the caller then allocates normally."""
    if torch.cuda.is_current_stream_capturing():
        return None
    return device.index, torch.cuda.current_stream(device).cuda_stream


def scratch(device: torch.device, dtype: torch.dtype, shape) -> torch.Tensor:
    """A ``shape`` / ``dtype`` view of the reused buffer of ``device`` and its current stream
    (no allocation once it is large enough). Valid until the next call on that stream."""
    shape = tuple(int(s) for s in shape)
    nbytes = reference.numel(shape) * torch.empty(0, dtype=dtype).element_size()
    key = _scratch_key(device)
    if key is None:
        return torch.empty(shape, dtype=dtype, device=device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < nbytes:
        _SCRATCH.pop(key, None)
        del buf  # returned to torch's allocator (stream-ordered) before the larger one is taken
        buf = torch.empty(-(-max(nbytes, 1) // _SCRATCH_STEP) * _SCRATCH_STEP, dtype=torch.uint8, device=device)
        _SCRATCH[key] = buf
    return buf[:nbytes].view(dtype).view(shape)


def release_scratch() -> None:
    """Frees every scratch buffer (they come back at the next large-M call)."""
    _SCRATCH.clear()


def _dequantize_to_scratch(packed, absmax, shape, blocksize, quant_type, dtype):
    """W decoded into the scratch buffer (the CuPy kernel), or a fresh tensor without CuPy."""
    k = cupy_backend()
    if k is None or dtype not in _NATIVE:
        return reference.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    w = scratch(packed.device, dtype, shape)
    k.launch_dequantize_4bit(_contiguous_aligned(packed, 16), absmax.to(packed.device, torch.float32).contiguous(), w,
                             blocksize, quant_type)
    return w


# ---------------------------------------------------------------------- 4-bit matmuls


def _gemv_ok(k, m: int, in_features: int, dtype) -> bool:
    return k is not None and 0 < m <= FUSED_MAX_M and in_features % 32 == 0 and dtype in _NATIVE


def matmul_4bit(x, packed, absmax, shape, blocksize, quant_type, bias):
    out_features, in_features = shape
    k = cupy_backend()
    x2 = x.reshape(-1, in_features)
    if _gemv_ok(k, x2.shape[0], in_features, x.dtype):
        x2 = _contiguous_aligned(x2, 16)
        out = torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)
        b = None if bias is None else bias.to(x.dtype).contiguous()
        k.launch_gemv_4bit(x2, _contiguous_aligned(packed, 16), absmax.contiguous(), b, out, blocksize, quant_type)
        return out.reshape(*x.shape[:-1], out_features)
    # Large M: decode W into the scratch buffer (kernel), then cuBLAS with the bias in its epilogue.
    w = _dequantize_to_scratch(packed, absmax, shape, blocksize, quant_type, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def lora_fusable(x, x_lora, lora_a, lora_b) -> bool:
    """Whether ``Linear4bitFunction`` / ``Linear8bitFunction`` compute their LoRA term inside
    the base op on this input (tensor metadata only, so torch.compile traces it): CUDA, one
    adapter, and x, x_lora, A, B in one of the kernels' dtypes."""
    xl = x if x_lora is None else x_lora
    return (x.is_cuda and x.dtype in _NATIVE and lora_a.dim() == 2 and lora_b.dim() == 2
            and xl.dtype == x.dtype and lora_a.dtype == x.dtype and lora_b.dtype == x.dtype)


def grad_input_fusable(g, lora_a) -> bool:
    """Whether the 4-bit layer's backward computes grad_x through ``matmul_4bit_grad_input``."""
    return g.is_cuda and g.dtype in _NATIVE and (lora_a is None or lora_a.dtype == g.dtype)


def _adapter_args(adapter_index, adapter_scale, device):
    idx = None if adapter_index is None else adapter_index.to(device, torch.int32).reshape(-1).contiguous()
    sc = None if adapter_scale is None else adapter_scale.to(device, torch.float32).reshape(-1).contiguous()
    return idx, sc


def lora_down(x_lora2, lora_a, adapter_index=None):
    """``x_lora A^T`` (M, r) in float32 by the LoRA down-projection kernel (M <= FUSED_MAX_M)."""
    k = cupy_backend()
    xa = torch.empty((x_lora2.shape[0], lora_a.shape[-2]), dtype=torch.float32, device=x_lora2.device)
    k.launch_lora_down(_contiguous_aligned(x_lora2, 16), _contiguous_aligned(lora_a, 16), adapter_index, xa)
    return xa


def matmul_4bit_lora(x, packed, absmax, shape, blocksize, quant_type, bias, x_lora, lora_a, lora_b, scale,
                     adapter_index, adapter_scale):
    out_features, in_features = shape
    k = cupy_backend()
    xl = x if x_lora is None else x_lora
    x2, xl2 = x.reshape(-1, in_features), xl.reshape(-1, in_features)
    m, r = x2.shape[0], lora_a.shape[-2]
    same_dtype = xl.dtype == x.dtype and lora_a.dtype == x.dtype and lora_b.dtype == x.dtype
    if _gemv_ok(k, m, in_features, x.dtype) and same_dtype:
        # Decode: x_lora A^T by the down-projection kernel, then the GEMV with the LoRA epilogue.
        if adapter_index is None and lora_a.dim() == 3:  # stacked adapters, no index: adapter 0
            adapter_index = torch.zeros(m, dtype=torch.int32, device=x.device)
        idx, sc = _adapter_args(adapter_index, adapter_scale, x.device)
        xa = lora_down(xl2, lora_a, idx)
        out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
        b = None if bias is None else bias.to(x.dtype).contiguous()
        k.launch_gemv_4bit_lora(_contiguous_aligned(x2, 16), _contiguous_aligned(packed, 16), absmax.contiguous(), b,
                                xa, lora_b.contiguous(), idx, sc, float(scale), out, blocksize, quant_type)
        return out.reshape(*x.shape[:-1], out_features), xa.to(xl.dtype).reshape(*xl.shape[:-1], r)
    if adapter_index is None and lora_a.dim() == 2 and k is not None and same_dtype:
        # Prefill / training: W decoded into scratch, then three cuBLAS calls on the stream:
        # the base GEMM (bias in its epilogue), x_lora A^T, and B accumulated into the base.
        w = _dequantize_to_scratch(packed, absmax, shape, blocksize, quant_type, x.dtype)
        base = torch.nn.functional.linear(x2, w, None if bias is None else bias.to(x.dtype))
        xa = torch.matmul(xl2, lora_a.t())
        out = torch.addmm(base, xa, lora_b.t(), alpha=float(scale))
        return out.reshape(*x.shape[:-1], out_features), xa.reshape(*xl.shape[:-1], r)
    return reference.matmul_4bit_lora(x, packed, absmax, shape, blocksize, quant_type, bias, x_lora, lora_a, lora_b,
                                      scale, adapter_index, adapter_scale)


def matmul_4bit_grad_input(grad_out, packed, absmax, shape, blocksize, quant_type, grad_xa, lora_a):
    out_features, in_features = shape
    k = cupy_backend()
    g2 = grad_out.reshape(-1, out_features)
    m = g2.shape[0]
    dtype = grad_out.dtype
    lora_ok = lora_a is None or lora_a.dtype == dtype
    if k is not None and 0 < m <= FUSED_MAX_M and in_features % 8 == 0 and dtype in _NATIVE and lora_ok:
        sms = torch.cuda.get_device_properties(grad_out.device).multi_processor_count
        _, splits, rows_per_split = k.gemv_t_plan(m, out_features, in_features, sms)
        ws = torch.empty((splits, m, in_features), dtype=torch.float32, device=grad_out.device)
        out = torch.empty((m, in_features), dtype=dtype, device=grad_out.device)
        gxa = None if grad_xa is None else grad_xa.reshape(m, -1).to(torch.float32).contiguous()
        a = None if grad_xa is None else lora_a.contiguous()
        k.launch_gemv_4bit_t(g2.contiguous(), _contiguous_aligned(packed, 16), absmax.contiguous(), gxa, a, ws, out,
                             blocksize, quant_type, rows_per_split)
        return out.reshape(*grad_out.shape[:-1], in_features)
    if k is not None and dtype in _NATIVE and lora_ok:
        # Large M: W decoded into scratch, g W by cuBLAS, the LoRA term accumulated into it.
        w = _dequantize_to_scratch(packed, absmax, shape, blocksize, quant_type, dtype)
        out = torch.matmul(g2, w)
        if grad_xa is not None:
            out = torch.addmm(out, grad_xa.reshape(m, -1).to(dtype), lora_a)
        return out.reshape(*grad_out.shape[:-1], in_features)
    return reference.matmul_4bit_grad_input(grad_out, packed, absmax, shape, blocksize, quant_type, grad_xa, lora_a)


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


def int8_linear_lora(x, q_w, w_scale, bias, threshold, x_lora, lora_a, lora_b, scale, int8_linear):
    """LLM.int8() linear with its LoRA term. Small M on the kernels: x_lora A^T by the
    down-projection kernel, one epilogue kernel for dequantization, outlier columns (their
    float32 product, when there are any), bias and the LoRA term, rounded once. Otherwise
    ``int8_linear`` (the op composition) and the adapter GEMMs by cuBLAS, B accumulated into
    the base output."""
    k = cupy_backend()
    cols = x.shape[-1]
    xl = x if x_lora is None else x_lora
    x2, xl2 = x.reshape(-1, cols), xl.reshape(-1, cols)
    m, r, n = x2.shape[0], lora_a.shape[0], q_w.shape[0]
    same_dtype = xl.dtype == x.dtype and lora_a.dtype == x.dtype and lora_b.dtype == x.dtype
    if k is not None and 0 < m <= FUSED_MAX_M and cols % 8 == 0 and x.dtype in _NATIVE and same_dtype:
        q_x, row_absmax, outliers = torch.ops.nybble.int8_vectorwise_quant(x2, threshold)
        acc = int_mm_padded(q_x, q_w)
        addend = None
        if outliers.numel():
            addend = torch.matmul(x2[:, outliers].float(), reference.int8_dequantize_rows(q_w[:, outliers], w_scale).t())
        xa = lora_down(xl2, lora_a)
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        k.launch_int8_mm_dequant_lora(
            acc, row_absmax.reshape(-1).float().contiguous(), w_scale.reshape(-1).float().contiguous(),
            None if addend is None else addend.contiguous(), None if bias is None else bias.float().contiguous(), xa,
            lora_b.contiguous(), float(scale), out,
        )
        return out.reshape(*x.shape[:-1], n), xa.to(xl.dtype).reshape(*xl.shape[:-1], r)
    base = int8_linear(x, q_w, w_scale, bias, threshold)
    xa = torch.matmul(xl2, lora_a.t())
    if base.dtype == xa.dtype:
        out = torch.addmm(base.reshape(-1, n), xa, lora_b.t(), alpha=float(scale))
    else:
        out = base.reshape(-1, n) + (torch.matmul(xa, lora_b.t()) * scale).to(base.dtype)
    return out.reshape(*x.shape[:-1], n), xa.reshape(*xl.shape[:-1], r)


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
