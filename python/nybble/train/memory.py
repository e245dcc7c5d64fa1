"""Memory accounting of QLoRA fine-tuning, measured on the model and optimizer and checked
against the paper's per-parameter arithmetic: 4 bits per base weight + 0.127 bits of
double-quantized constants (8/64 + 32/(64*256)); adapters, gradients and optimizer states
exist for the adapter parameters only."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn import Linear4bit, Linear8bitLt, LoraLinear


def dq_bits_per_param(blocksize: int = 64, nested_blocksize: int = 256) -> float:
    """Bits per parameter of the double-quantized block constants (0.127 for 64 / 256)."""
    return 8 / blocksize + 32 / (blocksize * nested_blocksize)


def weight_bits_per_param(blocksize: int = 64, double_quant: bool = True, nested_blocksize: int = 256) -> float:
    return 4 + (dq_bits_per_param(blocksize, nested_blocksize) if double_quant else 32 / blocksize)


def optimizer_bytes_per_param(optim_bits: int) -> float:
    """AdamW: two float32 moments, or two 8-bit codes plus two float32 absmax per 256."""
    return 8.0 if optim_bits == 32 else 2.0 + 8 / 256


def linear4bit_bytes(m: Linear4bit) -> int:
    return sum(b.numel() * b.element_size() for b in _packed_tensors(m)) + (
        m.bias.numel() * m.bias.element_size() if m.bias is not None else 0)


def _tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _packed_tensors(m: nn.Module) -> list[torch.Tensor]:
    """A quantized layer's weight and constants: its buffers, and the packed tensors FSDP
    shards, which are frozen parameters there (nybble.train.fsdp.prepare_packed)."""
    return [*m.buffers(), *(p for n, p in m.named_parameters(recurse=False) if n != "bias")]


def _storage_key(t: torch.Tensor) -> int:
    # FSDP2's sharded parameters are DTensors: their local shard's memory.
    return getattr(t, "_local_tensor", t).data_ptr()


@dataclass
class MemoryReport:
    base_quantized_params: int = 0
    base_quantized_bytes: int = 0
    base_other_params: int = 0
    base_other_bytes: int = 0
    adapter_params: int = 0
    adapter_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int | None = None
    peak_bytes: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bits_per_param(self) -> float:
        return 8 * self.base_quantized_bytes / max(self.base_quantized_params, 1)

    def rows(self) -> list[tuple[str, int | None, str]]:
        return [
            ("base weights, quantized", self.base_quantized_bytes,
             f"{self.base_quantized_params:,} params, {self.weight_bits_per_param:.3f} bits/param"),
            ("base weights, other (embeddings, norms, head)", self.base_other_bytes, f"{self.base_other_params:,} params"),
            ("LoRA adapters", self.adapter_bytes, f"{self.adapter_params:,} params"),
            ("adapter gradients", self.grad_bytes, ""),
            ("optimizer states", self.optimizer_bytes,
             f"{self.optimizer_bytes / max(self.adapter_params, 1):.3f} bytes/adapter param"),
            ("activations saved for backward", self.activation_bytes, "first step"),
            ("peak allocated (GPU)", self.peak_bytes, ""),
        ]

    def format(self) -> str:
        def h(n):
            if n is None:
                return "n/a"
            for unit in ("B", "KB", "MB", "GB"):
                if n < 1000 or unit == "GB":
                    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
                n /= 1000

        lines = ["memory:"] + [f"  {name:<48} {h(b):>10}  {note}" for name, b, note in self.rows()]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def measure(model: nn.Module, optimizer=None) -> MemoryReport:
    """Bytes of base weights (quantized / other), adapters, their gradients and the optimizer."""
    r = MemoryReport()
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, (Linear4bit, Linear8bitLt)):
            n = m.in_features * m.out_features
            r.base_quantized_params += n
            r.base_quantized_bytes += _tensor_bytes(_packed_tensors(m))
            seen.update(id(b) for b in _packed_tensors(m))
            if m.bias is not None:
                seen.add(id(m.bias))
                r.base_other_params += m.bias.numel()
                r.base_other_bytes += _tensor_bytes([m.bias])
    lora_ids = set()
    for m in model.modules():
        if isinstance(m, LoraLinear):
            for p in (m.lora_A.weight, m.lora_B.weight):
                lora_ids.add(id(p))
                r.adapter_params += p.numel()
                r.adapter_bytes += _tensor_bytes([p])
                if p.grad is not None:
                    r.grad_bytes += _tensor_bytes([p.grad])
                else:  # gradients are allocated at the first backward: count what it will hold
                    r.grad_bytes += _tensor_bytes([p])
    ptrs: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in lora_ids or _storage_key(t) in ptrs:
            continue  # tied weights (embeddings / head) counted once
        ptrs.add(_storage_key(t))
        r.base_other_params += t.numel() if t.is_floating_point() else 0
        r.base_other_bytes += _tensor_bytes([t])
    if optimizer is not None:
        r.optimizer_bytes = sum(_tensor_bytes(v for v in st.values() if torch.is_tensor(v))
                                for st in optimizer.state.values())
    return r


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward (activations), excluding the model's own
    parameters and buffers; a context manager around one forward pass."""

    def __init__(self, model: nn.Module):
        self.exclude = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        self.bytes = 0
        self._seen: set[int] = set()
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t):
        try:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.exclude and ptr not in self._seen:
                self._seen.add(ptr)
                self.bytes += t.untyped_storage().nbytes()
        except Exception:
            pass
        return t

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def paper_estimate(n_base: int, n_adapter: int, optim_bits: int = 32, adapter_bytes_per_param: int = 4,
                   blocksize: int = 64, double_quant: bool = True) -> dict[str, float]:
    """The paper's arithmetic, in bytes (no activations)."""
    return {
        "weights": n_base * weight_bits_per_param(blocksize, double_quant) / 8,
        "adapters": n_adapter * adapter_bytes_per_param,
        "grads": n_adapter * adapter_bytes_per_param,
        "optimizer": n_adapter * optimizer_bytes_per_param(optim_bits),
    }
