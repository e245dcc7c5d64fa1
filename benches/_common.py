"""Helpers shared by the benchmark scripts (run as ``python benches/NAME.py``, so this folder
is on ``sys.path``)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

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


def reset_peak_rss() -> None:
    """Resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0). A child
    process starts with its parent's peak otherwise (fork copies the address space)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    """Bytes: VmHWM since the last reset (the lifetime maximum where resets are unsupported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache Linux reports (None where unknown)."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1024, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return max(sizes) if sizes else None
