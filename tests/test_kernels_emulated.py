"""The CUDA kernels, run on the CPU by the emulator in tests/cuda_emu, through the real launchers
of ``nybble.kernels._cupy`` and ``nybble.kernels.optim``: bit-identical to the Rust core where
the kernels claim it (quantize, dequantize, double-quant decode, int8 quantization, optimizer
steps), within the stated float32 error bound for the fused matmul.

This is the CPU twin of test_kernels_gpu.py, with small sizes. Every output sits between guard
bytes that must stay untouched and is poisoned before each launch; every kernel runs twice
(the second time with another poison and the blocks in reverse order) and both runs must agree
bit for bit, so an unwritten element, a race or a block-order dependence fails.
"""

# The launch lambdas are called within the loop iteration that defines them.
# ruff: noqa: B023

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cuda_emu.emulator import Emulator, KernelEmulationError, find_compiler  # noqa: E402

import nybble  # noqa: E402
import nybble.int8  # noqa: E402
import nybble.quant  # noqa: E402
from nybble import _core  # noqa: E402
from nybble import kernels as dispatch  # noqa: E402
from nybble.kernels import _cuda, _source, ops  # noqa: E402
from nybble.kernels import optim as kopt  # noqa: E402
from nybble.kernels import reference as ref  # noqa: E402

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the CUDA emulator is built for Linux"),
    pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler (g++ or $CXX) for the CUDA emulator"),
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("f32", "f16", "bf16")
QUANT_TYPES = ("nf4", "fp4")
#: Multiprocessors the emulated device reports: grid-stride kernels then launch at most 32
#: blocks of 256 threads, so their loops wrap from 8193 elements on.
EMULATED_SMS = 1
GRID_STRIDE_SPAN = EMULATED_SMS * 32 * 256
#: Bytes of canary on each side of every output.
GUARD = 64
CANARY = 0xC3
#: The two poisons of run_twice: NaN for every float type, then a finite pattern.
POISONS = (0xFF, 0x5A)


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def emulator() -> Emulator:
    emu = Emulator(_source.cuda_dir())
    emu.build(_source.KERNELS)  # each file once per session (and cached across sessions)
    return emu


class _AsCudaTensor:
    """A CPU tensor that answers ``is_cuda`` with True, so ``_cupy._check`` runs its other checks."""

    is_cuda = True

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    def __getattr__(self, name):
        return getattr(self._tensor, name)


def _cupy_stub() -> types.ModuleType:
    """Stands in for CuPy so ``_cupy`` imports; touching it would mean a launch bypassed ``_launch``."""
    stub = types.ModuleType("cupy")

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AssertionError(f"cupy.{name} was used under the CUDA emulator")

    stub.__getattr__ = __getattr__
    return stub


@pytest.fixture(scope="module")
def k(emulator):
    """``nybble.kernels._cupy`` imported against a CuPy stub, launching on the emulator.

    The stub and this copy of ``_cupy`` are removed afterwards, and nybble.kernels' cached
    backend lookup is cleared, so other tests still see a machine without CuPy."""
    names = ("cupy", "nybble.kernels._cupy")
    saved_modules = {name: sys.modules.get(name) for name in names}
    saved_attr = dispatch.__dict__.get("_cupy")
    sys.modules["cupy"] = _cupy_stub()
    sys.modules.pop("nybble.kernels._cupy", None)
    try:
        cupy_side = importlib.import_module("nybble.kernels._cupy")
        real_check = cupy_side._check

        def launch(file, name, device, grid, block, args):
            emulator.launch(file, name, grid, block, args)

        def check_on_cpu(t, what, dtype=None, align=1):
            real_check(_AsCudaTensor(t), what, dtype, align)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(cupy_side, "_launch", launch)
            mp.setattr(cupy_side, "_check", check_on_cpu)
            mp.setattr(torch.cuda, "get_device_properties",
                       lambda device=None: types.SimpleNamespace(multi_processor_count=EMULATED_SMS))  # fmt: skip
            yield cupy_side
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        if saved_attr is None:
            dispatch.__dict__.pop("_cupy", None)
        else:
            dispatch._cupy = saved_attr
        _cuda.cupy_backend.cache_clear()


@pytest.fixture
def gen(rng) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


# ---------------------------------------------------------------------- helpers


class Guarded:
    """A tensor placed 256-byte aligned (like a CUDA allocation) inside a larger buffer whose
    bytes on both sides hold a canary, to catch writes out of bounds."""

    def __init__(self, shape, dtype: torch.dtype, fill: int | torch.Tensor):
        shape = tuple(shape)
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        self.buffer = torch.full((nbytes + 2 * GUARD + 256,), CANARY, dtype=torch.uint8)
        start = self.buffer.data_ptr() + GUARD
        self.offset = GUARD + (-start) % 256
        self.nbytes = nbytes
        self.tensor = self.buffer[self.offset : self.offset + nbytes].view(dtype).reshape(shape)
        if isinstance(fill, torch.Tensor):
            self.tensor.copy_(fill)
        else:
            self.buffer[self.offset : self.offset + nbytes] = fill

    def check_guards(self, what: str) -> None:
        before, after = self.buffer[: self.offset], self.buffer[self.offset + self.nbytes :]
        assert bool((before == CANARY).all()), f"{what}: a kernel wrote before the start of its output"
        assert bool((after == CANARY).all()), f"{what}: a kernel wrote past the end of its output"


