#!/usr/bin/env python3
"""Compiles every CUDA kernel with NVRTC for sm_80 and sm_90, without a GPU or CuPy.

CI runs this so a kernel that does not compile cannot land. NVRTC comes from the
``nvidia-cuda-nvrtc`` wheel torch depends on (or a CUDA toolkit); it is driven directly
through ctypes. Each file is compiled twice: as written (local headers through ``-I``) and as
the run-time loader assembles it (headers inlined), and the cubin must contain every kernel
the Python side launches.

Exit status: 0 all compiled, 1 a compile failed (the NVRTC log is printed; with --werror a
warning fails too), 2 NVRTC not found.

    python benches/check_kernels_compile.py [--arch sm_80 --arch sm_90] [--nvrtc PATH] [--werror]
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE_MODULE = REPO / "python" / "nybble" / "kernels" / "_source.py"


def load_source_module():
    """nybble/kernels/_source.py by path: no torch, CuPy or built extension needed."""
    spec = importlib.util.spec_from_file_location("_nybble_kernel_source", SOURCE_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _site_dirs() -> list[Path]:
    return load_source_module()._site_dirs()


def find_nvrtc() -> list[Path]:
    """Candidate libnvrtc paths, best first: $NYBBLE_NVRTC, the NVIDIA pip wheels (CUDA 13
    ships nvidia/cu13/lib, CUDA 12 nvidia/cuda_nvrtc/lib), then a CUDA toolkit."""
    found: list[Path] = []
    env = os.environ.get("NYBBLE_NVRTC")
    if env:
        found.append(Path(env))
    patterns = ["libnvrtc.so.*", "nvrtc64_*.dll"]
    for d in _site_dirs():
        for sub in ("nvidia/cu13/lib", "nvidia/cu13/bin", "nvidia/cuda_nvrtc/lib", "nvidia/cuda_nvrtc/bin"):
            for pat in patterns:
                found += sorted((Path(p) for p in glob.glob(str(d / sub / pat))), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            for pat in patterns:
                found += sorted((Path(p) for p in glob.glob(str(Path(home) / "lib64" / pat))), reverse=True)
    # Skip the builtins companion library and any alias already listed.
    out: list[Path] = []
    for p in found:
        if p.is_file() and "builtins" not in p.name and p not in out:
            out.append(p)
    return out


class Nvrtc:
    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(result).decode()}")

    def supported_archs(self) -> list[int]:
        n = ctypes.c_int()
        self._check(self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * n.value)()
        self._check(self.lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return list(archs)

    def compile(self, source: str, name: str, options: list[str]) -> tuple[bool, str, bytes]:
        """Returns (ok, log, cubin)."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(
                ctypes.byref(prog), source.encode(), name.encode(), 0, None, None
            ),
            "nvrtcCreateProgram",
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            result = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
            log_text = log.value.decode(errors="replace").strip()
            if result != 0:
                err = self.lib.nvrtcGetErrorString(result).decode()
                return False, f"{err}\n{log_text}", b""
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            return True, log_text, cubin.raw
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def check(archs: list[str], nvrtc_path: Path | None = None, verbose: bool = True, werror: bool = False) -> int:
    src = load_source_module()
    candidates = [nvrtc_path] if nvrtc_path else find_nvrtc()
    if not candidates:
        print("check_kernels_compile: libnvrtc not found (install torch's nvidia-cuda-nvrtc "
              "dependency or set NYBBLE_NVRTC=/path/to/libnvrtc.so)", file=sys.stderr)
        return 2
    nvrtc = Nvrtc(candidates[0])
    supported = nvrtc.supported_archs()
    print(f"NVRTC {nvrtc.version[0]}.{nvrtc.version[1]} from {nvrtc.path}")
    includes = src.cuda_include_dirs(nvrtc.version[0])
    print(f"CUDA headers: {includes[0] if includes else 'NVRTC built-ins only'}")
    cuda_dir = src.cuda_dir()
    failures = 0
    for arch in archs:
        if int(arch.removeprefix("sm_")) not in supported:
            print(f"FAIL {arch}: not supported by this NVRTC (supports {supported})")
            failures += 1
            continue
        for path in src.kernel_files():
            options = [*src.nvrtc_options(nvrtc.version[0]), f"--gpu-architecture={arch}"]
            variants = {
                "as written": (path.read_text(encoding="utf-8"), [*options, f"-I{cuda_dir}"]),
                "as loaded": (src.read_source(path.name), options),
            }
            for label, (text, opts) in variants.items():
                ok, log, cubin = nvrtc.compile(text, path.name, opts)
                missing = [k for k in src.KERNELS.get(path.name, ()) if k.encode() not in cubin]
                if not ok or missing or (werror and log):
                    failures += 1
                    print(f"FAIL {arch} {path.name} ({label})")
                    if log:
                        print(log)
                    if ok and missing:
                        print(f"  kernels missing from the cubin: {missing}")
                elif verbose:
                    warn = f"\n{log}" if log else ""
                    print(f"ok   {arch} {path.name} ({label}): {len(cubin)} bytes cubin{warn}")
    unknown = set(src.KERNELS) - {p.name for p in src.kernel_files()}
    if unknown:
        failures += 1
        print(f"FAIL kernel files listed in _source.KERNELS but missing: {sorted(unknown)}")
    print("all kernels compiled" if failures == 0 else f"{failures} compile failure(s)")
    return 0 if failures == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", help="e.g. sm_80 (repeatable; default sm_80 and sm_90)")
    p.add_argument("--nvrtc", type=Path, help="path to libnvrtc.so (default: search)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--werror", action="store_true", help="fail on any NVRTC warning")
    args = p.parse_args(argv)
    archs = args.arch or list(load_source_module().CI_ARCHS)
    return check(archs, args.nvrtc, verbose=not args.quiet, werror=args.werror)


if __name__ == "__main__":
    sys.exit(main())
