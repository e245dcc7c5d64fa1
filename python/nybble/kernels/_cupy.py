"""CuPy side: compiles the CUDA sources with NVRTC on first use, caches modules and functions,
and launches kernels on torch's current stream over torch-allocated memory.

Tensors cross as raw device pointers (zero copy); every output is allocated by the caller
(torch), so one caching allocator serves both libraries. The launchers take their outputs as
arguments, which lets the GPU tests poison them before a launch. Importing this module needs
CuPy; nybble.kernels imports it lazily.
"""

from __future__ import annotations

import threading

import cupy
import numpy as np
import torch

from . import _source

_THREADS = 256
_GEMV_WARPS = 4  # kGemvWarps in gemv_4bit.cu
_LORA_WARPS = 4  # kLoraWarps in lora.cu
_T_THREADS = 128  # kTThreads in gemv_4bit_t.cu
_T_COLS = 8  # kTCols in gemv_4bit_t.cu
_ROW_THREADS = 256  # kRowThreads in int8.cu
_TYPE_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

_lock = threading.Lock()
#: Compiled modules keyed by (kernel file, NVRTC options, device compute capability).
MODULES: dict[tuple[str, tuple[str, ...], tuple[int, int]], cupy.RawModule] = {}
_FUNCTIONS: dict[tuple[str, str, int], object] = {}
_STREAMS: dict[tuple[int, int], cupy.cuda.ExternalStream] = {}
_OPTIONS: tuple[str, ...] | None = None


def nvrtc_options() -> tuple[str, ...]:
    """Options for CuPy's NVRTC (its major version picks the matching CUDA headers)."""
    global _OPTIONS
    if _OPTIONS is None:
        major = cupy.cuda.nvrtc.getVersion()[0]
        _OPTIONS = _source.nvrtc_options(major)
    return _OPTIONS


def get_module(file: str, device: int) -> cupy.RawModule:
    arch = torch.cuda.get_device_capability(device)
    key = (file, nvrtc_options(), arch)
    module = MODULES.get(key)
    if module is None:
        with _lock:
            module = MODULES.get(key)
            if module is None:
                with cupy.cuda.Device(device):
                    module = cupy.RawModule(code=_source.read_source(file), options=key[1], backend="nvrtc")
                    module.compile()
                MODULES[key] = module
    return module


def get_function(file: str, name: str, device: int):
    key = (file, name, device)
    fn = _FUNCTIONS.get(key)
    if fn is None:
        fn = get_module(file, device).get_function(name)
        _FUNCTIONS[key] = fn
    return fn


def _stream(device: int) -> cupy.cuda.ExternalStream:
    ptr = torch.cuda.current_stream(device).cuda_stream
    key = (device, ptr)
    s = _STREAMS.get(key)
    if s is None:
        s = cupy.cuda.ExternalStream(ptr, device)
        _STREAMS[key] = s
    return s


def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _launch(file: str, name: str, device: int, grid, block, args) -> None:
    fn = get_function(file, name, device)
    with cupy.cuda.Device(device), _stream(device):
        fn(grid, block, args)


def _check(t: torch.Tensor, what: str, dtype=None, align: int = 1) -> None:
    if not t.is_cuda:
        raise ValueError(f"{what} must be a CUDA tensor, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{what} must be contiguous")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{what} has dtype {t.dtype}, expected {dtype}")
    if t.data_ptr() % align:
        raise ValueError(f"{what} must be {align}-byte aligned")


