"""CPU implementations of the ``nybble::`` ops: the Rust core on zero-copy numpy views of CPU
tensors (multithreaded, GIL released), torch where the core has no kernel of its own.

Each function has the op's signature; ``ops`` registers them as the ``CPU`` kernels.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch

from .. import _core
from . import optim as kopt
from . import reference

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

#: Threads of the fused matmuls: torch's OpenMP team ("openmp", the threads torch's own ops
#: run on; they spin between ops, so a second pool would fight them for the cores), or
#: nybble's rayon pools ("rayon", also the fallback without a loaded libgomp). Set once at
#: import from NYBBLE_PARALLEL (default "openmp"); ``_core.set_parallel_backend`` changes it.
#: Either way a call runs on ``torch.get_num_threads()`` threads, the count torch's own ops use
#: (``torch.set_num_threads`` bounds both).
PARALLEL_BACKEND = _core.set_parallel_backend(os.environ.get("NYBBLE_PARALLEL", "").strip().lower() or "openmp")


class _TensorMemory:
    """The array interface of a contiguous CPU tensor's memory, holding the tensor alive. Unlike
    ``Tensor.numpy()`` it leaves the storage resizable: FSDP2 frees an all-gathered parameter
    by resizing its storage to 0, which a storage numpy has seen refuses."""

    __slots__ = ("tensor", "__array_interface__")

    def __init__(self, t: torch.Tensor, typestr: str):
        self.tensor = t
        self.__array_interface__ = {"data": (t.data_ptr(), False), "shape": (t.numel(),), "typestr": typestr,
                                    "version": 3}


#: numpy's type string for each tensor dtype np_view hands over (16-bit floats as their uint16
#: bits: numpy has no bfloat16, and the core takes the dtype by name).
_TYPESTRS = {dtype: np.dtype(np_type).str for dtype, np_type in (
    (torch.float32, np.float32), (torch.float64, np.float64), (torch.float16, np.uint16),
    (torch.bfloat16, np.uint16), (torch.uint8, np.uint8), (torch.int8, np.int8), (torch.int16, np.int16),
    (torch.int32, np.int32), (torch.int64, np.int64))}


def np_view(t: torch.Tensor) -> np.ndarray:
    """A zero-copy 1-D numpy view of a CPU tensor made contiguous (16-bit floats as uint16);
    for a contiguous tensor it shares its memory, so the core may write through it. (Called
    several times per layer per token at decode: kept to a dict lookup and one array.)"""
    if not t.is_contiguous():
        t = t.detach().contiguous()
    typestr = _TYPESTRS.get(t.dtype)
    if typestr is None or t.numel() == 0:  # bool and the like, empty tensors: numpy's own view
        flat = t.detach().reshape(-1)
        return flat.view(torch.int16).numpy().view(np.uint16) if typestr == "<u2" else flat.numpy()
    return np.asarray(_TensorMemory(t, typestr))


def _from_core(flat: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over an array the core returned (16-bit floats come back as uint16 bits)."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.from_numpy(flat.view(np.int16)).view(dtype)
    return torch.from_numpy(flat)


def decode_absmax(codes, nested_absmax, nested_code, offset, nested_blocksize):
    # The offset arrives as a one-element tensor: reading it as a float here, inside the op,
    # keeps torch.compile from tracing a data-dependent scalar.
    out = _core.double_dequantize(np_view(codes), np_view(nested_absmax.float()), float(offset.reshape(())),
                                  np_view(nested_code.float()), nested_blocksize)
    return torch.from_numpy(out)


def double_quantize(absmax, nested_blocksize):
    code = torch.from_numpy(_core.dynamic_map(True))
    codes, nested_absmax, offset = _core.double_quantize(np_view(absmax.float()), np_view(code), nested_blocksize)
    return (torch.from_numpy(codes), torch.from_numpy(nested_absmax), code,
            torch.tensor(float(offset), dtype=torch.float32))


def dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype):
    if dtype not in DTYPE_NAMES:  # float64 (exact products) and others: the torch reference
        return reference.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, dtype)
    n = reference.numel(shape)
    flat = _core.dequantize_4bit(np_view(packed), np_view(absmax.float()), n, blocksize, quant_type,
                                 DTYPE_NAMES[dtype])
    return _from_core(flat, dtype).reshape(tuple(shape))


def quantize_4bit(w, blocksize, quant_type):
    from ..quant import quantize_4bit as core_quantize  # raises NonFiniteError with the position

    packed, state = core_quantize(w.detach(), blocksize, quant_type)
    return packed.reshape(-1, 1), torch.from_numpy(state.absmax)


#: Most rows of x (tokens) for which ``matmul_4bit`` runs the fused Rust kernel (codes decoded
#: in registers, the packed weight read once); above it, dequantize to x's dtype + one BLAS
#: call. Measured with benches/bench_cpu_decode.py --crossover (and CPU-time runs of the same
#: calls), 2 threads, torch 2.15, NF4 blocksize 64, 4096x4096 and 11008x4096:
#: - AMD EPYC Zen 4 (AVX512-BF16, no AMX): bf16 x, fused / (dequantize + oneDNN bf16 GEMM)
#:   time = 0.51 at M=64, 0.66 at 128, 0.88-1.04 at 256, 0.93-1.0 at 384; float32 x still
#:   0.76-0.95 at 384. Hence 256.
#: - Intel Xeon with AMX-BF16 (Sapphire Rapids class), nybble's ``amx_bf16`` level: bf16 x
#:   from 5 rows runs nybble's own AMX tile kernel, against dequantize + oneDNN's AMX GEMM
#:   (4096x4096, 11008x4096): 5.6x faster at 64 rows (8-20x at 6-16), 5.2x at 128, 1.4x at
#:   256, 0.87x at 512. Hence 256.
#: - The same CPU without the tiles granted to the process (no ``amx_bf16`` level; oneDNN may
#:   still use them): dequantize + BLAS wins from M = 48 (fused speed-up 2.2x at 16,
#:   1.08-1.11x at 32, 0.70-0.81x at 48): bf16 x there switches above FUSED_4BIT_MAX_M_AMX.
#:   float32 x does not use AMX (no bf16 rounding allowed), so it keeps 256.
#: - AMD EPYC Zen 3 (AVX2 only, no bf16 instructions; nybble's ``avx2`` level): torch's bf16
#:   GEMM is emulated there (2.3-2.8x slower than the fused kernel even at M = 256), so bf16 x
#:   above the limit is decoded to float32 and multiplied by the float32 BLAS, rounded once
#:   (:func:`_bf16_gemm_is_native`). Fused / (dequantize + float32 BLAS) time, bf16 x: 0.50
#:   at M=32, 0.98-0.70 at 64, 1.16-1.25 at 128; float32 x: 0.57-0.65 at 64, 0.89-1.04 at 96,
#:   1.02-1.11 at 128 (4096x4096, 11008x4096). Hence FUSED_4BIT_MAX_M_AVX2 for both.
#: Float16 x always takes the fused kernel: torch's float16 CPU GEMM is 3.5-5x slower than it
#: at every M measured (128-384). ``NYBBLE_FUSED_MAX_M`` overrides the limit (every dtype).
FUSED_4BIT_MAX_M = 256
FUSED_4BIT_MAX_M_AMX = 32
FUSED_4BIT_MAX_M_AVX2 = 96


def setting(name: str) -> str:
    """Environment variable ``name``, stripped ("" when unset), read per call (tests and users
    change the NYBBLE_* settings at run time) from the process environment that ``os.environ``
    writes through: a fraction of ``os.environ.get``'s cost on the per-token path."""
    return (_core.env_var(name) or "").strip()


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            # "flags" on x86, "Features" on arm64
            return frozenset(next(line for line in f if line.startswith(("flags", "Features"))).split(":", 1)[1].split())
    except (OSError, StopIteration, IndexError):
        return frozenset()


