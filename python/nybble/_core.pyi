"""Type stubs for the Rust extension ``nybble._core``.

Float inputs are 1-D C-contiguous numpy arrays: float32 for ``dtype="float32"``, uint16 bit
patterns for ``"float16"`` and ``"bfloat16"``. Float outputs follow the same rule. Every call
releases the GIL and runs on ``threads`` workers (default: :func:`get_num_threads`), capped at
:func:`max_threads` (4 per core); pools are cached, at most 4 of them alive at once.

Every size taken from an argument (``n``, a blocksize) is checked against the buffers before
anything is allocated; an array passed for two arguments of which one is written in place is a
``ValueError``; a failed allocation is a ``MemoryError``; and a Rust panic (a bug) is raised as
:class:`nybble.errors.InternalError`, never an abort.
"""

import os
import pathlib
from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

# Errors: defined in nybble.errors and re-exported here. Every core error carries its fields
# as attributes: NonFiniteError (.index, .value, .position, .tensor, .path), CorruptFileError
# (.path, .tensor, .reason); ValueError / OverflowError / OSError ones get the variant's fields
# (e.g. .blocksize, .expected / .got, .what, .dtype, .path, .tensor; writer misuse: a plain
# ValueError with .path, .tensor, .reason). OS-level I/O errors have .errno, .strerror, .filename.
from nybble.errors import CorruptFileError as CorruptFileError
from nybble.errors import InternalError as InternalError
from nybble.errors import NonFiniteError as NonFiniteError

