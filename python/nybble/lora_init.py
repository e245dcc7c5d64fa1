"""Adapter initialisations and weight statistics that need the base weight, computed over
nybble's packed layers without keeping a dense copy of the model.

* :func:`loftq` (Li et al., 2023): adapters (A, B) such that ``Q + s B A`` approximates the
  original dense ``W`` (``Q`` the packed base), alternating ``T`` times between quantizing
  ``W - s B A`` into the base and the best rank-r fit of ``W - Q`` (exact SVD). With
  ``T = 1`` the packed base is kept as it is and only the adapters change.
* :func:`pissa` (Meng et al., 2024): A, B from the top-r singular triplets of ``W``, the
  residual ``W - s B A`` quantized into the base.
* :func:`row_norms`: the per-output-row L2 norm of ``W + s B A`` decoded block of rows by
  block of rows (DoRA's magnitude), never the whole dense W.
* :class:`DenseWeights`: the original dense weights, read one tensor at a time from a
  safetensors file or folder (or taken from a dict), for LoftQ / PiSSA.

Each function works on one layer: one dense (out, in) float32 weight at a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import formats

__all__ = ["DenseWeights", "loftq", "pissa", "row_norms"]

#: Elements decoded at once by :func:`row_norms` (a block of rows of about this size).
ROW_BLOCK_ELEMENTS = 1 << 22


def _is_quantized(base: nn.Module) -> bool:
    from .nn import Linear4bit, Linear8bitLt

    return isinstance(base, (Linear4bit, Linear8bitLt))


def _check_base(base: nn.Module, what: str) -> None:
    if not _is_quantized(base):
        raise ValueError(f"{what} initialises adapters over a quantized base (nybble.nn.Linear4bit / Linear8bitLt), "
                         f"got {type(base).__name__}; quantize the model first (nybble.quantize_model or "
                         f"from_pretrained(..., quantization_config=nybble.NybbleConfig()))")


def _dense(base: nn.Module) -> torch.Tensor:
    return base.dequantized_weight(torch.float32)


#: Up to this many columns (the smaller side) an SVD runs on one thread: LAPACK's threaded
#: SVD gains little at these sizes and, on a CPU busy with other work, its spinning threads
#: made it 10x slower than one thread (measured on the 2-core dev machine).
SVD_ONE_THREAD_MAX = 2048


def _svd(m: torch.Tensor):
    if m.device.type != "cpu" or min(m.shape) > SVD_ONE_THREAD_MAX:
        return torch.linalg.svd(m, full_matrices=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.svd(m, full_matrices=False)
    finally:
        torch.set_num_threads(threads)


def _low_rank(residual: torch.Tensor, r: int, scaling: float, niter: int | None = None, oversample: int = 0):
    """``(A, B)`` with ``scaling * B A`` the best rank-r approximation of ``residual`` (float32):
    exact SVD for ``niter=None``, else the randomized SVD (``torch.svd_lowrank``) with ``niter``
    power iterations on ``r + oversample`` columns."""
    q = min(r + oversample, *residual.shape)
    if niter is None or q >= min(residual.shape):
        u, s, vh = _svd(residual)
    else:
        u, s, v = torch.svd_lowrank(residual, q=q, niter=niter)
        vh = v.t()
    u, s, vh = u[:, :r], s[:r], vh[:r]
    root = torch.sqrt(s / scaling)
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def _check_dense(base: nn.Module, w: torch.Tensor) -> torch.Tensor:
    w = w.detach()
    if tuple(w.shape) != (base.out_features, base.in_features):
        raise ValueError(f"dense weight {tuple(w.shape)} does not fit a ({base.out_features}, {base.in_features}) layer")
    return w.to(_device_of(base), torch.float32)


def _device_of(base: nn.Module) -> torch.device:
    return base.weight.device


@torch.no_grad()
def loftq(base: nn.Module, w: torch.Tensor, r: int, scaling: float, iters: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """LoftQ over a packed base: returns float32 ``(A (r, in), B (out, r))``; for ``iters > 1``
    the base's packed weight is replaced by the quantization of ``W - scaling * B A`` of the
    previous iteration (the base's own format)."""
    _check_base(base, "LoftQ")
    if iters < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iters}")
    w = _check_dense(base, w)
    a = b = None
    for t in range(iters):
        if t > 0:
            base.set_weight((w - scaling * (b @ a)).to(w.dtype))
        # Exact SVD: the quantization residual has a nearly flat spectrum, on which a
        # randomized SVD finds little of the best rank-r part.
        a, b = _low_rank(w - _dense(base), r, scaling)
    return a, b


