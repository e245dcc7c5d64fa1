"""Block-wise 4-bit (NF4 / FP4) and 8-bit quantization on numpy arrays and CPU torch tensors.

Bit-compatible with bitsandbytes: the tensor is flattened row-major, split into blocks of
``blocksize`` elements (blocks may span rows), each block scaled by its float32 absmax and
mapped to the nearest code. Two 4-bit codes share a byte, element ``2j`` in the high nibble.
With ``double_quant=True`` the absmaxes are themselves quantized to 8 bits (QLoRA's DQ).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _core
from ._arrays import dtype_name, flat_floats, from_core, like_input, to_numpy
from .codebooks import code_4bit, dynamic_map
from .formats import NESTED_BLOCKSIZE, QUANT_TYPES, packed_as_storage, packed_as_uint8, packed_shape, quant_storage_name


@dataclass
class NestedState:
    """Double-quantized absmax: ``absmax = code[q] * nested_absmax[i // blocksize] + offset``."""

    nested_absmax: np.ndarray  # float32 (ceil(nblocks / blocksize),)
    offset: float
    code: np.ndarray = field(default_factory=lambda: dynamic_map(signed=True))
    blocksize: int = NESTED_BLOCKSIZE


@dataclass
class QuantState4bit:
    """Everything needed to decode a packed 4-bit tensor (bitsandbytes' QuantState)."""

    shape: tuple[int, ...]
    dtype: str  # original dtype: "float32" | "float16" | "bfloat16"
    blocksize: int
    quant_type: str  # "nf4" | "fp4"
    absmax: np.ndarray  # float32 (nblocks,), or uint8 codes when ``nested`` is set
    nested: NestedState | None = None
    code: np.ndarray = field(default_factory=lambda: code_4bit("nf4"))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    def float_absmax(self, threads: int | None = None) -> np.ndarray:
        """The float32 absmax per block (decoding the double quantization if present)."""
        if self.nested is None:
            return np.ascontiguousarray(self.absmax, dtype=np.float32)
        n = self.nested
        return _core.double_dequantize(
            np.ascontiguousarray(self.absmax, dtype=np.uint8),
            np.ascontiguousarray(n.nested_absmax, dtype=np.float32),
            float(n.offset),
            np.ascontiguousarray(n.code, dtype=np.float32),
            n.blocksize,
            threads,
        )

    def bits_per_parameter(self) -> float:
        return _core.bits_per_parameter(self.numel, self.blocksize, self.double_quant)

    def to_dict(self, packed: bool = True) -> dict[str, Any]:
        """bitsandbytes' ``QuantState.as_dict``: the state-dict entries of this state (keys
        without the ``P.weight.`` prefix); see :func:`nybble.formats.quant_state_to_dict`."""
        from .formats import quant_state_to_dict

        return quant_state_to_dict(self, packed)

    @classmethod
    def from_dict(cls, items: dict[str, Any]) -> "QuantState4bit":
        """bitsandbytes' ``QuantState.from_dict``: a state from a weight's quant-state entries
        (prefixed or not, packed or not); see :func:`nybble.formats.quant_state_from_dict`."""
        from .formats import quant_state_from_dict

        return quant_state_from_dict(items)


def _check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    return quant_type


def quantize_4bit(
    x: Any,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    threads: int | None = None,
    quant_storage: Any = "uint8",
) -> tuple[Any, QuantState4bit]:
    """Packs ``x`` (float32 / float16 / bfloat16, numpy or CPU torch) into 4-bit codes.

    Returns ``(packed, state)``: ``packed`` is uint8 of shape ``((n + 1) // 2, 1)`` like
    bitsandbytes (a torch tensor if ``x`` was one); with ``quant_storage`` bfloat16 / float16 /
    float32, the same bytes viewed as that dtype, ``((n + 1) // 2 // itemsize, 1)``. Raises ``NonFiniteError`` with the first
    NaN / Inf's ``.index`` (flat), ``.position`` (in ``x``'s shape) and ``.value``.
    """
    _check_quant_type(quant_type)
    storage = quant_storage_name(quant_storage)
    flat = flat_floats(x)
    packed_shape(int(np.prod(flat.shape, dtype=np.int64)), storage)  # fails early on a bad size
    try:
        packed, absmax = _core.quantize_4bit(flat.array, flat.dtype, blocksize, quant_type, threads)
    except _core.NonFiniteError as e:
        e.locate(flat.shape)  # the core sees a flat buffer; .position needs the shape
        raise
    nested = None
    if double_quant:
        code = dynamic_map(signed=True)
        codes, nested_absmax, offset = _core.double_quantize(absmax, code, NESTED_BLOCKSIZE, threads)
        nested = NestedState(nested_absmax, float(offset), code, NESTED_BLOCKSIZE)
        absmax = codes
    state = QuantState4bit(
        shape=flat.shape,
        dtype=flat.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        absmax=absmax,
        nested=nested,
        code=code_4bit(quant_type),
    )
    packed = like_input(packed.reshape(-1, 1), flat.torch_out)
    return (packed if storage == "uint8" else packed_as_storage(packed, storage)), state


def dequantize_4bit(
    packed: Any,
    state: QuantState4bit,
    dtype: Any = None,
    threads: int | None = None,
    out: Any = None,
) -> Any:
    """Decodes a packed 4-bit tensor to ``dtype`` (default: the original dtype), shaped like
    the original. Returns torch if ``packed`` is a torch tensor.

    ``out``: a C-contiguous numpy array or CPU tensor shaped like the original, written in
    place and returned (its dtype is the output dtype), so a loop can reuse one buffer."""
    from ._arrays import is_torch_tensor, writable_floats

    p = to_numpy(packed)
    # Any quant_storage (uint8, or the same bytes as bfloat16 / float16 / float32): a view.
    p = (np.ascontiguousarray(p, dtype=np.uint8) if p.dtype.kind in "biu" else packed_as_uint8(p)).reshape(-1)
    quant_type = _check_quant_type(state.quant_type)
    if out is not None:
        target = writable_floats(out, "out")
        if tuple(out.shape) != tuple(state.shape):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(state.shape)}")
        if dtype is not None and dtype_name(dtype) != target.dtype:
            raise TypeError(f"out has dtype {target.dtype} but dtype={dtype_name(dtype)} was asked for")
        absmax = state.float_absmax(threads)
        if np.may_share_memory(target.array, p) or np.may_share_memory(target.array, absmax):
            raise ValueError("out overlaps the packed input or the absmax: it would be overwritten while read")
        _core.dequantize_4bit_into(p, absmax, state.blocksize, quant_type, target.array, target.dtype, threads)
        return out
    out_dtype = dtype_name(dtype) if dtype is not None else state.dtype
    flat = _core.dequantize_4bit(
        p, state.float_absmax(threads), state.numel, state.blocksize, quant_type, out_dtype, threads
    )
    return from_core(flat, out_dtype, tuple(state.shape), is_torch_tensor(packed))


