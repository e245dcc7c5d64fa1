"""Helpers shared by the benchmark scripts (run as ``python benches/NAME.py``, so this folder
is on ``sys.path``)."""

from __future__ import annotations

import os
import platform

#: The CPU features the benchmark tables report.
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
              "avx512vbmi", "amx_bf16", "asimd", "sve")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line for line in f if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_bf16_features() -> str:
    """The CPU's bfloat16 instructions: bitsandbytes' CPU path computes in bf16, so its speed
    (the peer's) depends on them."""
    from nybble.kernels._cpu import cpu_flags

    flags = cpu_flags()
    if not flags:
        return "CPU flags unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return "bf16 instructions: " + (", ".join(found) if found else "none")


def cpu_line() -> str:
    """CPU model, logical CPUs, SIMD flags, bf16 instructions and nybble's SIMD levels."""
    from nybble import _core
    from nybble.kernels._cpu import cpu_flags

    flags = [f for f in SIMD_FLAGS if f in cpu_flags()]
    return (f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; SIMD flags: {' '.join(flags) or 'unknown'}; "
            f"{cpu_bf16_features()}; nybble SIMD levels: {', '.join(_core.simd_levels())} "
            f"(default {_core.simd_level()})")