def assert_bits_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal bit patterns (NaN-safe, -0.0 is not 0.0), with the first difference on failure."""
    expected = torch.as_tensor(expected)
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, expected {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    a, b = got.reshape(-1).view(as_int), expected.reshape(-1).contiguous().view(as_int)
    bad = torch.nonzero(a != b).reshape(-1)
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.numel()} of {a.numel()} elements differ; first at flat index {i}: "
            f"got {got.reshape(-1)[i].item()!r}, expected {expected.reshape(-1)[i].item()!r}"
        )


def run_twice(emulator: Emulator, launch, *outputs, poisons=POISONS):
    """Launches into fresh guarded outputs ``(shape, dtype)``, twice: poisoned with
    ``poisons[0]`` in block order, then ``poisons[1]`` in reverse block order. Both runs must
    agree bitwise and keep the guards; returns the outputs of the first run."""
    runs = []
    for poison, reverse in zip(poisons, (False, True)):
        guarded = [Guarded(shape, dtype, poison) for shape, dtype in outputs]
        emulator.reverse_blocks = reverse
        try:
            launch(*(g.tensor for g in guarded))
        finally:
            emulator.reverse_blocks = False
        for i, g in enumerate(guarded):
            g.check_guards(f"output {i}")
        runs.append([g.tensor for g in guarded])
    for i, (first, second) in enumerate(zip(*runs)):
        assert_bits_equal(second, first, f"output {i}, two launches (unwritten elements, a race or block order?)")
    return runs[0][0] if len(outputs) == 1 else runs[0]


def spread_values(shape, gen: torch.Generator) -> torch.Tensor:
    """Normal values with heavy tails (normal / uniform), a few -0.0 and an all-zero leading run."""
    x = torch.randn(shape, generator=gen) / torch.rand(shape, generator=gen).clamp_min(0.05)
    flat = x.view(-1)
    flat[: min(flat.numel() // 4, 64)] = 0.0
    flat[flat.numel() // 2 :: 97] = -0.0
    return x


# ---------------------------------------------------------------------- the kernel files


def test_every_launched_kernel_is_emulated(emulator):
    for file, names in _source.KERNELS.items():
        lib = emulator.library(file)
        missing = set(names) - set(lib.kernels)
        assert not missing, f"{file} lacks {sorted(missing)}"
        # The launch sizes the launchers and the occupancy table use are the compiled bounds.
        wrong = {n: (lib.max_threads[n], _source.block_threads(n)) for n in names
                 if lib.max_threads[n] != _source.block_threads(n)}  # fmt: skip
        assert not wrong, f"{file}: __launch_bounds__ vs _source.BLOCK_THREADS: {wrong}"


# ---------------------------------------------------------------------- 4-bit quantize / dequantize


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_4bit_bit_identical_to_core(k, emulator, gen, quant_type, blocksize, dtype):
    for shape in [(1,), (7,), (33, 65), (3 * blocksize + 1,)]:
        w = spread_values(shape, gen).to(dtype)
        n = w.numel()
        packed, absmax = run_twice(
            emulator,
            lambda p, a: k.launch_quantize_4bit(w, p, a, blocksize, quant_type),
            (((n + 1) // 2, 1), torch.uint8),
            ((-(-n // blocksize),), torch.float32),
        )
        core_packed, state = nybble.quant.quantize_4bit(w, blocksize, quant_type)
        assert_bits_equal(packed, core_packed, f"packed {shape}")
        assert_bits_equal(absmax, torch.from_numpy(state.absmax), f"absmax {shape}")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_quantize_4bit_non_finite_blocks_get_nan_absmax(k, emulator, gen, quant_type, dtype):
    blocksize, n = 64, 1000  # 16 blocks, the last one partial (40 elements)
    w = torch.randn(n, generator=gen)
    poisoned_at = {3: 3 * 64 + 5, 7: 7 * 64, 15: n - 1}  # block -> element
    for value, i in zip((float("nan"), float("inf"), float("-inf")), poisoned_at.values()):
        w[i] = value
    w = w.to(dtype)
    packed, absmax = run_twice(
        emulator,
        lambda p, a: k.launch_quantize_4bit(w, p, a, blocksize, quant_type),
        (((n + 1) // 2, 1), torch.uint8),
        ((16,), torch.float32),
    )
    assert bool(absmax[list(poisoned_at)].isnan().all())
    # Blocks are independent: the finite ones match the core on the same data made finite.
    clean = w.clone()
    clean[list(poisoned_at.values())] = 0
    core_packed, state = nybble.quant.quantize_4bit(clean, blocksize, quant_type)
    for b in sorted(set(range(16)) - set(poisoned_at)):
        assert_bits_equal(absmax[b], torch.from_numpy(state.absmax)[b], f"absmax of block {b}")
        rows = slice(b * blocksize // 2, min((b + 1) * blocksize, n) // 2)
        assert_bits_equal(packed[rows], core_packed[rows], f"codes of block {b}")


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_quantize_4bit_ties_go_to_the_lower_code(k, emulator, quant_type):
    """Values exactly on the float32 midpoints between neighbouring levels, in blocks whose
    absmax is 1 so the scaled value is the value itself: a full block (reciprocal path) and a
    partial one (division path)."""
    table = ref.code_table(quant_type)
    levels = table if quant_type == "nf4" else torch.sort(table[:8]).values  # ascending (magnitudes for FP4)
    ties = (levels[:-1] + levels[1:]) * 0.5
    full = torch.cat([torch.ones(1), ties, -ties])
    w = torch.cat([full, torch.zeros(32 - full.numel()), torch.ones(1), ties])  # blocks of 32: full, partial
    n = w.numel()
    packed, absmax = run_twice(
        emulator,
        lambda p, a: k.launch_quantize_4bit(w, p, a, 32, quant_type),
        (((n + 1) // 2, 1), torch.uint8),
        ((2,), torch.float32),
    )
    core_packed, state = nybble.quant.quantize_4bit(w, 32, quant_type)
    assert_bits_equal(packed, core_packed, "packed")
    assert_bits_equal(absmax, torch.from_numpy(state.absmax), "absmax")
    decoded = table[ref.unpack_codes(packed, n)]
    for start in (1, 33):  # the ties of each block decode to the lower neighbour
        assert torch.equal(decoded[start : start + ties.numel()], levels[:-1])


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dequantize_4bit_bit_identical_to_core(k, emulator, gen, quant_type, blocksize, dtype):
    # 2145 and 10245 elements: several thread blocks and a ragged tail of n % 8 elements.
    for shape in [(1,), (7,), (33, 65), (5, 2049)]:
        packed, state = nybble.quant.quantize_4bit(torch.randn(shape, generator=gen), blocksize, quant_type)
        absmax = torch.from_numpy(state.absmax)
        out = run_twice(
            emulator, lambda o: k.launch_dequantize_4bit(packed, absmax, o, blocksize, quant_type), (shape, dtype)
        )
        assert_bits_equal(out, nybble.quant.dequantize_4bit(packed, state, dtype), f"vs core {shape}")
        # Ground truth: the exact product code * absmax (float64), rounded to float32 once as the
        # kernel's single multiply does, then to the output type.
        exact = ref.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, torch.float64)
        assert_bits_equal(out, exact.to(torch.float32).to(dtype), f"vs float64 {shape}")


@pytest.mark.parametrize("nested_blocksize", [256, 64])
def test_decode_absmax_bit_identical_to_core(k, emulator, gen, nested_blocksize):
    for nblocks in (1, 255, 257, 3000):
        absmax = torch.rand(nblocks, generator=gen) * 3
        codes, nested = nybble.quant.double_quantize(absmax.numpy(), nested_blocksize)
        args = [torch.from_numpy(a) for a in (codes, nested.nested_absmax, nested.code)]
        offset = torch.tensor([nested.offset], dtype=torch.float32)
        out = run_twice(
            emulator,
            lambda o: k.launch_decode_absmax(*args, offset, o, nested_blocksize),
            ((nblocks,), torch.float32),
        )
        assert_bits_equal(out, torch.from_numpy(nybble.quant.double_dequantize(codes, nested)), f"{nblocks} blocks")


# ---------------------------------------------------------------------- fused 4-bit matmul

#: (out_features, in_features, blocksize, bias): one 32-code chunk; quantization blocks that
#: span rows; a block larger than the matrix; K past one warp stride (lanes take 2 or 3 steps).
GEMV_CASES = [(1, 32, 32, False), (37, 96, 64, True), (5, 64, 4096, True), (6, 2080, 128, False)]
#: Unit roundoff of each output type (float32 output is the accumulator, not rounded again).
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def gemv_error_bound(x64, w64, bias64, dtype) -> torch.Tensor:
    """The float32 error bound of gemv_4bit.cu's evaluation order, plus the final rounding.

    Weights enter at full float32 precision (code * absmax, no rounding to the compute dtype),
    so only the accumulation rounds: each product x * w passes through at most 32 fmaf steps of
    its chunk's partial sum, one fmaf per later chunk of its lane (K / 1024 of them), the 5
    levels of the warp sum and the bias add. With d such roundings the float32 result is within
    gamma_d * sum |terms| (gamma_d = d u / (1 - d u), u = 2^-24) of the exact value; rounding to
    a 16-bit output adds its unit roundoff relative to the result, and half a subnormal step."""
    k_dim = x64.shape[1]
    depth = 32 + math.ceil(k_dim / 1024) + 5 + 1
    u32 = 2.0**-24
    gamma = depth * u32 / (1 - depth * u32)
    magnitude = x64.abs() @ w64.abs().t() + (0 if bias64 is None else bias64.abs())
    exact = x64 @ w64.t() + (0 if bias64 is None else bias64)
    f32_error = gamma * magnitude
    return f32_error + UNIT_ROUNDOFF[dtype] * (exact.abs() + f32_error) + 2.0**-25


@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 17])  # row tiles 1, 2, 4, 8, 16 and 16 twice (last one partial)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_gemv_4bit_within_float32_error_bound(k, emulator, gen, quant_type, dtype, m):
    for out_f, in_f, blocksize, with_bias in GEMV_CASES:
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        packed, absmax = ref.quantize_4bit(w, blocksize, quant_type)
        x = torch.randn(m, in_f, generator=gen).to(dtype)
        bias = torch.randn(out_f, generator=gen).to(dtype) if with_bias else None
        out = run_twice(
            emulator,
            lambda o: k.launch_gemv_4bit(x, packed, absmax, bias, o, blocksize, quant_type),
            ((m, out_f), dtype),
        )
        w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), blocksize, quant_type, torch.float64)
        bias64 = None if bias is None else bias.double()
        expected = x.double() @ w64.t() + (0 if bias64 is None else bias64)
        error = (out.double() - expected).abs()
        bound = gemv_error_bound(x.double(), w64, bias64, dtype)
        assert bool((error <= bound).all()), (
            f"{(out_f, in_f, blocksize)}: worst error {float(error.max()):.3g} vs bound {float(bound.min()):.3g}"
        )


# ---------------------------------------------------------------------- QLoRA kernels

U32 = 2.0**-24


def gamma(depth: int) -> float:
    """Higham's gamma_d = d u / (1 - d u): the relative bound of d float32 roundings in a chain."""
    return depth * U32 / (1 - depth * U32)


