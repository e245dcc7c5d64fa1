"""Code tables: NF4, FP4 (bitsandbytes' layout) and the 8-bit dynamic map."""

from __future__ import annotations

import numpy as np

from . import _core

#: QLoRA's NF4 offset: the outermost quantile used to build the table.
NF4_OFFSET = 0.9677083


def code_4bit(quant_type: str = "nf4") -> np.ndarray:
    """The 16 float32 levels of ``"nf4"`` or ``"fp4"``, index = 4-bit code."""
    return _core.code_4bit(quant_type)


def nf4() -> np.ndarray:
    return code_4bit("nf4")


def fp4() -> np.ndarray:
    return code_4bit("fp4")


def nf4_from_normal_quantiles(offset: float = NF4_OFFSET) -> np.ndarray:
    """Rebuilds NF4 from quantiles of N(0, 1) as in the QLoRA paper (15 of 16 entries match
    the shipped table exactly in float32; use :func:`nf4` for quantization)."""
    return _core.nf4_from_normal_quantiles(offset)


def dynamic_map(signed: bool = True) -> np.ndarray:
    """bitsandbytes' 256-entry dynamic map (``create_dynamic_map(signed, 7, 8)``)."""
    return _core.dynamic_map(signed)
