"""AdamW with 32-bit or 8-bit block-wise states, optionally paged (CUDA managed memory).

The update step is one fused call per parameter: the Rust core on the CPU (parameters and
gradients cross as numpy views of the torch tensors, no copies; rayon over blocks, GIL
released) and ``cuda/optim_8bit.cu`` on the GPU.

8-bit states follow bitsandbytes' ``AdamW8bit``: block-wise (256) with the signed dynamic map
for ``exp_avg`` and the unsigned one for ``exp_avg_sq``, float32 absmax per block, and
tensors with fewer than ``min_8bit_size`` (4096) elements keep 32-bit states.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable

import torch

from ..kernels import optim as kopt
from ..kernels.ops import dynamic_map
from . import paged as _paged

STATE_BLOCKSIZE = kopt.STATE_BLOCKSIZE
_CORE_DTYPE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


_NO_MANAGED_WARNED = False


def _warn_no_managed_memory() -> None:
    global _NO_MANAGED_WARNED
    if not _NO_MANAGED_WARNED:
        _NO_MANAGED_WARNED = True
        warnings.warn("paged optimizer: CUDA managed memory is unavailable (is CuPy installed? pip install "
                      "'nybble[cuda13]'); optimizer states are ordinary GPU tensors and will not page out",
                      stacklevel=5)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2's sharded parameters and gradients), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") and hasattr(t, "placements") else t


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with fused steps.

    ``optim_bits``: 32 (float32 states, equal to ``torch.optim.AdamW`` to float32 rounding)
    or 8 (block-wise 8-bit states). ``paged``: states in CUDA managed memory (see
    :mod:`nybble.optim.paged`); plain tensors on the CPU.

    Gradients holding NaN / Inf raise :class:`nybble.NonFiniteError` before anything is
    modified (one fused check over all gradients per step).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        optim_bits: int = 32,
        min_8bit_size: int = 4096,
        paged: bool = False,
        threads: int | None = None,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not 0.0 <= eps:
            raise ValueError(f"invalid eps {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self.paged = paged
        self.threads = threads

    # ------------------------------------------------------------------ state

    def _state_buffers(self, p: torch.Tensor, specs: dict[str, tuple[int, torch.dtype]]) -> dict[str, torch.Tensor]:
        """Zeroed state tensors ``{name: (numel, dtype)}`` for ``p``, all in one place: on
        ``p``'s device, or for paged optimizers in one managed allocation, or (when that does
        not fit in the GPU's free memory) all on the host."""
        names = list(specs)
        if self.paged and p.is_cuda:
            got = _paged.paged_zeros_group([((n,), dt) for n, dt in specs.values()], p.device)
            if got is not None:
                return dict(zip(names, got))
            if _paged.managed_memory_available(p.device):
                nbytes = sum(_paged.nbytes((n,), dt) for n, dt in specs.values())
                warnings.warn(f"paged optimizer: the {nbytes:,} bytes of state of a parameter of shape "
                              f"{tuple(p.shape)} do not fit in the free GPU memory; keeping them on the host "
                              "(CPU update)", stacklevel=4)
                return {k: torch.zeros(n, dtype=dt) for k, (n, dt) in specs.items()}
            _warn_no_managed_memory()
        return {k: torch.zeros(n, dtype=dt, device=p.device) for k, (n, dt) in specs.items()}

    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _state_specs(self, p: torch.Tensor) -> dict[str, tuple[int, torch.dtype]]:
        n = p.numel()
        if self._uses_8bit(p):
            nb = -(-n // STATE_BLOCKSIZE)
            return {"state1": (n, torch.uint8), "state2": (n, torch.uint8), "absmax1": (nb, torch.float32),
                    "absmax2": (nb, torch.float32)}
        return {"exp_avg": (n, torch.float32), "exp_avg_sq": (n, torch.float32)}

    def _init_state(self, p: torch.Tensor) -> dict:
        return {"step": 0, **self._state_buffers(p, self._state_specs(p))}

    def state_bytes(self) -> int:
        """Bytes held by the optimizer states."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        return total

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Check every gradient before touching any parameter, so a NaN / Inf leaves the
        # model and the optimizer state exactly as they were. One host sync for all of them.
        params = [p for g in self.param_groups for p in g["params"]]
        grads = [(i, _local(p.grad)) for i, p in enumerate(params) if p.grad is not None and not p.grad.is_sparse]
        if grads:
            finite = [torch.isfinite(g).all() for _, g in grads]
            finite = torch.stack([f.to(finite[0].device) for f in finite])
            if not bool(finite.all()):
                from ..errors import NonFiniteError

                i, g = grads[int((~finite).nonzero()[0])]
                flat = g.detach().reshape(-1)
                j = int((~torch.isfinite(flat)).nonzero()[0])
                raise NonFiniteError(
                    f"gradient of parameter {i} (shape {tuple(params[i].shape)}) holds {float(flat[j])} at flat "
                    f"index {j}; no parameter was updated", index=j, value=float(flat[j])
                ).locate(tuple(params[i].shape))
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("nybble.optim.AdamW does not support sparse gradients")
                if p.dtype not in _CORE_DTYPE:
                    raise TypeError(f"parameter dtype {p.dtype} is not float32, float16 or bfloat16")
                state = self.state[p]
                # A sharded parameter (FSDP2's DTensor) steps on this rank's shard, the states too.
                local = _local(p)
                if not state:
                    state.update(self._init_state(local))
                state["step"] = int(state["step"]) + 1
                self._update(local, _local(p.grad), state, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        return loss

    def _update(self, p, g, state, lr, beta1, beta2, eps, wd) -> None:
        step = state["step"]
        eight = "state1" in state
        bufs = [state[k] for k in (("state1", "state2", "absmax1", "absmax2") if eight else ("exp_avg", "exp_avg_sq"))]
        if bufs[0].device != p.device:
            # States kept on the host (paged fallback): update a host copy, then write it back.
            p_host = p.detach().to("cpu", copy=True).contiguous()
            g_host = g.detach().to("cpu", p.dtype).contiguous()
            self._step_op(p_host, g_host, bufs, eight, step, lr, beta1, beta2, eps, wd)
            p.copy_(p_host.view_as(p))
            return
        if p.is_cuda and self.paged:
            _paged.prefetch(bufs, p.device)
        pc = p.data if p.is_contiguous() else p.data.contiguous()
        self._step_op(pc, g.to(p.dtype).contiguous(), bufs, eight, step, lr, beta1, beta2, eps, wd)
        if pc.data_ptr() != p.data_ptr():
            p.copy_(pc)

    def _step_op(self, p, g, bufs, eight, step, lr, beta1, beta2, eps, wd) -> None:
        """One fused step through the ``nybble::adamw_8bit`` / ``adamw_32bit`` op (the Rust core
        on CPU tensors, the CUDA kernel on GPU ones, the torch reference under NYBBLE_KERNELS=torch)."""
        hp = (float(lr), float(beta1), float(beta2), float(eps), float(wd), int(step), self.threads)
        if eight:
            torch.ops.nybble.adamw_8bit(p.view(-1), g.view(-1), *bufs, dynamic_map(True, p.device),
                                        dynamic_map(False, p.device), *hp)
        else:
            torch.ops.nybble.adamw_32bit(p.view(-1), g.view(-1), *bufs, *hp)

    # ------------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores param groups and states; states are rebuilt in this optimizer's memory
        (paged or not) with their saved dtypes (torch's loader would cast float32 state to
        the parameter dtype). Accepts ``torch.optim.AdamW`` state dicts too."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for pid, p in zip(ids, params):
            if pid not in saved:
                continue
            src = saved[pid]
            st = {"step": int(src["step"].item() if torch.is_tensor(src["step"]) else src["step"])}
            tensors = {k: v for k, v in src.items() if k != "step" and torch.is_tensor(v)}
            specs = {k: (v.numel(), torch.uint8 if k in ("state1", "state2") else torch.float32)
                     for k, v in tensors.items()}
            for k, buf in self._state_buffers(p, specs).items():
                buf.copy_(tensors[k].reshape(-1).to(buf.dtype))
                st[k] = buf
            if not (("exp_avg" in st and "exp_avg_sq" in st) or all(k in st for k in ("state1", "state2", "absmax1", "absmax2"))):
                raise ValueError(f"optimizer state for parameter {pid} has keys {sorted(src)}, not AdamW's")
            self.state[p] = st

    def __getstate__(self):
        return copy.copy(self.__dict__)


class AdamW8bit(AdamW):
    """AdamW with 8-bit block-wise states (bitsandbytes' ``AdamW8bit``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096,
                 threads=None):
        super().__init__(params, lr, betas, eps, weight_decay, 8, min_8bit_size, False, threads)


class PagedAdamW(AdamW):
    """AdamW with 32-bit states in CUDA managed memory (QLoRA's paged optimizer)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, threads=None):
        super().__init__(params, lr, betas, eps, weight_decay, 32, 4096, True, threads)


class PagedAdamW8bit(AdamW):
    """AdamW with 8-bit block-wise states in CUDA managed memory."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, min_8bit_size=4096,
                 threads=None):
        super().__init__(params, lr, betas, eps, weight_decay, 8, min_8bit_size, True, threads)
