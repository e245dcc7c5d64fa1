"""int8 quantization: absmax and zero-point, per tensor / row / column, and LLM.int8()'s
vector-wise quantization with outlier columns (Dettmers et al., 2022)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _core
from ._arrays import flat_floats, like_input, to_numpy

GRANULARITIES = ("tensor", "row", "column")
#: LLM.int8()'s default outlier threshold.
DEFAULT_THRESHOLD = 6.0


def _matrix(x: Any):
    flat = flat_floats(x)
    if len(flat.shape) < 1:
        raise ValueError("int8 quantization needs at least a 1-D input")
    cols = flat.shape[-1] if flat.shape else 1
    rows = int(np.prod(flat.shape[:-1], dtype=np.int64)) if len(flat.shape) > 1 else 1
    return flat, rows, cols


def _check_granularity(g: str) -> str:
    if g not in GRANULARITIES:
        raise ValueError(f"granularity {g!r} is not one of {GRANULARITIES}")
    return g


@dataclass
class Int8Absmax:
    q: Any  # int8, shaped like the input
    absmax: Any  # float32 per group; scale = absmax / 127
    granularity: str


@dataclass
class Int8ZeroPoint:
    q: Any
    scale: Any  # float32 per group
    zero_point: Any  # float32 (integer-valued) per group
    granularity: str


def quantize_absmax(x: Any, granularity: str = "row", threads: int | None = None) -> Int8Absmax:
    """Symmetric int8: ``q = round(x * 127 / absmax)`` with one absmax per tensor, row
    (last axis is the column) or column."""
    flat, rows, cols = _matrix(x)
    q, absmax = _core.int8_quantize_absmax(
        flat.array, flat.dtype, rows, cols, _check_granularity(granularity), threads
    )
    return Int8Absmax(
        like_input(q.reshape(flat.shape), flat.torch_out), like_input(absmax, flat.torch_out), granularity
    )


def dequantize_absmax(state: Int8Absmax, threads: int | None = None) -> np.ndarray:
    q = to_numpy(state.q, np.int8)
    rows = int(np.prod(q.shape[:-1], dtype=np.int64)) if q.ndim > 1 else 1
    out = _core.int8_dequantize_absmax(
        q.reshape(-1), to_numpy(state.absmax, np.float32).reshape(-1), rows, q.shape[-1],
        state.granularity, threads,
    )
    return out.reshape(q.shape)


def quantize_zeropoint(x: Any, granularity: str = "row", threads: int | None = None) -> Int8ZeroPoint:
    """Asymmetric int8: each group's [min, max] maps onto [-128, 127]."""
    flat, rows, cols = _matrix(x)
    q, scale, zp = _core.int8_quantize_zeropoint(
        flat.array, flat.dtype, rows, cols, _check_granularity(granularity), threads
    )
    t = flat.torch_out
    return Int8ZeroPoint(like_input(q.reshape(flat.shape), t), like_input(scale, t), like_input(zp, t), granularity)


def dequantize_zeropoint(state: Int8ZeroPoint, threads: int | None = None) -> np.ndarray:
    q = to_numpy(state.q, np.int8)
    rows = int(np.prod(q.shape[:-1], dtype=np.int64)) if q.ndim > 1 else 1
    out = _core.int8_dequantize_zeropoint(
        q.reshape(-1),
        to_numpy(state.scale, np.float32).reshape(-1),
        to_numpy(state.zero_point, np.float32).reshape(-1),
        rows,
        q.shape[-1],
        state.granularity,
        threads,
    )
    return out.reshape(q.shape)


def outlier_columns(x: Any, threshold: float = DEFAULT_THRESHOLD, threads: int | None = None) -> Any:
    """Indices of the columns (last axis) holding any ``|x| >= threshold``."""
    flat, rows, cols = _matrix(x)
    out = _core.int8_outlier_columns(flat.array, flat.dtype, rows, cols, float(threshold), threads)
    return like_input(out, flat.torch_out)


def vectorwise_quant(
    x: Any, threshold: float = DEFAULT_THRESHOLD, threads: int | None = None
) -> tuple[Any, Any, Any]:
    """LLM.int8()'s quantization of one matmul operand (bitsandbytes' ``int8_vectorwise_quant``).

    Returns ``(q, row_absmax, outlier_cols)``: row-wise int8 with outlier columns zeroed,
    the per-row absmax over non-outlier elements, and the outlier column indices.
    ``threshold=0`` disables outlier extraction."""
    flat, rows, cols = _matrix(x)
    q, stats, cols_out = _core.int8_vectorwise_quant(flat.array, flat.dtype, rows, cols, float(threshold), threads)
    t = flat.torch_out
    return like_input(q.reshape(flat.shape), t), like_input(stats, t), like_input(cols_out, t)
