"""CPU implementations of the ``nybble::`` ops: the Rust core on zero-copy numpy views of CPU
tensors (multithreaded, GIL released), torch where the core has no kernel of its own.

Each function has the op's signature; ``ops`` registers them as the ``CPU`` kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _core
from . import optim as kopt
from . import reference

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def np_view(t: torch.Tensor) -> np.ndarray:
    """A zero-copy 1-D numpy view of a CPU tensor made contiguous (16-bit floats as uint16);
    for a contiguous tensor it shares its memory, so the core may write through it."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _from_core(flat: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over an array the core returned (16-bit floats come back as uint16 bits)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.from_numpy(flat.view(np.int16)).view(dtype)
    return torch.from_numpy(flat)


def decode_absmax(codes, nested_absmax, nested_code, offset, nested_blocksize):
    # The offset arrives as a one-element tensor: reading it as a float here, inside the op,
    # keeps torch.compile from tracing a data-dependent scalar.
    out = _core.double_dequantize(np_view(codes), np_view(nested_absmax.float()), float(offset.reshape(())),
                                  np_view(nested_code.float()), nested_blocksize)
    return torch.from_numpy(out)


def double_quantize(absmax, nested_blocksize):
    code = torch.from_numpy(_core.dynamic_map(True))
    codes, nested_absmax, offset = _core.double_quantize(np_view(absmax.float()), np_view(code), nested_blocksize)
    return (torch.from_numpy(codes), torch.from_numpy(nested_absmax), code,
            torch.tensor(float(offset), dtype=torch.float32))


def dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype):
    if dtype not in DTYPE_NAMES:  # float64 (exact products) and others: the torch reference
        return reference.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    n = reference.numel(shape)
    flat = _core.dequantize_4bit(np_view(packed), np_view(absmax.float()), n, blocksize, quant_type,
                                 DTYPE_NAMES[dtype])
    return _from_core(flat, dtype).reshape(tuple(shape))


def quantize_4bit(w, blocksize, quant_type):
    from ..quant import quantize_4bit as core_quantize  # raises NonFiniteError with the position

    packed, state = core_quantize(w.detach(), blocksize, quant_type)
    return packed.reshape(-1, 1), torch.from_numpy(state.absmax)


def matmul_4bit(x, packed, absmax, shape, blocksize, quant_type, bias):
    # Decode W once into x's dtype (float64: exact products), then one BLAS call.
    w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def int8_vectorwise_quant(x, threshold):
    from .. import int8 as core_int8

    x = x.detach()
    if x.dtype not in DTYPE_NAMES:
        x = x.float()  # e.g. float64 in gradcheck: the codes come from its float32 values
    q, row_absmax, cols = core_int8.vectorwise_quant(x, threshold)
    return q, row_absmax, cols.to(torch.int64)


def int8_matmul(a, b):
    # float64 holds every int32 accumulation exactly (|acc| < 2^53).
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype):
    return reference.int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype)


def adamw_8bit(p, g, state1, state2, absmax1, absmax2, code1, code2, h: dict, threads: int | None) -> None:
    dt = DTYPE_NAMES[p.dtype]
    hp = (h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"])
    _core.adamw_step_8bit(np_view(p), np_view(g), dt, state1.numpy(), state2.numpy(), absmax1.numpy(),
                          absmax2.numpy(), np_view(code1), np_view(code2), kopt.STATE_BLOCKSIZE, *hp, threads=threads)


def adamw_32bit(p, g, exp_avg, exp_avg_sq, h: dict, threads: int | None) -> None:
    dt = DTYPE_NAMES[p.dtype]
    hp = (h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"])
    _core.adamw_step_32bit(np_view(p), np_view(g), dt, exp_avg.numpy(), exp_avg_sq.numpy(), *hp, threads=threads)
