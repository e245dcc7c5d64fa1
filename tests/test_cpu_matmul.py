"""The fused CPU matmuls of the Rust core (issue 16): the packed 4-bit matmul and the LLM.int8()
linear, on every SIMD level this machine has (each forced in turn, plus the portable one).

The 4-bit kernel is held to dequantize-then-matmul in float64 within the float32-accumulation
bound ``|err| <= c * K * eps32 * sum|x||w|`` (plus bf16 rounding of W where a kernel documents
it, and the output's own rounding); the int8 kernel to the op composition it replaced, bit for
bit (or within float32 rounding of the outlier sum when several outlier columns exist). Inputs
are fresh random values each run (the seed is printed on failure).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nybble  # noqa: E402
from nybble import _core, kernels  # noqa: E402
from nybble.kernels import _cpu, ops  # noqa: E402
from nybble.kernels import reference as ref  # noqa: E402
from nybble.nn import Linear4bit, Linear8bitLt  # noqa: E402

LEVELS = _core.simd_levels()
#: Each level, and at AVX2 each of its two decodes forced (NYBBLE_AVX2_DECODE) whatever the vendor.
LEVEL_RUNS = LEVELS + ([f"avx2:{d}" for d in ("permute", "shuffle")] if "avx2" in LEVELS else [])
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS32 = 2.0**-24
#: Unit roundoff of each output dtype, and half its smallest subnormal (the absolute rounding
#: error of outputs in the subnormal range: float16's starts at 6.1e-5).
OUT_EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
OUT_TINY = {torch.float32: 2.0**-150, torch.bfloat16: 2.0**-134, torch.float16: 2.0**-25}


@pytest.fixture
def gen(rng) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def _weights(gen, shape):
    # Student-t-like outliers, as real LLM weights have; never all zeros.
    return torch.randn(shape, generator=gen) / torch.rand(shape, generator=gen).clamp_min(0.05) * 0.02


def _check_4bit(got, x, packed, absmax, shape, blocksize, quant_type, bias=None, context=""):
    """``got`` against float64 math on the exactly decoded weight, within the f32 bound."""
    out_f, in_f = shape
    w64 = ref.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, torch.float64)
    x64 = x.double().reshape(-1, in_f)
    expected = x64 @ w64.t()
    mag = x64.abs() @ w64.abs().t()
    if bias is not None:
        b64 = bias.to(x.dtype).double()  # the dense path rounds the bias to x's dtype too
        expected, mag = expected + b64, mag + b64.abs()
    # f32 accumulation over K products (plus the f32 rounding of code * absmax); bf16 x may
    # multiply bf16-rounded weights (documented for the bf16 kernels); the output is rounded
    # once to x's dtype (absolutely for subnormal outputs); 1e-30 covers flushed denormals.
    w_eps = 2.0**-8 if x.dtype == torch.bfloat16 else 0.0
    bound = ((2 * in_f + 4) * EPS32 * mag + w_eps * mag + OUT_EPS[x.dtype] * expected.abs() + OUT_TINY[x.dtype]
             + 1e-30 * (in_f + 1))
    err = (got.double().reshape(expected.shape) - expected).abs()
    bad = err > bound
    assert not bool(bad.any()), (
        f"{context}: {int(bad.sum())} of {bad.numel()} outside the bound; worst excess "
        f"{float((err - bound).max()):.3g} (err {float(err.max()):.3g})")


def _quantized(gen, out_f, in_f, blocksize, quant_type, double_quant):
    w = _weights(gen, (out_f, in_f))
    packed, absmax = kernels.quantize_4bit(w, blocksize, quant_type)
    if double_quant:  # what the modules pass: the float32 absmax decoded from DQ constants
        codes, nested = kernels.double_quantize(absmax)
        absmax = kernels.decode_absmax(codes, nested["nested_absmax"], nested["nested_code"], nested["offset"])
    return packed, absmax


# --------------------------------------------------------------------------- 4-bit


def test_levels_are_a_ladder_starting_with_portable():
    assert LEVELS[0] == "portable"
    assert _core.simd_level() == LEVELS[-1]
    for level in LEVELS:
        assert _core.simd_level(level) == level
    assert _core.simd_level("auto") == LEVELS[-1]
    with pytest.raises(ValueError) as info:
        _core.simd_level("sse9")
    assert info.value.requested == "sse9" and "portable" in info.value.available


@pytest.mark.parametrize("level", LEVEL_RUNS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_fused_4bit_against_float64(gen, monkeypatch, level, quant_type, double_quant):
    level, _, decode = level.partition(":")
    if decode:
        monkeypatch.setenv("NYBBLE_AVX2_DECODE", decode)
    cases = [  # (M, N, K, blocksize): odd N, K not a multiple of the blocksize / of 32, odd K
        (1, 7, 64, 64),
        (1, 33, 96, 64),  # blocks span rows
        (2, 31, 160, 128),
        (3, 9, 32, 32),
        (5, 17, 4160, 4096),  # rows straddle a 4096 block
        (8, 13, 256, 4096),  # one block holds many rows
        (17, 11, 45, 32),  # odd K: rows start mid-byte (portable kernel)
        (33, 5, 200, 256),  # K % 32 != 0
        (64, 19, 512, 1024),
        (64, 3, 2080, 2048),
        # whole blocks per row, K % 32 == 0: the AMX tile kernel (bf16 x, M >= 5) where present,
        # x in 1 to 5 groups of 16 rows, W rows past a 64-row pass
        (6, 70, 256, 64),
        (20, 40, 128, 32),
        (70, 33, 512, 128),
    ]
    for m, n, k, bs in cases:
        packed, absmax = _quantized(gen, n, k, bs, quant_type, double_quant)
        bias = torch.randn(n, generator=gen)
        for dtype in DTYPES:
            x = torch.randn(m, k, generator=gen).to(dtype)
            got = _cpu.matmul_4bit_fused(x, packed, absmax, [n, k], bs, quant_type, bias, simd=level)
            assert got.dtype == dtype and got.shape == (m, n)
            _check_4bit(got, x, packed, absmax, (n, k), bs, quant_type, bias, f"{level} {dtype} {(m, n, k, bs)}")


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
def test_every_blocksize_every_level(gen, monkeypatch, blocksize):
    for run in LEVEL_RUNS:
        level, _, decode = run.partition(":")
        monkeypatch.setenv("NYBBLE_AVX2_DECODE", decode or "")
        for m, k in ((1, blocksize + 96), (4, blocksize + 96), (12, blocksize + 96), (12, 2 * blocksize)):
            n = 21  # K = blocksize + 96: not a multiple of the blocksize; 2 * blocksize: whole blocks
            packed, absmax = _quantized(gen, n, k, blocksize, "nf4", False)
            x = torch.randn(m, k, generator=gen).bfloat16()
            got = _cpu.matmul_4bit_fused(x, packed, absmax, [n, k], blocksize, "nf4", None, simd=level)
            _check_4bit(got, x, packed, absmax, (n, k), blocksize, "nf4", None, f"{run} bs={blocksize} m={m}")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 64),
    n=st.integers(1, 70),
    k=st.one_of(st.integers(1, 400), st.integers(1, 12).map(lambda c: 32 * c)),
    bs_pow=st.integers(5, 12),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    dtype=st.sampled_from(DTYPES),
    level=st.sampled_from(LEVELS),
    seed=st.integers(0, 2**62),
)
def test_fused_4bit_hypothesis_shapes(m, n, k, bs_pow, quant_type, dtype, level, seed):
    g = torch.Generator().manual_seed(seed)
    packed, absmax = _quantized(g, n, k, 1 << bs_pow, quant_type, False)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g) if seed % 2 else None
    got = _cpu.matmul_4bit_fused(x, packed, absmax, [n, k], 1 << bs_pow, quant_type, bias, simd=level)
    _check_4bit(got, x, packed, absmax, (n, k), 1 << bs_pow, quant_type, bias, f"{level} {dtype} {(m, n, k)}")


@pytest.mark.parametrize("level", LEVELS)
def test_op_and_module_under_forced_level(gen, monkeypatch, level):
    """NYBBLE_SIMD forces the level through the op and the modules (DQ on and off)."""
    monkeypatch.setenv("NYBBLE_SIMD", level)
    assert _core.simd_level() == level
    for double_quant in (False, True):
        lin = torch.nn.Linear(96, 37)
        with torch.no_grad():
            lin.weight.copy_(_weights(gen, (37, 96)))
        layer = Linear4bit.from_linear(lin, blocksize=64, double_quant=double_quant)
        absmax = layer.float_absmax()
        packed = layer.packed_uint8()
        for dtype in DTYPES:
            x = torch.randn(2, 3, 96, generator=gen).to(dtype)
            with torch.no_grad():
                y = layer(x)
            assert y.dtype == dtype and y.shape == (2, 3, 37)
            _check_4bit(y, x, packed, absmax, (37, 96), 64, "nf4", layer.bias, f"module {level} {dtype}")
            y2 = kernels.matmul_4bit(x, packed, absmax, (37, 96), 64, "nf4", layer.bias)
            _check_4bit(y2, x, packed, absmax, (37, 96), 64, "nf4", layer.bias, f"op {level} {dtype}")


def test_dispatch_uses_fused_up_to_the_threshold(gen, monkeypatch):
    calls = []
    real = _core.matmul_4bit_tensor

    def spy(*args, **kwargs):
        calls.append(args[0].numel() // args[5])  # rows: x's elements / in_features
        return real(*args, **kwargs)

    monkeypatch.setattr(_core, "matmul_4bit_tensor", spy)
    n, k = 24, 128
    packed, absmax = _quantized(gen, n, k, 64, "nf4", False)
    limit = _cpu.fused_4bit_max_m(torch.float32)
    for m in (1, limit, limit + 1):
        x = torch.randn(m, k, generator=gen)
        y = kernels.matmul_4bit(x, packed, absmax, (n, k), 64, "nf4")
        _check_4bit(y, x, packed, absmax, (n, k), 64, "nf4", None, f"m={m}")
    assert calls == [1, limit]
    # float64 x keeps dequantize + matmul (exact products).
    x = torch.randn(3, k, generator=gen, dtype=torch.float64)
    w64 = ref.dequantize_4bit(packed, absmax, (n, k), 64, "nf4", torch.float64)
    assert torch.allclose(kernels.matmul_4bit(x, packed, absmax, (n, k), 64, "nf4"), x @ w64.t(), rtol=1e-12)
    assert calls == [1, limit]


def test_fused_limit_follows_the_blas(gen, monkeypatch):
    """bf16 x on a CPU whose BLAS has AMX-BF16 tiles that nybble's kernel may not use switches
    to dequantize + BLAS sooner; with the tiles (the amx_bf16 level) the fused limit stays;
    float16 x always takes the fused kernel; NYBBLE_FUSED_MAX_M overrides both."""
    monkeypatch.delenv("NYBBLE_FUSED_MAX_M", raising=False)
    assert isinstance(_cpu.cpu_flags(), frozenset)
    assert _cpu._amx_tiles() == ("amx_bf16" in _core.simd_levels())
    monkeypatch.setattr(_cpu, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    monkeypatch.setattr(_cpu, "_kernel_level", lambda: "amx_bf16")
    monkeypatch.setattr(_cpu, "_amx_tiles", lambda: True)
    assert _cpu.fused_4bit_max_m(torch.bfloat16) == _cpu.FUSED_4BIT_MAX_M
    monkeypatch.setattr(_cpu, "_amx_tiles", lambda: False)
    assert _cpu.fused_4bit_max_m(torch.bfloat16) == _cpu.FUSED_4BIT_MAX_M_AMX
    assert _cpu.fused_4bit_max_m(torch.float32) == _cpu.FUSED_4BIT_MAX_M
    assert _cpu.fused_4bit_max_m(torch.float16) is None
    monkeypatch.setattr(_cpu, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(_cpu, "_kernel_level", lambda: "avx512_bf16")
    assert _cpu.fused_4bit_max_m(torch.bfloat16) == _cpu.FUSED_4BIT_MAX_M
    # AVX2 only: the float32 BLAS takes over sooner, for float32 and bf16 x alike.
    monkeypatch.setattr(_cpu, "_kernel_level", lambda: "avx2")
    assert _cpu.fused_4bit_max_m(torch.bfloat16) == _cpu.fused_4bit_max_m(torch.float32) == _cpu.FUSED_4BIT_MAX_M_AVX2
    assert _cpu.fused_4bit_max_m(torch.float16) is None
    monkeypatch.setattr(_cpu, "_kernel_level", lambda: "avx512_bf16")
    packed, absmax = _quantized(gen, 24, 128, 64, "nf4", False)
    x = torch.randn(_cpu.FUSED_4BIT_MAX_M_AMX + 1, 128, generator=gen).to(torch.bfloat16)
    assert _cpu.fused_4bit_applies(x, packed)
    monkeypatch.setenv("NYBBLE_FUSED_MAX_M", str(_cpu.FUSED_4BIT_MAX_M_AMX))
    assert not _cpu.fused_4bit_applies(x, packed) and _cpu.fused_4bit_applies(x[:-1], packed)
    assert not _cpu.fused_4bit_applies(x.to(torch.float16), packed)
    monkeypatch.setenv("NYBBLE_FUSED_MAX_M", "many")
    with pytest.raises(ValueError, match="NYBBLE_FUSED_MAX_M"):
        _cpu.fused_4bit_applies(x, packed)


def test_bf16_x_takes_the_f32_kernel_where_bf16_dot_products_are_slow(gen, monkeypatch):
    levels = []
    real = _core.matmul_4bit_tensor

    def spy(*args):
        levels.append(args[-2])  # (..., simd, threads)
        return real(*args[:-2], None, args[-1])  # whatever this machine has

    monkeypatch.setattr(_core, "matmul_4bit_tensor", spy)
    monkeypatch.delenv("NYBBLE_SIMD", raising=False)
    assert isinstance(_cpu._bf16_dot_is_slow(), bool)
    packed, absmax = _quantized(gen, 24, 128, 64, "nf4", False)
    for slow in (True, False):
        monkeypatch.setattr(_cpu, "_bf16_dot_is_slow", lambda slow=slow: slow)
        for m, dtype in ((4, torch.bfloat16), (1, torch.bfloat16), (4, torch.float32)):
            x = torch.randn(m, 128, generator=gen).to(dtype)
            y = _cpu.matmul_4bit_fused(x, packed, absmax, (24, 128), 64, "nf4", None)
            _check_4bit(y, x, packed, absmax, (24, 128), 64, "nf4", None, f"m={m} {dtype}")
    assert levels == ["avx512_vnni", None, None, None, None, None]
    monkeypatch.setenv("NYBBLE_SIMD", "portable")
    monkeypatch.setattr(_cpu, "_bf16_dot_is_slow", lambda: True)
    _cpu.matmul_4bit_fused(torch.randn(4, 128).bfloat16(), packed, absmax, (24, 128), 64, "nf4", None)
    assert levels[-1] is None  # NYBBLE_SIMD decides


def test_fused_kernels_run_on_torchs_thread_count(gen, monkeypatch):
    """``torch.set_num_threads`` bounds the fused kernels as it bounds torch's own ops (the core
    is handed torch.get_num_threads() at each call), and the result does not depend on it."""
    seen = []
    real4, real8 = _core.matmul_4bit_tensor, _core.int8_linear_tensor

    def spy4(*args):
        seen.append(("4bit", args[-1]))
        return real4(*args)

    def spy8(*args):
        seen.append(("int8", args[-1]))
        return real8(*args)

    monkeypatch.setattr(_core, "matmul_4bit_tensor", spy4)
    monkeypatch.setattr(_core, "int8_linear_tensor", spy8)
    packed, absmax = _quantized(gen, 37, 256, 64, "nf4", True)
    x = torch.randn(3, 256, generator=gen).bfloat16()
    q_w = torch.randint(-127, 128, (37, 256), generator=gen, dtype=torch.int8)
    scale = torch.rand(37, generator=gen) + 0.5
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = (_cpu.matmul_4bit_fused(x, packed, absmax, (37, 256), 64, "nf4", None),
                                _cpu.int8_linear(x, q_w, scale, None, 6.0))
    finally:
        torch.set_num_threads(before)
    assert seen == [(kind, t) for t in (1, 2, 3) for kind in ("4bit", "int8")]
    for t in (2, 3):
        assert torch.equal(results[t][0], results[1][0]) and torch.equal(results[t][1], results[1][1])


def test_bf16_above_the_limit_multiplies_in_float32_without_bf16_instructions(gen, monkeypatch):
    """Without bf16 dot-product instructions torch emulates the bf16 GEMM: above the fused
    limit bf16 x is multiplied by the weight decoded to float32, the result rounded once."""
    n, k, bs = 40, 256, 64
    packed, absmax = _quantized(gen, n, k, bs, "nf4", True)
    bias = torch.randn(n, generator=gen)
    monkeypatch.setenv("NYBBLE_FUSED_MAX_M", "4")
    x = torch.randn(9, k, generator=gen).bfloat16()
    w32 = _cpu.dequantize_4bit(packed, absmax, (n, k), bs, "nf4", torch.float32)
    monkeypatch.setattr(_cpu, "_bf16_gemm_is_native", lambda: False)
    got = kernels.matmul_4bit(x, packed, absmax, (n, k), bs, "nf4", bias)
    want = torch.nn.functional.linear(x.float(), w32, bias.bfloat16().float()).bfloat16()
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    _check_4bit(got, x, packed, absmax, (n, k), bs, "nf4", bias, "float32 BLAS")
    monkeypatch.setattr(_cpu, "_bf16_gemm_is_native", lambda: True)  # the bf16 GEMM
    w16 = _cpu.dequantize_4bit(packed, absmax, (n, k), bs, "nf4", torch.bfloat16)
    got = kernels.matmul_4bit(x, packed, absmax, (n, k), bs, "nf4", bias)
    assert torch.equal(got, torch.nn.functional.linear(x, w16, bias.bfloat16()))


def test_fused_grad_x_and_empty_inputs(gen):
    n, k = 10, 64
    packed, absmax = _quantized(gen, n, k, 64, "nf4", False)
    w64 = ref.dequantize_4bit(packed, absmax, (n, k), 64, "nf4", torch.float64)
    x = torch.randn(3, k, generator=gen).requires_grad_()
    kernels.matmul_4bit(x, packed, absmax, (n, k), 64, "nf4").sum().backward()
    assert torch.allclose(x.grad.double(), w64.sum(0).expand(3, k), rtol=1e-6, atol=1e-6)
    empty = kernels.matmul_4bit(torch.zeros(0, k), packed, absmax, (n, k), 64, "nf4")
    assert empty.shape == (0, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_4bit_on_tensors_equals_the_numpy_entry(gen, dtype):
    """``_core.matmul_4bit_tensor`` (x and out as tensors, the per-token path) gives the
    numpy entry's result bit for bit, for any leading shape and with a bias."""
    n, k = 37, 192
    packed, absmax = _quantized(gen, n, k, 64, "fp4", True)
    p, a = _cpu.np_view(packed), _cpu.np_view(absmax)
    bias = torch.randn(n, generator=gen).to(dtype).float()  # rounded to x's dtype, as the modules do
    for lead in ((1,), (2, 3), (5,)):
        x = torch.randn(*lead, k, generator=gen).to(dtype)
        out = torch.empty(*lead, n, dtype=dtype)
        _core.matmul_4bit_tensor(x, out, p, a, n, k, 64, "fp4", _cpu.np_view(bias), None, 2)
        ref_out = torch.empty(*lead, n, dtype=dtype)
        rows = x.numel() // k
        _core.matmul_4bit(_cpu.np_view(x), _cpu.DTYPE_NAMES[dtype], rows, p, a, n, k, 64, "fp4", _cpu.np_view(bias),
                          _cpu.np_view(ref_out), None, 2)
        assert torch.equal(out, ref_out)
        _check_4bit(out, x, packed, absmax, (n, k), 64, "fp4", bias.to(dtype), f"lead={lead} {dtype}")