FloatArray = npt.NDArray[np.float32] | npt.NDArray[np.uint16]

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def max_threads() -> int: ...
def quantize_4bit(
    x: FloatArray, dtype: str, blocksize: int, quant_type: str, threads: int | None = None, simd: str | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
def dequantize_4bit(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    n: int,
    blocksize: int,
    quant_type: str,
    out_dtype: str,
    threads: int | None = None,
    simd: str | None = None,
) -> FloatArray: ...
def dequantize_4bit_into(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    blocksize: int,
    quant_type: str,
    out: FloatArray,
    out_dtype: str,
    threads: int | None = None,
    simd: str | None = None,
) -> None: ...

# Fused CPU matmuls (codes decoded in registers, never a dense weight). ``simd`` forces a level
# ("portable", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_bf16" or "auto"); None reads the
# NYBBLE_SIMD environment variable at each call, else uses the best level of this CPU. An
# unknown or unavailable level is a ValueError (``.requested``, ``.available``).

def simd_levels() -> list[str]:
    """The levels this CPU runs, lowest first ("portable" first)."""

def simd_level(simd: str | None = None) -> str:
    """The level a fused matmul runs with ``simd`` (None: NYBBLE_SIMD, else detected)."""

def set_parallel_backend(name: str) -> str:
    """Selects the threads of the fused kernels: ``"openmp"`` (the OpenMP runtime already loaded
    in the process, torch's; ``"rayon"`` when there is none) or ``"rayon"`` (nybble's pools).
    Returns the backend now in use; another name is a ValueError."""

def parallel_backend() -> str:
    """The threads the fused kernels run on: ``"openmp"`` or ``"rayon"``."""

def matmul_4bit(
    x: FloatArray,
    dtype: str,
    rows: int,
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    out_features: int,
    in_features: int,
    blocksize: int,
    quant_type: str,
    bias: npt.NDArray[np.float32] | None,
    out: FloatArray,
    simd: str | None = None,
    threads: int | None = None,
) -> None:
    """``out = x @ W^T (+ bias)`` in place: x ``rows x in_features`` (flat, ``dtype``), W packed
    NF4 / FP4 ``out_features x in_features`` (bitsandbytes layout) with float32 ``absmax`` per
    ``blocksize`` block of the flattened W, ``out`` a writable ``rows x out_features`` array of
    x's dtype; float32 accumulation, bias (float32) added before the one rounding. For bf16 x
    with more than one row on AVX512-BF16 the weights are rounded to bf16 (as dequantize +
    bf16 GEMM does). Lengths are checked (ValueError) before any work."""

def matmul_4bit_tensor(
    x: Any,
    out: Any,
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    out_features: int,
    in_features: int,
    blocksize: int,
    quant_type: str,
    bias: npt.NDArray[np.float32] | None = None,
    simd: str | None = None,
    threads: int | None = None,
) -> None:
    """:func:`matmul_4bit` with x and out as torch tensors (the per-token path: no numpy views
    built per call): contiguous CPU tensors of one dtype (float32, float16 or bfloat16), x
    ``(..., in_features)``, out ``(..., out_features)`` with as many rows, sharing no memory
    with x or the weight (ValueError otherwise)."""

def int8_linear_tensor(
    x: Any,
    out: Any,
    q_w: Any,
    scb: Any,
    out_features: int,
    in_features: int,
    threshold: float,
    bias: Any | None = None,
    simd: str | None = None,
    threads: int | None = None,
) -> None:
    """:func:`int8_linear` with every argument a torch tensor (the per-token path): x and out
    contiguous CPU tensors of one dtype (float32, float16 or bfloat16), ``q_w`` int8, ``scb``
    and ``bias`` float32, all contiguous CPU tensors; ``out`` shares no memory with the others
    (ValueError otherwise)."""

def env_var(name: str) -> str | None:
    """Environment variable ``name`` from the process environment (None when unset); what
    ``os.environ`` holds, as it writes through, at a fraction of the cost of reading it."""

def int8_linear(
    x: FloatArray,
    dtype: str,
    rows: int,
    q_w: npt.NDArray[np.int8],
    scb: npt.NDArray[np.float32],
    out_features: int,
    in_features: int,
    bias: npt.NDArray[np.float32] | None,
    threshold: float,
    out: FloatArray,
    simd: str | None = None,
    threads: int | None = None,
) -> None:
    """LLM.int8() ``out = x @ W^T (+ bias)`` in place, ``q_w`` int8 row-wise with float32 row
    absmax ``scb``: x quantized vector-wise (columns with ``|x| >= threshold`` kept in float32;
    0 disables), exact int8 dot products, ``int8_matmul_dequant``'s float32 epilogue, one
    rounding to x's dtype. NonFiniteError on NaN / Inf in x."""

def quantize_blockwise(
    x: FloatArray,
    dtype: str,
    code: npt.NDArray[np.float32],
    blocksize: int,
    threads: int | None = None,
    simd: str | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
def dequantize_blockwise(
    codes: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    code: npt.NDArray[np.float32],
    blocksize: int,
    out_dtype: str,
    threads: int | None = None,
) -> FloatArray: ...
def double_quantize(
    absmax: npt.NDArray[np.float32],
    code: npt.NDArray[np.float32],
    nested_blocksize: int = 256,
    threads: int | None = None,
    simd: str | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], float]: ...
def double_dequantize(
    codes: npt.NDArray[np.uint8],
    nested_absmax: npt.NDArray[np.float32],
    offset: float,
    code: npt.NDArray[np.float32],
    nested_blocksize: int = 256,
    threads: int | None = None,
) -> npt.NDArray[np.float32]: ...
def bits_per_parameter(n: int, blocksize: int, double_quant: bool) -> float: ...
def int8_quantize_absmax(
    x: FloatArray, dtype: str, rows: int, cols: int, granularity_name: str, threads: int | None = None
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]: ...
def int8_dequantize_absmax(
    q: npt.NDArray[np.int8],
    absmax: npt.NDArray[np.float32],
    rows: int,
    cols: int,
    granularity_name: str,
    threads: int | None = None,
) -> npt.NDArray[np.float32]: ...
def int8_quantize_zeropoint(
    x: FloatArray, dtype: str, rows: int, cols: int, granularity_name: str, threads: int | None = None
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def int8_dequantize_zeropoint(
    q: npt.NDArray[np.int8],
    scale: npt.NDArray[np.float32],
    zero_point: npt.NDArray[np.float32],
    rows: int,
    cols: int,
    granularity_name: str,
    threads: int | None = None,
) -> npt.NDArray[np.float32]: ...
def int8_outlier_columns(
    x: FloatArray, dtype: str, rows: int, cols: int, threshold: float, threads: int | None = None
) -> npt.NDArray[np.int64]: ...
def int8_vectorwise_quant(
    x: FloatArray, dtype: str, rows: int, cols: int, threshold: float, threads: int | None = None
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32], npt.NDArray[np.int64]]: ...
def error_stats(
    a: FloatArray, a_dtype: str, b: FloatArray, b_dtype: str, threads: int | None = None
) -> dict[str, float]: ...
def code_4bit(quant_type: str) -> npt.NDArray[np.float32]: ...
def nf4_from_normal_quantiles(offset: float = 0.9677083) -> npt.NDArray[np.float32]: ...
def dynamic_map(signed: bool = True) -> npt.NDArray[np.float32]: ...

# ------------------------------------------------------------------ checkpoint conversion

def resolve_checkpoint(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """The safetensors files of a file or model folder (shards of
    model.safetensors.index.json, else model.safetensors)."""

def read_safetensors_header(
    path: str | os.PathLike[str],
) -> tuple[list[tuple[str, str, list[int], int, int]], dict[str, str] | None]:
    """Validated header: ([(name, dtype, shape, absolute data offset, byte length)], metadata)."""

def is_default_quantizable(name: str, dtype: str, shape: list[int]) -> bool:
    """The default rule: 2-D float ``.weight``, not an embedding, lm_head or norm."""

def write_safetensors_file(
    path: str | os.PathLike[str],
    tensors: list[tuple[str, str, list[int], npt.NDArray[np.uint8]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes (name, dtype, shape, 1-D uint8 view of the bytes) atomically (temp file + rename)."""

class Converter:
    """A checkpoint conversion driven one tensor per :meth:`step` (GIL released inside)."""

    def __init__(
        self,
        inputs: list[str | os.PathLike[str]],
        output_dir: str | os.PathLike[str],
        quantize: set[str],
        *,
        method: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        max_shard_bytes: int = 5_000_000_000,
        error_stats: bool = True,
        threads: int | None = None,
        quant_storage: str = "uint8",
    ) -> None: ...
    def plan(self) -> list[dict[str, Any]]:
        """name, dtype, shape, quantize, in_bytes, out_bytes, shard per input tensor."""
    def shard_names(self) -> list[str]: ...
    def step(self) -> dict[str, Any] | None:
        """Converts the next tensor (checks for Ctrl-C first): name, quantized, num_elements,
        in_bytes, out_bytes, stats (dict or None); None when done."""
    def finish(self) -> None:
        """Converts what is left and writes the shard index."""
    def abort(self) -> None:
        """Abandons the conversion, deleting the shard being written."""

def adamw_step_32bit(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    dtype: str,
    exp_avg: npt.NDArray[np.float32],
    exp_avg_sq: npt.NDArray[np.float32],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    threads: int | None = None,
) -> None:
    """One fused AdamW step in place (float32 states); ``param`` / ``grad`` are 1-D
    contiguous float32 arrays or uint16 bit patterns of ``dtype`` ("float16" / "bfloat16").
    Raises NonFiniteError (touching nothing) when ``grad`` holds NaN / Inf."""

def adamw_step_8bit(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    dtype: str,
    state1: npt.NDArray[np.uint8],
    state2: npt.NDArray[np.uint8],
    absmax1: npt.NDArray[np.float32],
    absmax2: npt.NDArray[np.float32],
    code1: npt.NDArray[np.float32],
    code2: npt.NDArray[np.float32],
    blocksize: int,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    threads: int | None = None,
) -> None:
    """One fused AdamW step in place with 8-bit block-wise states (bitsandbytes' AdamW8bit:
    signed dynamic map for state1, unsigned for state2, float32 absmax per block)."""

class GptqHessian:
    """GPTQ's damped inverse-Hessian factor of one layer input (``h``: k*k float64,
    row-major, ``2 XᵀX``); shared by every weight that reads the input. Raises ValueError
    (``.column``, ``.pivot``, ``.damp``) when the damped Hessian is not positive definite."""

    def __init__(
        self,
        h: npt.NDArray[np.float64],
        k: int,
        damp: float = 0.01,
        act_order: bool = False,
        threads: int | None = None,
    ) -> None: ...
    @property
    def cols(self) -> int: ...
    @property
    def damp(self) -> float:
        """Absolute damping added to the diagonal (``damp * mean(diag H)``)."""
    @property
    def dead_columns(self) -> int: ...
    def perm(self) -> npt.NDArray[np.int64]:
        """Processing order: column ``perm[t]`` is rounded at step ``t``."""
    def upper(self) -> npt.NDArray[np.float64]:
        """``U`` (k*k, row-major, processing order): upper Cholesky factor of the damped,
        permuted inverse Hessian."""
    def quantize(
        self,
        w: npt.NDArray[np.float32],
        rows: int,
        blocksize: int = 64,
        quant_type: str = "nf4",
        lazy_block: int = 128,
        search_grid: int = 0,
        min_shrink: float = 0.8,
        objective: str = "sequential",
        absmax: npt.NDArray[np.float32] | None = None,
        threads: int | None = None,
    ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], float]:
        """GPTQ of ``w`` (rows x k float32, flattened) into bitsandbytes' 4-bit layout:
        ``(packed uint8 ((n+1)//2,), absmax float32 (nblocks,), loss)``."""