def fused_4bit_max_m(dtype: torch.dtype) -> int | None:
    """The most rows of x of ``dtype`` for which the fused kernel runs (None: every M)."""
    override = setting("NYBBLE_FUSED_MAX_M")
    if override:
        try:
            return max(0, int(override))
        except ValueError:
            raise ValueError(f"NYBBLE_FUSED_MAX_M={override!r} is not an integer") from None
    if dtype == torch.float16:
        return None
    if dtype == torch.bfloat16 and "amx_bf16" in cpu_flags() and not _amx_tiles():
        return FUSED_4BIT_MAX_M_AMX
    if _kernel_level() == "avx2":
        return FUSED_4BIT_MAX_M_AVX2
    return FUSED_4BIT_MAX_M


def _kernel_level() -> str:
    """The SIMD level the fused kernels run at by default (``NYBBLE_SIMD``, else the best)."""
    return _core.simd_level(None)


@functools.lru_cache(maxsize=1)
def _bf16_gemm_is_native() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16), which
    torch's bf16 GEMM uses; without them the dequantize + BLAS path multiplies in float32."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@functools.lru_cache(maxsize=1)
def _amx_tiles() -> bool:
    """Whether the core runs its AMX tile kernel here (the ``amx_bf16`` level: the CPU has
    the tiles and the OS grants them to this process)."""
    return "amx_bf16" in _core.simd_levels()


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def fused_4bit_applies(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    """Whether ``matmul_4bit`` takes the fused kernel for this input (see FUSED_4BIT_MAX_M);
    ``packed`` None: its uint8 bytes, whatever the storage."""
    if x.dtype not in DTYPE_NAMES or (packed is not None and packed.dtype != torch.uint8):
        return False
    rows = _rows(x)
    if rows <= FUSED_4BIT_MAX_M_AMX and not setting("NYBBLE_FUSED_MAX_M"):
        return True  # below every built-in limit (decode): no need to work out which applies
    limit = fused_4bit_max_m(x.dtype)
    return limit is None or rows <= limit


@functools.lru_cache(maxsize=1)
def _bf16_dot_is_slow() -> bool:
    """Whether the f32-FMA kernel beats the ``vdpbf16ps`` one for bf16 x at M >= 2: on Intel
    CPUs with AMX-BF16 (Sapphire Rapids and later) ``vdpbf16ps`` zmm issues every ~2 cycles
    against 2 FMAs per cycle. Measured there (4096x4096 NF4, 2 threads, cold cache): the f32
    kernel is 1.2-1.5x faster at M = 2..32 and equal at M = 1; on AMD Zen 4 (no AMX) the bf16
    kernel was the faster one. Where the tiles are granted the best level is ``amx_bf16``,
    whose own choice (the tile kernel from 5 rows, else the f32 one) already does this."""
    return "amx_bf16" in cpu_flags() and _core.simd_level(None) == "avx512_bf16"


def _default_simd(x: torch.Tensor) -> str | None:
    """The level the fused 4-bit kernel runs at when the caller forces none (None: the core's
    choice, ``NYBBLE_SIMD`` else the best level)."""
    if _bf16_dot_is_slow() and x.dtype == torch.bfloat16 and _rows(x) > 1 and not setting("NYBBLE_SIMD"):
        return "avx512_vnni"  # the AVX-512 f32-FMA kernel (the level below avx512_bf16)
    return None


def matmul_4bit_fused(x, packed, absmax, shape, blocksize, quant_type, bias, simd: str | None = None):
    """``x @ W^T (+ bias)`` by the fused Rust kernel (x float32 / float16 / bfloat16, any number
    of rows), the output in x's dtype. The bias is rounded to x's dtype first, as the dense
    path adds it. ``simd`` forces a level (default: ``NYBBLE_SIMD``, else the best for x:
    :func:`_default_simd`)."""
    n_out, n_in = int(shape[0]), int(shape[1])
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {n_in}")
    return matmul_4bit_views(x, np_view(packed), np_view(absmax.float()), n_out, n_in, blocksize, quant_type, bias,
                             simd)


def matmul_4bit_views(x, packed: np.ndarray, absmax: np.ndarray, n_out: int, n_in: int, blocksize: int,
                      quant_type: str, bias, simd: str | None = None):
    """:func:`matmul_4bit_fused` on the weight's numpy views (``np_view`` of the packed uint8
    bytes and of the float32 absmax), which a caller calling per token keeps (the core checks
    every length); x and the output go to the core as tensors (no views built per call)."""
    if simd is None:
        simd = _default_simd(x)
    if not x.is_contiguous():
        x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype)
    b = None if bias is None else np_view(aligned_float32(bias.detach().to(x.dtype)))
    _core.matmul_4bit_tensor(x, out, packed, absmax, n_out, n_in, blocksize, quant_type, b, simd,
                             torch.get_num_threads())
    return out