def test_fused_4bit_on_tensors_bad_arguments(gen):
    n, k = 8, 64
    packed, absmax = _quantized(gen, n, k, 64, "nf4", False)
    p, a = _cpu.np_view(packed), _cpu.np_view(absmax)
    x = torch.ones(2, k)
    out = torch.zeros(2, n)

    def call(x, out, *rest, **kw):
        _core.matmul_4bit_tensor(x, out, p, a, n, k, 64, "nf4", *rest, **kw)

    call(x, out)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        call(x.double(), out)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        call(x.numpy(), out)  # not a tensor
    with pytest.raises(ValueError, match="same dtype"):
        call(x, out.bfloat16())
    with pytest.raises(ValueError, match="contiguous"):
        call(torch.ones(k, 2).t(), out)
    with pytest.raises(ValueError, match="contiguous"):
        call(x, torch.zeros(n, 2).t())
    with pytest.raises(ValueError, match="CPU tensor"):
        call(torch.ones(2, k, device="meta"), out)
    with pytest.raises(ValueError, match="multiple of in_features"):
        call(torch.ones(2, k + 1), out)
    with pytest.raises(ValueError, match="expected 2 x 8"):
        call(x, torch.zeros(3, n))
    with pytest.raises(ValueError, match="overlaps"):  # out written over x
        big = torch.zeros(2 * k)
        call(big[: 2 * k].view(2, k), big[k:k + 2 * n].view(2, n))
    with pytest.raises(ValueError, match="overlaps"):  # out written over the weight's absmax
        call(x[:1], torch.from_numpy(a).view(1, n))
    with pytest.raises(ValueError, match="bias"):
        call(x, out, np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="blocksize"):
        _core.matmul_4bit_tensor(x, out, p, a, n, k, 48, "nf4")
    with pytest.raises(ValueError, match="packed weight"):
        _core.matmul_4bit_tensor(x, out, p[1:], a, n, k, 64, "nf4")
    empty_out = torch.zeros(0, n)
    call(torch.zeros(0, k), empty_out)  # no rows: nothing to do, no error


