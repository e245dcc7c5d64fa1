"""GPU side of nybble.optim: the fused AdamW kernels of ``cuda/optim_8bit.cu`` (CuPy, NVRTC,
launched on torch's current stream over torch-owned memory), and a torch implementation of
the same math that serves CUDA users without CuPy and that tests compare against.

Both take the per-step constants from :func:`adamw_constants`, computed exactly as the Rust
core computes them. The kernels round every operation explicitly (no FMA contraction), so
they give the CPU core's bits; the torch reference agrees to an ulp or so (torch's CPU
division is not always correctly rounded), which can move an 8-bit code to its neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .reference import nearest_code

KERNEL_FILE = "optim_8bit.cu"
STATE_BLOCKSIZE = 256
_THREADS = 256


@dataclass(frozen=True)
class AdamWConstants:
    beta1: float
    beta2: float
    omb1: float
    omb2: float
    decay: float
    step_size: float
    bc2_sqrt: float
    eps: float

    def as_args(self) -> tuple[np.float32, ...]:
        return tuple(np.float32(v) for v in (self.beta1, self.beta2, self.omb1, self.omb2, self.decay,
                                              self.step_size, self.bc2_sqrt, self.eps))


def adamw_constants(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> AdamWConstants:
    """The rust core's per-step constants: inputs rounded to float32, arithmetic in float64,
    results rounded to float32."""
    f = lambda x: float(np.float32(x))  # noqa: E731
    lr, b1, b2, eps, wd = f(lr), f(beta1), f(beta2), f(eps), f(weight_decay)
    bc1 = 1.0 - b1**step
    bc2 = 1.0 - b2**step
    return AdamWConstants(b1, b2, f(1.0 - b1), f(1.0 - b2), f(1.0 - lr * wd), f(lr / bc1), f(math.sqrt(bc2)), eps)


def cupy_available() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


# ---------------------------------------------------------------------- torch reference


def _update(c: AdamWConstants, p, g, m, v):
    # Full tensors, not scalars: torch divides by a scalar through its reciprocal, which
    # can differ from a true division in the last bit.
    f32 = lambda x: torch.full_like(p, x, dtype=torch.float32)  # noqa: E731
    p = p * f32(c.decay)
    m = m * f32(c.beta1) + g * f32(c.omb1)
    v = v * f32(c.beta2) + (g * g) * f32(c.omb2)
    denom = v.sqrt() / f32(c.bc2_sqrt) + f32(c.eps)
    return p - f32(c.step_size) * (m / denom), m, v


@torch.no_grad()
def adamw_32bit_reference(p, g, exp_avg, exp_avg_sq, c: AdamWConstants) -> None:
    pn, m, v = _update(c, p.float(), g.float(), exp_avg, exp_avg_sq)
    p.copy_(pn.to(p.dtype))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


@torch.no_grad()
def adamw_8bit_reference(p, g, state1, state2, absmax1, absmax2, code1, code2, c: AdamWConstants,
                         blocksize: int = STATE_BLOCKSIZE) -> None:
    """In place on flat tensors; the same result as the Rust core and the CUDA kernel."""
    n = p.numel()
    nb = absmax1.numel()
    pad = nb * blocksize - n

    def blocks(t):
        t = t.reshape(-1)
        return torch.nn.functional.pad(t, (0, pad)).reshape(nb, blocksize)

    m = code1[blocks(state1).long()] * absmax1[:, None]
    v = code2[blocks(state2).long()] * absmax2[:, None]
    pn, m, v = _update(c, blocks(p.float()), blocks(g.float()), m, v)
    if pad:
        # The padding lanes are not elements: keep them out of the block maximum.
        valid = torch.arange(nb * blocksize, device=p.device).reshape(nb, blocksize) < n
        m, v = m * valid, v * valid
    new1 = m.abs().amax(dim=1)
    new2 = v.abs().amax(dim=1)
    q1 = nearest_code(code1, m / new1.clamp(min=1e-38)[:, None])
    q2 = nearest_code(code2, v / new2.clamp(min=1e-38)[:, None])
    p.reshape(-1).copy_(pn.reshape(-1)[:n].to(p.dtype))
    state1.reshape(-1).copy_(q1.reshape(-1)[:n])
    state2.reshape(-1).copy_(q2.reshape(-1)[:n])
    absmax1.copy_(new1)
    absmax2.copy_(new2)


# ---------------------------------------------------------------------- CUDA kernels


def launch_adamw_8bit(p, g, state1, state2, absmax1, absmax2, code1, code2, c: AdamWConstants) -> None:
    from . import _cupy
    from ._cupy import _check, _suffix

    _check(p, "param")
    _check(g, "grad", p.dtype)
    for t, name in ((state1, "state1"), (state2, "state2")):
        _check(t, name, torch.uint8)
    for t, name in ((absmax1, "absmax1"), (absmax2, "absmax2"), (code1, "code1"), (code2, "code2")):
        _check(t, name, torch.float32)
    n = p.numel()
    nb = -(-n // STATE_BLOCKSIZE)
    if absmax1.numel() != nb or absmax2.numel() != nb or state1.numel() != n or state2.numel() != n:
        raise ValueError("8-bit optimizer state sizes do not match the parameter")
    if code1.numel() != 256 or code2.numel() != 256:
        raise ValueError("code tables must have 256 entries")
    if n == 0:
        return
    _cupy._launch(
        KERNEL_FILE, f"nybble_adamw_8bit_{_suffix(p.dtype)}", p.device.index, (nb,), (_THREADS,),
        (_cupy._ptr(p), _cupy._ptr(g), _cupy._ptr(state1), _cupy._ptr(state2), _cupy._ptr(absmax1),
         _cupy._ptr(absmax2), _cupy._ptr(code1), _cupy._ptr(code2), np.int64(n), *c.as_args()),
    )


def launch_adamw_32bit(p, g, exp_avg, exp_avg_sq, c: AdamWConstants) -> None:
    from . import _cupy
    from ._cupy import _check, _suffix

    _check(p, "param")
    _check(g, "grad", p.dtype)
    _check(exp_avg, "exp_avg", torch.float32)
    _check(exp_avg_sq, "exp_avg_sq", torch.float32)
    n = p.numel()
    if exp_avg.numel() != n or exp_avg_sq.numel() != n:
        raise ValueError("optimizer state sizes do not match the parameter")
    if n == 0:
        return
    sms = torch.cuda.get_device_properties(p.device).multi_processor_count
    grid = min(-(-n // _THREADS), sms * 32)
    _cupy._launch(
        KERNEL_FILE, f"nybble_adamw_32bit_{_suffix(p.dtype)}", p.device.index, (grid,), (_THREADS,),
        (_cupy._ptr(p), _cupy._ptr(g), _cupy._ptr(exp_avg), _cupy._ptr(exp_avg_sq), np.int64(n), *c.as_args()),
    )