def output_rounding(exact: torch.Tensor, f32_error: torch.Tensor, dtype) -> torch.Tensor:
    """The float32 error plus the final rounding to ``dtype`` (and half a float32 subnormal step)."""
    return f32_error + UNIT_ROUNDOFF[dtype] * (exact.abs() + f32_error) + 2.0**-25


def lora_down_bound(xl64, a64) -> torch.Tensor:
    """lora.cu: each lane chains 8 fmaf per 256 columns it visits, then 5 levels of warp sum."""
    depth = 8 * math.ceil(xl64.shape[1] / 256) + 5
    return gamma(depth) * (xl64.abs() @ a64.abs().t())


def _adapter(gen, rank, out_f, in_f, dtype, stacked=None):
    lead = () if stacked is None else (stacked,)
    a = (torch.randn(*lead, rank, in_f, generator=gen) * 0.05).to(dtype)
    b = (torch.randn(*lead, out_f, rank, generator=gen) * 0.05).to(dtype)
    return a, b


#: (rank, rows M, dtype, quant_type, blocksize, out_features, in_features, bias): ranks 1, 8
#: and 64; row tiles 1, 4, 16 (partial) and two tiles of 16; K past one warp stride of the GEMV
#: (1088: lanes take 1 or 2 steps) and of the down projection (320, 1088).
LORA_GEMV_CASES = [
    (1, 1, torch.bfloat16, "nf4", 64, 37, 96, False),
    (8, 3, torch.float16, "fp4", 128, 37, 320, True),
    (64, 9, torch.float32, "nf4", 32, 21, 1088, True),
    (8, 17, torch.bfloat16, "nf4", 64, 6, 64, True),
]


@pytest.mark.parametrize("case", LORA_GEMV_CASES, ids=lambda c: f"r{c[0]}-m{c[1]}-{str(c[2])[6:]}-{c[3]}")
def test_gemv_4bit_lora_epilogue_within_float32_error_bound(k, emulator, gen, case):
    """x A^T by lora.cu, then the GEMV with the LoRA epilogue, against float64 math."""
    rank, m, dtype, quant_type, blocksize, out_f, in_f, with_bias = case
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    packed, absmax = ref.quantize_4bit(w, blocksize, quant_type)
    x = torch.randn(m, in_f, generator=gen).to(dtype)
    xl = torch.randn(m, in_f, generator=gen).to(dtype)  # the adapter's own input (dropout)
    a, b = _adapter(gen, rank, out_f, in_f, dtype)
    bias = torch.randn(out_f, generator=gen).to(dtype) if with_bias else None
    scale = 1.75

    xa = run_twice(emulator, lambda o: k.launch_lora_down(xl, a, None, o), ((m, rank), torch.float32))
    xl64, a64, b64 = xl.double(), a.double(), b.double()
    xa64 = xl64 @ a64.t()
    down_bound = lora_down_bound(xl64, a64)
    assert bool(((xa.double() - xa64).abs() <= down_bound).all()), "x A^T"

    out = run_twice(
        emulator,
        lambda o: k.launch_gemv_4bit_lora(x, packed, absmax, bias, xa, b, None, None, scale, o, blocksize, quant_type),
        ((m, out_f), dtype),
    )
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), blocksize, quant_type, torch.float64)
    bias64 = 0 if bias is None else bias.double()
    exact = x.double() @ w64.t() + bias64 + scale * (xa64 @ b64.t())
    # Base and LoRA products share one accumulator: 32 fmaf per chunk, one per later chunk,
    # one per 32 adapter columns, the rounding of s * B, the warp sum and the bias add. x A^T
    # enters with the down projection's error.
    depth = 32 + math.ceil(in_f / 1024) + math.ceil(rank / 32) + 1 + 5 + 1
    magnitude = x.double().abs() @ w64.abs().t() + (0 if bias is None else bias.double().abs())
    magnitude = magnitude + scale * (xa64.abs() @ b64.abs().t())
    f32_error = gamma(depth) * magnitude + scale * (down_bound @ b64.abs().t()) * (1 + gamma(depth))
    error = (out.double() - exact).abs()
    bound = output_rounding(exact, f32_error, dtype)
    assert bool((error <= bound).all()), f"worst error {float(error.max()):.3g}, bound {float(bound.min()):.3g}"


