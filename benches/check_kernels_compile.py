#!/usr/bin/env python3
"""Compiles every CUDA kernel with NVRTC for sm_80 and sm_90, without a GPU or CuPy.

CI runs this so a kernel that does not compile cannot land. NVRTC comes from the
``nvidia-cuda-nvrtc`` wheel torch depends on (or a CUDA toolkit); it is driven directly
through ctypes. Each file is compiled twice: as written (local headers through ``-I``) and as
the run-time loader assembles it (headers inlined), and the cubin must contain every kernel
the Python side launches.

With --resources, ptxas reports each kernel's resources (NVRTC passes ``-Xptxas -v`` to its
built-in ptxas; no CUDA toolkit needed) and a table prints, per architecture and launched
kernel: threads per block (``_source.BLOCK_THREADS``), registers per thread, spill stores /
loads, stack frame, static shared memory, and the occupancy those imply (resident blocks and
warps per SM, with the limiting resource). Any spill fails the check.

Exit status: 0 all compiled, 1 a compile failed (the NVRTC log is printed; with --werror a
warning fails too) or, with --resources, a kernel spills, 2 NVRTC not found.

    python benches/check_kernels_compile.py [--arch sm_80 --arch sm_90] [--nvrtc PATH] [--werror]
                                            [--resources [--json PATH]]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import glob
import importlib.util
import json
import os
import re
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


#: Per-SM limits (CUDA C++ Programming Guide, technical specifications per compute capability):
#: 32-bit registers, resident threads / blocks / warps, shared memory, and the 1 KB of shared
#: memory the runtime reserves per block.
SM_LIMITS: dict[str, dict[str, int]] = {
    "sm_80": {"regs": 65536, "threads": 2048, "blocks": 32, "warps": 64, "smem": 167936, "reserved": 1024},
    "sm_90": {"regs": 65536, "threads": 2048, "blocks": 32, "warps": 64, "smem": 233472, "reserved": 1024},
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclasses.dataclass
class Resources:
    kernel: str
    arch: str
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    threads: int = 0
    blocks_per_sm: int = 0
    warps_per_sm: int = 0
    occupancy: float = 0.0
    limiter: str = ""

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas(log: str) -> dict[str, Resources]:
    """The per-kernel lines of ``ptxas -v`` (as NVRTC puts them in its log)."""
    out: dict[str, Resources] = {}
    current: Resources | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = out.setdefault(m.group(1), Resources(m.group(1), m.group(2)))
        elif current is not None and (m := _FRAME.search(line)):
            current.stack, current.spill_stores, current.spill_loads = (int(g) for g in m.groups())
        elif current is not None and (m := _USED.search(line)):
            current.registers = int(m.group(1))
            sm = _SMEM.search(line)
            current.smem = int(sm.group(1)) if sm else 0
    return out


def occupancy(res: Resources, threads: int) -> Resources:
    """Fills in the resident blocks / warps per SM ``res`` allows at ``threads`` per block."""
    lim = SM_LIMITS[res.arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(res.registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {
        "registers": (lim["regs"] // regs_per_warp) // warps,
        "shared memory": lim["smem"] // (res.smem + lim["reserved"]),
        "threads": min(lim["threads"] // (warps * 32), lim["warps"] // warps),
        "blocks": lim["blocks"],
    }
    res.threads = threads
    res.limiter = min(by, key=lambda k: by[k])
    res.blocks_per_sm = by[res.limiter]
    res.warps_per_sm = res.blocks_per_sm * warps
    res.occupancy = res.warps_per_sm / lim["warps"]
    return res


def _is_ptxas_report(line: str) -> bool:
    return line.startswith("ptxas info") or line.startswith("ptxas         .")


def resource_table(rows: list[Resources]) -> str:
    head = ("arch", "kernel", "threads", "regs", "spill st/ld", "stack", "smem", "blocks/SM", "occupancy", "limit")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r.arch} | {r.kernel} | {r.threads} | {r.registers} | {r.spill_stores}/{r.spill_loads} | "
                     f"{r.stack} | {r.smem} | {r.blocks_per_sm} | {r.occupancy:.0%} | {r.limiter} |")
    return "\n".join(lines)


def check(archs: list[str], nvrtc_path: Path | None = None, verbose: bool = True, werror: bool = False,
          resources: bool = False, json_path: Path | None = None) -> int:
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
    table: list[Resources] = []
    for arch in archs:
        if int(arch.removeprefix("sm_")) not in supported:
            print(f"FAIL {arch}: not supported by this NVRTC (supports {supported})")
            failures += 1
            continue
        for path in src.kernel_files():
            options = [*src.nvrtc_options(nvrtc.version[0]), f"--gpu-architecture={arch}"]
            report = ["-Xptxas", "-v"] if resources else []
            variants = {
                "as written": (path.read_text(encoding="utf-8"), [*options, f"-I{cuda_dir}"]),
                "as loaded": (src.read_source(path.name), [*options, *report]),
            }
            for label, (text, opts) in variants.items():
                ok, log, cubin = nvrtc.compile(text, path.name, opts)
                if resources and label == "as loaded" and ok:
                    found = parse_ptxas(log)
                    for name in src.KERNELS.get(path.name, ()):
                        if name in found:
                            table.append(occupancy(found[name], src.block_threads(name)))
                    log = "\n".join(line for line in log.splitlines() if not _is_ptxas_report(line)).strip()
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
    if resources:
        print(resource_table(table))
        expected = sum(len(v) for v in src.KERNELS.values()) * len(archs)
        if len(table) != expected:
            failures += 1
            print(f"FAIL ptxas reported resources for {len(table)} of {expected} kernels")
        spilling = [r for r in table if r.spills]
        for r in spilling:
            failures += 1
            print(f"FAIL {r.arch} {r.kernel} spills: {r.spill_stores} bytes stored, {r.spill_loads} bytes loaded")
        low = min(table, key=lambda r: r.occupancy, default=None)
        if low is not None:
            print(f"resources: {len(table)} kernels, {len(spilling)} spilling; lowest occupancy "
                  f"{low.occupancy:.0%} ({low.arch} {low.kernel}, limited by {low.limiter})")
        if json_path is not None:
            json_path.write_text(json.dumps([dataclasses.asdict(r) for r in table], indent=1))
    print("all kernels compiled" if failures == 0 else f"{failures} compile failure(s)")
    return 0 if failures == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", action="append", help="e.g. sm_80 (repeatable; default sm_80 and sm_90)")
    p.add_argument("--nvrtc", type=Path, help="path to libnvrtc.so (default: search)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--werror", action="store_true", help="fail on any NVRTC warning")
    p.add_argument("--resources", action="store_true",
                   help="print registers / spills / shared memory / occupancy per kernel; fail on any spill")
    p.add_argument("--json", type=Path, help="with --resources: also write the table as JSON here")
    args = p.parse_args(argv)
    archs = args.arch or list(load_source_module().CI_ARCHS)
    return check(archs, args.nvrtc, verbose=not args.quiet, werror=args.werror, resources=args.resources,
                 json_path=args.json)


if __name__ == "__main__":
    sys.exit(main())
