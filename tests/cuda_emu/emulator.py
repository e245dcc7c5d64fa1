"""A CPU emulator for nybble's CUDA kernels, so their logic runs in CI without a GPU.

Each kernel file (``cuda/*.cu``, unmodified) is compiled by the host C++ compiler against shim
headers (``include/``) into a shared library together with generated trampolines and the launch
machinery (``launcher.cpp``). :meth:`Emulator.launch` takes the arguments of
``nybble.kernels._cupy._launch`` (grid, block, a tuple of numpy scalars with device pointers as
``np.uint64``) and runs the grid on the CPU: blocks one after another, each block's threads as
OS threads with real barriers. Pointers are host addresses (``tensor.data_ptr()`` of CPU
tensors).

Besides running the kernels, the emulator reports as errors what would fault or misbehave on a
GPU: arguments whose width or kind does not match the kernel's parameter, launch
configurations beyond CUDA's limits or the kernel's ``__launch_bounds__``, partial-warp or
divergent warp operations, deadlocks, misaligned or null accesses and out-of-bounds indexing of
fixed-size arrays (shared memory included).

Compiled libraries are cached on disk, keyed by a hash of the compiler, flags, shims and
sources. Test infrastructure only: not part of the nybble package.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHIM_DIR = HERE / "include"
LAUNCHER = HERE / "launcher.cpp"
RUNTIME_HEADER = "nybble_emu_runtime.h"

#: -ffp-contract=off: no FMA contraction, so every float operation rounds once like the
#: kernels' explicit _rn intrinsics. -fno-strict-aliasing: the kernels reinterpret uint4 loads
#: as other element types, which nvcc tolerates. The sanitizer reports go to launcher.cpp.
CXX_FLAGS: tuple[str, ...] = (
    "-std=c++20",
    "-O1",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-fsanitize=alignment,null,bounds",
    "-fPIC",
    "-pthread",
)
LINK_FLAGS: tuple[str, ...] = ("-shared", "-pthread", "-Wl,-z,defs")

#: CUDA's launch configuration limits (compute capability 7.0 and later).
MAX_BLOCK = (1024, 1024, 64)
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65535, 65535)

#: Seconds a thread may wait in one barrier before the launch is reported as deadlocked.
DEFAULT_TIMEOUT_S = 60.0

_KERNEL = re.compile(
    r'extern\s+"C"\s+__nybble_emu_global__\s+void\s+'
    r"(?:__nybble_emu_launch_bounds__\s*\((?P<bounds>(?:[^()]|\([^()]*\))*)\)\s*)?"
    r"(?P<name>\w+)\s*\("
)


class KernelEmulationError(RuntimeError):
    """A launch that would fail or misbehave on a GPU, or a kernel that does not compile."""


def find_compiler() -> str | None:
    """$CXX, else g++ on PATH."""
    return os.environ.get("CXX") or shutil.which("g++")


def default_cache_dir() -> Path:
    """$NYBBLE_CUDA_EMU_CACHE, else a per-user folder in the temporary directory."""
    env = os.environ.get("NYBBLE_CUDA_EMU_CACHE")
    if env:
        return Path(env)
    return Path(tempfile.gettempdir()) / f"nybble-cuda-emu-{os.getuid()}"


def _dims(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not 1 <= len(dims) <= 3:
        raise KernelEmulationError(f"{what} must have 1 to 3 dimensions, got {value!r}")
    dims = tuple(int(d) for d in dims) + (1,) * (3 - len(dims))
    return dims  # type: ignore[return-value]


def _arg_bytes(arg) -> tuple[str, bytes]:
    """(numpy kind, bytes) of one argument, converted as CuPy's CScalar converts it
    (cupy/_core/_scalar.pyx): Python ints become int64 (uint64 from 2^63), floats float64."""
    if isinstance(arg, bool):
        arg = np.bool_(arg)
    elif isinstance(arg, int):
        arg = np.uint64(arg) if arg >= 2**63 else np.int64(arg)
    elif isinstance(arg, float):
        arg = np.float64(arg)
    elif isinstance(arg, complex):
        arg = np.complex128(arg)
    if not isinstance(arg, np.generic):
        raise KernelEmulationError(f"kernel arguments must be numpy scalars, got {type(arg).__name__}")
    return arg.dtype.kind, arg.tobytes()


class KernelLibrary:
    """One compiled kernel file: its kernels by name with their launch bounds."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.nybble_emu_kernel_name.restype = ctypes.c_char_p
        self._lib.nybble_emu_last_error.restype = ctypes.c_char_p
        self._lib.nybble_emu_launch.restype = ctypes.c_int
        self._lib.nybble_emu_launch.argtypes = [
            ctypes.c_int, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int,
            ctypes.c_double, ctypes.c_int,
        ]  # fmt: skip
        self.kernels: dict[str, int] = {
            self._lib.nybble_emu_kernel_name(i).decode(): i for i in range(self._lib.nybble_emu_kernel_count())
        }
        self.max_threads = {name: self._lib.nybble_emu_kernel_max_threads(i) for name, i in self.kernels.items()}

    def launch(self, name: str, grid, block, args: Sequence, timeout_s: float, reverse_blocks: bool) -> None:
        if name not in self.kernels:
            raise KernelEmulationError(f"{self.path.name} has no kernel {name!r}")
        grid3, block3 = _dims(grid, "grid"), _dims(block, "block")
        threads = block3[0] * block3[1] * block3[2]
        if min(grid3) < 1 or min(block3) < 1:
            raise KernelEmulationError(f"{name}: empty launch configuration grid={grid3} block={block3}")
        if any(b > m for b, m in zip(block3, MAX_BLOCK)) or threads > MAX_THREADS_PER_BLOCK:
            raise KernelEmulationError(f"{name}: block {block3} exceeds CUDA's limits")
        if any(g > m for g, m in zip(grid3, MAX_GRID)):
            raise KernelEmulationError(f"{name}: grid {grid3} exceeds CUDA's limits")
        if threads > self.max_threads[name]:
            raise KernelEmulationError(
                f"{name}: {threads} threads per block exceed its __launch_bounds__({self.max_threads[name]})"
            )
        converted = [_arg_bytes(a) for a in args]
        # One 16-byte aligned slot per argument, like a kernel parameter buffer.
        slots = np.zeros(max(1, len(args)) * 2, dtype=np.uint64)
        raw = slots.view(np.uint8)
        for i, (_, data) in enumerate(converted):
            if len(data) > 16:
                raise KernelEmulationError(f"{name}: argument {i} is wider than 16 bytes")
            raw[16 * i : 16 * i + len(data)] = np.frombuffer(data, dtype=np.uint8)
        base = slots.ctypes.data
        pointers = (ctypes.c_void_p * max(1, len(args)))(*[base + 16 * i for i in range(len(args))])
        kinds = "".join(kind for kind, _ in converted).encode()
        sizes = (ctypes.c_int * max(1, len(args)))(*[len(data) for _, data in converted])
        rc = self._lib.nybble_emu_launch(
            self.kernels[name], (ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), pointers, kinds, sizes,
            len(args), float(timeout_s), int(reverse_blocks),
        )  # fmt: skip
        if rc:
            raise KernelEmulationError(self._lib.nybble_emu_last_error().decode(errors="replace"))


