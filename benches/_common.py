"""Helpers shared by the benchmark scripts (run as ``python benches/NAME.py``, so this folder
is on ``sys.path``)."""

from __future__ import annotations


def cpu_bf16_features() -> str:
    """The CPU's bfloat16 instructions: bitsandbytes' CPU path computes in bf16, so its speed
    (the peer's) depends on them."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "CPU flags unknown"
    found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return "bf16 instructions: " + (", ".join(found) if found else "none")
