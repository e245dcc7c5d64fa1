"""Error statistics between a reference tensor and its approximation (computed in float64)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import _core
from ._arrays import flat_floats


@dataclass(frozen=True)
class ErrorStats:
    n: int
    rmse: float
    max_abs: float
    mean_abs: float
    sqnr_db: float  # 10 log10(sum x^2 / sum (x - y)^2); inf when equal


def error_stats(reference: Any, approx: Any, threads: int | None = None) -> ErrorStats:
    """RMSE, max / mean absolute error and SQNR of ``approx`` against ``reference``
    (any mix of float32 / float16 / bfloat16, numpy or CPU torch, same element count)."""
    a = flat_floats(reference, "reference")
    b = flat_floats(approx, "approx")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: reference {a.shape} vs approx {b.shape}")
    return ErrorStats(**_core.error_stats(a.array, a.dtype, b.array, b.dtype, threads))
