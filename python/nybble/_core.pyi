"""Type stubs for the Rust extension ``nybble._core``.

Float inputs are 1-D C-contiguous numpy arrays: float32 for ``dtype="float32"``, uint16 bit
patterns for ``"float16"`` and ``"bfloat16"``. Float outputs follow the same rule. Every call
releases the GIL and runs on ``threads`` workers (default: :func:`get_num_threads`).
"""

import numpy as np
import numpy.typing as npt

__version__: str

class NonFiniteError(ValueError):
    """An input holds NaN or Inf; the message names the flat index."""

class CorruptFileError(ValueError):
    """A file is not a valid safetensors / packed checkpoint."""

FloatArray = npt.NDArray[np.float32] | npt.NDArray[np.uint16]

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def quantize_4bit(
    x: FloatArray, dtype: str, blocksize: int, quant_type: str, threads: int | None = None
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]: ...
def dequantize_4bit(
    packed: npt.NDArray[np.uint8],
    absmax: npt.NDArray[np.float32],
    n: int,
    blocksize: int,
    quant_type: str,
    out_dtype: str,
    threads: int | None = None,
) -> FloatArray: ...
def quantize_blockwise(
    x: FloatArray, dtype: str, code: npt.NDArray[np.float32], blocksize: int, threads: int | None = None
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