def test_gemv_4bit_lora_with_an_adapter_per_row(k, emulator, gen):
    """Stacked adapters: each row its own A / B and scale; index -1 and one past the end mean
    no adapter (x A^T = 0 exactly, the base output)."""
    adapters, rank, m, out_f, in_f, dtype = 3, 8, 7, 37, 96, torch.bfloat16
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    packed, absmax = ref.quantize_4bit(w, 64, "nf4")
    x = torch.randn(m, in_f, generator=gen).to(dtype)
    a, b = _adapter(gen, rank, out_f, in_f, dtype, stacked=adapters)
    index = torch.tensor([2, -1, 0, 1, 2, 3, 0], dtype=torch.int32)
    per_adapter = torch.tensor([0.5, 2.0, 1.5])
    scale = 0.75
    xa = run_twice(emulator, lambda o: k.launch_lora_down(x, a, index, o), ((m, rank), torch.float32))
    out = run_twice(
        emulator,
        lambda o: k.launch_gemv_4bit_lora(x, packed, absmax, None, xa, b, index, per_adapter, scale, o, 64, "nf4"),
        ((m, out_f), dtype),
    )
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", torch.float64)
    x64 = x.double()
    base = x64 @ w64.t()
    depth = 32 + 1 + 1 + 1 + 5
    for i, j in enumerate(index.tolist()):
        if not 0 <= j < adapters:
            assert bool((xa[i] == 0).all()), f"row {i}: x A^T of a row without an adapter"
            exact, mag = base[i], x64[i].abs() @ w64.abs().t()
            f32_error = gamma(depth) * mag
        else:
            a64, b64, s = a[j].double(), b[j].double(), scale * float(per_adapter[j])
            xa64 = x64[i] @ a64.t()
            down = lora_down_bound(x64[i : i + 1], a64)[0]
            assert bool(((xa[i].double() - xa64).abs() <= down).all()), f"row {i}: x A^T"
            exact = base[i] + s * (b64 @ xa64)
            mag = x64[i].abs() @ w64.abs().t() + s * (b64.abs() @ xa64.abs())
            f32_error = gamma(depth) * mag + s * (b64.abs() @ down) * (1 + gamma(depth))
        error = (out[i].double() - exact).abs()
        assert bool((error <= output_rounding(exact, f32_error, dtype)).all()), f"row {i} (adapter {j})"


#: (rank or None, rows M, dtype, quant_type, blocksize, out_features N, in_features K, splits):
#: K not a multiple of 32 and one column tile with idle threads; two splits whose rows come in
#: chunks of 32 and 18; two column tiles (the second with one active thread), two row tiles
#: and ragged splits (24, 24, 22); rank 64 with a block larger than the matrix.
GEMV_T_CASES = [
    (None, 1, torch.float32, "nf4", 64, 40, 264, 1),
    (1, 5, torch.bfloat16, "fp4", 32, 100, 264, 2),
    (8, 11, torch.float16, "nf4", 128, 70, 1032, 3),
    (64, 2, torch.bfloat16, "nf4", 4096, 33, 64, 1),
]


@pytest.mark.parametrize("case", GEMV_T_CASES, ids=lambda c: f"r{c[0]}-m{c[1]}-{str(c[2])[6:]}-{c[3]}-s{c[7]}")
def test_gemv_4bit_t_within_float32_error_bound(k, emulator, gen, case):
    """dX = g W + grad_xa A: the split partial sums (the workspace is poisoned too, so every
    element of it must be written) and the finishing kernel, against float64 math."""
    rank, m, dtype, quant_type, blocksize, out_f, in_f, splits = case
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    packed, absmax = ref.quantize_4bit(w, blocksize, quant_type)
    g = torch.randn(m, out_f, generator=gen).to(dtype)
    gxa = a = None
    if rank is not None:
        gxa = torch.randn(m, rank, generator=gen) * 0.3
        a = (torch.randn(rank, in_f, generator=gen) * 0.05).to(dtype)
    _, splits, rows_per_split = k.gemv_t_plan(m, out_f, in_f, EMULATED_SMS, splits)
    ws, out = run_twice(
        emulator,
        lambda ws, o: k.launch_gemv_4bit_t(g, packed, absmax, gxa, a, ws, o, blocksize, quant_type, rows_per_split),
        ((splits, m, in_f), torch.float32),
        ((m, in_f), dtype),
    )
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), blocksize, quant_type, torch.float64)
    g64 = g.double()
    exact = g64 @ w64
    magnitude = g64.abs() @ w64.abs()
    if rank is not None:
        exact = exact + gxa.double() @ a.double()
        magnitude = magnitude + gxa.double().abs() @ a.double().abs()
    # Each weight is one float32 product (code * absmax), each split chains one fmaf per row,
    # the splits are summed in order, then r fmaf and an add.
    depth = 1 + rows_per_split + splits + (rank or 0) + 2
    error = (out.double() - exact).abs()
    bound = output_rounding(exact, gamma(depth) * magnitude, dtype)
    assert bool((error <= bound).all()), f"worst error {float(error.max()):.3g}, bound {float(bound.min()):.3g}"
    # The workspace holds each split's partial product g[:, rows] W[rows] within its own bound.
    for s_ in range(splits):
        rows = slice(s_ * rows_per_split, min(out_f, (s_ + 1) * rows_per_split))
        part = g64[:, rows] @ w64[rows]
        part_bound = gamma(rows_per_split + 1) * (g64[:, rows].abs() @ w64[rows].abs()) + 2.0**-126
        assert bool(((ws[s_].double() - part).abs() <= part_bound).all()), f"workspace split {s_}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int8_mm_dequant_lora_epilogue(k, emulator, gen, dtype):
    """The LLM.int8() epilogue with outliers, bias and the LoRA term: with a zero adapter
    scale bit-identical to the op composition's float32 steps; otherwise within the float32
    bound of float64 math. (130, 70): more than one grid-stride pass."""
    for m, kdim, n, rank, with_addend, with_bias in [(3, 40, 24, 1, True, False), (17, 64, 33, 8, False, True),
                                                     (130, 8, 70, 64, True, True)]:
        q_a = torch.randint(-128, 128, (m, kdim), generator=gen, dtype=torch.int8)
        q_b = torch.randint(-128, 128, (n, kdim), generator=gen, dtype=torch.int8)
        sa, sb = torch.rand(m, generator=gen) * 4, torch.rand(n, generator=gen) * 4
        addend = torch.randn(m, n, generator=gen) * 3 if with_addend else None
        bias = torch.randn(n, generator=gen) if with_bias else None
        xa = torch.randn(m, rank, generator=gen)
        b = (torch.randn(n, rank, generator=gen) * 0.1).to(dtype)
        acc = _cuda.int_mm_padded(q_a, q_b)
        for scale in (0.0, 1.5):
            out = run_twice(
                emulator,
                lambda o: k.launch_int8_mm_dequant_lora(acc, sa, sb, addend, bias, xa, b, scale, o),
                ((m, n), dtype),
            )
            base32 = ref.int8_matmul_dequant(q_a, q_b, sa, sb, None, torch.float32)
            if addend is not None:
                base32 = base32 + addend
            if bias is not None:
                base32 = base32 + bias
            if scale == 0.0:
                assert_bits_equal(out, base32.to(dtype), f"{(m, kdim, n)}: zero adapter vs the composition")
                continue
            exact = ref.int8_matmul_dequant(q_a, q_b, sa, sb, None, torch.float64)
            magnitude = exact.abs()
            if addend is not None:
                exact, magnitude = exact + addend.double(), magnitude + addend.double().abs()
            if bias is not None:
                exact, magnitude = exact + bias.double(), magnitude + bias.double().abs()
            exact = exact + scale * (xa.double() @ b.double().t())
            magnitude = magnitude + scale * (xa.double().abs() @ b.double().abs().t())
            bound = output_rounding(exact, gamma(rank + 8) * magnitude, dtype)
            assert bool(((out.double() - exact).abs() <= bound).all()), f"{(m, kdim, n)} rank {rank}"


