"""nybble: QLoRA with a Rust core. bitsandbytes-compatible NF4 / FP4 / int8 quantization,
packed checkpoints, and LoRA on top of them.

Arrays are numpy (float32, float16 or ``ml_dtypes.bfloat16``) or CPU torch tensors; the
Rust core works on them in place without copies, in parallel, with the GIL released.
"""

from . import codebooks, int8
from ._core import CorruptFileError, NonFiniteError, __version__, get_num_threads, set_num_threads
from .quant import (
    NestedState,
    QuantState4bit,
    dequantize_4bit,
    dequantize_blockwise,
    double_dequantize,
    double_quantize,
    quantize_4bit,
    quantize_blockwise,
)
from .stats import ErrorStats, error_stats

__all__ = [
    "CorruptFileError",
    "ErrorStats",
    "NestedState",
    "NonFiniteError",
    "QuantState4bit",
    "__version__",
    "codebooks",
    "dequantize_4bit",
    "dequantize_blockwise",
    "double_dequantize",
    "double_quantize",
    "error_stats",
    "get_num_threads",
    "int8",
    "quantize_4bit",
    "quantize_blockwise",
    "set_num_threads",
]
