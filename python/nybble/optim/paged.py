"""Paged optimizer state: CUDA managed (unified) memory that the driver pages out to host RAM
when the GPU runs short and that is prefetched back before each optimizer step, as in the
QLoRA paper's paged optimizers.

Buffers come from ``cupy.cuda.malloc_managed`` and are handed to torch without a copy
(DLPack), so the optimizer kernels see ordinary CUDA tensors. No more managed memory is ever
requested than ``cudaMemGetInfo`` reports free on the card: a state that does not fit (or a
machine without CUDA / CuPy) gets a plain host tensor instead, and the optimizer updates that
parameter on the CPU (the Rust core) and copies it back.
"""

from __future__ import annotations

import threading
import warnings

import torch

#: Managed bytes handed out by this process, and a lock around the free-memory check.
_lock = threading.Lock()
_allocated = 0
_PREFETCH_WARNED = False


def managed_memory_available(device: torch.device | None = None) -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import cupy

        dev = torch.cuda.current_device() if device is None or device.index is None else device.index
        return bool(cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrManagedMemory, dev))
    except Exception:
        return False


def managed_bytes() -> int:
    """Bytes of managed memory this process holds through :func:`paged_zeros`."""
    return _allocated


def _free_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def paged_zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor in CUDA managed memory on ``device``; a CPU tensor when managed memory
    is unavailable or the card has fewer free bytes than asked for."""
    global _allocated
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if device.type != "cuda" or nbytes == 0 or not managed_memory_available(device):
        return torch.zeros(shape, dtype=dtype)
    import cupy

    with _lock:
        # Managed memory can oversubscribe the card; we never let it: a state that would not
        # fit in what is free now lives on the host instead.
        if nbytes > _free_bytes(device):
            warnings.warn(f"paged optimizer: {nbytes} bytes of state do not fit in the free GPU memory; "
                          "keeping this state on the host (CPU update)", stacklevel=3)
            return torch.zeros(shape, dtype=dtype)
        with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
            mem = cupy.cuda.malloc_managed(nbytes)
            arr = cupy.ndarray((numel,), dtype=_cupy_dtype(dtype), memptr=mem)
            arr.fill(0)
            cupy.cuda.get_current_stream().synchronize()
        _allocated += nbytes
    t = torch.from_dlpack(arr).view(dtype).reshape(shape)
    _on_release(mem.mem, nbytes)
    return t


def _cupy_dtype(dtype: torch.dtype):
    import numpy as np

    # bfloat16 has no numpy dtype: allocate its bytes as uint16 and view in torch.
    return {torch.float32: np.float32, torch.uint8: np.uint8, torch.float16: np.float16,
            torch.bfloat16: np.uint16, torch.int32: np.int32}[dtype]


def _on_release(memory, nbytes: int) -> None:
    """Counts the bytes as returned when CuPy frees the managed allocation."""
    import weakref

    def release(n=nbytes):
        global _allocated
        with _lock:
            _allocated -= n

    try:
        weakref.finalize(memory, release)
    except TypeError:  # a CuPy build whose memory objects take no weak references
        pass


def is_paged(t: torch.Tensor) -> bool:
    """True when ``t`` lives in CUDA managed memory."""
    if not t.is_cuda:
        return False
    try:
        import cupy

        attrs = cupy.cuda.runtime.pointerGetAttributes(t.data_ptr())
        return int(attrs.type) == 3  # cudaMemoryTypeManaged
    except Exception:
        return False


def prefetch(tensors, device: torch.device) -> None:
    """cudaMemPrefetchAsync of each managed tensor to ``device`` on torch's current stream."""
    global _PREFETCH_WARNED
    tensors = [t for t in tensors if t is not None and t.is_cuda]
    if not tensors:
        return
    try:
        import cupy

        stream = torch.cuda.current_stream(device).cuda_stream
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            cupy.cuda.runtime.memPrefetchAsync(t.data_ptr(), nbytes, device.index, stream)
    except Exception as e:  # e.g. a CuPy build whose prefetch signature differs (CUDA 13)
        if not _PREFETCH_WARNED:
            warnings.warn(f"paged optimizer: prefetch unavailable ({e}); pages migrate on demand", stacklevel=2)
            _PREFETCH_WARNED = True
