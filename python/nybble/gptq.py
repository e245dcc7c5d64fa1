"""GPTQ (Frantar et al., 2022) into plain bitsandbytes NF4 / FP4.

Round-to-nearest (RTN) picks each 4-bit code on its own. GPTQ picks them column by column
and feeds each rounding error back into the columns not yet rounded, weighted by the inverse
Hessian of the layer's reconstruction loss ``‖XWᵀ - XŴᵀ‖²`` (``H = 2XᵀX`` over calibration
inputs ``X``). The result is stored exactly as RTN's is (one code per weight, one float32
absmax per block of ``blocksize`` elements, optionally double-quantized), so every
bitsandbytes reader loads it unchanged.

- :class:`HessianFactor` / :func:`gptq_quantize`: one weight (the Rust core on the CPU,
  torch on CUDA; the algorithm and its choices are documented in ``rust/core/src/gptq.rs``).
- :func:`quantize_model`: a whole torch model, one transformer block at a time
  (true-sequential: each block's inputs come from the blocks before it, already quantized;
  inside a block, layers reading the same input are quantized together, in execution order),
  returning the model with :class:`nybble.nn.Linear4bit` layers and a per-layer
  :class:`GptqSummary` of the calibration output error, RTN vs GPTQ.
"""

from __future__ import annotations

import functools
import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _core, formats, kernels
from .codebooks import code_4bit
from .nn import Linear4bit

__all__ = [
    "DEFAULT_DAMP",
    "DEFAULT_LAZY_BLOCK",
    "GptqSummary",
    "HessianFactor",
    "LayerReport",
    "find_blocks",
    "gptq_quantize",
    "quantize_model",
    "relative_output_error",
]

DEFAULT_DAMP = 0.01
DEFAULT_LAZY_BLOCK = 128
#: How often the damping is multiplied by 10 when a Hessian is not positive definite.
DAMP_RETRIES = 4
_MIN_ABSMAX = 1e-38
_OBJECTIVES = ("sequential", "diagonal")


# ----------------------------------------------------------------------------- one weight


def _is_not_positive_definite(err: BaseException) -> bool:
    return isinstance(err, torch.linalg.LinAlgError) or (isinstance(err, ValueError) and hasattr(err, "pivot"))