def quantize_blockwise(
    x: Any,
    code: Any = None,
    blocksize: int = 4096,
    threads: int | None = None,
) -> tuple[Any, Any]:
    """Block-wise 8-bit quantization with a sorted 256-entry codebook (default: the signed
    dynamic map). Returns ``(codes uint8 shaped like x, absmax float32 (nblocks,))``."""
    flat = flat_floats(x)
    code = dynamic_map(signed=True) if code is None else to_numpy(code, np.float32).reshape(-1)
    try:
        codes, absmax = _core.quantize_blockwise(flat.array, flat.dtype, code, blocksize, threads)
    except _core.NonFiniteError as e:
        e.locate(flat.shape)  # the core sees a flat buffer; .position needs the shape
        raise
    return like_input(codes.reshape(flat.shape), flat.torch_out), like_input(absmax, flat.torch_out)


def dequantize_blockwise(
    codes: Any,
    absmax: Any,
    code: Any = None,
    blocksize: int = 4096,
    dtype: Any = "float32",
    threads: int | None = None,
) -> Any:
    """Inverse of :func:`quantize_blockwise`: ``code[q] * absmax[block]`` in ``dtype``."""
    from ._arrays import is_torch_tensor

    torch_out = is_torch_tensor(codes)
    shape = tuple(codes.shape)
    code = dynamic_map(signed=True) if code is None else to_numpy(code, np.float32).reshape(-1)
    out_dtype = dtype_name(dtype)
    flat = _core.dequantize_blockwise(
        to_numpy(codes, np.uint8).reshape(-1),
        to_numpy(absmax, np.float32).reshape(-1),
        code,
        blocksize,
        out_dtype,
        threads,
    )
    return from_core(flat, out_dtype, shape, torch_out)


def double_quantize(
    absmax: Any, nested_blocksize: int = NESTED_BLOCKSIZE, threads: int | None = None
) -> tuple[np.ndarray, NestedState]:
    """QLoRA double quantization of float32 block constants: returns (uint8 codes, state)."""
    code = dynamic_map(signed=True)
    a = to_numpy(absmax, np.float32).reshape(-1)
    codes, nested_absmax, offset = _core.double_quantize(a, code, nested_blocksize, threads)
    return codes, NestedState(nested_absmax, float(offset), code, nested_blocksize)


def double_dequantize(codes: Any, nested: NestedState, threads: int | None = None) -> np.ndarray:
    """Inverse of :func:`double_quantize`."""
    return _core.double_dequantize(
        to_numpy(codes, np.uint8).reshape(-1),
        to_numpy(nested.nested_absmax, np.float32).reshape(-1),
        float(nested.offset),
        to_numpy(nested.code, np.float32).reshape(-1),
        nested.blocksize,
        threads,
    )
