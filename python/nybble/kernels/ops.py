"""The ``nybble::`` torch ops: every compute operation the modules and optimizers use, defined
once (schema from the signature, a fake for shapes) and implemented per backend.

Each op has three registrations:

* ``CPU``: the Rust core (``_cpu``);
* ``CUDA``: the CuPy kernels (``_cuda``), which fall back to the reference without CuPy;
* the default (torch's ``CompositeExplicitAutograd`` key): the pure-torch reference, serving
  every other device (and CUDA through the CUDA kernel's fallback).

``NYBBLE_KERNELS=torch`` makes the CPU and CUDA registrations call the reference too, read
at each call, so one switch selects the reference everywhere, optimizers included.

The ops are opaque to torch.compile (it sees one call with the fake's output shapes) and
carry no autograd formula: the modules' ``torch.autograd.Function`` s in ``kernels`` call
them and define the gradients.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from . import _cpu, _cuda, reference
from . import optim as kopt

#: Dispatch keys each op is registered for: "CompositeExplicitAutograd" is the default.
BACKEND_KEYS = ("CPU", "CUDA", "CompositeExplicitAutograd")

#: The ops by short name (``torch.ops.nybble.<name>``).
OPS: dict[str, torch.library.CustomOpDef] = {}
CPU_KERNELS: dict[str, Callable] = {}


def use_reference() -> bool:
    """True when ``NYBBLE_KERNELS=torch`` asks for the torch reference on every device."""
    return _cpu.setting("NYBBLE_KERNELS").lower() == "torch"


def _late(module, name: str) -> Callable:
    """``module.name``, looked up at each call (so a test can wrap an implementation)."""

    def impl(*args, **kwargs):
        return getattr(module, name)(*args, **kwargs)

    impl.__name__ = name
    return impl


def _register(op: torch.library.CustomOpDef, cpu: Callable, cuda: Callable, reference_impl: Callable) -> None:
    def pick(impl):
        def kernel(*args, **kwargs):
            return (reference_impl if use_reference() else impl)(*args, **kwargs)

        return kernel

    op.register_kernel("cpu", pick(cpu))
    op.register_kernel("cuda", pick(cuda))
    OPS[op._name.split("::")[-1]] = op
    CPU_KERNELS[op._name.split("::")[-1]] = cpu


def cpu_kernel(name: str) -> Callable:
    """The CPU implementation registered for ``nybble::name`` (what the dispatcher calls for CPU
    tensors unless NYBBLE_KERNELS=torch), for eager callers that skip the dispatcher."""
    return CPU_KERNELS[name]


def _nblocks(n, blocksize: int):
    return (n + blocksize - 1) // blocksize


# ---------------------------------------------------------------------- 4-bit


@torch.library.custom_op("nybble::quantize_4bit", mutates_args=())
def quantize_4bit(w: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """Block-wise NF4 / FP4: (packed uint8 ((n+1)//2, 1), absmax float32 (nblocks,))."""
    return reference.quantize_4bit_checked(w, blocksize, quant_type)


@quantize_4bit.register_fake
def _(w, blocksize, quant_type):
    n = w.numel()
    return (w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            w.new_empty((_nblocks(n, blocksize),), dtype=torch.float32))


_register(quantize_4bit, _late(_cpu, "quantize_4bit"), _late(_cuda, "quantize_4bit"), reference.quantize_4bit_checked)


@torch.library.custom_op("nybble::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: Tensor, absmax: Tensor, shape: list[int], blocksize: int, quant_type: str, dtype: torch.dtype
) -> Tensor:
    """``code[q] * absmax[i // blocksize]`` to ``dtype``, shaped ``shape``."""
    return reference.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)


@dequantize_4bit.register_fake
def _(packed, absmax, shape, blocksize, quant_type, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


_register(dequantize_4bit, _late(_cpu, "dequantize_4bit"), _late(_cuda, "dequantize_4bit"), reference.dequantize_4bit)


@torch.library.custom_op("nybble::decode_absmax", mutates_args=())
def decode_absmax(codes: Tensor, nested_absmax: Tensor, nested_code: Tensor, offset: Tensor,
                  nested_blocksize: int) -> Tensor:
    """Double-quant decode: ``nested_code[q] * nested_absmax[i // nested_blocksize] + offset``."""
    return reference.decode_absmax(codes, nested_absmax, nested_code, offset, nested_blocksize)


@decode_absmax.register_fake
def _(codes, nested_absmax, nested_code, offset, nested_blocksize):
    return codes.new_empty((codes.numel(),), dtype=torch.float32)


_register(decode_absmax, _late(_cpu, "decode_absmax"), _late(_cuda, "decode_absmax"), reference.decode_absmax)


def _double_quantize_reference(absmax, nested_blocksize):
    code = signed_dynamic_map(absmax.device)
    codes, nested_absmax, offset = reference.double_quantize(absmax, code, nested_blocksize)
    return codes, nested_absmax, code.clone(), offset


_DYNAMIC_MAPS: dict[tuple[bool, torch.device], Tensor] = {}


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """bitsandbytes' 256-entry dynamic map (from the core), cached per device."""
    device = torch.device(device)
    key = (signed, device)
    if key not in _DYNAMIC_MAPS:
        from .. import _core

        _DYNAMIC_MAPS[key] = torch.from_numpy(_core.dynamic_map(signed)).to(device)
    return _DYNAMIC_MAPS[key]


def signed_dynamic_map(device) -> Tensor:
    return dynamic_map(True, device)


@torch.library.custom_op("nybble::double_quantize", mutates_args=())
def double_quantize(absmax: Tensor, nested_blocksize: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """QLoRA's double quantization of a float32 absmax, on its device: (codes uint8,
    nested_absmax float32, nested_code float32 (256,), offset float32 0-d)."""
    return _double_quantize_reference(absmax, nested_blocksize)


@double_quantize.register_fake
def _(absmax, nested_blocksize):
    n = absmax.numel()
    return (absmax.new_empty((n,), dtype=torch.uint8), absmax.new_empty((_nblocks(n, nested_blocksize),),
            dtype=torch.float32), absmax.new_empty((256,), dtype=torch.float32),
            absmax.new_empty((), dtype=torch.float32))


# No CUDA kernel: the reference runs on the GPU (no round trip through the host).
_register(double_quantize, _late(_cpu, "double_quantize"), _double_quantize_reference, _double_quantize_reference)


@torch.library.custom_op("nybble::matmul_4bit", mutates_args=())
def matmul_4bit(x: Tensor, packed: Tensor, absmax: Tensor, shape: list[int], blocksize: int, quant_type: str,
                bias: Tensor | None) -> Tensor:
    """``x @ W^T (+ bias)`` for a packed W of ``shape = (out, in)``, in x's dtype."""
    return reference.matmul_4bit(x, packed, absmax, shape, blocksize, quant_type, bias)


@matmul_4bit.register_fake
def _(x, packed, absmax, shape, blocksize, quant_type, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


_register(matmul_4bit, _late(_cpu, "matmul_4bit"), _late(_cuda, "matmul_4bit"), reference.matmul_4bit)


# QLoRA: the adapter term with its base (the layer Functions' fused path on CUDA).


def _with_lora(base: Tensor, x: Tensor, x_lora, lora_a, lora_b, scale, adapter_index=None, adapter_scale=None):
    """``(base + the LoRA term in base's dtype, x_lora A^T)``, the adapter GEMMs in torch."""
    xl = x if x_lora is None else x_lora
    delta, xa = reference.lora_delta(xl.reshape(-1, xl.shape[-1]), lora_a, lora_b, scale, adapter_index,
                                     adapter_scale)
    return base + delta.to(base.dtype).reshape(base.shape), xa.reshape(*xl.shape[:-1], xa.shape[-1])


def _matmul_4bit_lora_cpu(x, packed, absmax, shape, blocksize, quant_type, bias, x_lora, lora_a, lora_b, scale,
                          adapter_index, adapter_scale):
    base = _cpu.matmul_4bit(x, packed, absmax, shape, blocksize, quant_type, bias)
    return _with_lora(base, x, x_lora, lora_a, lora_b, scale, adapter_index, adapter_scale)


@torch.library.custom_op("nybble::matmul_4bit_lora", mutates_args=())
def matmul_4bit_lora(x: Tensor, packed: Tensor, absmax: Tensor, shape: list[int], blocksize: int, quant_type: str,
                     bias: Tensor | None, x_lora: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float,
                     adapter_index: Tensor | None, adapter_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """QLoRA with unmerged adapters: ``(x W^T + bias + scale * (x_lora A^T) B^T, x_lora A^T)``,
    ``x_lora`` None meaning x. A (r, in), B (out, r); or stacked A (L, r, in), B (L, out, r)
    with ``adapter_index`` (one int per row of x; negative: no adapter) and ``adapter_scale``
    (L,) multiplying ``scale``. On CUDA, M <= 64 runs the LoRA down projection and the GEMV
    with the LoRA epilogue (one rounding, x A^T in float32)."""
    return reference.matmul_4bit_lora(x, packed, absmax, shape, blocksize, quant_type, bias, x_lora, lora_a, lora_b,
                                      scale, adapter_index, adapter_scale)


@matmul_4bit_lora.register_fake
def _(x, packed, absmax, shape, blocksize, quant_type, bias, x_lora, lora_a, lora_b, scale, adapter_index,
      adapter_scale):
    xl = x if x_lora is None else x_lora
    return x.new_empty((*x.shape[:-1], shape[0])), xl.new_empty((*xl.shape[:-1], lora_a.shape[-2]))


_register(matmul_4bit_lora, _late(sys.modules[__name__], "_matmul_4bit_lora_cpu"), _late(_cuda, "matmul_4bit_lora"),
          reference.matmul_4bit_lora)


def _matmul_4bit_grad_input_cpu(grad_out, packed, absmax, shape, blocksize, quant_type, grad_xa, lora_a):
    w = _cpu.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, grad_out.dtype)
    out = torch.matmul(grad_out, w)
    if grad_xa is not None:
        out = out + torch.matmul(grad_xa.to(grad_out.dtype), lora_a.to(grad_out.dtype)).reshape(out.shape)
    return out


@torch.library.custom_op("nybble::matmul_4bit_grad_input", mutates_args=())
def matmul_4bit_grad_input(grad_out: Tensor, packed: Tensor, absmax: Tensor, shape: list[int], blocksize: int,
                           quant_type: str, grad_xa: Tensor | None, lora_a: Tensor | None) -> Tensor:
    """The backward pass through a packed W of ``shape = (out, in)``: ``g W (+ grad_xa A)`` in g's
    dtype, ``grad_xa`` (M, r) the gradient reaching ``x A^T`` (scale included). On CUDA, M <= 64
    runs the transposed GEMV (packed W read once, the LoRA term in its epilogue); larger M
    decodes W into a reused scratch buffer for cuBLAS."""
    return reference.matmul_4bit_grad_input(grad_out, packed, absmax, shape, blocksize, quant_type, grad_xa, lora_a)


@matmul_4bit_grad_input.register_fake
def _(grad_out, packed, absmax, shape, blocksize, quant_type, grad_xa, lora_a):
    return grad_out.new_empty((*grad_out.shape[:-1], shape[1]))


_register(matmul_4bit_grad_input, _late(sys.modules[__name__], "_matmul_4bit_grad_input_cpu"),
          _late(_cuda, "matmul_4bit_grad_input"), reference.matmul_4bit_grad_input)


# ---------------------------------------------------------------------- int8 (LLM.int8())


@torch.library.custom_op("nybble::int8_vectorwise_quant", mutates_args=())
def int8_vectorwise_quant(x: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(q int8 like x, row_absmax float32, outlier_cols int64) of one matmul operand."""
    return reference.int8_vectorwise_quant(x, threshold)


@int8_vectorwise_quant.register_fake
def _(x, threshold):
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else (x.shape[0] if x.dim() > 1 else 1)
    cols = torch.library.get_ctx().new_dynamic_size()
    return (torch.empty_like(x, dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((cols,), dtype=torch.int64))


_register(int8_vectorwise_quant, _late(_cpu, "int8_vectorwise_quant"), _late(_cuda, "int8_vectorwise_quant"),
          reference.int8_vectorwise_quant)


def _int8_matmul_reference(a, b):
    return torch.matmul(a.double(), b.double().t()).to(torch.int32)


@torch.library.custom_op("nybble::int8_matmul", mutates_args=())
def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """int8 (M, K) @ int8 (N, K)^T -> int32 (M, N), exact."""
    return _int8_matmul_reference(a, b)


@int8_matmul.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


_register(int8_matmul, _late(_cpu, "int8_matmul"), _late(_cuda, "int8_matmul"), _int8_matmul_reference)


@torch.library.custom_op("nybble::int8_matmul_dequant", mutates_args=())
def int8_matmul_dequant(q_a: Tensor, q_b: Tensor, row_scale_a: Tensor, row_scale_b: Tensor, bias: Tensor | None,
                        dtype: torch.dtype) -> Tensor:
    """``(q_a @ q_b^T) * row_scale_a[i] * row_scale_b[j] / 127^2 + bias`` in ``dtype``."""
    return reference.int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype)


@int8_matmul_dequant.register_fake
def _(q_a, q_b, row_scale_a, row_scale_b, bias, dtype):
    return q_a.new_empty((*q_a.shape[:-1], q_b.shape[0]), dtype=dtype)


_register(int8_matmul_dequant, _late(_cpu, "int8_matmul_dequant"), _late(_cuda, "int8_matmul_dequant"), reference.int8_matmul_dequant)


def _int8_linear(x, q_w, w_scale, bias, threshold):
    """LLM.int8() linear from the ops above (each dispatching to its backend): float32
    accumulation, one rounding to x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    q_x, row_absmax, cols = torch.ops.nybble.int8_vectorwise_quant(x2, threshold)
    out = torch.ops.nybble.int8_matmul_dequant(q_x, q_w, row_absmax, w_scale, None, torch.float32)
    if cols.numel():
        out = out + torch.matmul(x2[:, cols].float(), reference.int8_dequantize_rows(q_w[:, cols], w_scale).t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], q_w.shape[0])


@torch.library.custom_op("nybble::int8_linear", mutates_args=())
def int8_linear(x: Tensor, q_w: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float) -> Tensor:
    """LLM.int8() linear (inference): int8 GEMM for the regular columns, the outlier columns
    of x against the dequantized matching weight columns; one opaque op, so the data-dependent
    outlier count never reaches a compiled graph."""
    return reference.int8_linear(x, q_w, w_scale, bias, threshold)


@int8_linear.register_fake
def _(x, q_w, w_scale, bias, threshold):
    return x.new_empty((*x.shape[:-1], q_w.shape[0]))


def _int8_linear_cpu(x, q_w, w_scale, bias, threshold):
    """CPU: the fused Rust LLM.int8() kernel (same numerics as the composition; see
    ``_cpu.int8_linear``) for float32 / float16 / bfloat16 x, else the composition."""
    if _cpu.int8_linear_applies(x, q_w):
        return _cpu.int8_linear(x, q_w, w_scale, bias, threshold)
    return _int8_linear(x, q_w, w_scale, bias, threshold)


# CUDA: the composition, whose inner ops dispatch to the kernels; CPU: the fused kernel.
_register(int8_linear, _int8_linear_cpu, _int8_linear, reference.int8_linear)


def _int8_linear_lora_cpu(x, q_w, w_scale, bias, threshold, x_lora, lora_a, lora_b, scale):
    base = torch.ops.nybble.int8_linear(x, q_w, w_scale, bias, threshold)  # the CPU kernel
    return _with_lora(base, x, x_lora, lora_a, lora_b, scale)


def _int8_linear_lora_cuda(x, q_w, w_scale, bias, threshold, x_lora, lora_a, lora_b, scale):
    return _cuda.int8_linear_lora(x, q_w, w_scale, bias, threshold, x_lora, lora_a, lora_b, scale, _int8_linear)


@torch.library.custom_op("nybble::int8_linear_lora", mutates_args=())
def int8_linear_lora(x: Tensor, q_w: Tensor, w_scale: Tensor, bias: Tensor | None, threshold: float,
                     x_lora: Tensor | None, lora_a: Tensor, lora_b: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """LLM.int8() linear with a LoRA term: ``(int8_linear(x) + scale * (x_lora A^T) B^T,
    x_lora A^T)``. On CUDA, M <= 64 computes x A^T by the down-projection kernel and folds
    dequantization, outlier columns, bias and the LoRA term into one epilogue kernel."""
    return reference.int8_linear_lora(x, q_w, w_scale, bias, threshold, x_lora, lora_a, lora_b, scale)


@int8_linear_lora.register_fake
def _(x, q_w, w_scale, bias, threshold, x_lora, lora_a, lora_b, scale):
    xl = x if x_lora is None else x_lora
    return x.new_empty((*x.shape[:-1], q_w.shape[0])), xl.new_empty((*xl.shape[:-1], lora_a.shape[0]))


_register(int8_linear_lora, _late(sys.modules[__name__], "_int8_linear_lora_cpu"),
          _late(sys.modules[__name__], "_int8_linear_lora_cuda"), reference.int8_linear_lora)


# ---------------------------------------------------------------------- optimizers


def _hyper(lr, beta1, beta2, eps, weight_decay, step) -> dict:
    return {"lr": float(lr), "beta1": float(beta1), "beta2": float(beta2), "eps": float(eps),
            "weight_decay": float(weight_decay), "step": int(step)}


def _constants(lr, beta1, beta2, eps, weight_decay, step) -> kopt.AdamWConstants:
    return kopt.adamw_constants(lr, beta1, beta2, eps, weight_decay, step)


_8BIT_MUTATES = ("p", "state1", "state2", "absmax1", "absmax2")


def _adamw_8bit_reference(p, g, state1, state2, absmax1, absmax2, code1, code2, lr, beta1, beta2, eps,
                          weight_decay, step, threads):
    kopt.adamw_8bit_reference(p, g, state1, state2, absmax1, absmax2, code1, code2,
                              _constants(lr, beta1, beta2, eps, weight_decay, step))


def _adamw_8bit_cpu(p, g, state1, state2, absmax1, absmax2, code1, code2, lr, beta1, beta2, eps, weight_decay,
                    step, threads):
    _cpu.adamw_8bit(p, g, state1, state2, absmax1, absmax2, code1, code2,
                    _hyper(lr, beta1, beta2, eps, weight_decay, step), threads)


def _adamw_8bit_cuda(p, g, state1, state2, absmax1, absmax2, code1, code2, lr, beta1, beta2, eps, weight_decay,
                     step, threads):
    _cuda.adamw_8bit(p, g, state1, state2, absmax1, absmax2, code1, code2,
                     _constants(lr, beta1, beta2, eps, weight_decay, step))


@torch.library.custom_op("nybble::adamw_8bit", mutates_args=_8BIT_MUTATES)
def adamw_8bit(p: Tensor, g: Tensor, state1: Tensor, state2: Tensor, absmax1: Tensor, absmax2: Tensor,
               code1: Tensor, code2: Tensor, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               step: int, threads: int | None) -> None:
    """One AdamW step with block-wise 8-bit states, in place on flat contiguous tensors."""
    _adamw_8bit_reference(p, g, state1, state2, absmax1, absmax2, code1, code2, lr, beta1, beta2, eps,
                          weight_decay, step, threads)


@adamw_8bit.register_fake
def _(*args):
    return None


_register(adamw_8bit, _adamw_8bit_cpu, _adamw_8bit_cuda, _adamw_8bit_reference)


def _adamw_32bit_reference(p, g, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, threads):
    kopt.adamw_32bit_reference(p, g, exp_avg, exp_avg_sq, _constants(lr, beta1, beta2, eps, weight_decay, step))


def _adamw_32bit_cpu(p, g, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, threads):
    _cpu.adamw_32bit(p, g, exp_avg, exp_avg_sq, _hyper(lr, beta1, beta2, eps, weight_decay, step), threads)


def _adamw_32bit_cuda(p, g, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, threads):
    _cuda.adamw_32bit(p, g, exp_avg, exp_avg_sq, _constants(lr, beta1, beta2, eps, weight_decay, step))


@torch.library.custom_op("nybble::adamw_32bit", mutates_args=("p", "exp_avg", "exp_avg_sq"))
def adamw_32bit(p: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, lr: float, beta1: float, beta2: float,
                eps: float, weight_decay: float, step: int, threads: int | None) -> None:
    """One AdamW step with float32 states, in place on flat contiguous tensors."""
    _adamw_32bit_reference(p, g, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, step, threads)


@adamw_32bit.register_fake
def _(*args):
    return None


_register(adamw_32bit, _adamw_32bit_cpu, _adamw_32bit_cuda, _adamw_32bit_reference)