class HessianFactor:
    """The damped inverse-Hessian factor of one layer input, shared by every weight that
    reads it (a transformer's q / k / v projections, for example).

    ``h`` is ``2XᵀX`` (k x k; numpy or torch, any float dtype; used in float64). The factor
    lives on ``device`` (default: ``h``'s): on the CPU the Rust core computes it (float64,
    rayon), elsewhere torch does (``dtype``, float64 by default). ``backend="torch"`` forces
    torch on the CPU too (tests). When the damped Hessian is not positive definite the
    damping is multiplied by 10 (0 becomes 1e-4), up to :data:`DAMP_RETRIES` times, with a
    warning;
    :attr:`damp` is the relative damping finally used.
    """

    def __init__(
        self,
        h: Any,
        damp: float = DEFAULT_DAMP,
        act_order: bool = False,
        device: str | torch.device | None = None,
        threads: int | None = None,
        backend: str = "auto",
        dtype: torch.dtype = torch.float64,
        name: str = "",
    ):
        h = torch.as_tensor(h)
        if h.ndim != 2 or h.shape[0] != h.shape[1]:
            raise ValueError(f"the Hessian must be square, got shape {tuple(h.shape)}")
        if backend not in ("auto", "rust", "torch"):
            raise ValueError(f"backend {backend!r} is not 'auto', 'rust' or 'torch'")
        self.k = int(h.shape[0])
        self.device = torch.device(device) if device is not None else h.device
        self.act_order = bool(act_order)
        self.threads = threads
        self.dtype = dtype
        self.backend = ("rust" if self.device.type == "cpu" else "torch") if backend == "auto" else backend
        if self.backend == "rust" and self.device.type != "cpu":
            raise ValueError("the Rust backend runs on the CPU")
        self._h = h
        self._rust = None
        self._torch = None
        self.damp = float(damp)
        for attempt in range(DAMP_RETRIES + 1):
            try:
                if self.backend == "rust":
                    self._rust = self._rust_factor(self.damp)
                else:
                    self._torch = self._torch_factor(self.damp)
                break
            except (ValueError, torch.linalg.LinAlgError) as err:
                if not _is_not_positive_definite(err) or attempt == DAMP_RETRIES:
                    raise
                where = f" for {name}" if name else ""
                raised = 10 * self.damp if self.damp > 0 else DEFAULT_DAMP / 100
                warnings.warn(f"GPTQ: the damped Hessian{where} is not positive definite with damp "
                              f"{self.damp:g}; retrying with {raised:g}", stacklevel=2)
                self.damp = raised

    def _rust_factor(self, damp: float):
        h = np.ascontiguousarray(self._h.detach().to("cpu", torch.float64).numpy()).reshape(-1)
        return _core.GptqHessian(h, self.k, damp, self.act_order, self.threads)

    def _torch_factor(self, damp: float):
        h = self._h.detach().to(self.device, self.dtype)
        h = (h + h.T) / 2
        diag = h.diagonal()
        dead = diag == 0
        h[dead, dead] = 1.0
        diag = h.diagonal().clone()
        k = self.k
        perm = (torch.argsort(diag, descending=True, stable=True) if self.act_order
                else torch.arange(k, device=self.device))
        hp = h[perm][:, perm]
        hp.diagonal().add_(damp * diag.mean())
        lower = torch.linalg.cholesky(hp)
        u = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
        return u.contiguous(), perm, dead

    @property
    def perm(self) -> torch.Tensor:
        """Processing order: column ``perm[t]`` is rounded at step ``t`` (int64, CPU)."""
        if self._rust is not None:
            return torch.from_numpy(self._rust.perm())
        return self._torch[1].cpu()

    @property
    def dead_columns(self) -> int:
        if self._rust is not None:
            return self._rust.dead_columns
        return int(self._torch[2].sum())

    def upper(self) -> torch.Tensor:
        """``U`` (k x k, processing order): upper Cholesky factor of the damped, permuted ``H⁻¹``."""
        if self._rust is not None:
            return torch.from_numpy(self._rust.upper()).reshape(self.k, self.k)
        return self._torch[0]

    def quantize(
        self,
        w: torch.Tensor,
        blocksize: int = 64,
        quant_type: str = "nf4",
        lazy_block: int = DEFAULT_LAZY_BLOCK,
        absmax_search: int = 0,
        min_shrink: float = 0.8,
        search_objective: str = "sequential",
        fixed_absmax: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """GPTQ of ``w`` (out x k): ``(packed uint8 ((n+1)//2, 1), absmax float32 (nblocks,),
        loss)`` in :func:`nybble.kernels.quantize_4bit`'s layout, on ``w``'s device.

        ``absmax_search`` > 0 tries that many shrink factors in ``[min_shrink, 1]`` of each
        block's max|w| and keeps the one with the least Hessian-weighted error
        (``search_objective``: "sequential" simulates GPTQ's feedback inside the block,
        "diagonal" rounds each column on its own). ``fixed_absmax`` fixes every block's absmax.
        ``loss`` is GPTQ's ``Σ ((w - q) / U_tt)² / 2``."""
        w = torch.as_tensor(w)
        if w.ndim != 2 or w.shape[1] != self.k:
            raise ValueError(f"weight shape {tuple(w.shape)} does not match a Hessian of {self.k} columns")
        if quant_type not in formats.QUANT_TYPES:
            raise ValueError(f"quant_type {quant_type!r} is not one of {formats.QUANT_TYPES}")
        if search_objective not in _OBJECTIVES:
            raise ValueError(f"search_objective {search_objective!r} is not one of {_OBJECTIVES}")
        kernels.check_blocksize(blocksize)
        out_device = w.device
        if self._torch is not None and self.k % blocksize == 0:
            packed, absmax, loss = _torch_gptq(w, *self._torch, blocksize, quant_type, lazy_block, absmax_search,
                                               min_shrink, search_objective, fixed_absmax, self.dtype)
            return packed.to(out_device), absmax.to(out_device), loss
        if self._rust is None:
            # Blocks spanning rows (k not a multiple of blocksize): the Rust core handles them.
            self._rust = self._rust_factor(self.damp)
        wn = np.ascontiguousarray(w.detach().to("cpu", torch.float32).numpy()).reshape(-1)
        fixed = None
        if fixed_absmax is not None:
            fixed = np.ascontiguousarray(torch.as_tensor(fixed_absmax).detach().to("cpu", torch.float32).numpy())
            fixed = fixed.reshape(-1)
        packed, absmax, loss = self._rust.quantize(wn, int(w.shape[0]), blocksize, quant_type, lazy_block,
                                                   absmax_search, min_shrink, search_objective, fixed, self.threads)
        return (torch.from_numpy(packed).reshape(-1, 1).to(out_device),
                torch.from_numpy(absmax).to(out_device), float(loss))


def gptq_quantize(
    w: torch.Tensor,
    h: Any,
    blocksize: int = 64,
    quant_type: str = "nf4",
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    lazy_block: int = DEFAULT_LAZY_BLOCK,
    absmax_search: int = 0,
    min_shrink: float = 0.8,
    search_objective: str = "sequential",
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one weight ``w`` (out x in) with Hessian ``h`` (in x in, ``2XᵀX``), on ``w``'s
    device: ``(packed uint8 ((n+1)//2, 1), absmax float32 (nblocks,))``, the layout of
    :func:`nybble.kernels.quantize_4bit` (so :meth:`Linear4bit.set_packed` takes it)."""
    w = torch.as_tensor(w)
    factor = HessianFactor(h, damp, act_order, device=w.device, threads=threads)
    packed, absmax, _ = factor.quantize(w, blocksize, quant_type, lazy_block, absmax_search, min_shrink,
                                        search_objective)
    return packed, absmax


# ----------------------------------------------------------------------------- torch backend


def _code_bounds(quant_type: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(table, float32 decision bounds, FP4's code per sorted magnitude) as the core uses them."""
    table = torch.from_numpy(code_4bit(quant_type)).to(device)
    if quant_type == "nf4":
        return table, (table[:-1] + table[1:]) / 2, None
    order = torch.argsort(table[:8], stable=True)
    mags = table[order]
    return table, (mags[:-1] + mags[1:]) / 2, order.to(torch.uint8)


def _encode(x: torch.Tensor, absmax: torch.Tensor, bounds, fp4_codes) -> torch.Tensor:
    """bitsandbytes' decision on float32 values: x times the float32 reciprocal of the absmax
    (full blocks), the nearest code, ties to the lower one. ``absmax`` broadcasts against x."""
    s = x * (1.0 / absmax.clamp_min(_MIN_ABSMAX))
    if fp4_codes is None:
        return (s.unsqueeze(-1) > bounds).sum(-1).to(torch.uint8)
    idx = (s.abs().unsqueeze(-1) > bounds).sum(-1)
    return fp4_codes[idx] | ((s < 0).to(torch.uint8) << 3)


def _torch_gptq(w, u, perm, dead, blocksize, quant_type, lazy_block, absmax_search, min_shrink, objective,
                fixed_absmax, dtype):
    """The core's algorithm in torch (for CUDA), for k a multiple of blocksize: every block
    lies inside a row, in the same columns for all rows, so its absmax is chosen for all rows
    at once."""
    if lazy_block < 1:
        raise ValueError("lazy_block must be >= 1")
    if absmax_search < 0 or (absmax_search and not 0 < min_shrink <= 1):
        raise ValueError(f"absmax_search {absmax_search} / min_shrink {min_shrink} out of range")
    dev = u.device
    rows, k = w.shape
    ng = k // blocksize
    work = w.detach().to(dev, dtype).clone()
    if not torch.isfinite(work).all():
        raise _non_finite_error(w)
    work[:, dead] = 0.0
    work = work[:, perm].contiguous()
    perm_list = perm.tolist()
    inv_perm = [0] * k
    for t, c in enumerate(perm_list):
        inv_perm[c] = t
    group_of = [c // blocksize for c in perm_list]
    # Processing positions of each block's columns, ascending; a block is chosen at its first.
    members = [sorted(inv_perm[c] for c in range(g * blocksize, (g + 1) * blocksize)) for g in range(ng)]
    first = {m[0]: g for g, m in enumerate(members)}
    if fixed_absmax is not None:
        absmax = torch.as_tensor(fixed_absmax).to(dev, torch.float32).reshape(rows, ng).clone()
    else:
        absmax = torch.zeros(rows, ng, dtype=torch.float32, device=dev)
    table, bounds, fp4_codes = _code_bounds(quant_type, dev)
    codes = torch.empty(rows, k, dtype=torch.uint8, device=dev)
    diag = u.diagonal()
    loss = torch.zeros((), dtype=dtype, device=dev)
    shrinks = None
    if absmax_search:
        g_idx = torch.arange(absmax_search, dtype=torch.float64, device=dev)
        shrinks = (1.0 - (1.0 - min_shrink) * g_idx / max(absmax_search - 1, 1)) if absmax_search > 1 else \
            torch.ones(1, dtype=torch.float64, device=dev)
    lazy = min(lazy_block, k)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        err = torch.zeros(rows, i2 - i1, dtype=dtype, device=dev)
        for t in range(i1, i2):
            g = group_of[t]
            if fixed_absmax is None and t in first:
                pos = members[g]
                vals = work[:, pos].clone()
                beyond = [i for i, p in enumerate(pos) if p >= i2]
                if beyond and t > i1:
                    cols = torch.tensor([pos[i] for i in beyond], device=dev)
                    vals[:, beyond] -= err[:, : t - i1] @ u[i1:t][:, cols]
                absmax[:, g] = _choose_absmax(vals, pos, u, shrinks, objective, table, bounds, fp4_codes)
            a = absmax[:, g]
            x = work[:, t]
            code = _encode(x.to(torch.float32), a, bounds, fp4_codes)
            q = (table[code.long()] * a).to(dtype)
            codes[:, t] = code
            e = (x - q) / diag[t]
            loss += e @ e
            work[:, t + 1:i2] -= e[:, None] * u[t, t + 1:i2][None, :]
            err[:, t - i1] = e
        if i2 < k:
            work[:, i2:] -= err @ u[i1:i2, i2:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    flat = out.reshape(-1)
    packed = (flat[0::2] << 4) | flat[1::2]
    return packed.reshape(-1, 1), absmax.reshape(-1), float(loss) / 2


def _non_finite_error(w: torch.Tensor):
    from .errors import NonFiniteError

    flat = w.detach().reshape(-1)
    index = int((~torch.isfinite(flat)).nonzero()[0])
    return NonFiniteError(f"input holds a non-finite value ({float(flat[index])}) at flat index {index}; "
                          "quantization needs finite numbers", index=index, value=float(flat[index]))


def _choose_absmax(vals, pos, u, shrinks, objective, table, bounds, fp4_codes) -> torch.Tensor:
    """The absmax per row of one block from its current weights ``vals`` (rows x bs, columns in
    processing order ``pos``): max|w|, or the best shrink of it (see the core)."""
    amax = vals.abs().amax(1)
    if shrinks is None:
        return amax.to(torch.float32)
    cand = (amax[:, None] * shrinks[None, :]).to(torch.float32)  # rows x G
    idx = torch.tensor(pos, device=vals.device)
    d = u.diagonal()[idx].to(vals.dtype)
    if objective == "diagonal":
        x = vals.to(torch.float32)[:, :, None]
        q = (table[_encode(x, cand[:, None, :], bounds, fp4_codes).long()] * cand[:, None, :]).to(vals.dtype)
        loss = (((vals[:, :, None] - q) / d[None, :, None]) ** 2).sum(1)
    else:
        sub = u[idx][:, idx].to(vals.dtype)
        v = vals[:, :, None].repeat(1, 1, cand.shape[1])
        loss = torch.zeros_like(cand, dtype=vals.dtype)
        for ia in range(len(pos)):
            x = v[:, ia, :]
            q = (table[_encode(x.to(torch.float32), cand, bounds, fp4_codes).long()] * cand).to(vals.dtype)
            e = (x - q) / d[ia]
            loss += e * e
            if ia + 1 < len(pos):
                v[:, ia + 1:, :] -= e[:, None, :] * sub[ia, ia + 1:][None, :, None]
    loss = torch.where(cand > 0, loss, torch.full_like(loss, math.inf))
    best = cand.gather(1, loss.argmin(1, keepdim=True)).squeeze(1)
    return torch.where(amax > 0, best, torch.zeros_like(best))


# ----------------------------------------------------------------------------- reports


def relative_output_error(h: torch.Tensor, w: torch.Tensor, *w_hats: torch.Tensor) -> float | list[float]:
    """``‖XWᵀ - XŴᵀ‖ / ‖XWᵀ‖`` on the calibration inputs, from ``H = 2XᵀX / n``
    (``‖XΔᵀ‖² = tr(Δ H Δᵀ) / 2``), in float32 on ``h``'s device; one product for all the
    ``w_hats`` given (a list of errors when there are several)."""
    h = h.to(torch.float32)
    w = w.to(h.device, torch.float32)
    stacked = torch.cat([w] + [w - x.to(h.device, torch.float32) for x in w_hats])
    quad = ((stacked @ h) * stacked).sum(1).reshape(1 + len(w_hats), -1).sum(1)
    errs = torch.sqrt(quad[1:].clamp_min(0) / quad[0].clamp_min(1e-30)).tolist()
    return errs[0] if len(errs) == 1 else errs


@dataclass
class LayerReport:
    """One quantized layer: calibration output error ``‖XWᵀ - XŴᵀ‖ / ‖XWᵀ‖``, RTN vs GPTQ."""

    name: str
    shape: tuple[int, int]
    tokens: int
    damp: float
    rtn_error: float
    gptq_error: float
    seconds: float

    @property
    def reduction(self) -> float:
        """Fraction of RTN's output error that GPTQ removes."""
        return 1.0 - self.gptq_error / self.rtn_error if self.rtn_error > 0 else 0.0


@dataclass
class GptqSummary:
    layers: list[LayerReport] = field(default_factory=list)
    blocks: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def mean_rtn_error(self) -> float:
        return float(np.mean([r.rtn_error for r in self.layers])) if self.layers else 0.0

    @property
    def mean_gptq_error(self) -> float:
        return float(np.mean([r.gptq_error for r in self.layers])) if self.layers else 0.0

    @property
    def mean_reduction(self) -> float:
        """Mean over layers of the fraction of RTN's output error GPTQ removes."""
        return float(np.mean([r.reduction for r in self.layers])) if self.layers else 0.0

    def table(self) -> str:
        width = max((len(r.name) for r in self.layers), default=5)
        lines = [f"{'layer':<{width}}  {'shape':>11} {'RTN err':>8} {'GPTQ err':>8} {'reduction':>9}"]
        for r in self.layers:
            shape = f"{r.shape[0]}x{r.shape[1]}"
            lines.append(f"{r.name:<{width}}  {shape:>11} {r.rtn_error:>8.4f} {r.gptq_error:>8.4f} "
                         f"{100 * r.reduction:>8.1f}%")
        lines.append(f"{'mean':<{width}}  {'':>11} {self.mean_rtn_error:>8.4f} {self.mean_gptq_error:>8.4f} "
                     f"{100 * self.mean_reduction:>8.1f}%")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "seconds": self.seconds, "settings": self.settings,
                "mean_rtn_error": self.mean_rtn_error, "mean_gptq_error": self.mean_gptq_error,
                "mean_reduction": self.mean_reduction, "layers": [asdict(r) for r in self.layers]}


# ----------------------------------------------------------------------------- model plumbing


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's transformer blocks: the ``nn.ModuleList`` of same-typed modules holding the
    most ``nn.Linear`` layers (``encoder.layer`` of BERT, ``model.layers`` of Llama)."""
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or len({type(c) for c in m}) != 1:
            continue
        linears = sum(1 for c in m for s in c.modules() if isinstance(s, nn.Linear))
        if linears and (best is None or linears > best[2]):
            best = (name, m, linears)
    return None if best is None else (best[0], best[1])


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, Mapping):
        return next(v for v in out.values() if torch.is_tensor(v))
    return out[0]


def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class _Hessian:
    """``2XᵀX / n`` of one layer input over the calibration tokens (padding excluded):
    float32 products per batch, summed in float64."""

    def __init__(self, k: int, device):
        self.xtx = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if mask is not None and mask.numel() == x.shape[0]:
            x = x[mask.to(x.device)]
        x = x.to(self.xtx.device, torch.float32)
        self.xtx += (x.T @ x).to(torch.float64)
        self.tokens += int(x.shape[0])

    def hessian(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


@dataclass
class _Options:
    quant: str
    blocksize: int
    double_quant: bool
    damp: float
    act_order: bool
    lazy_block: int
    compute_dtype: torch.dtype | None
    absmax_search: int
    min_shrink: float
    search_objective: str
    dq_aware: bool
    threads: int | None
    quant_storage: torch.dtype


def _dq_decoded(absmax: torch.Tensor) -> torch.Tensor:
    """The absmax a reader decodes after QLoRA's double quantization."""
    codes, nested = kernels.double_quantize(absmax)
    return kernels.decode_absmax(codes, nested["nested_absmax"], nested["nested_code"], nested["offset"],
                                 nested["blocksize"])


def _rtn_weight(w: torch.Tensor, o: _Options) -> torch.Tensor:
    packed, absmax = kernels.quantize_4bit(w, o.blocksize, o.quant)
    if o.double_quant:
        absmax = _dq_decoded(absmax)
    return kernels.dequantize_4bit(packed, absmax, tuple(w.shape), o.blocksize, o.quant, torch.float32)


def _quantize_linear(name: str, lin: nn.Linear, factor: HessianFactor, h: torch.Tensor, tokens: int,
                     o: _Options) -> tuple[Linear4bit, LayerReport]:
    started = time.perf_counter()
    w = lin.weight.detach()
    w32 = w.to(torch.float32)
    args = (o.blocksize, o.quant, o.lazy_block, o.absmax_search, o.min_shrink, o.search_objective)
    packed, absmax, _ = factor.quantize(w32, *args)
    if o.dq_aware and o.double_quant:
        # Round against the absmax a reader decodes: double quantization of this pass's
        # absmax gives the same codes again, so the stored constants match what was used.
        packed, _, _ = factor.quantize(w32, *args, fixed_absmax=_dq_decoded(absmax))
    new = Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type=o.quant,
                     blocksize=o.blocksize, double_quant=o.double_quant, compute_dtype=o.compute_dtype,
                     weight_dtype=w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32,
                     device=w.device, quant_storage=o.quant_storage)
    new.set_packed(packed.to(w.device), absmax.to(w.device))
    if lin.bias is not None:
        new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    rtn_error, gptq_error = relative_output_error(h, w32, _rtn_weight(w32, o), new.dequantized_weight(torch.float32))
    report = LayerReport(name=name, shape=(lin.out_features, lin.in_features), tokens=tokens, damp=factor.damp,
                         rtn_error=rtn_error, gptq_error=gptq_error, seconds=time.perf_counter() - started)
    return new, report


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _input_groups(block: nn.Module, names: list[str], args, kwargs) -> tuple[list[list[str]], list[str]]:
    """Target layers of ``block`` grouped by the input tensor they read, in execution order
    (one probing forward); and the targets the forward never called."""
    calls: list[tuple[str, torch.Tensor]] = []

    def record(name, module, inputs):
        calls.append((name, inputs[0]))  # keeps each input alive: no address is reused

    handles = [block.get_submodule(n).register_forward_pre_hook(functools.partial(record, n)) for n in names]
    try:
        with torch.no_grad():
            block(*args, **kwargs)
    finally:
        for hd in handles:
            hd.remove()
    groups: dict[tuple, list[str]] = {}
    seen = set()
    for name, x in calls:
        if name in seen:
            continue
        seen.add(name)
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
        groups.setdefault(key, []).append(name)
    return list(groups.values()), [n for n in names if n not in seen]


def _accumulate(run_forward: Callable[[], None], root: nn.Module, groups: list[list[str]],
                masks: list[torch.Tensor | None], stop_early: bool) -> list[_Hessian]:
    """Runs ``run_forward(i)`` for every batch i with a hook on the first layer of each group
    accumulating its input's Hessian; with ``stop_early`` the pass ends after the last group."""
    state = {"mask": None}
    accs: list[_Hessian] = []
    handles = []
    last_group = len(groups) - 1
    for gi, group in enumerate(groups):
        lin = root.get_submodule(group[0])
        acc = _Hessian(lin.in_features, lin.weight.device)
        accs.append(acc)

        def hook(module, inputs, acc=acc, last=gi == last_group):
            acc.add(inputs[0], state["mask"])
            if stop_early and last:
                raise _Stop

        handles.append(lin.register_forward_pre_hook(hook))
    try:
        for i, mask in enumerate(masks):
            state["mask"] = mask
            try:
                with torch.no_grad():
                    run_forward(i)
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    return accs


def _dense_stand_in(lin: nn.Linear, layer: Linear4bit) -> nn.Linear:
    """A plain Linear with ``layer``'s decoded weight, in ``lin``'s dtype: what later layers are
    calibrated through (the same weights as the packed layer, without its per-call decoding)."""
    dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                      dtype=lin.weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantized_weight(torch.float32).to(lin.weight.dtype))
        if lin.bias is not None:
            dense.bias.copy_(lin.bias)
    return dense


def _quantize_groups(root: nn.Module, prefix: str, groups: list[list[str]], accs: list[_Hessian], o: _Options,
                     device, reports: list[LayerReport], on_layer, packed: dict[str, Linear4bit] | None = None) -> None:
    """GPTQ of each group's layers. With ``packed`` given, the model gets a dense stand-in
    (:func:`_dense_stand_in`) and ``packed[name]`` the real layer, to swap in later."""
    for group, acc in zip(groups, accs):
        if acc.tokens == 0:
            raise ValueError(f"{prefix}{group[0]}: no calibration tokens reached this layer")
        h = acc.hessian()
        factor = HessianFactor(h, o.damp, o.act_order, device=device, threads=o.threads,
                               name=prefix + group[0])
        for name in group:
            lin = root.get_submodule(name)
            new, report = _quantize_linear(prefix + name, lin, factor, h, acc.tokens, o)
            if packed is None:
                _set_module(root, name, new)
            else:
                packed[name] = new
                _set_module(root, name, _dense_stand_in(lin, new))
            reports.append(report)
            if on_layer is not None:
                on_layer(report)


def _batches(calibration_batches: Iterable[Any], device) -> list[tuple[tuple, dict[str, Any]]]:
    """Each batch as (args, kwargs) of the model's forward: a tensor is its first argument
    (``input_ids`` of a transformers model), a mapping its keyword arguments."""
    out = []
    for b in calibration_batches:
        if torch.is_tensor(b):
            out.append(((b.to(device),), {}))
        elif isinstance(b, Mapping):
            out.append(((), {k: _to(v, device) for k, v in dict(b).items()}))
        else:
            raise TypeError(f"a calibration batch must be a tensor or a mapping of model inputs, got {type(b).__name__}")
    if not out:
        raise ValueError("no calibration batches")
    return out


def _token_mask(batch: tuple[tuple, dict[str, Any]]) -> torch.Tensor | None:
    mask = batch[1].get("attention_mask")
    return None if mask is None or mask.ndim != 2 else mask.reshape(-1).bool()


def quantize_model(
    model: nn.Module,
    calibration_batches: Iterable[Any],
    quant: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    damp: float = DEFAULT_DAMP,
    act_order: bool = False,
    block_size_gptq: int = DEFAULT_LAZY_BLOCK,
    compute_dtype: torch.dtype | None = None,
    skip_modules: Iterable[str] = ("lm_head",),
    absmax_search: int = 0,
    min_shrink: float = 0.8,
    search_objective: str = "sequential",
    dq_aware: bool = False,
    true_sequential: bool = True,
    propagate: str = "dense",
    device: str | torch.device | None = None,
    threads: int | None = None,
    quant_storage: torch.dtype = torch.uint8,
    on_block: Callable[[int, int, float], None] | None = None,
    on_layer: Callable[[LayerReport], None] | None = None,
) -> tuple[nn.Module, GptqSummary]:
    """GPTQ-quantizes every ``nn.Linear`` of ``model`` (but the output layer and
    ``skip_modules``, as :func:`nybble.quantize_model`) into :class:`Linear4bit`, in place.

    ``calibration_batches``: tensors (the forward's first argument: input ids of a
    transformers model) or mappings of keyword inputs (``input_ids``, ``attention_mask``, ...);
    padded positions (``attention_mask`` 0) are left out of the Hessians. The model runs one transformer block (:func:`find_blocks`) at a time:
    block 0's inputs are captured by a hook, each block's outputs (after it is quantized)
    become the next block's inputs, and ``device`` (default: where the model is) is where
    each block and its Hessians live while it is processed. With ``true_sequential`` the
    layers of a block are quantized in execution order, grouped by shared input (q / k / v
    together), each group seeing the outputs of the quantized groups before it. Linear layers
    outside the blocks (a pooler) are quantized last, from a full forward pass.

    ``propagate``: how quantized layers compute while later ones are calibrated: "dense"
    (default) through plain Linear layers holding the decoded 4-bit weights in the model's
    dtype (the same weights, several times faster on the CPU), "packed" through the
    :class:`Linear4bit` layers themselves, in ``compute_dtype``.

    ``block_size_gptq`` is GPTQ's lazy batch size (it does not change the result);
    ``absmax_search`` / ``min_shrink`` / ``search_objective``: see
    :meth:`HessianFactor.quantize`; ``dq_aware`` rounds a second time against the
    double-quantized absmax (2x the time). ``on_block(i, n, seconds)`` is called after each
    block, ``on_layer(report)`` after each layer. Returns ``(model, summary)``.
    """
    from .model import _name_matches, _output_layer_names

    if quant not in formats.QUANT_TYPES:
        raise ValueError(f"GPTQ quantizes to {formats.QUANT_TYPES}, not {quant!r}")
    kernels.check_blocksize(blocksize)
    if search_objective not in _OBJECTIVES:
        raise ValueError(f"search_objective {search_objective!r} is not one of {_OBJECTIVES}")
    if block_size_gptq < 1:
        raise ValueError(f"block_size_gptq must be >= 1, got {block_size_gptq}")
    if propagate not in ("dense", "packed"):
        raise ValueError(f"propagate {propagate!r} is not 'dense' or 'packed'")
    o = _Options(quant, blocksize, double_quant, damp, act_order, block_size_gptq, compute_dtype, absmax_search,
                 min_shrink, search_objective, dq_aware, threads, quant_storage)
    started = time.perf_counter()
    model.eval()
    first_param = next(model.parameters())
    model_device = first_param.device
    work_device = torch.device(device) if device is not None else model_device
    skip = set(skip_modules) | _output_layer_names(model)
    targets = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _name_matches(n, skip)]
    batches = _batches(calibration_batches, model_device)
    masks = [_token_mask(b) for b in batches]
    use_cache = "use_cache" in inspect.signature(model.forward).parameters
    reports: list[LayerReport] = []
    summary = GptqSummary(settings={
        "method": "gptq", "quant_type": quant, "blocksize": blocksize, "double_quant": double_quant,
        "damp": damp, "act_order": act_order, "block_size_gptq": block_size_gptq,
        "absmax_search": absmax_search, "min_shrink": min_shrink if absmax_search else None,
        "search_objective": search_objective if absmax_search else None, "dq_aware": dq_aware,
        "true_sequential": true_sequential, "propagate": propagate, "calibration_batches": len(batches),
    })

    def forward_model(i):
        args, kwargs = batches[i]
        model(*args, **kwargs, **({"use_cache": False} if use_cache else {}))

    found = find_blocks(model)
    in_blocks: set[str] = set()
    if found is not None:
        list_name, blocks = found
        records: list[tuple[tuple, dict]] = []

        def capture(module, args, kwargs):
            records.append((args, kwargs))
            raise _Stop

        handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for i in range(len(batches)):
                try:
                    with torch.no_grad():
                        forward_model(i)
                except _Stop:
                    pass
        finally:
            handle.remove()
        if len(records) != len(batches):
            raise RuntimeError(f"only {len(records)} of {len(batches)} calibration batches reached {list_name}.0")
        for bi, block in enumerate(blocks):
            block_started = time.perf_counter()
            prefix = f"{list_name}.{bi}."
            names = [n[len(prefix):] for n in targets if n.startswith(prefix)]
            in_blocks.update(prefix + n for n in names)
            home = next(block.parameters()).device
            block.to(work_device)
            moved = [(_to(a, work_device), _to(k, work_device)) for a, k in records] if work_device != model_device \
                else records

            def forward_block(i, block=block, moved=moved):
                block(*moved[i][0], **moved[i][1])

            packed: dict[str, Linear4bit] | None = {} if propagate == "dense" else None
            if names:
                groups, unused = _input_groups(block, names, *moved[0])
                if unused:
                    warnings.warn(f"GPTQ: {', '.join(prefix + n for n in unused)} never ran on the calibration "
                                  "data; left unquantized", stacklevel=2)
                stages = [[g] for g in groups] if true_sequential else [groups]
                for stage in stages:
                    accs = _accumulate(forward_block, block, stage, masks, stop_early=True)
                    _quantize_groups(block, prefix, stage, accs, o, work_device, reports, on_layer, packed)
            # The quantized block's outputs are the next block's inputs.
            with torch.no_grad():
                for i, (args, kwargs) in enumerate(moved):
                    hidden = _first_tensor(block(*args, **kwargs)).to(model_device)
                    records[i] = _with_hidden(*records[i], hidden)
            for name, layer in (packed or {}).items():
                _set_module(block, name, layer)
            block.to(home)
            summary.blocks += 1
            if on_block is not None:
                on_block(bi, len(blocks), time.perf_counter() - block_started)
    rest = [n for n in targets if n not in in_blocks]
    if rest:
        # Layers outside the blocks (or a model without blocks): Hessians from full passes.
        groups = [[n] for n in rest]
        accs = _accumulate(forward_model, model, groups, masks, stop_early=False)
        present = [(g, a) for g, a in zip(groups, accs) if a.tokens > 0]
        for g, a in zip(groups, accs):
            if a.tokens == 0:
                warnings.warn(f"GPTQ: {g[0]} never ran on the calibration data; left unquantized", stacklevel=2)
        _quantize_groups(model, "", [g for g, _ in present], [a for _, a in present], o, model_device, reports,
                         on_layer)
    summary.layers = reports
    summary.seconds = time.perf_counter() - started
    return model, summary
