"""The compute layer the torch modules and optimizers call.

* ``ops``: the ``nybble::`` torch ops, each defined once and registered for CPU (the Rust
  core), CUDA (the CuPy kernels) and a default (the torch reference); ``NYBBLE_KERNELS=torch``
  selects the reference everywhere.
* This module: thin functions over those ops (argument checks and normalisation only, no
  device ladders) and the autograd Functions, one per layer kind: :class:`Linear4bitFunction`
  and :class:`Linear8bitFunction`, each with an optional fused LoRA term.
* ``reference``: the pure-torch semantics every path is tested against.
"""

from __future__ import annotations

import math

import torch

from . import _cuda, ops, reference
from ._cuda import FUSED_MAX_M, cupy_backend, release_scratch
from .reference import check_blocksize, check_quant_type

__all__ = [
    "FUSED_MAX_M",
    "Linear4bitFunction",
    "Linear8bitFunction",
    "cuda_available",
    "decode_absmax",
    "dequantize_4bit",
    "double_quantize",
    "int8_dequantize_rows",
    "int8_linear",
    "int8_matmul",
    "int8_matmul_dequant",
    "int8_vectorwise_quant",
    "lora_linear_4bit",
    "matmul_4bit",
    "multi_lora_linear_4bit",
    "ops",
    "quantize_4bit",
    "reference",
    "release_scratch",
]

_NATIVE = (torch.float32, torch.float16, torch.bfloat16)
int8_dequantize_rows = reference.int8_dequantize_rows


def cuda_available() -> bool:
    """True when CUDA tensors will run nybble's CuPy kernels (not the torch fallback)."""
    return torch.cuda.is_available() and cupy_backend() is not None