def _suffix(dtype: torch.dtype) -> str:
    try:
        return _TYPE_SUFFIX[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not float32, float16 or bfloat16") from None


def _blocks(count: int, per_block: int) -> int:
    return max(1, -(-count // per_block))


def launch_dequantize_4bit(packed, absmax, out, blocksize: int, quant_type: str) -> None:
    """out (any shape, n elements) = decode(packed) * absmax; packed 4-, out 16-byte aligned."""
    _check(packed, "packed", torch.uint8, 4)
    _check(absmax, "absmax", torch.float32)
    _check(out, "out", None, 16)
    n = out.numel()
    if n == 0:
        return
    units = -(-n // 8)
    _launch(
        "dequant_4bit.cu", f"nybble_dequant_4bit_{quant_type}_{_suffix(out.dtype)}", out.device.index,
        (_blocks(units, _THREADS),), (_THREADS,),
        (_ptr(packed), _ptr(absmax), _ptr(out), np.int64(n), np.int32(blocksize)),
    )


def launch_decode_absmax(codes, nested_absmax, nested_code, offset, out, nested_blocksize: int) -> None:
    """``offset``: a one-element float32 tensor on the device (read there, no host sync)."""
    _check(codes, "codes", torch.uint8)
    _check(nested_absmax, "nested_absmax", torch.float32)
    _check(nested_code, "nested_code", torch.float32)
    _check(offset, "offset", torch.float32)
    _check(out, "out", torch.float32)
    if nested_code.numel() != 256:
        raise ValueError("nested_code must have 256 entries")
    if offset.numel() != 1:
        raise ValueError(f"offset must have one element, got {offset.numel()}")
    n = out.numel()
    if n == 0:
        return
    _launch(
        "dequant_4bit.cu", "nybble_decode_absmax", out.device.index, (_blocks(n, _THREADS),), (_THREADS,),
        (_ptr(codes), _ptr(nested_absmax), _ptr(nested_code), _ptr(offset), _ptr(out), np.int64(n),
         np.int32(nested_blocksize)),
    )


def launch_quantize_4bit(x, packed, absmax, blocksize: int, quant_type: str) -> None:
    """One warp per quantization block; a block holding NaN / Inf gets a NaN absmax."""
    _check(x, "x")
    _check(packed, "packed", torch.uint8)
    _check(absmax, "absmax", torch.float32)
    n = x.numel()
    if n == 0:
        return
    nblocks = -(-n // blocksize)
    warps_per_block = _THREADS // 32
    _launch(
        "quant_4bit.cu", f"nybble_quant_4bit_{quant_type}_{_suffix(x.dtype)}", x.device.index,
        (_blocks(nblocks, warps_per_block),), (_THREADS,),
        (_ptr(x), _ptr(packed), _ptr(absmax), np.int64(n), np.int32(blocksize)),
    )


def gemv_tile(m: int) -> int:
    """The smallest compiled row tile >= m (the largest tile for m beyond it)."""
    for tile in _source.GEMV_TILES:
        if m <= tile:
            return tile
    return _source.GEMV_TILES[-1]


def launch_gemv_4bit(x, packed, absmax, bias, out, blocksize: int, quant_type: str) -> None:
    """out (M, N) = x (M, K) @ W^T + bias for packed W (N, K); K % 32 == 0."""
    _check(x, "x", None, 16)
    _check(packed, "packed", torch.uint8, 16)
    _check(absmax, "absmax", torch.float32)
    _check(out, "out", x.dtype)
    if bias is not None:
        _check(bias, "bias", x.dtype)
    m, k = x.shape
    n = out.shape[1]
    if k % 32:
        raise ValueError(f"the fused 4-bit matmul needs in_features % 32 == 0, got {k}")
    if m == 0 or n == 0:
        return
    tile = gemv_tile(m)
    _launch(
        "gemv_4bit.cu", f"nybble_gemv_4bit_{quant_type}_{_suffix(x.dtype)}_m{tile}", x.device.index,
        (_blocks(n, _GEMV_WARPS), _blocks(m, tile)), (_GEMV_WARPS * 32,),
        (_ptr(x), _ptr(packed), _ptr(absmax), _ptr(bias), _ptr(out), np.int32(m), np.int32(n), np.int32(k),
         np.int32(blocksize)),
    )


def _check_lora(lora_a, lora_b, xa, dtype, k: int, n: int, adapter) -> tuple[int, int]:
    """Validates the adapter operands; returns (rank r, adapters L)."""
    stacked = lora_b.dim() == 3
    r = lora_b.shape[-1]
    adapters = lora_b.shape[0] if stacked else 1
    if lora_b.shape[-2] != n:
        raise ValueError(f"lora_b has {lora_b.shape[-2]} rows, the output {n} features")
    if xa is not None and xa.shape[-1] != r:
        raise ValueError(f"x A^T has {xa.shape[-1]} columns, the adapter rank is {r}")
    if lora_a is not None:
        if tuple(lora_a.shape) != ((adapters,) if stacked else ()) + (r, k):
            raise ValueError(f"lora_a {tuple(lora_a.shape)} does not match lora_b {tuple(lora_b.shape)} and {k} inputs")
        _check(lora_a, "lora_a", dtype, 16)
    if adapter is None and stacked and adapters != 1:
        raise ValueError("stacked adapters need an adapter index per row")
    _check(lora_b, "lora_b", dtype)
    if adapter is not None:
        _check(adapter, "adapter_index", torch.int32)
    return r, adapters


def launch_lora_down(x, lora_a, adapter, xa) -> None:
    """xa (M, r) float32 = x (M, K) @ A^T for A (r, K), or stacked A (L, r, K) with ``adapter``
    (M,) int32 the adapter of each row (rows with none get 0); K % 8 == 0."""
    _check(x, "x", None, 16)
    _check(lora_a, "lora_a", x.dtype, 16)
    _check(xa, "xa", torch.float32)
    if adapter is not None:
        _check(adapter, "adapter_index", torch.int32)
    m, k = x.shape
    r, adapters = lora_a.shape[-2], (lora_a.shape[0] if lora_a.dim() == 3 else 1)
    if lora_a.shape[-1] != k or tuple(xa.shape) != (m, r):
        raise ValueError(f"lora_down shapes: x {tuple(x.shape)}, A {tuple(lora_a.shape)}, xa {tuple(xa.shape)}")
    if k % 8:
        raise ValueError(f"the LoRA down projection needs in_features % 8 == 0, got {k}")
    if m == 0 or r == 0:
        return
    tile = next((t for t in _source.LORA_DOWN_TILES if m <= t), _source.LORA_DOWN_TILES[-1])
    _launch(
        "lora.cu", f"nybble_lora_down_{_suffix(x.dtype)}_m{tile}", x.device.index,
        (_blocks(r, _LORA_WARPS), _blocks(m, tile)), (_LORA_WARPS * 32,),
        (_ptr(x), _ptr(lora_a), _ptr(adapter), _ptr(xa), np.int32(m), np.int32(r), np.int32(k), np.int32(adapters)),
    )


def launch_gemv_4bit_lora(x, packed, absmax, bias, xa, lora_b, adapter, adapter_scale, scale: float, out,
                          blocksize: int, quant_type: str) -> None:
    """out (M, N) = x @ W^T + bias + scale * xa B^T, the LoRA term in the GEMV's epilogue.

    ``xa`` (M, r) float32 (from :func:`launch_lora_down`); ``lora_b`` (N, r), or stacked
    (L, N, r) with ``adapter`` (M,) int32 (negative or >= L: no adapter for that row) and
    ``adapter_scale`` (L,) float32 or None multiplying ``scale``. K % 32 == 0."""
    _check(x, "x", None, 16)
    _check(packed, "packed", torch.uint8, 16)
    _check(absmax, "absmax", torch.float32)
    _check(out, "out", x.dtype)
    _check(xa, "xa", torch.float32)
    if bias is not None:
        _check(bias, "bias", x.dtype)
    if adapter_scale is not None:
        _check(adapter_scale, "adapter_scale", torch.float32)
    m, k = x.shape
    n = out.shape[1]
    r, adapters = _check_lora(None, lora_b, xa, x.dtype, k, n, adapter)
    if k % 32:
        raise ValueError(f"the fused 4-bit matmul needs in_features % 32 == 0, got {k}")
    if xa.shape[0] != m:
        raise ValueError(f"x A^T has {xa.shape[0]} rows, x {m}")
    if m == 0 or n == 0:
        return
    tile = gemv_tile(m)
    _launch(
        "gemv_4bit.cu", f"nybble_gemv_4bit_lora_{quant_type}_{_suffix(x.dtype)}_m{tile}", x.device.index,
        (_blocks(n, _GEMV_WARPS), _blocks(m, tile)), (_GEMV_WARPS * 32,),
        (_ptr(x), _ptr(packed), _ptr(absmax), _ptr(bias), _ptr(out), np.int32(m), np.int32(n), np.int32(k),
         np.int32(blocksize), _ptr(xa), _ptr(lora_b), _ptr(adapter), _ptr(adapter_scale), np.float32(scale),
         np.int32(r), np.int32(adapters)),
    )


def gemv_t_tile(m: int) -> int:
    """The transposed GEMV's row tile for m rows of g (the largest beyond it)."""
    for tile in _source.GEMV_T_TILES:
        if m <= tile:
            return tile
    return _source.GEMV_T_TILES[-1]


def gemv_t_plan(m: int, n: int, k: int, sms: int, splits: int | None = None) -> tuple[int, int, int]:
    """(row tile, splits, rows per split) of the transposed GEMV for g (m, n) and W (n, k).

    Splits of the weight's rows give the grid about 4 blocks per SM when K alone is too short
    for it, each split at least 32 rows, and the float32 workspace (splits x m x k) no larger
    than the packed weight itself (n k / 2 bytes)."""
    tile = gemv_t_tile(m)
    if splits is None:
        blocks = _blocks(k, _T_THREADS * _T_COLS) * _blocks(m, tile)
        splits = min(_blocks(4 * sms, blocks), max(1, n // (8 * m)), _blocks(n, 32))
    splits = max(1, min(int(splits), n))
    rows_per_split = _blocks(n, splits)
    return tile, _blocks(n, rows_per_split), rows_per_split


def launch_gemv_4bit_t(g, packed, absmax, grad_xa, lora_a, ws, out, blocksize: int, quant_type: str,
                       rows_per_split: int) -> None:
    """out (M, K) = g (M, N) @ W + grad_xa (M, r) @ A (r, K) for packed W (N, K): the partial
    kernel into the float32 workspace ``ws`` (splits, M, K) (splits = ws.shape[0], each
    ``rows_per_split`` rows of W), then the finishing kernel summing the splits in order and
    adding the LoRA term (none when ``grad_xa`` is None). K % 8 == 0."""
    _check(g, "g")
    _check(packed, "packed", torch.uint8, 16)
    _check(absmax, "absmax", torch.float32)
    _check(ws, "workspace", torch.float32, 16)
    _check(out, "out", g.dtype)
    m, n = g.shape
    k = out.shape[1]
    splits = ws.shape[0]
    if tuple(ws.shape) != (splits, m, k) or out.shape[0] != m:
        raise ValueError(f"workspace {tuple(ws.shape)} / out {tuple(out.shape)} do not fit g {tuple(g.shape)}")
    if splits * rows_per_split < n or (splits - 1) * rows_per_split >= n:
        raise ValueError(f"{splits} splits of {rows_per_split} rows do not cover {n} rows exactly")
    if k % 8:
        raise ValueError(f"the transposed 4-bit matmul needs in_features % 8 == 0, got {k}")
    r = 0
    if grad_xa is not None:
        _check(grad_xa, "grad_xa", torch.float32)
        _check(lora_a, "lora_a", g.dtype)
        r = grad_xa.shape[1]
        if tuple(lora_a.shape) != (r, k) or grad_xa.shape[0] != m:
            raise ValueError(f"grad_xa {tuple(grad_xa.shape)} / lora_a {tuple(lora_a.shape)} do not fit ({m}, {k})")
    if m == 0 or k == 0:
        return
    dev = g.device.index
    suffix = _suffix(g.dtype)
    if n > 0:
        tile = gemv_t_tile(m)
        _launch(
            "gemv_4bit_t.cu", f"nybble_gemv_4bit_t_partial_{quant_type}_{suffix}_m{tile}", dev,
            (_blocks(k, _T_THREADS * _T_COLS), splits, _blocks(m, tile)), (_T_THREADS,),
            (_ptr(g), _ptr(packed), _ptr(absmax), _ptr(ws), np.int32(m), np.int32(n), np.int32(k),
             np.int32(blocksize), np.int32(rows_per_split)),
        )
    _launch(
        "gemv_4bit_t.cu", f"nybble_gemv_4bit_t_finish_{suffix}", dev, (_grid_stride_blocks(m * k, dev),), (_THREADS,),
        (_ptr(ws), np.int32(splits if n > 0 else 0), _ptr(grad_xa), _ptr(lora_a), np.int32(r), _ptr(out),
         np.int32(m), np.int32(k)),
    )


def _grid_stride_blocks(count: int, device: int) -> int:
    # Enough blocks to fill the device several times over; the kernels loop over the rest.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(_blocks(count, _THREADS), sms * 32)


def launch_int8_outlier_flags(x, flags, threshold: float) -> None:
    """flags (cols,) int32, zeroed by the caller, gets 1 where a column has |x| >= threshold."""
    _check(x, "x")
    _check(flags, "flags", torch.int32)
    numel = x.numel()
    if numel == 0:
        return
    dev = x.device.index
    _launch(
        "int8.cu", f"nybble_int8_outlier_flags_{_suffix(x.dtype)}", dev, (_grid_stride_blocks(numel, dev),),
        (_THREADS,), (_ptr(x), _ptr(flags), np.int64(numel), np.int32(x.shape[-1]), np.float32(threshold)),
    )


def launch_int8_vectorwise_quant(x, flags, q, row_absmax, threshold: float) -> None:
    """One block per row of x (rows, cols); ``flags`` is None when extraction is off."""
    _check(x, "x")
    _check(q, "q", torch.int8)
    _check(row_absmax, "row_absmax", torch.float32)
    if flags is not None:
        _check(flags, "flags", torch.int32)
    rows, cols = x.shape
    if rows == 0:
        return
    _launch(
        "int8.cu", f"nybble_int8_vectorwise_quant_{_suffix(x.dtype)}", x.device.index, (rows,), (_ROW_THREADS,),
        (_ptr(x), _ptr(flags), _ptr(q), _ptr(row_absmax), np.int32(cols), np.float32(threshold)),
    )


def launch_int8_mm_dequant(acc, row_scale, col_scale, bias, out) -> None:
    """out (rows, cols) from the int32 accumulator acc (rows', ld) with rows' >= rows, ld >= cols."""
    _check(acc, "acc", torch.int32)
    _check(row_scale, "row_scale", torch.float32)
    _check(col_scale, "col_scale", torch.float32)
    _check(out, "out")
    if bias is not None:
        _check(bias, "bias", out.dtype)
    rows, cols = out.shape
    if rows == 0 or cols == 0:
        return
    dev = out.device.index
    _launch(
        "int8.cu", f"nybble_int8_mm_dequant_{_suffix(out.dtype)}", dev, (_grid_stride_blocks(rows * cols, dev),),
        (_THREADS,),
        (_ptr(acc), np.int64(acc.shape[1]), _ptr(row_scale), _ptr(col_scale), _ptr(bias), _ptr(out), np.int32(rows),
         np.int32(cols)),
    )


def launch_int8_mm_dequant_lora(acc, row_scale, col_scale, addend, bias, xa, lora_b, scale: float, out) -> None:
    """out (rows, cols) = acc * row_scale * col_scale / 127^2 (+ addend) (+ bias) + scale * xa @ B^T:
    the LLM.int8() epilogue with the LoRA term. ``addend`` (rows, cols) and ``bias`` (cols,) are
    float32 or None, ``xa`` (rows, r) float32, ``lora_b`` (cols, r) in out's dtype."""
    _check(acc, "acc", torch.int32)
    _check(row_scale, "row_scale", torch.float32)
    _check(col_scale, "col_scale", torch.float32)
    _check(out, "out")
    _check(xa, "xa", torch.float32)
    _check(lora_b, "lora_b", out.dtype)
    if addend is not None:
        _check(addend, "addend", torch.float32)
    if bias is not None:
        _check(bias, "bias", torch.float32)
    rows, cols = out.shape
    r = xa.shape[1]
    if xa.shape[0] != rows or tuple(lora_b.shape) != (cols, r):
        raise ValueError(f"xa {tuple(xa.shape)} / lora_b {tuple(lora_b.shape)} do not fit ({rows}, {cols})")
    if addend is not None and tuple(addend.shape) != (rows, cols):
        raise ValueError(f"addend {tuple(addend.shape)} is not ({rows}, {cols})")
    if rows == 0 or cols == 0:
        return
    dev = out.device.index
    _launch(
        "int8.cu", f"nybble_int8_mm_dequant_lora_{_suffix(out.dtype)}", dev,
        (_grid_stride_blocks(rows * cols, dev),), (_THREADS,),
        (_ptr(acc), np.int64(acc.shape[1]), _ptr(row_scale), _ptr(col_scale), _ptr(addend), _ptr(bias), _ptr(xa),
         _ptr(lora_b), np.float32(scale), np.int32(r), _ptr(out), np.int32(rows), np.int32(cols)),
    )
