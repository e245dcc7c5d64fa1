"""Paged optimizer state: CUDA managed (unified) memory that the driver pages out to host RAM
when the GPU runs short and that is prefetched back before each optimizer step, as in the
QLoRA paper's paged optimizers.

Buffers come from ``cupy.cuda.malloc_managed`` and are handed to torch without a copy
(``__cuda_array_interface__``), so the optimizer kernels see ordinary CUDA tensors. All
states of one parameter share one allocation. No more managed memory is ever requested than
``cudaMemGetInfo`` reports free on the card: a parameter whose states do not fit keeps them
on the host, and the optimizer updates it on the CPU (the Rust core) and copies it back.
Without managed memory (no CuPy) the states are ordinary GPU tensors.
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
    """Bytes of managed memory this process holds through :func:`paged_zeros_group`."""
    return _allocated


def _free_bytes(device: torch.device) -> int:
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


_ALIGN = 256  # bytes between the tensors carved from one allocation (any dtype's alignment)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def nbytes(shape, dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel * torch.empty((), dtype=dtype).element_size()


def paged_zeros_group(specs, device: torch.device) -> list[torch.Tensor] | None:
    """Zero tensors ``[(shape, dtype), ...]`` carved from ONE managed allocation on
    ``device``, or None when managed memory is unavailable or the card does not have that
    many bytes free (after torch's cached blocks are released). All of a parameter's states
    thus live together: never some on the GPU and the rest on the host."""
    global _allocated
    device = torch.device(device)
    if device.type != "cuda" or not managed_memory_available(device):
        return None
    offsets, total = [], 0
    for shape, dtype in specs:
        offsets.append(total)
        total += _aligned(nbytes(shape, dtype))
    if total == 0:
        return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in specs]
    import cupy

    with _lock:
        # Managed memory can oversubscribe the card; we never let it. torch's caching
        # allocator may hold freed blocks (the activation peak of the first step), so give
        # them back before concluding that the state does not fit.
        if total > _free_bytes(device):
            torch.cuda.empty_cache()
        if total > _free_bytes(device):
            return None
        with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
            mem = cupy.cuda.malloc_managed(total)
            arr = cupy.ndarray((total,), dtype=cupy.uint8, memptr=mem)
            arr.fill(0)
            cupy.cuda.get_current_stream().synchronize()
        _allocated += total
    try:
        # __cuda_array_interface__: torch wraps the pointer whatever its memory type (a managed
        # buffer's DLPack device type, kDLCUDAManaged, is not accepted by every torch build).
        raw = torch.as_tensor(arr, device=device)
    except (TypeError, RuntimeError, ValueError):
        raw = torch.from_dlpack(arr)
    _on_release(mem.mem, total)
    out = []
    for (shape, dtype), off in zip(specs, offsets):
        n = nbytes(shape, dtype)
        # Each view keeps ``raw`` (and so the managed allocation) alive.
        out.append(raw[off:off + n].view(dtype).reshape(shape))
    return out


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