def _offset_tensor(offset: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(offset, torch.Tensor):
        return offset.detach().to(device, torch.float32).reshape(())
    return torch.tensor(float(offset), dtype=torch.float32, device=device)


def _shape2(shape) -> list[int]:
    return [int(shape[0]), int(shape[1])]


# ---------------------------------------------------------------------- 4-bit


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
    check_blocksize(nested_blocksize)
    if nested_code.numel() != 256:
        raise ValueError(f"nested_code must have 256 entries, got {nested_code.numel()}")
    dev = codes.device
    return torch.ops.nybble.decode_absmax(codes.reshape(-1), nested_absmax.to(dev, torch.float32),
                                          nested_code.to(dev, torch.float32), _offset_tensor(offset, dev),
                                          int(nested_blocksize))


def double_quantize(absmax: torch.Tensor, nested_blocksize: int = 256) -> tuple[torch.Tensor, dict]:
    """Double quantization of a float32 absmax on its device (the Rust core on CPU, torch on
    other devices): ``(uint8 codes, {"nested_absmax", "nested_code", "offset", "blocksize"})``
    with ``offset`` a float32 0-d tensor on absmax's device."""
    check_blocksize(nested_blocksize)
    codes, nested_absmax, code, offset = torch.ops.nybble.double_quantize(absmax.detach().float(),
                                                                          int(nested_blocksize))
    return codes, {"nested_absmax": nested_absmax, "nested_code": code, "offset": offset,
                   "blocksize": nested_blocksize}


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
    shape = [int(s) for s in shape]  # a list, not a generator: torch.compile traces it
    n = reference.numel(shape)
    if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"packed ({packed.numel()} bytes) / absmax ({absmax.numel()}) do not match shape {tuple(shape)} "
            f"with blocksize {blocksize}"
        )
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed 4-bit codes must be uint8, got {packed.dtype} (view other storage as uint8)")
    return torch.ops.nybble.dequantize_4bit(packed, absmax.to(packed.device, torch.float32), shape, blocksize,
                                            quant_type, dtype)


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise NF4 / FP4 of ``w`` on its device (other float dtypes go through float32):
    ``(packed uint8 ((n+1)//2, 1), absmax float32 (nblocks,))``, bit-identical to
    ``nybble.quantize_4bit``. Raises ``NonFiniteError`` on NaN / Inf."""
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    if not w.is_floating_point():
        raise TypeError(f"cannot quantize a {w.dtype} tensor: expected floating point")
    if w.dtype not in _NATIVE:
        w = w.float()  # float64 and others: through float32
    return torch.ops.nybble.quantize_4bit(w.detach(), blocksize, quant_type)


def _absmax_of(absmax, nested_absmax, nested_code, offset):
    """The float32 absmax: given, or decoded from double-quantized codes."""
    if nested_absmax is None:
        return absmax
    return torch.ops.nybble.decode_absmax(absmax, nested_absmax, nested_code, offset, 256)


def _lora_delta(x_lora, lora_a, lora_b, scale):
    """``(scale * (x_lora A^T) B^T, x_lora A^T)`` in x_lora's dtype."""
    xa = torch.matmul(x_lora, lora_a.t())
    return torch.matmul(xa, lora_b.t()) * scale, xa


def _add_lora_and_save(ctx, out, x, bias, lora_a, lora_b, x_lora, scale, weight_tensors, xa=None):
    """Shared forward tail of the layer Functions: adds the LoRA term (if any) to the base
    output and saves what the backward pass needs: the frozen weight's tensors, and for LoRA
    x_lora, the small ``x A^T`` and the adapter weights. With ``xa`` given, the base op has
    already added the LoRA term (the fused CUDA path) and returned ``x_lora A^T``."""
    ctx.lora_meta = (scale, None if bias is None else bias.dtype, lora_a is not None, x_lora is not None, x.dtype,
                     len(weight_tensors))
    if lora_a is None:
        ctx.save_for_backward(*weight_tensors)
        return out
    xl = x if x_lora is None else x_lora
    if xa is not None:
        ctx.save_for_backward(*weight_tensors, xl, xa, lora_a, lora_b)
        return out
    delta, xa = _lora_delta(xl, lora_a, lora_b, scale)
    ctx.save_for_backward(*weight_tensors, xl, xa, lora_a, lora_b)
    return out + delta.to(out.dtype)


def _linear_backward(ctx, grad_out, weight, grad_input=None):
    """Shared backward of the layer Functions, inputs ordered (x, bias, lora_a, lora_b, x_lora):
    ``grad_x = g W (+ the LoRA part)``, W decoded by ``weight(dtype, *weight_tensors)``; or, when
    ``grad_input(g, grad_xa, lora_a, *weight_tensors)`` is given and returns a tensor, that op
    computes ``g W (+ grad_xa A)`` in one call (grad_xa None when the adapter has its own input)."""
    scale, bias_dtype, has_lora, separate_lora_input, x_dtype, n_weight = ctx.lora_meta
    saved = ctx.saved_tensors
    g = grad_out.to(x_dtype)
    grad_x = grad_bias = grad_a = grad_b = grad_x_lora = lora_part = gxa = lora_a = None
    if has_lora:
        xl, xa, lora_a, lora_b = saved[n_weight:]
        gl = grad_out.to(xl.dtype).reshape(-1, grad_out.shape[-1]) * scale  # reaching (x A^T) B^T
        gxa = torch.matmul(gl, lora_b)  # (M, r): the gradient reaching x A^T
        if ctx.needs_input_grad[2]:
            grad_a = torch.matmul(gxa.t(), xl.reshape(-1, xl.shape[-1]))
        if ctx.needs_input_grad[3]:
            grad_b = torch.matmul(gl.t(), xa.reshape(-1, xa.shape[-1]))
    if ctx.needs_input_grad[0] and grad_input is not None:
        fused_lora = has_lora and not separate_lora_input
        grad_x = grad_input(g, gxa if fused_lora else None, lora_a if fused_lora else None, *saved[:n_weight])
    if has_lora and (ctx.needs_input_grad[4] or (ctx.needs_input_grad[0] and grad_x is None)):
        lora_part = torch.matmul(gxa, lora_a).reshape(xl.shape)
        if separate_lora_input:
            grad_x_lora = lora_part
    if ctx.needs_input_grad[0] and grad_x is None:
        grad_x = torch.matmul(g, weight(g.dtype, *saved[:n_weight]))
        if has_lora and not separate_lora_input:
            grad_x = grad_x + lora_part.to(grad_x.dtype)
    if bias_dtype is not None and ctx.needs_input_grad[1]:
        grad_bias = g.reshape(-1, g.shape[-1]).sum(0).to(bias_dtype)
    return grad_x, grad_bias, grad_a, grad_b, grad_x_lora


class Linear4bitFunction(torch.autograd.Function):
    """The one autograd path of 4-bit layers: ``x W^T + bias [+ scale * (x_lora A^T) B^T]``
    with the packed W frozen, plain or with its LoRA adapter (QLoRA).

    ``absmax`` is float32, or uint8 codes when ``nested_absmax`` / ``nested_code`` / ``offset``
    are given (double quantization: decoded per call, never kept). ``x_lora`` is None to
    reuse x (no dropout). The output is in ``out_dtype`` (default x's), the base term
    computed in x's dtype and the LoRA term in x_lora's. Saves x_lora, the packed weight and
    its constants, and the small ``x A^T``; the backward pass decodes W once for grad_x."""

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, x_lora, scale, packed, absmax, nested_absmax, nested_code, offset,
                shape, blocksize, quant_type, out_dtype, decode_dtype):
        w_absmax = _absmax_of(absmax, nested_absmax, nested_code, offset)
        decode_dtype = decode_dtype or x.dtype
        weight_tensors = (packed, absmax, nested_absmax, nested_code, offset)
        ctx.meta = (shape, blocksize, quant_type, decode_dtype)
        if lora_a is not None and decode_dtype == x.dtype and _cuda.lora_fusable(x, x_lora, lora_a, lora_b):
            # CUDA: the base and the LoRA term in one op (the GEMV's LoRA epilogue for small M).
            out, xa = torch.ops.nybble.matmul_4bit_lora(x, packed, w_absmax, shape, blocksize, quant_type, bias,
                                                        x_lora, lora_a, lora_b, scale, None, None)
            return _add_lora_and_save(ctx, out.to(out_dtype or x.dtype), x, bias, lora_a, lora_b, x_lora, scale,
                                      weight_tensors, xa=xa)
        if decode_dtype == x.dtype:
            out = torch.ops.nybble.matmul_4bit(x, packed, w_absmax, shape, blocksize, quant_type, bias)
        else:  # e.g. float64 activations over the float32-decoded weight
            w = torch.ops.nybble.dequantize_4bit(packed, w_absmax, shape, blocksize, quant_type, decode_dtype)
            out = torch.nn.functional.linear(x, w.to(x.dtype), bias)
        out_dtype = out_dtype or x.dtype
        out = out.to(out_dtype)
        return _add_lora_and_save(ctx, out, x, bias, lora_a, lora_b, x_lora, scale, weight_tensors)

    @staticmethod
    def backward(ctx, grad_out):
        shape, blocksize, quant_type, decode_dtype = ctx.meta

        def weight(dtype, packed, absmax, nested_absmax, nested_code, offset):
            w_absmax = _absmax_of(absmax, nested_absmax, nested_code, offset)
            return torch.ops.nybble.dequantize_4bit(packed, w_absmax, shape, blocksize, quant_type,
                                                    decode_dtype).to(dtype)

        def grad_input(g, grad_xa, lora_a, packed, absmax, nested_absmax, nested_code, offset):
            # CUDA: g W (+ grad_xa A) in one op (the transposed GEMV for small M).
            if g.dtype != decode_dtype or not _cuda.grad_input_fusable(g, lora_a):
                return None
            w_absmax = _absmax_of(absmax, nested_absmax, nested_code, offset)
            return torch.ops.nybble.matmul_4bit_grad_input(g, packed, w_absmax, shape, blocksize, quant_type, grad_xa,
                                                           lora_a)

        return _linear_backward(ctx, grad_out, weight, grad_input) + (None,) * 11


def linear_4bit(x, packed, absmax, shape, blocksize, quant_type, bias=None, *, nested_absmax=None, nested_code=None,
                offset=None, lora_a=None, lora_b=None, scale=1.0, x_lora=None, out_dtype=None, decode_dtype=None):
    """The 4-bit layer's forward through :class:`Linear4bitFunction` (see there); W is decoded
    to ``decode_dtype`` (default x's dtype; float64 gives the exact products)."""
    if (lora_a is None and nested_absmax is None and decode_dtype in (None, x.dtype) and out_dtype in (None, x.dtype)
            and eager_cpu_inference(x, bias)):
        # Decode-time calls take ~0.1-0.2 ms of autograd and op dispatch around a ~0.5 ms kernel:
        # with nothing to differentiate, eager CPU calls go straight to the op's CPU kernel.
        return ops.cpu_kernel("matmul_4bit")(x, packed, absmax, _shape2(shape), int(blocksize), quant_type, bias)
    return Linear4bitFunction.apply(x, bias, lora_a, lora_b, x_lora, float(scale), packed, absmax, nested_absmax,
                                    nested_code, offset, _shape2(shape), int(blocksize), quant_type, out_dtype,
                                    decode_dtype)


def eager_cpu_inference(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """An eager call on plain CPU tensors that autograd does not record and the CPU kernels
    serve (not traced or compiled, no NYBBLE_KERNELS=torch): then the op's CPU kernel may be
    called without the dispatcher, with the same result (here and in ``Linear4bit``)."""
    return (type(x) is torch.Tensor and x.is_cpu
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
            and not torch.compiler.is_compiling() and not ops.use_reference())


def _check_4bit_args(x, packed, absmax, shape, blocksize, quant_type):
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    n = int(shape[0]) * int(shape[1])
    if x.shape[-1] != int(shape[1]):
        raise ValueError(f"x has {x.shape[-1]} features, the weight {int(shape[1])}")
    if packed.numel() != (n + 1) // 2 or absmax.numel() != -(-n // blocksize):
        raise ValueError(f"packed ({packed.numel()} bytes) / absmax ({absmax.numel()}) do not match shape "
                         f"{tuple(shape)} with blocksize {blocksize}")


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
    _check_4bit_args(x, packed, absmax, shape, blocksize, quant_type)
    return linear_4bit(x, packed, absmax.float(), shape, blocksize, quant_type, bias)


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
    with ``x_lora`` defaulting to x (pass ``dropout(x)`` for LoRA dropout). The adapter
    matmuls run in x's dtype."""
    _check_4bit_args(x, packed, absmax, shape, blocksize, quant_type)
    return linear_4bit(x, packed, absmax.float(), shape, blocksize, quant_type, bias, lora_a=lora_a.to(x.dtype),
                       lora_b=lora_b.to(x.dtype), scale=scale, x_lora=x_lora)


def multi_lora_linear_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int,
    quant_type: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    adapter_index: torch.Tensor,
    scale: float = 1.0,
    adapter_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    check_index: bool = True,
) -> torch.Tensor:
    """Serving many adapters over one 4-bit base (inference, no autograd): row i of x (leading
    dims flattened) gets ``x_i W^T + bias + scale * adapter_scale[j] * (x_i A_j^T) B_j^T`` with
    ``j = adapter_index[i]``; a negative index means the base only. ``lora_a`` (L, r, in) and
    ``lora_b`` (L, out, r) are the stacked adapters (in x's dtype), ``adapter_scale`` (L,)
    per-adapter factors (e.g. alpha / r). On CUDA up to FUSED_MAX_M rows run the GEMV with the
    LoRA epilogue (the packed weight read once for all adapters). ``check_index`` verifies
    every index is < L (one device-to-host sync)."""
    _check_4bit_args(x, packed, absmax, shape, blocksize, quant_type)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if lora_a.dim() != 3 or lora_b.dim() != 3 or lora_a.shape[0] != lora_b.shape[0]:
        raise ValueError(f"stacked adapters need lora_a (L, r, in) and lora_b (L, out, r), got "
                         f"{tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if adapter_index.numel() != rows:
        raise ValueError(f"adapter_index has {adapter_index.numel()} entries for {rows} rows")
    if check_index and rows and bool((adapter_index >= lora_a.shape[0]).any()):
        raise ValueError(f"adapter_index holds an index >= the {lora_a.shape[0]} adapters")
    idx = adapter_index.reshape(-1).to(x.device, torch.int32)
    sc = None if adapter_scale is None else adapter_scale.to(x.device, torch.float32).reshape(-1)
    with torch.no_grad():
        out, _ = torch.ops.nybble.matmul_4bit_lora(x, packed, absmax.float(), _shape2(shape), int(blocksize), quant_type,
                                                   bias, None, lora_a.to(x.dtype), lora_b.to(x.dtype), float(scale),
                                                   idx, sc)
    return out


# ---------------------------------------------------------------------- int8


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold {threshold} must be finite and >= 0")
    return threshold


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8() quantization of one operand: ``(q int8 like x, row_absmax float32,
    outlier_cols int64)``; equal to ``nybble.int8.vectorwise_quant`` on CPU."""
    return torch.ops.nybble.int8_vectorwise_quant(x.detach(), _check_threshold(threshold))


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 (M, K) @ int8 (N, K)^T -> int32 (M, N), exact."""
    return torch.ops.nybble.int8_matmul(a, b)


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
    return torch.ops.nybble.int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype)


class Linear8bitFunction(torch.autograd.Function):
    """The one autograd path of LLM.int8() layers: ``x W^T + bias [+ scale * (x_lora A^T) B^T]``
    with W int8 row-wise (``scb`` its row absmax) and frozen. The base term is one
    ``nybble::int8_linear`` op (float32 accumulation, one rounding to ``out_dtype``); the
    backward pass decodes W for grad_x instead of keeping a dense copy."""

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, x_lora, scale, q_w, scb, threshold, out_dtype):
        if lora_a is not None and _cuda.lora_fusable(x, x_lora, lora_a, lora_b):
            # CUDA: the base and the LoRA term in one op (one epilogue kernel for small M).
            out, xa = torch.ops.nybble.int8_linear_lora(x, q_w, scb, bias, threshold, x_lora, lora_a, lora_b, scale)
            return _add_lora_and_save(ctx, out.to(out_dtype or x.dtype), x, bias, lora_a, lora_b, x_lora, scale,
                                      (q_w, scb), xa=xa)
        out = torch.ops.nybble.int8_linear(x, q_w, scb, bias, threshold)
        out_dtype = out_dtype or x.dtype
        out = out.to(out_dtype)
        return _add_lora_and_save(ctx, out, x, bias, lora_a, lora_b, x_lora, scale, (q_w, scb))

    @staticmethod
    def backward(ctx, grad_out):
        def weight(dtype, q_w, scb):
            return int8_dequantize_rows(q_w, scb, dtype)

        return _linear_backward(ctx, grad_out, weight) + (None,) * 5


def linear_8bit(x, q_w, scb, bias=None, threshold: float = 6.0, *, lora_a=None, lora_b=None, scale=1.0, x_lora=None,
                out_dtype=None):
    """The LLM.int8() layer's forward through :class:`Linear8bitFunction` (see there)."""
    if lora_a is None and out_dtype in (None, x.dtype) and eager_cpu_inference(x, bias):
        # As in linear_4bit: with nothing to differentiate, eager CPU calls skip autograd and
        # the dispatcher and go straight to the op's CPU kernel (the same result).
        return ops.cpu_kernel("int8_linear")(x, q_w, scb, bias, float(threshold))
    return Linear8bitFunction.apply(x, bias, lora_a, lora_b, x_lora, float(scale), q_w, scb, float(threshold),
                                    out_dtype)


def int8_linear(
    x: torch.Tensor,
    q_w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """LLM.int8() linear layer: int8 GEMM for regular columns, outlier input columns
    multiplied against the dequantized matching weight columns, float32 accumulation and one
    rounding to x's dtype. Differentiable in x and bias (W is frozen)."""
    return linear_8bit(x, q_w, w_scale.float(), bias, _check_threshold(threshold))