def test_settings_are_read_from_the_live_environment(monkeypatch):
    """The per-call NYBBLE_* settings come from the process environment, which os.environ
    (and so monkeypatch / a user's os.environ[...] = ...) writes through."""
    monkeypatch.setenv("NYBBLE_TEST_SETTING", "  7 ")
    assert _core.env_var("NYBBLE_TEST_SETTING") == "  7 " and _cpu.setting("NYBBLE_TEST_SETTING") == "7"
    monkeypatch.delenv("NYBBLE_TEST_SETTING")
    assert _core.env_var("NYBBLE_TEST_SETTING") is None and _cpu.setting("NYBBLE_TEST_SETTING") == ""
    monkeypatch.setenv("NYBBLE_FUSED_MAX_M", "3")
    assert _cpu.fused_4bit_max_m(torch.float32) == 3
    assert not _cpu.fused_4bit_applies(torch.zeros(4, 8), None) and _cpu.fused_4bit_applies(torch.zeros(3, 8), None)
    monkeypatch.setenv("NYBBLE_KERNELS", "torch")
    assert kernels.ops.use_reference()
    monkeypatch.delenv("NYBBLE_KERNELS")
    assert not kernels.ops.use_reference()


def test_fused_4bit_bad_arguments(gen):
    n, k = 8, 64
    packed, absmax = _quantized(gen, n, k, 64, "nf4", False)
    p, a = _cpu.np_view(packed), _cpu.np_view(absmax)
    x = np.ones(2 * k, dtype=np.float32)
    out = np.zeros(2 * n, dtype=np.float32)
    with pytest.raises(ValueError, match="needs 128 elements") as info:
        _core.matmul_4bit(x[:100], "float32", 2, p, a, n, k, 64, "nf4", None, out)
    assert (info.value.rows, info.value.cols, info.value.len) == (2, 64, 100)
    with pytest.raises(ValueError, match="output") as info:
        _core.matmul_4bit(x, "float32", 2, p, a, n, k, 64, "nf4", None, out[:15])
    assert info.value.what == "output" and info.value.expected == 16
    with pytest.raises(ValueError, match="packed weight"):
        _core.matmul_4bit(x, "float32", 2, p[1:], a, n, k, 64, "nf4", None, out)
    with pytest.raises(ValueError, match="absmax"):
        _core.matmul_4bit(x, "float32", 2, p, a[:-1], n, k, 64, "nf4", None, out)
    with pytest.raises(ValueError, match="bias"):
        _core.matmul_4bit(x, "float32", 2, p, a, n, k, 64, "nf4", np.zeros(7, np.float32), out)
    with pytest.raises(ValueError, match="blocksize"):
        _core.matmul_4bit(x, "float32", 2, p, a, n, k, 48, "nf4", None, out)
    with pytest.raises(ValueError, match="quantization type"):
        _core.matmul_4bit(x, "float32", 2, p, a, n, k, 64, "nf5", None, out)
    with pytest.raises(ValueError, match="uint16"):  # out's dtype is not x's
        _core.matmul_4bit(x.view(np.uint16), "bfloat16", 2, p, a, n, k, 64, "nf4", None, out)
    with pytest.raises(ValueError, match="uint16"):
        _core.matmul_4bit(x, "bfloat16", 2, p, a, n, k, 64, "nf4", None, out)
    with pytest.raises(ValueError, match="dtype"):
        _core.matmul_4bit(x, "float64", 2, p, a, n, k, 64, "nf4", None, out)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.matmul_4bit(np.ones(4 * k, np.float32)[::2], "float32", 2, p, a, n, k, 64, "nf4", None, out)
    with pytest.raises(OverflowError):
        _core.matmul_4bit(x, "float32", 2, p, a, 2**62, 2**62, 64, "nf4", None, out)
    with pytest.raises(ValueError) as info:
        _core.matmul_4bit(x, "float32", 2, p, a, n, k, 64, "nf4", None, out, simd="avx9000")
    assert info.value.requested == "avx9000"
    with pytest.raises(ValueError):  # out aliasing x
        _core.matmul_4bit(x, "float32", 2, p, a, n, k, 64, "nf4", None, x)
    bad = absmax.clone()
    bad[3] = float("nan")
    for level in LEVELS:
        with pytest.raises(nybble.NonFiniteError) as info:
            _cpu.matmul_4bit_fused(torch.ones(2, k), packed, bad, [n, k], 64, "nf4", None, simd=level)
        assert info.value.index == 3
    with pytest.raises(ValueError, match="features"):
        kernels.matmul_4bit(torch.ones(2, k + 1), packed, absmax, (n, k), 64, "nf4")