@torch.no_grad()
def pissa(base: nn.Module, w: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """PiSSA over a packed base: ``(A, B)`` from the top-r singular triplets of ``W``, the
    residual ``W - scaling * B A`` quantized into the base. ``niter`` uses the randomized SVD
    (``pissa_niter_<n>``)."""
    _check_base(base, "PiSSA")
    w = _check_dense(base, w)
    a, b = _low_rank(w, r, scaling, niter)
    base.set_weight(w - scaling * (b @ a))
    return a, b


def _row_step(base: nn.Module) -> int:
    """Rows per decode step: a block of rows must start on a quantization block (4-bit)."""
    from .nn import Linear4bit

    if not isinstance(base, Linear4bit):
        return 1
    return base.blocksize // math.gcd(base.in_features, base.blocksize)


@torch.no_grad()
def row_norms(base: nn.Module, lora_b: torch.Tensor | None = None, lora_a: torch.Tensor | None = None,
              scaling: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``||W[i] + scaling * (B A)[i]||_2`` for every output row ``i`` of a packed (or dense)
    layer, in float32, decoding about :data:`ROW_BLOCK_ELEMENTS` weights at a time."""
    from . import kernels
    from .nn import Linear4bit, Linear8bitLt

    out_f, in_f = base.out_features, base.in_features
    step = _row_step(base)
    rows = max(step, (ROW_BLOCK_ELEMENTS // max(in_f, 1)) // step * step)
    device = base.weight.device
    norms = torch.empty(out_f, dtype=torch.float32, device=device)
    if isinstance(base, Linear4bit):
        packed, absmax = base.packed_uint8().reshape(-1), base.float_absmax().reshape(-1)
    delta_dtype = torch.float32
    for i0 in range(0, out_f, rows):
        i1 = min(out_f, i0 + rows)
        if isinstance(base, Linear4bit):
            start, stop = i0 * in_f, i1 * in_f
            blk = kernels.dequantize_4bit(packed[start // 2:(stop + 1) // 2],
                                          absmax[start // base.blocksize:-(-stop // base.blocksize)],
                                          (i1 - i0, in_f), base.blocksize, base.quant_type, torch.float32)
        elif isinstance(base, Linear8bitLt):
            blk = formats.int8_dequantize(base.weight[i0:i1], base.SCB[i0:i1])
        else:
            blk = base.weight[i0:i1].detach().float()
        if lora_b is not None:
            blk = blk + scaling * (lora_b[i0:i1].to(delta_dtype) @ lora_a.to(delta_dtype))
        norms[i0:i1] = torch.linalg.vector_norm(blk, dim=1)
    return norms.to(dtype)


class DenseWeights:
    """The original dense weights of a model, by module name, for LoftQ / PiSSA.

    ``source`` is a safetensors file, a folder of them (a model folder, sharded or not), a
    mapping ``name -> tensor`` (module or ``.weight`` names) or a callable ``name -> tensor``.
    Checkpoint keys are matched with or without ``base_model_prefix`` (``"model."`` ...).
    Tensors are read one at a time."""

    def __init__(self, source: Any, base_model_prefix: str = ""):
        self.prefix = base_model_prefix or ""
        self._get: Callable[[str], torch.Tensor | None]
        if callable(source) and not isinstance(source, Mapping):
            self._get = source
            return
        if isinstance(source, Mapping):
            table = dict(source)
            self._get = table.get
            return
        path = Path(os.fspath(source))
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.exists() for f in files):
            raise FileNotFoundError(f"{path}: no safetensors weights to read the dense weights from")
        from safetensors import safe_open

        self._files: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self._files[k] = f

        def read(key: str) -> torch.Tensor | None:
            f = self._files.get(key)
            if f is None:
                return None
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(key)

        self._get = read

    def _candidates(self, name: str) -> list[str]:
        names = [name, f"{name}.weight"]
        if self.prefix:
            bare = name.removeprefix(self.prefix + ".")
            names += [bare, f"{bare}.weight", f"{self.prefix}.{name}", f"{self.prefix}.{name}.weight"]
        return names

    def get(self, name: str) -> torch.Tensor:
        """The dense weight of module ``name``; ``KeyError`` when the source lacks it."""
        for key in self._candidates(name):
            value = self._get(key)
            if value is not None:
                return value
        raise KeyError(f"no dense weight for module {name!r} (tried {self._candidates(name)})")


def source_weight(base: nn.Module) -> torch.Tensor | None:
    """The dense weight a layer was quantized from by ``from_pretrained(..., NybbleConfig())``
    (file and key recorded at load), ``None`` when unknown."""
    src = getattr(base, "_nybble_dense_source", None)
    if src is None:
        return None
    from safetensors import safe_open

    file, key = src
    with safe_open(str(file), framework="pt") as h:
        w = h.get_tensor(key)
    return w.t() if getattr(base, "_nybble_transpose", False) else w
