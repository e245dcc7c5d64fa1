"""Moving arrays between numpy / torch and the Rust core without copies.

The core takes 1-D C-contiguous arrays: float32 as float32, float16 and bfloat16 as their
uint16 bit patterns plus a dtype name. numpy has no bfloat16, so bfloat16 arrays are
``ml_dtypes.bfloat16`` on the numpy side and ``torch.bfloat16`` on the torch side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np

FLOAT_DTYPES = ("float32", "float16", "bfloat16")

_NUMPY_NAMES = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(ml_dtypes.bfloat16): "bfloat16",
}


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is an optional extra
        return None
    return torch


def is_torch_tensor(x: Any) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass(frozen=True)
class FlatFloats:
    """A float input flattened for the core, and how to give results back."""

    array: np.ndarray  # 1-D contiguous float32 or uint16 bits
    dtype: str  # "float32" | "float16" | "bfloat16"
    shape: tuple[int, ...]
    torch_out: bool  # the caller passed a torch tensor: return torch tensors


def flat_floats(x: Any, what: str = "input") -> FlatFloats:
    """Views a numpy array or CPU torch tensor of float32 / float16 / bfloat16 as 1-D."""
    if is_torch_tensor(x):
        torch = _torch()
        if x.device.type != "cpu":
            raise ValueError(
                f"{what} is on {x.device}; the Rust core works on CPU tensors "
                "(GPU tensors go through nybble.kernels)"
            )
        names = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
        if x.dtype not in names:
            raise TypeError(f"{what} has dtype {x.dtype}; expected float32, float16 or bfloat16")
        t = x.detach().contiguous().reshape(-1)
        if x.dtype == torch.float32:
            arr = t.numpy()
        else:
            arr = t.view(torch.int16).numpy().view(np.uint16)
        return FlatFloats(arr, names[x.dtype], tuple(x.shape), True)
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    name = _NUMPY_NAMES.get(x.dtype)
    if name is None:
        raise TypeError(
            f"{what} has dtype {x.dtype}; expected float32, float16 or bfloat16 "
            "(ml_dtypes.bfloat16). Cast it first, e.g. x.astype(np.float32)"
        )
    arr = np.ascontiguousarray(x).reshape(-1)
    if name != "float32":
        arr = arr.view(np.uint16)
    return FlatFloats(arr, name, tuple(x.shape), False)


def writable_floats(out: Any, what: str = "out") -> FlatFloats:
    """A 1-D view of a caller's float output buffer that the core writes in place. Never a
    copy: a buffer that cannot be viewed (non-contiguous, read-only, on a GPU) is an error."""
    if is_torch_tensor(out):
        if out.device.type != "cpu":
            raise ValueError(f"{what} is on {out.device}; the Rust core writes CPU tensors")
        if out.requires_grad:
            raise ValueError(f"{what} requires grad; pass a tensor without autograd history")
    elif not isinstance(out, np.ndarray):
        raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(out).__name__}")
    elif not out.flags.writeable:
        raise ValueError(f"{what} is read-only")
    if not (out.is_contiguous() if is_torch_tensor(out) else out.flags.c_contiguous):
        raise ValueError(f"{what} must be C-contiguous")
    return flat_floats(out, what)


def check_float_dtype(name: str) -> str:
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {FLOAT_DTYPES}")
    return name


def dtype_name(dtype: Any) -> str:
    """Normalizes a dtype given as a string, numpy dtype or torch dtype to its name."""
    if isinstance(dtype, str):
        return check_float_dtype(dtype.replace("torch.", ""))
    torch = _torch()
    if torch is not None and isinstance(dtype, torch.dtype):
        return check_float_dtype(str(dtype).replace("torch.", ""))
    name = _NUMPY_NAMES.get(np.dtype(dtype))
    if name is None:
        raise ValueError(f"dtype {dtype!r} is not one of {FLOAT_DTYPES}")
    return name


def from_core(arr: np.ndarray, dtype: str, shape: tuple[int, ...], torch_out: bool) -> Any:
    """Wraps a float result of the core (uint16 bits for 16-bit types) without copying."""
    if torch_out:
        torch = _torch()
        if dtype == "float32":
            return torch.from_numpy(arr).reshape(shape)
        t = torch.from_numpy(arr.view(np.int16))
        return t.view(torch.float16 if dtype == "float16" else torch.bfloat16).reshape(shape)
    if dtype == "float32":
        return arr.reshape(shape)
    np_dtype = np.float16 if dtype == "float16" else ml_dtypes.bfloat16
    return arr.view(np_dtype).reshape(shape)


def to_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """A numpy view (or copy when it must) of an array-like of any dtype."""
    if is_torch_tensor(x):
        x = x.detach().cpu()
        torch = _torch()
        if x.dtype == torch.bfloat16:
            return x.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        x = x.numpy()
    arr = np.asarray(x)
    return arr if dtype is None else np.ascontiguousarray(arr, dtype=dtype)


def like_input(arr: np.ndarray, torch_out: bool) -> Any:
    """Returns a non-float result (codes, scales) as a torch tensor when the input was one."""
    if torch_out:
        return _torch().from_numpy(arr)
    return arr