class Emulator:
    """Compiles the kernel files of ``source_dir`` on demand (cached) and launches their kernels.

    ``reverse_blocks``: run blocks last to first, to expose kernels that depend on block order.
    """

    def __init__(self, source_dir: Path, cache_dir: Path | None = None, compiler: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):  # fmt: skip
        self.source_dir = Path(source_dir).resolve()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.compiler = compiler or find_compiler()
        if self.compiler is None:
            raise KernelEmulationError("no C++ compiler (g++ or $CXX) found")
        self.timeout_s = timeout_s
        self.reverse_blocks = False
        self._libraries: dict[str, KernelLibrary] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ building

    def _build_key(self) -> str:
        """Hash of everything a compiled library depends on: compiler, flags, shims, sources."""
        h = hashlib.sha256()
        version = subprocess.run([self.compiler, "--version"], capture_output=True, text=True).stdout
        h.update(f"{self.compiler}\n{version}\n{CXX_FLAGS}\n{LINK_FLAGS}\n".encode())
        inputs = sorted(SHIM_DIR.iterdir()) + [LAUNCHER, Path(__file__)]
        inputs += sorted(p for p in self.source_dir.iterdir() if p.suffix in (".cu", ".cuh", ".h"))
        for p in inputs:
            h.update(f"{p.name}\n".encode())
            h.update(p.read_bytes())
        return h.hexdigest()[:20]

    def _include_flags(self) -> list[str]:
        return [f"-I{SHIM_DIR}", f"-I{self.source_dir}", "-include", RUNTIME_HEADER]

    def _run(self, cmd: list[str], what: str) -> str:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise KernelEmulationError(f"{what} failed:\n{' '.join(cmd)}\n{done.stderr[-8000:]}")
        return done.stdout

    def scan_kernels(self, file: str) -> dict[str, str]:
        """The extern "C" __global__ kernels of ``file``: name -> __launch_bounds__ arguments ("" if none)."""
        text = self._run(
            [self.compiler, *CXX_FLAGS, "-DNYBBLE_EMU_SCAN", *self._include_flags(), "-E", "-P", "-x", "c++",
             str(self.source_dir / file)],
            f"preprocessing {file}",
        )  # fmt: skip
        return {m["name"]: (m["bounds"] or "").strip() for m in _KERNEL.finditer(text)}

    def _compile_launcher(self, out_dir: Path) -> Path:
        obj = out_dir / "launcher.o"
        if not obj.exists():
            tmp = out_dir / f"launcher.{os.getpid()}.{threading.get_ident()}.o"
            self._run([self.compiler, *CXX_FLAGS, f"-I{SHIM_DIR}", "-c", str(LAUNCHER), "-o", str(tmp)],
                      "compiling the emulator's launcher")  # fmt: skip
            os.replace(tmp, obj)
        return obj

    def _build(self, file: str, out_dir: Path, launcher_obj: Path) -> Path:
        kernels = self.scan_kernels(file)
        if not kernels:
            raise KernelEmulationError(f'{file} defines no extern "C" __global__ kernel')
        entries = ",\n".join(
            f'    nybble_emu::make_entry<&{name}>("{name}", nybble_emu::first_of({bounds or 1024}))'
            for name, bounds in kernels.items()
        )
        trampolines = (
            f"// Generated by {Path(__file__).name} for {file}.\n"
            f'#include "{self.source_dir / file}"\n#include "nybble_emu_kernels.h"\n\n'
            f"NYBBLE_EMU_KERNEL_TABLE(\n{entries})\n"
        )
        stem = Path(file).stem
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src, obj, lib = Path(tmp) / f"{stem}.cpp", Path(tmp) / f"{stem}.o", Path(tmp) / f"{stem}.so"
            src.write_text(trampolines)
            self._run([self.compiler, *CXX_FLAGS, *self._include_flags(), "-c", str(src), "-o", str(obj)],
                      f"compiling {file}")  # fmt: skip
            self._run([self.compiler, *LINK_FLAGS, str(obj), str(launcher_obj), "-o", str(lib)], f"linking {file}")
            final = out_dir / f"{stem}.so"
            os.replace(lib, final)  # atomic: a concurrent session sees the old library or the new one
        return final

    def build(self, files: Iterable[str]) -> None:
        """Compiles (or loads from the cache) the given kernel files, in parallel."""
        files = [f for f in files if f not in self._libraries]
        if not files:
            return
        out_dir = self.cache_dir / self._build_key()
        out_dir.mkdir(parents=True, exist_ok=True)
        missing = [f for f in files if not (out_dir / f"{Path(f).stem}.so").exists()]
        if missing:
            launcher_obj = self._compile_launcher(out_dir)
            with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
                for future in [pool.submit(self._build, f, out_dir, launcher_obj) for f in missing]:
                    future.result()
        with self._lock:
            for f in files:
                self._libraries.setdefault(f, KernelLibrary(out_dir / f"{Path(f).stem}.so"))

    def library(self, file: str) -> KernelLibrary:
        if file not in self._libraries:
            self.build([file])
        return self._libraries[file]

    # ------------------------------------------------------------------ launching

    def launch(self, file: str, name: str, grid, block, args: Sequence, timeout_s: float | None = None) -> None:
        """Runs kernel ``name`` of ``file`` to completion (synchronously), like
        ``nybble.kernels._cupy._launch`` without the device argument."""
        self.library(file).launch(name, grid, block, args, timeout_s or self.timeout_s, self.reverse_blocks)
