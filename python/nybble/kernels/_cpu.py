"""CPU side of nybble.kernels: the Rust core on zero-copy numpy views of CPU tensors.

Decoding runs as torch custom ops (``nybble::decode_absmax``, ``nybble::dequantize_4bit``)
so torch.compile treats each as one opaque call (with a fake for shapes) instead of breaking
the graph at the Rust extension.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _core

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def np_view(t: torch.Tensor) -> np.ndarray:
    """A zero-copy 1-D numpy view of a CPU tensor made contiguous (16-bit floats as uint16);
    for a contiguous tensor it shares its memory, so the core may write through it."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@torch.library.custom_op("nybble::decode_absmax", mutates_args=())
def decode_absmax(
    codes: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: torch.Tensor, blocksize: int
) -> torch.Tensor:
    # The offset arrives as a 0-d / 1-element tensor: reading it as a Python float here,
    # inside the op, keeps torch.compile from tracing a data-dependent scalar.
    out = _core.double_dequantize(np_view(codes), np_view(nested_absmax), float(offset.reshape(())),
                                  np_view(nested_code), blocksize)
    return torch.from_numpy(out)


@decode_absmax.register_fake
def _(codes, nested_absmax, nested_code, offset, blocksize):
    return codes.new_empty(codes.shape, dtype=torch.float32)


@torch.library.custom_op("nybble::dequantize_4bit", mutates_args=())
def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, rows: int, cols: int, blocksize: int, quant_type: str, dtype: torch.dtype
) -> torch.Tensor:
    core_dtype = DTYPE_NAMES[dtype]
    flat = _core.dequantize_4bit(np_view(packed), np_view(absmax), rows * cols, blocksize, quant_type, core_dtype)
    out = torch.from_numpy(flat) if core_dtype == "float32" else torch.from_numpy(flat.view(np.int16)).view(dtype)
    return out.reshape(rows, cols)


@dequantize_4bit.register_fake
def _(packed, absmax, rows, cols, blocksize, quant_type, dtype):
    return packed.new_empty((rows, cols), dtype=dtype)


def double_quantize(absmax: torch.Tensor, nested_blocksize: int = 256):
    """(uint8 codes, nested absmax, signed dynamic code, float offset) of a float32 absmax."""
    code = torch.from_numpy(_core.dynamic_map(True))
    codes, nested_absmax, offset = _core.double_quantize(np_view(absmax.float()), np_view(code), nested_blocksize)
    return torch.from_numpy(codes), torch.from_numpy(nested_absmax), code, float(offset)
