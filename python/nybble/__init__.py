"""nybble: QLoRA with a Rust core. bitsandbytes-compatible NF4 / FP4 / int8 quantization,
packed checkpoints, and LoRA on top of them.

Arrays are numpy (float32, float16 or ``ml_dtypes.bfloat16``) or CPU torch tensors; the
Rust core works on them in place without copies, in parallel, with the GIL released.
"""

from . import codebooks, int8
from ._core import CorruptFileError, InternalError, NonFiniteError, __version__, get_num_threads, set_num_threads
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


def __getattr__(name):
    # torch is an optional extra: the modules and model API load on first use.
    lazy = {
        "nn": ("nybble.nn", None),
        "gptq": ("nybble.gptq", None),
        "quantize_model": ("nybble.model", "quantize_model"),
        "add_lora": ("nybble.model", "add_lora"),
        "merge_adapters": ("nybble.model", "merge_adapters"),
        "dequantize_model": ("nybble.model", "dequantize_model"),
        "set_adapters_enabled": ("nybble.model", "set_adapters_enabled"),
        "adapters_disabled": ("nybble.model", "adapters_disabled"),
        "save_adapter": ("nybble.model", "save_adapter"),
        "load_adapter": ("nybble.model", "load_adapter"),
        "load_quantized": ("nybble.model", "load_quantized"),
        # transformers quantization config (imports torch and transformers on first use)
        "NybbleConfig": ("nybble.integrations.transformers", "NybbleConfig"),
    }
    if name not in lazy:
        raise AttributeError(f"module 'nybble' has no attribute {name!r}")
    import importlib

    module, attr = lazy[name]
    mod = importlib.import_module(module)
    return mod if attr is None else getattr(mod, attr)

__all__ = [
    "CorruptFileError",
    "ErrorStats",
    "InternalError",
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
