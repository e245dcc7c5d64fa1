"""int8 absmax / zero-point / LLM.int8() quantization and error statistics against float64."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import nybble
from nybble import int8


def groups_ref(x: np.ndarray, granularity: str, fn):
    if granularity == "tensor":
        return np.array([fn(x)])
    axis = 1 if granularity == "row" else 0
    return fn(x, axis=axis)


@pytest.mark.parametrize("granularity", ["tensor", "row", "column"])
def test_absmax_matches_float64_reference(rng, granularity):
    x = rng.standard_normal((37, 53)).astype(np.float32) * rng.uniform(0.1, 10)
    r = int8.quantize_absmax(x, granularity)
    absmax = groups_ref(np.abs(x.astype(np.float64)), granularity, np.max)
    np.testing.assert_array_equal(r.absmax, absmax.astype(np.float32))
    scale = {"tensor": absmax[0], "row": absmax[:, None], "column": absmax[None, :]}[granularity]
    ref = np.round(x.astype(np.float64) * 127.0 / scale)
    # float32 arithmetic may flip a value sitting within rounding of a .5 boundary.
    assert np.abs(r.q.astype(np.float64) - ref).max() <= 1
    assert (r.q != ref).mean() < 0.001
    back = int8.dequantize_absmax(r)
    assert np.all(np.abs(back - x) <= scale / 127.0 * 0.5 * 1.0001 + 1e-7)


@pytest.mark.parametrize("granularity", ["tensor", "row", "column"])
def test_zeropoint_round_trip(rng, granularity):
    x = rng.uniform(-1, 5, (20, 30)).astype(np.float32)
    z = int8.quantize_zeropoint(x, granularity)
    assert z.q.min() == -128 and z.q.max() == 127  # the full range is used
    back = int8.dequantize_zeropoint(z)
    lo = groups_ref(x.astype(np.float64), granularity, np.min)
    hi = groups_ref(x.astype(np.float64), granularity, np.max)
    step = {"tensor": (hi - lo)[0], "row": (hi - lo)[:, None], "column": (hi - lo)[None, :]}[granularity] / 255
    assert np.all(np.abs(back - x) <= step * 1.0001 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(x=arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 40)), elements=st.floats(-100, 100, width=32)))
def test_absmax_round_trip_hypothesis(x):
    for g in ["tensor", "row", "column"]:
        r = int8.quantize_absmax(x, g)
        back = int8.dequantize_absmax(r)
        bound = groups_ref(np.abs(x.astype(np.float64)), g, np.max).max() / 254 * 1.0001 + 1e-6
        assert np.all(np.abs(back.astype(np.float64) - x) <= bound)


def test_outliers(rng):
    x = rng.standard_normal((16, 40)).astype(np.float32)
    x[3, 7] = 8.0
    x[10, 22] = -6.0  # exactly at the threshold counts
    np.testing.assert_array_equal(int8.outlier_columns(x, 6.0), [7, 22])
    q, stats, cols = int8.vectorwise_quant(x, 6.0)
    np.testing.assert_array_equal(cols, [7, 22])
    assert np.all(q[:, [7, 22]] == 0)
    ref_stats = np.abs(np.where(np.abs(x) >= 6, 0, x)).max(axis=1)
    np.testing.assert_array_equal(stats, ref_stats)
    assert int8.outlier_columns(x, 0.0).size == 0
    with pytest.raises(ValueError, match="threshold"):
        int8.outlier_columns(x, -1.0)


def test_int8_errors():
    with pytest.raises(ValueError, match="granularity"):
        int8.quantize_absmax(np.ones((2, 2), np.float32), "block")
    x = np.ones((3, 3), np.float32)
    x[2, 1] = np.nan
    with pytest.raises(nybble.NonFiniteError, match="flat index 7"):
        int8.vectorwise_quant(x)


def test_int8_torch_surface():
    x = torch.randn(8, 16, dtype=torch.float16)
    r = int8.quantize_absmax(x, "row")
    assert isinstance(r.q, torch.Tensor) and r.q.dtype == torch.int8 and r.q.shape == x.shape


def test_error_stats_against_float64(rng):
    a = rng.standard_normal(10_001).astype(np.float32)
    b = (a + rng.standard_normal(a.size).astype(np.float32) * 0.01).astype(np.float32)
    s = nybble.error_stats(a, b)
    e = a.astype(np.float64) - b.astype(np.float64)
    assert s.n == a.size
    assert s.rmse == pytest.approx(np.sqrt(np.mean(e**2)), rel=1e-12)
    assert s.max_abs == pytest.approx(np.abs(e).max(), rel=1e-12)
    assert s.mean_abs == pytest.approx(np.abs(e).mean(), rel=1e-12)
    assert s.sqnr_db == pytest.approx(10 * np.log10(np.sum(a.astype(np.float64) ** 2) / np.sum(e**2)), rel=1e-12)
    assert nybble.error_stats(a, a).sqnr_db == float("inf")
    # Mixed dtypes and torch tensors.
    s16 = nybble.error_stats(torch.from_numpy(a), torch.from_numpy(a).to(torch.bfloat16))
    assert 0 < s16.max_abs <= np.abs(a).max() / 128
    with pytest.raises(ValueError, match="shapes differ"):
        nybble.error_stats(a, a[:-1])