def matmul_4bit(x, packed, absmax, shape, blocksize, quant_type, bias):
    if fused_4bit_applies(x, packed):
        return matmul_4bit_fused(x, packed, absmax, shape, blocksize, quant_type, bias)
    if x.dtype == torch.bfloat16 and not _bf16_gemm_is_native():
        # No bf16 instructions: torch emulates the bf16 GEMM; decode to float32 and round once.
        w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, torch.float32)
        b = None if bias is None else bias.to(x.dtype).float()
        return torch.nn.functional.linear(x.float(), w, b).to(x.dtype)
    # Decode W once into x's dtype (float64: exact products), then one BLAS call.
    w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def int8_vectorwise_quant(x, threshold):
    from .. import int8 as core_int8

    x = x.detach()
    if x.dtype not in DTYPE_NAMES:
        x = x.float()  # e.g. float64 in gradcheck: the codes come from its float32 values
    q, row_absmax, cols = core_int8.vectorwise_quant(x, threshold)
    return q, row_absmax, cols.to(torch.int64)


def int8_matmul(a, b):
    # float64 holds every int32 accumulation exactly (|acc| < 2^53).
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype):
    return reference.int8_matmul_dequant(q_a, q_b, row_scale_a, row_scale_b, bias, dtype)


def int8_linear_applies(x: torch.Tensor, q_w: torch.Tensor) -> bool:
    """Whether ``nybble::int8_linear`` takes the fused kernel on CPU (x float32 / float16 /
    bfloat16 and an int8 2-D weight; float64 x keeps the op composition)."""
    return x.dtype in DTYPE_NAMES and q_w.dtype == torch.int8 and q_w.dim() == 2 and x.dim() >= 1