# --------------------------------------------------------------------------- int8


def _int8_case(gen, m, n, k, outlier_cols, dtype):
    x = (torch.randn(m, k, generator=gen) * 1.5).clamp(-5.5, 5.5)  # outliers only where asked
    for c in outlier_cols:
        x[:, c] *= 12.0  # most rows exceed the threshold: an outlier column
    w = torch.randn(n, k, generator=gen) * 0.1
    qw = nybble.int8.quantize_absmax(w, "row")
    return x.to(dtype), qw.q, qw.absmax


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_int8_equals_the_composition(gen, level, dtype):
    for m, n, k in [(1, 7, 64), (3, 33, 100), (4, 16, 257), (9, 5, 31), (17, 12, 128), (64, 9, 4097)]:
        for cols, bias in [((), False), ((), True), ((k // 3,), True)]:
            x, q, scb = _int8_case(gen, m, n, k, cols, dtype)
            b = torch.randn(n, generator=gen) if bias else None
            got = _cpu.int8_linear(x, q, scb, b, 6.0, simd=level)
            expected = ops._int8_linear(x, q, scb, b, 6.0)
            assert got.dtype == dtype and got.shape == (m, n)
            # No or one outlier column: the same float32 operations in the same order.
            assert torch.equal(got, expected), (level, dtype, m, n, k, cols)


@pytest.mark.parametrize("level", LEVELS)
def test_fused_int8_several_outlier_columns_and_threshold_zero(gen, level):
    m, n, k = 12, 20, 96
    x, q, scb = _int8_case(gen, m, n, k, (2, 40, 77), torch.float32)
    got = _cpu.int8_linear(x, q, scb, None, 6.0, simd=level)
    expected = ops._int8_linear(x, q, scb, None, 6.0)
    # Only the summation order of the outlier term may differ: float32 rounding of it.
    cols = torch.tensor([2, 40, 77])
    w_deq = ref.int8_dequantize_rows(q, scb).double()
    outlier_mag = x[:, cols].double().abs() @ w_deq[:, cols].abs().t()
    assert torch.all((got.double() - expected.double()).abs() <= 4 * EPS32 * (outlier_mag + expected.double().abs()))
    # threshold 0: no outlier extraction, the composition bit for bit.
    got0 = _cpu.int8_linear(x, q, scb, None, 0.0, simd=level)
    assert torch.equal(got0, ops._int8_linear(x, q, scb, None, 0.0))


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 64), n=st.integers(1, 40), k=st.integers(1, 300), dtype=st.sampled_from(DTYPES),
       level=st.sampled_from(LEVELS), seed=st.integers(0, 2**62))
def test_fused_int8_hypothesis(m, n, k, dtype, level, seed):
    g = torch.Generator().manual_seed(seed)
    x, q, scb = _int8_case(g, m, n, k, (seed % k,) if seed % 3 == 0 else (), dtype)
    assert torch.equal(_cpu.int8_linear(x, q, scb, None, 6.0, simd=level), ops._int8_linear(x, q, scb, None, 6.0))


def test_int8_linear_op_runs_the_fused_kernel_on_cpu(gen, monkeypatch):
    calls = []
    real = _cpu.int8_linear

    def spy(*args, **kwargs):
        calls.append(args[0].dtype)
        return real(*args, **kwargs)

    monkeypatch.setattr(_cpu, "int8_linear", spy)
    x, q, scb = _int8_case(gen, 5, 8, 64, (3,), torch.bfloat16)
    y = kernels.int8_linear(x, q, scb, None, 6.0)
    assert calls == [torch.bfloat16]
    assert torch.equal(y, ops._int8_linear(x, q, scb, None, 6.0))
    # float64 keeps the composition; NYBBLE_KERNELS=torch the reference.
    kernels.int8_linear(x.double(), q, scb, None, 6.0)
    monkeypatch.setenv("NYBBLE_KERNELS", "torch")
    kernels.int8_linear(x, q, scb, None, 6.0)
    assert calls == [torch.bfloat16]


def test_fused_int8_on_tensors_equals_the_numpy_entry(gen):
    """``_core.int8_linear_tensor`` (every argument a tensor: the per-token path) writes what
    the numpy entry writes, bit for bit, for every dtype, leading shapes, bias and outliers."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x, q, scb = _int8_case(gen, 6, 24, 96, (5,), dtype)  # one outlier column: bit-exact vs the composition
        x = x.view(2, 3, 96)
        bias = torch.randn(24, generator=gen)
        for b in (None, bias):
            via_tensors = torch.empty(2, 3, 24, dtype=dtype)
            _core.int8_linear_tensor(x, via_tensors, q, scb, 24, 96, 6.0, b)
            via_numpy = torch.empty(2, 3, 24, dtype=dtype)
            _core.int8_linear(_cpu.np_view(x), _cpu.DTYPE_NAMES[dtype], 6, _cpu.np_view(q), _cpu.np_view(scb), 24, 96,
                              None if b is None else _cpu.np_view(b), 6.0, _cpu.np_view(via_numpy))
            assert torch.equal(via_tensors, via_numpy)
            assert torch.equal(via_tensors.view(6, 24), ops._int8_linear(x.reshape(6, 96), q, scb, b, 6.0))


def test_fused_int8_takes_unaligned_float32_tensors(gen):
    """A checkpoint's SCB or bias can start at any byte of the file's buffer; the op copies
    such a tensor (and the 4-bit op its bias) to aligned memory (the core reads &[f32]), and a
    loaded Linear8bitLt keeps its SCB in its own aligned storage."""
    x, q, scb = _int8_case(gen, 3, 8, 64, (2,), torch.float32)
    bias = torch.randn(8, generator=gen)

    def unaligned(t):
        raw = bytearray(t.numel() * 4 + 2)
        u = torch.frombuffer(raw, dtype=torch.float32, offset=2, count=t.numel())
        u.copy_(t)
        assert u.data_ptr() % 4 == 2
        return u

    expected = ops._int8_linear(x, q, scb, bias, 6.0)
    assert torch.equal(_cpu.int8_linear(x, q, unaligned(scb), unaligned(bias), 6.0), expected)
    assert torch.equal(_cpu.int8_linear(unaligned(x.reshape(-1)).view(3, 64), q, scb, bias, 6.0), expected)
    packed, absmax = _quantized(gen, 8, 64, 64, "nf4", False)
    want4 = _cpu.matmul_4bit_fused(x, packed, absmax, (8, 64), 64, "nf4", bias)
    assert torch.equal(_cpu.matmul_4bit_fused(x, packed, absmax, (8, 64), 64, "nf4", unaligned(bias)), want4)
    layer = Linear8bitLt(64, 8, bias=False)
    state = {"weight": q, "SCB": unaligned(scb)}
    layer.load_state_dict(state, strict=False)
    assert layer.SCB.data_ptr() % 4 == 0 and torch.equal(layer.SCB, scb)


def test_fused_int8_on_tensors_bad_arguments(gen):
    x, q, scb = _int8_case(gen, 2, 8, 64, (), torch.float32)
    out = torch.zeros(2, 8)

    def call(x=x, out=out, q=q, scb=scb, **kw):
        _core.int8_linear_tensor(x, out, q, scb, 8, 64, kw.pop("threshold", 6.0), **kw)

    call()
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        call(x=x.double())
    with pytest.raises(ValueError, match="same dtype"):
        call(out=out.bfloat16())
    with pytest.raises(ValueError, match="q_w must be a torch.int8 tensor"):
        call(q=q.to(torch.int16))
    with pytest.raises(ValueError, match="scb must be a torch.float32 tensor"):
        call(scb=scb.double())
    with pytest.raises(ValueError, match="bias must be a torch.float32 tensor"):
        call(bias=torch.zeros(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        call(bias=torch.zeros(7))
    with pytest.raises(ValueError, match="contiguous"):
        call(q=torch.zeros(64, 8, dtype=torch.int8).t())
    with pytest.raises(ValueError, match="CPU tensor"):
        call(scb=torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match="SCB"):
        call(scb=scb[:7])
    with pytest.raises(ValueError, match="int8 weight"):
        call(q=q.reshape(-1)[:100])
    with pytest.raises(ValueError, match="multiple of in_features"):
        call(x=torch.ones(2, 65))
    with pytest.raises(ValueError, match="expected 2 x 8"):
        call(out=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="threshold"):
        call(threshold=-1.0)
    with pytest.raises(ValueError, match="overlaps"):  # out written over the row scales
        call(x=x[:1], out=scb.view(1, 8))
    with pytest.raises(ValueError, match="overlaps"):  # out written over the bias
        b = torch.zeros(16)
        call(x=x[:1], out=b[:8].view(1, 8), bias=b[4:12])
    with pytest.raises(ValueError, match="overlaps"):  # out written over x
        big = torch.zeros(2 * 64)
        call(x=big.view(2, 64), out=big[:16].view(2, 8))
    call(x=torch.zeros(0, 64), out=torch.zeros(0, 8))  # no rows: nothing to do


def test_fused_int8_bad_arguments(gen):
    x, q, scb = _int8_case(gen, 2, 3, 4, (), torch.float32)
    xn = _cpu.np_view(x)
    qn, sn = _cpu.np_view(q), _cpu.np_view(scb)
    out = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="needs 8 elements"):
        _core.int8_linear(xn[:7], "float32", 2, qn, sn, 3, 4, None, 6.0, out)
    with pytest.raises(ValueError, match="SCB"):
        _core.int8_linear(xn, "float32", 2, qn, sn[:2], 3, 4, None, 6.0, out)
    with pytest.raises(ValueError, match="int8 weight"):
        _core.int8_linear(xn, "float32", 2, qn[:11], sn, 3, 4, None, 6.0, out)
    with pytest.raises(ValueError, match="threshold"):
        _core.int8_linear(xn, "float32", 2, qn, sn, 3, 4, None, -1.0, out)
    with pytest.raises(ValueError, match="threshold"):
        _core.int8_linear(xn, "float32", 2, qn, sn, 3, 4, None, math.inf, out)
    bad = x.clone()
    bad[1, 2] = float("inf")
    with pytest.raises(nybble.NonFiniteError) as info:
        _cpu.int8_linear(bad, q, scb, None, 6.0)
    assert info.value.index == 6
    with pytest.raises(ValueError, match="features"):
        kernels.int8_linear(torch.ones(2, 5), q, scb)
