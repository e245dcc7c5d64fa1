"""Block-wise 4-bit quantization: references in float64, round trips, errors, surface."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import nybble
from nybble import codebooks

from conftest import random_weights
from reference import dequantize_ref, quantize_4bit_ref, unpack

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
TIE_MARGIN = 1e-6  # float32 rounding of x / absmax


def canonical(codes, quant_type):
    # FP4 codes 0 and 8 both decode to zero (+0 / -0).
    return np.where(codes == 8, 0, codes) if quant_type == "fp4" else codes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("kind", ["normal", "heavy", "uniform"])
def test_matches_float64_reference(rng, quant_type, blocksize, kind):
    shape = (int(rng.integers(1, 40)), int(rng.integers(1, 300)))
    x = random_weights(rng, shape, kind)
    packed, state = nybble.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    table = codebooks.code_4bit(quant_type)
    ref_codes, ref_absmax, margin = quantize_4bit_ref(x, blocksize, table)
    assert packed.shape == ((x.size + 1) // 2, 1) and packed.dtype == np.uint8
    np.testing.assert_array_equal(state.absmax, ref_absmax.astype(np.float32))
    codes = unpack(packed, x.size)
    differ = canonical(codes, quant_type) != canonical(ref_codes, quant_type)
    # Only values within float32 rounding of a decision point may land on the other side.
    assert np.all(margin[differ] < TIE_MARGIN), margin[differ]
    if x.size % 2:
        zero = 0b0111 if quant_type == "nf4" else 0
        assert packed.reshape(-1)[-1] & 0x0F == zero
    y = nybble.dequantize_4bit(packed, state)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y.reshape(-1), dequantize_ref(codes, state.absmax, blocksize, table), rtol=1e-6, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    x=arrays(np.float32, st.integers(1, 3000), elements=st.floats(-1e4, 1e4, width=32)),
    blocksize=st.sampled_from(BLOCKSIZES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
)
def test_round_trip_hypothesis(x, blocksize, quant_type, double_quant, dtype):
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    xd = x.astype(np_dtype)
    packed, state = nybble.quantize_4bit(xd, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    y = nybble.dequantize_4bit(packed, state)
    assert y.dtype == xd.dtype and y.shape == xd.shape
    x64 = xd.astype(np.float64)
    y64 = nybble.dequantize_4bit(packed, state, dtype="float32").astype(np.float64)
    absmax = state.float_absmax()
    # Error bound: half the widest gap of the table, times the (decoded) block absmax,
    # plus the double-quantization error of that absmax.
    half_gap = 0.152 if quant_type == "nf4" else 0.1667
    true_absmax = np.array([np.abs(b).max() for b in np.array_split(x64, range(blocksize, x64.size, blocksize))])
    scale = np.repeat(np.maximum(absmax, true_absmax), blocksize)[: x.size]
    dq_err = np.repeat(np.abs(absmax - true_absmax), blocksize)[: x.size]
    assert np.all(np.abs(x64 - y64) <= scale * half_gap + dq_err + 1e-6 * scale + 1e-30)
    # Decoding is a fixed point: quantizing the decoded values gives the same decoded values.
    if not double_quant:
        p2, s2 = nybble.quantize_4bit(y64.astype(np.float32), blocksize=blocksize, quant_type=quant_type)
        np.testing.assert_allclose(
            nybble.dequantize_4bit(p2, s2).astype(np.float64), y64, rtol=1e-5, atol=1e-30
        )


@pytest.mark.parametrize("n", [1, 2, 3, 31, 63, 64, 65, 127, 4095, 4097])
def test_edge_sizes(rng, n):
    x = rng.standard_normal(n).astype(np.float32)
    packed, state = nybble.quantize_4bit(x, blocksize=64)
    assert packed.shape == ((n + 1) // 2, 1)
    assert state.absmax.shape == (-(-n // 64),)
    y = nybble.dequantize_4bit(packed, state)
    assert y.shape == (n,)
    assert np.all(np.abs(y - x) <= np.repeat(state.absmax, 64)[:n] * 0.152 + 1e-7)


def test_all_zero_blocks_decode_to_zeros():
    x = np.zeros((3, 64), dtype=np.float32)
    x[1] = np.linspace(-1, 1, 64)
    for qt in ["nf4", "fp4"]:
        packed, state = nybble.quantize_4bit(x, blocksize=64, quant_type=qt, double_quant=True)
        y = nybble.dequantize_4bit(packed, state)
        assert np.all(y[0] == 0) and np.all(y[2] == 0)
        assert np.abs(y[1] - x[1]).max() < 0.2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_position(bad):
    x = np.ones((8, 100), dtype=np.float32)
    x[5, 17] = bad
    with pytest.raises(nybble.NonFiniteError, match=r"flat index 517\b.*position \(5, 17\)"):
        nybble.quantize_4bit(x)
    with pytest.raises(nybble.NonFiniteError, match="flat index 517"):
        nybble.quantize_blockwise(x)


def test_bad_arguments():
    x = np.ones(100, dtype=np.float32)
    with pytest.raises(ValueError, match="blocksize 48"):
        nybble.quantize_4bit(x, blocksize=48)
    with pytest.raises(ValueError, match="quant_type"):
        nybble.quantize_4bit(x, quant_type="int3")
    with pytest.raises(TypeError, match="float64"):
        nybble.quantize_4bit(x.astype(np.float64))
    with pytest.raises(TypeError, match="int32"):
        nybble.quantize_4bit(torch.ones(4, dtype=torch.int32))
    packed, state = nybble.quantize_4bit(x)
    with pytest.raises(ValueError, match="packed input"):
        nybble.dequantize_4bit(packed[:10], state)
    state.absmax = state.absmax.copy()
    state.absmax[0] = np.nan
    with pytest.raises(nybble.NonFiniteError):
        nybble.dequantize_4bit(packed, state)


def test_non_contiguous_and_views(rng):
    x = rng.standard_normal((64, 128)).astype(np.float32)
    a, sa = nybble.quantize_4bit(x.T)  # Fortran-ordered view: copied once into row-major
    b, sb = nybble.quantize_4bit(np.ascontiguousarray(x.T))
    np.testing.assert_array_equal(a, b)
    assert sa.shape == (128, 64)


def test_torch_tensors_in_and_out(rng):
    x = torch.from_numpy(rng.standard_normal((33, 65)).astype(np.float32)).to(torch.bfloat16)
    packed, state = nybble.quantize_4bit(x, double_quant=True)
    assert isinstance(packed, torch.Tensor) and packed.dtype == torch.uint8
    y = nybble.dequantize_4bit(packed, state)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.shape == x.shape
    y16 = nybble.dequantize_4bit(packed, state, dtype=torch.float16)
    assert y16.dtype == torch.float16
    # Same codes as the numpy bfloat16 path.
    xn = x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    pn, _ = nybble.quantize_4bit(xn, double_quant=True)
    np.testing.assert_array_equal(packed.numpy(), pn)
    assert nybble.error_stats(x, y).sqnr_db > 18


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_into_out(rng, dtype):
    x = torch.from_numpy(rng.standard_normal((33, 65)).astype(np.float32))
    packed, state = nybble.quantize_4bit(x, double_quant=True)
    expected = nybble.dequantize_4bit(packed, state, dtype=dtype)
    # Poisoned buffers: every element must be written, in place, and the buffer returned.
    out = torch.full((33, 65), float("nan"), dtype=dtype)
    assert nybble.dequantize_4bit(packed, state, out=out) is out
    assert torch.equal(out, expected)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16}[dtype]
    out_np = np.full((33, 65), np.nan, dtype=np_dtype)
    assert nybble.dequantize_4bit(packed.numpy(), state, out=out_np) is out_np
    np.testing.assert_array_equal(out_np.view(np.uint8), expected.contiguous().view(torch.uint8).numpy())


def test_dequantize_into_rejects_bad_buffers(rng):
    x = rng.standard_normal((16, 64)).astype(np.float32)
    packed, state = nybble.quantize_4bit(x)
    with pytest.raises(ValueError, match="shape"):
        nybble.dequantize_4bit(packed, state, out=np.empty((64, 16), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        nybble.dequantize_4bit(packed, state, out=np.empty((64, 16), np.float32).T)
    with pytest.raises(TypeError, match="dtype"):
        nybble.dequantize_4bit(packed, state, dtype="float16", out=np.empty((16, 64), np.float32))
    with pytest.raises(TypeError, match="float64"):
        nybble.dequantize_4bit(packed, state, out=np.empty((16, 64), np.float64))
    frozen = np.empty((16, 64), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        nybble.dequantize_4bit(packed, state, out=frozen)
    with pytest.raises(ValueError, match="requires grad"):
        nybble.dequantize_4bit(packed, state, out=torch.empty((16, 64), requires_grad=True))
    # An out that aliases the packed bytes (same memory, another dtype) would be read while written.
    arena = np.zeros(16 * 64 * 4, dtype=np.uint8)
    arena[: packed.size] = packed.reshape(-1)
    with pytest.raises(ValueError, match="overlaps"):
        nybble.dequantize_4bit(arena[: packed.size], state, out=arena.view(np.float32).reshape(16, 64))


def test_input_is_not_modified(rng):
    x = rng.standard_normal(1000).astype(np.float32)
    before = x.copy()
    nybble.quantize_4bit(x, double_quant=True)
    nybble.quantize_blockwise(x)
    nybble.int8.vectorwise_quant(x.reshape(10, 100) * 10)
    np.testing.assert_array_equal(x, before)


def test_thread_count_does_not_change_results(rng):
    x = rng.standard_normal(300_000).astype(np.float32)
    a = nybble.quantize_4bit(x, double_quant=True, threads=1)
    b = nybble.quantize_4bit(x, double_quant=True, threads=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1].absmax, b[1].absmax)
    assert a[1].nested.offset == b[1].nested.offset
    old = nybble.get_num_threads()
    try:
        nybble.set_num_threads(1)
        assert nybble.get_num_threads() == 1
    finally:
        nybble.set_num_threads(old)


def test_dtypes_share_codes(rng):
    x = rng.standard_normal(5000).astype(np.float32)
    for np_dtype in [np.float16, ml_dtypes.bfloat16]:
        xd = x.astype(np_dtype)
        a, _ = nybble.quantize_4bit(xd)
        b, _ = nybble.quantize_4bit(xd.astype(np.float32))
        np.testing.assert_array_equal(a, b)


SIMD_LEVELS = nybble._core.simd_levels()


def _simd_inputs(rng, n, blocksize):
    """Finite values with ties on the NF4 / FP4 decision points, +-0, subnormals, huge values
    and all-zero / constant blocks."""
    x = (rng.standard_normal(n) * 0.05).astype(np.float32)
    nf4 = codebooks.code_4bit("nf4").astype(np.float32)
    bounds = np.concatenate([(nf4[1:] + nf4[:-1]) / np.float32(2), nf4, [0.0, -0.0, 1.0, -1.0]]).astype(np.float32)
    pick = rng.random(n)
    x = np.where(pick < 0.15, bounds[rng.integers(0, bounds.size, n)], x)
    x = np.where((pick > 0.15) & (pick < 0.18), np.float32(1e-40), x)
    x = np.where((pick > 0.18) & (pick < 0.19), np.float32(3e4), x)
    x[blocksize:2 * blocksize] = 0.0
    x[3 * blocksize:4 * blocksize] = -0.25
    return x.astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_every_simd_level_writes_the_same_bytes(rng, dtype, quant_type):
    """Each SIMD level of the block-wise kernels (forced) equals the portable one bit for bit:
    quantize (codes, absmax, the non-finite error) and dequantize into every dtype."""
    from nybble import _core

    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    for blocksize in BLOCKSIZES:
        for n in (1, 33, blocksize + 1, 5 * blocksize + 7):
            x = _simd_inputs(rng, max(n, 4 * blocksize), blocksize)[:n].astype(np_dtype)
            arg = x if dtype == "float32" else x.view(np.uint16)
            want = _core.quantize_4bit(arg, dtype, blocksize, quant_type, simd="portable")
            for level in SIMD_LEVELS:
                got = _core.quantize_4bit(arg, dtype, blocksize, quant_type, simd=level)
                np.testing.assert_array_equal(got[0], want[0], err_msg=f"{level} {blocksize} {n}")
                np.testing.assert_array_equal(got[1].view(np.uint32), want[1].view(np.uint32))
            packed, absmax = want
            for out_dtype in ("float32", "float16", "bfloat16"):
                ref = _core.dequantize_4bit(packed, absmax, n, blocksize, quant_type, out_dtype, simd="portable")
                for level in SIMD_LEVELS:
                    got = _core.dequantize_4bit(packed, absmax, n, blocksize, quant_type, out_dtype, simd=level)
                    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8), err_msg=f"{level}")
        bad = _simd_inputs(rng, 3 * blocksize + 5, blocksize).astype(np_dtype)
        bad[blocksize + 3] = np.inf
        bad[-1] = np.nan
        arg = bad if dtype == "float32" else bad.view(np.uint16)
        for level in SIMD_LEVELS:
            with pytest.raises(nybble.NonFiniteError) as e:
                _core.quantize_4bit(arg, dtype, blocksize, quant_type, simd=level)
            assert e.value.index == blocksize + 3


def test_simd_level_forced_by_environment(rng, monkeypatch):
    """NYBBLE_SIMD selects the level of quantize / dequantize as of the fused matmuls; a level
    this CPU lacks is an error, not undefined behaviour."""
    x = torch.randn(257, 129).to(torch.bfloat16)
    want_p, want_s = nybble.quantize_4bit(x, blocksize=64, double_quant=True)
    want = nybble.dequantize_4bit(want_p, want_s)
    for level in SIMD_LEVELS:
        monkeypatch.setenv("NYBBLE_SIMD", level)
        p, s = nybble.quantize_4bit(x, blocksize=64, double_quant=True)
        assert torch.equal(p, want_p) and torch.equal(nybble.dequantize_4bit(p, s).view(torch.int16), want.view(torch.int16))
        out = torch.empty_like(want)
        nybble.dequantize_4bit(p, s, out=out)
        assert torch.equal(out.view(torch.int16), want.view(torch.int16))
    missing = [lv for lv in ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_bf16") if lv not in SIMD_LEVELS]
    if missing:
        monkeypatch.setenv("NYBBLE_SIMD", missing[0])
        with pytest.raises(Exception, match="SIMD|simd"):
            nybble.quantize_4bit(x)