def int8_linear(x, q_w, w_scale, bias, threshold, simd: str | None = None):
    """LLM.int8() linear by the fused Rust kernel: the op composition's numerics (vector-wise
    int8 x with float32 outlier columns, exact int8 dot products, float32 epilogue, one rounding
    to x's dtype); equal to it bit for bit except the last bits of the outlier sum when two or
    more outlier columns exist (summed in column order, not BLAS's)."""
    n_out, n_in = int(q_w.shape[0]), int(q_w.shape[1])
    if x.shape[-1] != n_in:
        raise ValueError(f"x has {x.shape[-1]} features, the int8 weight {n_in}")
    out = torch.empty((*x.shape[:-1], n_out), dtype=x.dtype)
    # Every argument goes to the core as a tensor (no numpy views built per call).
    x = aligned_float32(x) if x.dtype == torch.float32 else x.contiguous()
    b = None if bias is None else aligned_float32(bias.detach())
    _core.int8_linear_tensor(x, out, q_w.contiguous(), aligned_float32(w_scale), n_out, n_in, float(threshold), b,
                             simd, torch.get_num_threads())
    return out


def aligned_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous float32 tensor at a 4-byte aligned address (the core reads it as
    ``&[f32]``): itself when it already is one, else a copy. Tensors read from a safetensors
    file at an odd offset (a checkpoint's SCB, absmax, bias) can start anywhere. The one
    place for that rule: the modules' float32 constants are stored through it too."""
    if t.dtype != torch.float32:
        return t.float().contiguous()  # a new tensor: aligned
    if t.is_contiguous() and t.data_ptr() % 4 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def adamw_8bit(p, g, state1, state2, absmax1, absmax2, code1, code2, h: dict, threads: int | None) -> None:
    dt = DTYPE_NAMES[p.dtype]
    hp = (h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"])
    _core.adamw_step_8bit(np_view(p), np_view(g), dt, state1.numpy(), state2.numpy(), absmax1.numpy(),
                          absmax2.numpy(), np_view(code1), np_view(code2), kopt.STATE_BLOCKSIZE, *hp, threads=threads)


def adamw_32bit(p, g, exp_avg, exp_avg_sq, h: dict, threads: int | None) -> None:
    dt = DTYPE_NAMES[p.dtype]
    hp = (h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"])
    _core.adamw_step_32bit(np_view(p), np_view(g), dt, exp_avg.numpy(), exp_avg_sq.numpy(), *hp, threads=threads)
