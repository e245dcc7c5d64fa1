"""Where the CUDA sources live and how they are turned into one NVRTC translation unit.

Importable on its own (no torch, no cupy, no nybble._core) so that the CI compile check can
load it by file path on a machine without a GPU.
"""

from __future__ import annotations

import os
import re
import site
import sys
import sysconfig
from pathlib import Path

#: Options every kernel is compiled with, at run time (CuPy adds the device's arch) and in CI.
#: No fast-math: quantization must round exactly like the CPU core.
NVRTC_OPTIONS: tuple[str, ...] = ("-std=c++17",)

#: The architectures CI compiles for.
CI_ARCHS: tuple[str, ...] = ("sm_80", "sm_90")

#: Kernel files and the extern "C" kernels the Python side launches from each.
_FLOATS = ("f32", "f16", "bf16")
_QUANTS = ("nf4", "fp4")
GEMV_TILES: tuple[int, ...] = (1, 2, 4, 8, 16)
#: Row tiles of the transposed (backward) GEMV and of the LoRA down projection; M beyond the
#: largest takes several tiles (a 16-row down projection spills on sm_80).
GEMV_T_TILES: tuple[int, ...] = (1, 2, 4, 8)
LORA_DOWN_TILES: tuple[int, ...] = (1, 2, 4, 8)
KERNELS: dict[str, tuple[str, ...]] = {
    "dequant_4bit.cu": tuple(f"nybble_dequant_4bit_{q}_{t}" for q in _QUANTS for t in _FLOATS)
    + ("nybble_decode_absmax",),
    "quant_4bit.cu": tuple(f"nybble_quant_4bit_{q}_{t}" for q in _QUANTS for t in _FLOATS),
    "gemv_4bit.cu": tuple(
        f"nybble_gemv_4bit{v}_{q}_{t}_m{mt}" for v in ("", "_lora") for q in _QUANTS for t in _FLOATS
        for mt in GEMV_TILES
    ),
    "gemv_4bit_t.cu": tuple(
        f"nybble_gemv_4bit_t_partial_{q}_{t}_m{mt}" for q in _QUANTS for t in _FLOATS for mt in GEMV_T_TILES
    )
    + tuple(f"nybble_gemv_4bit_t_finish_{t}" for t in _FLOATS),
    "lora.cu": tuple(f"nybble_lora_down_{t}_m{mt}" for t in _FLOATS for mt in LORA_DOWN_TILES),
    "int8.cu": tuple(
        f"nybble_int8_{k}_{t}" for k in ("outlier_flags", "vectorwise_quant", "mm_dequant", "mm_dequant_lora")
        for t in _FLOATS
    ),
    "optim_8bit.cu": tuple(f"nybble_adamw_{b}_{t}" for b in ("8bit", "32bit") for t in _FLOATS),
}

#: Threads per block each kernel is launched with (its ``__launch_bounds__``), by name
#: prefix; the launchers use these numbers, the compile check's occupancy table too, and the
#: emulator test holds them to the bounds compiled into each kernel.
BLOCK_THREADS: dict[str, int] = {
    "nybble_dequant_4bit_": 256,
    "nybble_decode_absmax": 256,
    "nybble_quant_4bit_": 256,
    "nybble_gemv_4bit_t_partial_": 128,
    "nybble_gemv_4bit_t_finish_": 256,
    "nybble_gemv_4bit_": 128,
    "nybble_lora_down_": 128,
    "nybble_int8_": 256,
    "nybble_adamw_": 256,
}


def block_threads(kernel: str) -> int:
    """Threads per block ``kernel`` is launched with (the longest matching prefix)."""
    best = max((p for p in BLOCK_THREADS if kernel.startswith(p)), key=len, default=None)
    if best is None:
        raise KeyError(f"no launch size recorded for kernel {kernel!r}")
    return BLOCK_THREADS[best]


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def cuda_dir() -> Path:
    """The folder holding the *.cu / *.cuh sources.

    Installed: ``nybble/kernels/cuda`` inside the wheel. Source checkout: the same path is a
    symlink to the repository's top-level ``cuda/``; the fallback covers a checkout where the
    symlink was not materialized (e.g. a copy without symlink support).
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "cuda", here.parents[2] / "cuda"):
        if (candidate / "nybble_common.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"nybble's CUDA sources were not found next to {here} (expected kernels/cuda/*.cu)"
    )


def kernel_files() -> list[Path]:
    return sorted(cuda_dir().glob("*.cu"))


def read_source(name: str, _seen: frozenset[str] = frozenset()) -> str:
    """The text of ``name`` with its local ``#include "..."`` lines inlined (each header once).

    Inlining makes the source text the complete cache key for CuPy's compile cache, so an
    edited header can never be served from a stale cached binary.
    """
    path = cuda_dir() / name
    text = path.read_text(encoding="utf-8")

    def inline(m: re.Match[str]) -> str:
        header = m.group(1)
        if header in _seen:
            return f"// {header} already included"
        return f"// begin {header}\n{read_source(header, _seen | {name, header})}\n// end {header}"

    return _LOCAL_INCLUDE.sub(inline, text)


_CUDART_VERSION = re.compile(r"#define\s+CUDART_VERSION\s+(\d+)")


def _site_dirs() -> list[Path]:
    dirs = [Path(p) for p in sys.path if p]
    try:
        dirs += [Path(p) for p in site.getsitepackages()]
    except AttributeError:  # virtualenvs with an old site.py
        pass
    dirs += [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["platlib"])]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d not in out:
            out.append(d)
    return out


def _cuda_major(include: Path) -> int | None:
    try:
        m = _CUDART_VERSION.search((include / "cuda_runtime_api.h").read_text(errors="replace"))
    except OSError:
        return None
    return int(m.group(1)) // 1000 if m else None


def cuda_include_dirs(nvrtc_major: int) -> list[str]:
    """The CUDA include folder matching NVRTC's major version, for cuda_fp16.h / cuda_bf16.h.

    NVRTC 13 has no built-in copy of these headers, so they come from the NVIDIA pip wheels
    torch installs (``nvidia/cu13/include`` for CUDA 13, ``nvidia/cuda_runtime/include`` for
    CUDA 12) or from a toolkit. Headers of another major version are never mixed in. Returns
    ``[]`` when none is found; NVRTC builds that carry the headers built in still compile.
    """
    candidates: list[Path] = []
    for d in _site_dirs():
        candidates += [d / "nvidia" / f"cu{nvrtc_major}" / "include", d / "nvidia" / "cuda_runtime" / "include"]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for inc in candidates:
        if (inc / "cuda_fp16.h").is_file() and (inc / "cuda_bf16.h").is_file() and _cuda_major(inc) == nvrtc_major:
            return [str(inc)]
    return []


def nvrtc_options(nvrtc_major: int) -> tuple[str, ...]:
    """NVRTC_OPTIONS plus the include folder for the 16-bit float headers."""
    return NVRTC_OPTIONS + tuple(f"-I{d}" for d in cuda_include_dirs(nvrtc_major))