# ---------------------------------------------------------------------- LLM.int8()


@pytest.mark.parametrize("threshold", [0.0, 3.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int8_vectorwise_quant_bit_identical_to_core(k, emulator, gen, dtype, threshold):
    # (33, 257): more elements than one grid-stride pass of the outlier scan, rows wider than a block.
    for rows, cols in [(1, 1), (3, 17), (5, 300), (33, 257)]:
        x = torch.randn(rows, cols, generator=gen) * 2
        x[rows // 2, cols // 3] = 7.5  # an outlier column even at threshold 6
        x = x.to(dtype)
        flags = None
        if threshold > 0:
            flags = run_twice(
                emulator, lambda f: k.launch_int8_outlier_flags(x, f, threshold), ((cols,), torch.int32),
                poisons=(0, 0),  # the caller zeroes the flags
            )  # fmt: skip
        q, row_absmax = run_twice(
            emulator,
            lambda q, a: k.launch_int8_vectorwise_quant(x, flags, q, a, threshold),
            ((rows, cols), torch.int8),
            ((rows,), torch.float32),
        )
        q_core, absmax_core, cols_core = nybble.int8.vectorwise_quant(x, threshold)
        assert_bits_equal(q, q_core, f"q {(rows, cols)}")
        assert_bits_equal(row_absmax, absmax_core, f"row absmax {(rows, cols)}")
        got_cols = torch.nonzero(flags).reshape(-1) if flags is not None else torch.zeros(0, dtype=torch.int64)
        assert got_cols.tolist() == cols_core.tolist()
        q_ref, absmax_ref, _ = ref.int8_vectorwise_quant(x, threshold)
        assert_bits_equal(q, q_ref, "q vs torch reference")
        assert_bits_equal(row_absmax, absmax_ref, "row absmax vs torch reference")


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_int8_mm_dequant_bit_identical_to_reference(k, emulator, gen, dtype, with_bias):
    # The accumulator comes padded as on CUDA (row stride > cols); 130 x 70 outputs take more
    # than one grid-stride pass.
    for m, kdim, n in [(1, 8, 8), (17, 64, 24), (130, 40, 70)]:
        q_a = torch.randint(-128, 128, (m, kdim), generator=gen, dtype=torch.int8)
        q_b = torch.randint(-128, 128, (n, kdim), generator=gen, dtype=torch.int8)
        scale_a, scale_b = torch.rand(m, generator=gen) * 4, torch.rand(n, generator=gen) * 4
        bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
        acc = _cuda.int_mm_padded(q_a, q_b)
        assert torch.equal(acc[:m, :n].double(), q_a.double() @ q_b.double().t())
        out = run_twice(emulator, lambda o: k.launch_int8_mm_dequant(acc, scale_a, scale_b, bias, o), ((m, n), dtype))
        assert_bits_equal(out, ref.int8_matmul_dequant(q_a, q_b, scale_a, scale_b, bias, dtype), f"{(m, kdim, n)}")
        exact = ref.int8_matmul_dequant(q_a, q_b, scale_a, scale_b, bias, torch.float64)
        eps = {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        assert bool(((out.double() - exact).abs() <= eps * exact.abs() + 1e-3).all())


# ---------------------------------------------------------------------- AdamW

ADAMW_HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def _core_view(t: torch.Tensor) -> np.ndarray:
    """A writable numpy view for the Rust core (16-bit floats as uint16 bit patterns)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _grad(n: int, step: int, gen: torch.Generator, dtype) -> torch.Tensor:
    return (torch.randn(n, generator=gen) * 10.0 ** (step - 3)).to(dtype)  # scales 1e-2 .. 10


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_adamw_8bit_bit_identical_to_core(k, emulator, gen, dtype):
    code1, code2 = torch.from_numpy(_core.dynamic_map(True)), torch.from_numpy(_core.dynamic_map(False))
    for n in (1, 255, 3 * 256 + 77):
        nb = -(-n // kopt.STATE_BLOCKSIZE)
        p0 = torch.randn(n, generator=gen).to(dtype)
        core = [p0.clone(), torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
                torch.zeros(nb), torch.zeros(nb)]  # fmt: skip
        # Two emulated copies of the state, stepped in block order and in reverse block order.
        copies = [[Guarded(t.shape, t.dtype, t) for t in core] for _ in range(2)]
        for step in range(1, 5):
            g = _grad(n, step, gen, dtype)
            h = ADAMW_HYPER
            _core.adamw_step_8bit(_core_view(core[0]), _core_view(g), str(dtype).removeprefix("torch."),
                                  *(t.numpy() for t in core[1:]), code1.numpy(), code2.numpy(),
                                  kopt.STATE_BLOCKSIZE, step, h["lr"], h["beta1"], h["beta2"], h["eps"],
                                  h["weight_decay"])  # fmt: skip
            c = kopt.adamw_constants(h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"], step)
            for reverse, copy in zip((False, True), copies):
                emulator.reverse_blocks = reverse
                p, s1, s2, a1, a2 = (t.tensor for t in copy)
                try:
                    kopt.launch_adamw_8bit(p, g, s1, s2, a1, a2, code1, code2, c)
                finally:
                    emulator.reverse_blocks = False
                for name, got, want in zip(("param", "state1", "state2", "absmax1", "absmax2"), copy, core):
                    got.check_guards(name)
                    assert_bits_equal(got.tensor, want, f"{name}, n={n}, step {step}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_adamw_32bit_bit_identical_to_core(k, emulator, gen, dtype):
    for n in (1, 1000, GRID_STRIDE_SPAN + 808):
        core = [torch.randn(n, generator=gen).to(dtype), torch.zeros(n), torch.zeros(n)]
        copies = [[Guarded(t.shape, t.dtype, t) for t in core] for _ in range(2)]
        for step in range(1, 4):
            g = _grad(n, step, gen, dtype)
            h = ADAMW_HYPER
            _core.adamw_step_32bit(_core_view(core[0]), _core_view(g), str(dtype).removeprefix("torch."),
                                   core[1].numpy(), core[2].numpy(), step, h["lr"], h["beta1"], h["beta2"],
                                   h["eps"], h["weight_decay"])  # fmt: skip
            c = kopt.adamw_constants(h["lr"], h["beta1"], h["beta2"], h["eps"], h["weight_decay"], step)
            for reverse, (p, m, v) in zip((False, True), copies):
                emulator.reverse_blocks = reverse
                try:
                    kopt.launch_adamw_32bit(p.tensor, g, m.tensor, v.tensor, c)
                finally:
                    emulator.reverse_blocks = False
                for name, got, want in zip(("param", "exp_avg", "exp_avg_sq"), (p, m, v), core):
                    got.check_guards(name)
                    assert_bits_equal(got.tensor, want, f"{name}, n={n}, step {step}")


# ---------------------------------------------------------------------- the dispatch layer


def test_dispatch_functions_on_emulated_kernels(k, gen, monkeypatch):
    """The CUDA implementations of the nybble:: ops (output allocation, alignment fix-ups, the
    NaN check, the padded int8 GEMM) with the emulated kernels standing in for the GPU ones."""
    monkeypatch.setattr(_cuda, "cupy_backend", lambda: k)

    # Double-quant decode as the modules call it: the offset a 0-d tensor view, read by pointer.
    absmax_f = torch.rand(300, generator=gen) * 2
    codes_np, nested = nybble.quant.double_quantize(absmax_f.numpy())
    expected = torch.from_numpy(nybble.quant.double_dequantize(codes_np, nested))
    offset_bits = torch.tensor(nested.offset, dtype=torch.float32).view(torch.int32)
    for offset in (torch.tensor(nested.offset), offset_bits.view(torch.float32)):
        got = _cuda.decode_absmax(torch.from_numpy(codes_np), torch.from_numpy(nested.nested_absmax),
                                     torch.from_numpy(nested.code), offset, nested.blocksize)
        assert_bits_equal(got, expected, f"decode_absmax, offset {type(offset).__name__}")

    w = torch.randn(40, 96, generator=gen) * 0.02
    packed, absmax = _cuda.quantize_4bit(w, 64, "nf4")
    core_packed, state = nybble.quant.quantize_4bit(w, 64, "nf4")
    assert_bits_equal(packed, core_packed, "quantize_4bit")
    w_bad = torch.randn(1000, generator=gen)
    w_bad[8 * 64 + 3] = float("nan")
    with pytest.raises(nybble.NonFiniteError, match="block 8"):
        _cuda.quantize_4bit(w_bad, 64, "nf4")

    # An odd byte offset: dequantize_4bit must realign the packed bytes for the kernel.
    shifted = torch.empty(packed.numel() + 1, dtype=torch.uint8)[1:].copy_(packed.reshape(-1))
    out = _cuda.dequantize_4bit(shifted, absmax, (40, 96), 64, "nf4", torch.bfloat16)
    assert_bits_equal(out, nybble.quant.dequantize_4bit(core_packed, state, torch.bfloat16), "dequantize_4bit")

    x = torch.randn(2, 3, 96, generator=gen).to(torch.float16)
    bias = torch.randn(40, generator=gen)
    got = _cuda.matmul_4bit(x, packed, absmax, (40, 96), 64, "nf4", bias)
    assert got.shape == (2, 3, 40) and got.dtype == torch.float16
    w64 = ref.dequantize_4bit(packed, absmax, (40, 96), 64, "nf4", torch.float64)
    x64, b64 = x.double().reshape(6, 96), bias.half().double()
    bound = gemv_error_bound(x64, w64, b64, torch.float16)
    assert bool(((got.double().reshape(6, 40) - (x64 @ w64.t() + b64)).abs() <= bound).all())

    q_a = torch.randint(-128, 128, (2, 5, 24), generator=gen, dtype=torch.int8)
    q_b = torch.randint(-128, 128, (12, 24), generator=gen, dtype=torch.int8)
    sa, sb = torch.rand(10, generator=gen), torch.rand(12, generator=gen)
    got = _cuda.int8_matmul_dequant(q_a, q_b, sa, sb, None, torch.bfloat16)
    assert_bits_equal(got, ref.int8_matmul_dequant(q_a, q_b, sa, sb, None, torch.bfloat16), "int8_matmul_dequant")


def _rel_close(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, eps: float, what: str) -> None:
    err = (got.double() - exact).abs()
    assert bool((err <= eps * magnitude + 1e-6).all()), f"{what}: worst error {float(err.max()):.3g}"


@pytest.fixture
def emulated_cuda(k, monkeypatch):
    """The CUDA implementations of the ops (``_cuda``) on the emulated kernels: CPU tensors
    stand in for device memory, one scratch buffer stands in for the device's."""
    monkeypatch.setattr(_cuda, "cupy_backend", lambda: k)
    monkeypatch.setattr(_cuda, "_scratch_key", lambda device: ("emulated", 0))
    monkeypatch.setattr(_cuda, "_SCRATCH_STEP", 4096)  # small steps: growth shows on small weights
    _cuda.release_scratch()
    yield k
    _cuda.release_scratch()


def test_qlora_dispatch_on_emulated_kernels(emulated_cuda, gen):
    """matmul_4bit_lora / matmul_4bit_grad_input / int8_linear_lora as the CUDA dispatch runs
    them: small M on the fused kernels, large M through the reused scratch buffer + GEMMs."""
    out_f, in_f, rank, scale = 40, 96, 8, 1.5
    w = torch.randn(out_f, in_f, generator=gen) * 0.02
    packed, absmax = ref.quantize_4bit(w, 64, "nf4")
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", torch.float64)
    a, b = _adapter(gen, rank, out_f, in_f, torch.bfloat16)
    a64, b64 = a.double(), b.double()
    bias = torch.randn(out_f, generator=gen).to(torch.bfloat16)
    for lead in ((2, 3), (70,)):  # 6 rows: the kernels; 70 rows: scratch + GEMMs
        x = torch.randn(*lead, in_f, generator=gen).to(torch.bfloat16)
        xl = torch.randn(*lead, in_f, generator=gen).to(torch.bfloat16)
        out, xa = _cuda.matmul_4bit_lora(x, packed, absmax, (out_f, in_f), 64, "nf4", bias, xl, a, b, scale, None,
                                         None)
        assert out.shape == (*lead, out_f) and out.dtype == torch.bfloat16
        assert xa.shape == (*lead, rank) and xa.dtype == torch.bfloat16
        x64, xl64 = x.double().reshape(-1, in_f), xl.double().reshape(-1, in_f)
        exact = x64 @ w64.t() + bias.double() + scale * (xl64 @ a64.t()) @ b64.t()
        mag = x64.abs() @ w64.abs().t() + bias.double().abs() + scale * (xl64.abs() @ a64.abs().t()) @ b64.abs().t()
        _rel_close(out.reshape(-1, out_f), exact, mag, 2.0**-6, f"matmul_4bit_lora {lead}")
        _rel_close(xa.reshape(-1, rank), xl64 @ a64.t(), xl64.abs() @ a64.abs().t(), 2.0**-7, f"x A^T {lead}")

        g = torch.randn(*lead, out_f, generator=gen).to(torch.bfloat16)
        gxa = torch.randn(math.prod(lead), rank, generator=gen).to(torch.bfloat16)
        for with_lora in (False, True):
            got = _cuda.matmul_4bit_grad_input(g, packed, absmax, (out_f, in_f), 64, "nf4",
                                               gxa if with_lora else None, a if with_lora else None)
            assert got.shape == (*lead, in_f) and got.dtype == torch.bfloat16
            g64 = g.double().reshape(-1, out_f)
            exact, mag = g64 @ w64, g64.abs() @ w64.abs()
            if with_lora:
                exact, mag = exact + gxa.double() @ a64, mag + gxa.double().abs() @ a64.abs()
            _rel_close(got.reshape(-1, in_f), exact, mag, 2.0**-6, f"grad_input {lead} lora={with_lora}")

    # The scratch buffer: allocated once, reused for the same or smaller weights, grown for larger.
    assert len(_cuda._SCRATCH) == 1
    buf = next(iter(_cuda._SCRATCH.values()))
    x = torch.randn(80, in_f, generator=gen).to(torch.bfloat16)
    _cuda.matmul_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4", None)
    assert next(iter(_cuda._SCRATCH.values())) is buf
    big = torch.randn(buf.numel() // (2 * 64) + 8, 64, generator=gen) * 0.02  # more bf16 bytes than buf holds
    p_big, a_big = ref.quantize_4bit(big, 64, "nf4")
    x = torch.randn(70, 64, generator=gen).to(torch.bfloat16)
    got = _cuda.matmul_4bit(x, p_big, a_big, tuple(big.shape), 64, "nf4", None)
    grown = next(iter(_cuda._SCRATCH.values()))
    assert grown is not buf and grown.numel() >= big.numel() * 2 and len(_cuda._SCRATCH) == 1
    big64 = ref.dequantize_4bit(p_big, a_big, tuple(big.shape), 64, "nf4", torch.float64)
    _rel_close(got, x.double() @ big64.t(), x.double().abs() @ big64.abs().t(), 2.0**-6, "grown scratch")

    # Multi-adapter serving through the dispatch: the fused path, then the reference's loop.
    stacked_a, stacked_b = _adapter(gen, rank, out_f, in_f, torch.float16, stacked=2)
    index = torch.tensor([1, -1, 0, 1])
    x = torch.randn(4, in_f, generator=gen).to(torch.float16)
    fused, _ = _cuda.matmul_4bit_lora(x, packed, absmax, (out_f, in_f), 64, "nf4", None, None, stacked_a, stacked_b,
                                      2.0, index, torch.tensor([1.0, 0.5]))
    expected, _ = ref.matmul_4bit_lora(x.double(), packed, absmax, (out_f, in_f), 64, "nf4", None, None,
                                       stacked_a.double(), stacked_b.double(), 2.0, index, torch.tensor([1.0, 0.5]))
    mag = x.double().abs() @ w64.abs().t() + 2 * (x.double().abs() @ stacked_a.double().abs()[1].t()).abs().sum()
    _rel_close(fused, expected, mag, 2.0**-9, "multi-adapter")

    # LLM.int8() with its LoRA term: small M on the epilogue kernel (with outlier columns), large M composed.
    q_w = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
    scb = torch.rand(out_f, generator=gen) * 0.1 + 0.01
    a16, b16 = a.to(torch.float16), b.to(torch.float16)
    for rows in (5, 70):
        x = (torch.randn(rows, in_f, generator=gen)).to(torch.float16)
        x[:, 7] = 9.0  # an outlier column at threshold 6
        got, xa = _cuda.int8_linear_lora(x, q_w, scb, bias.float(), 6.0, None, a16, b16, scale, ops._int8_linear)
        expected, xa_ref = ref.int8_linear_lora(x, q_w, scb, bias.float(), 6.0, None, a16.float().to(torch.float16),
                                                b16, scale)
        assert got.dtype == torch.float16 and xa.dtype == torch.float16
        torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(xa, xa_ref, rtol=2e-3, atol=2e-3)


def test_layer_functions_use_the_fused_ops_on_emulated_kernels(emulated_cuda, gen, monkeypatch):
    """Linear4bitFunction / Linear8bitFunction wired as on CUDA (the op's CUDA kernels behind the
    CPU dispatch key): the fused forward and the transposed-GEMV backward are what runs, and
    values and gradients match float64 autograd."""
    launched: list[str] = []
    real_launch = emulated_cuda._launch

    def spy(file, name, device, grid, block, args):
        launched.append(name)
        real_launch(file, name, device, grid, block, args)

    monkeypatch.setattr(emulated_cuda, "_launch", spy)
    monkeypatch.setattr(_cuda, "lora_fusable", lambda x, xl, a, b: True)
    monkeypatch.setattr(_cuda, "grad_input_fusable", lambda g, a: True)
    monkeypatch.setattr(ops, "_matmul_4bit_lora_cpu", _cuda.matmul_4bit_lora)
    monkeypatch.setattr(ops, "_matmul_4bit_grad_input_cpu", _cuda.matmul_4bit_grad_input)
    monkeypatch.setattr(ops, "_int8_linear_lora_cpu", ops._int8_linear_lora_cuda)

    out_f, in_f, rank, scale = 24, 64, 4, 2.0
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    packed, absmax = ref.quantize_4bit(w, 64, "nf4")
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", torch.float64)
    leaves = [torch.randn(3, in_f, generator=gen), torch.randn(rank, in_f, generator=gen) * 0.1,
              torch.randn(out_f, rank, generator=gen) * 0.1, torch.randn(out_f, generator=gen)]
    x, a, b, bias = (t.clone().requires_grad_() for t in leaves)
    out = dispatch.lora_linear_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4", a, b, scale, bias=bias)
    grad = torch.randn(out.shape, generator=gen)
    out.backward(grad)
    assert {"nybble_lora_down_f32_m4", "nybble_gemv_4bit_lora_nf4_f32_m4", "nybble_gemv_4bit_t_partial_nf4_f32_m4",
            "nybble_gemv_4bit_t_finish_f32"} <= set(launched), launched
    e = [t.double().clone().requires_grad_() for t in leaves]
    expected = e[0] @ w64.t() + e[3] + scale * (e[0] @ e[1].t()) @ e[2].t()
    expected.backward(grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    for got, exp, name in zip((x, a, b, bias), e, ("x", "A", "B", "bias")):
        torch.testing.assert_close(got.grad.double(), exp.grad, rtol=1e-5, atol=1e-5, msg=name)

    launched.clear()
    q_w = torch.randint(-127, 128, (out_f, in_f), generator=gen, dtype=torch.int8)
    scb = torch.rand(out_f, generator=gen) + 0.5
    x8, a8, b8 = (t.clone().requires_grad_() for t in leaves[:3])
    out8 = dispatch.linear_8bit(x8, q_w, scb, None, 6.0, lora_a=a8, lora_b=b8, scale=scale)
    assert "nybble_int8_mm_dequant_lora_f32" in launched and "nybble_lora_down_f32_m4" in launched, launched
    expected8, _ = ref.int8_linear_lora(leaves[0], q_w, scb, None, 6.0, None, leaves[1], leaves[2], scale)
    torch.testing.assert_close(out8, expected8, rtol=1e-4, atol=1e-4)
    out8.sum().backward()
    assert x8.grad is not None and a8.grad is not None and b8.grad is not None


# ---------------------------------------------------------------------- the emulator itself


@pytest.fixture(scope="module")
def checks(emulator) -> Emulator:
    """The emulator on tests/cuda_emu/emulator_checks.cu (short deadlock timeout)."""
    emu = Emulator(Path(__file__).parent / "cuda_emu", cache_dir=emulator.cache_dir, timeout_s=10.0)
    emu.build(["emulator_checks.cu"])
    return emu


def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _launch_check(checks: Emulator, name: str, block, *args, grid=1, timeout_s=None) -> None:
    checks.launch("emulator_checks.cu", name, (grid,), (block,), args, timeout_s=timeout_s)


def test_emulated_16bit_conversions_are_bit_exact(checks):
    """Float -> half / bfloat16 round to nearest even (numpy's and ml_dtypes' conversions are
    the reference) on every upper bit pattern with the rounding bits at and around the tie;
    16-bit -> float is checked on all 65536 patterns."""
    import ml_dtypes

    def around_ties(kept_bits: int) -> np.ndarray:
        dropped = 32 - kept_bits
        tie = 1 << (dropped - 1)
        low = np.array([0, 1, tie - 1, tie, tie + 1, (1 << dropped) - 1], dtype=np.uint32)
        high = np.arange(1 << kept_bits, dtype=np.uint32) << np.uint32(dropped)
        return (high[:, None] | low[None, :]).reshape(-1)

    for name, kept, target in (
        ("check_float_to_half", 19, np.float16),
        ("check_float_to_bf16", 16, ml_dtypes.bfloat16),
    ):
        bits = around_ties(kept)
        x = torch.from_numpy(bits.view(np.float32).copy())
        out = torch.empty(x.numel(), dtype=torch.int16)
        _launch_check(checks, name, 256, _ptr(x), _ptr(out), np.int64(x.numel()), grid=8)
        got = out.numpy().view(np.uint16)
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to Inf is part of the check
            want = x.numpy().astype(target).view(np.uint16)
        nan = np.isnan(x.numpy())
        assert np.array_equal(got[~nan], want[~nan]), name
        assert np.all(got[nan] == 0x7FFF), f"{name}: NaN must become the canonical 0x7fff"

    all16 = torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16).copy())
    for name, source in (("check_half_to_float", np.float16), ("check_bf16_to_float", ml_dtypes.bfloat16)):
        out = torch.empty(65536, dtype=torch.float32)
        _launch_check(checks, name, 256, _ptr(all16), _ptr(out), np.int64(65536), grid=8)
        want = all16.numpy().view(np.uint16).view(source).astype(np.float32)
        assert np.array_equal(out.numpy().view(np.uint32), want.view(np.uint32)), name

    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3e9, -3e9, float("nan"), 2.4999998], dtype=torch.float32)
    out = torch.empty(x.numel(), dtype=torch.int32)
    _launch_check(checks, "check_float_to_int_rn", 32, _ptr(x), _ptr(out), np.int64(x.numel()))
    assert out.tolist() == [0, 2, 2, 0, -2, 2**31 - 1, -(2**31), 0, 2]


def test_emulated_warp_operations_follow_cuda_semantics(checks):
    blocks, threads = 2, 96
    out = torch.full((blocks * threads, 8), -7, dtype=torch.int32)
    _launch_check(checks, "check_warp_ops", threads, _ptr(out), grid=blocks)
    ballot = sum(1 << lane for lane in range(0, 32, 3))
    for b in range(blocks):
        for t in range(threads):
            lane, base = t % 32, t - t % 32
            expected = [
                base + (lane * 7) % 32,
                base + (lane ^ 5),
                t - 3 if lane >= 3 else t,
                t + 3 if lane % 16 + 3 < 16 else t,
                ballot,
                1 if t // 32 == 1 else 0,
                threads * (threads - 1) // 2,
                b,
            ]
            assert out[b * threads + t].tolist() == expected, (b, t)


@pytest.mark.parametrize(
    ("name", "block", "message", "timeout_s"),
    [
        ("check_shuffle_after_return", 32, "returned from the kernel", None),
        ("check_deadlock", 32, "deadlock: .* 1 in __syncthreads, 31 in warp operations", 0.5),
        ("check_partial_mask", 32, "mask 0x0000ffff", None),
        ("check_warp_ops", 48, "not a multiple of 32", None),
        ("check_shared_overflow", 32, r"index (1[6-9]|2\d|3[01]) out of bounds for type 'float \[16\]'", None),
        ("check_launch_bounds", 128, r"__launch_bounds__\(64\)", None),
    ],
)
def test_emulator_reports_what_would_fail_on_a_gpu(checks, name, block, message, timeout_s):
    out = torch.zeros(8 * 128, dtype=torch.int32)
    with pytest.raises(KernelEmulationError, match=message):
        _launch_check(checks, name, block, _ptr(out), timeout_s=timeout_s)


def test_emulator_reports_misaligned_access_and_bad_arguments(checks):
    data, out = torch.zeros(64, dtype=torch.uint8), torch.zeros(32, dtype=torch.int32)
    with pytest.raises(KernelEmulationError, match="misaligned address .* 16-byte alignment"):
        _launch_check(checks, "check_misaligned_load", 32, _ptr(data), _ptr(out))
    x = torch.zeros(4)
    with pytest.raises(KernelEmulationError, match="argument 2 must be a 64-bit integer"):
        _launch_check(checks, "check_float_to_int_rn", 32, _ptr(x), _ptr(out), np.int32(4))
    with pytest.raises(KernelEmulationError, match="takes 3 arguments"):
        _launch_check(checks, "check_float_to_int_rn", 32, _ptr(x), _ptr(out))
