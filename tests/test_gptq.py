"""GPTQ into the bitsandbytes 4-bit layout: the Rust core against a float64 reference of the
algorithm written here, and GPTQ's output error against round-to-nearest."""

from __future__ import annotations

import numpy as np
import pytest

import nybble
from nybble import _core
from nybble.codebooks import code_4bit

MIN_ABSMAX = np.float32(1e-38)


# ----------------------------------------------------------------------------- reference


def _bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Midpoints (float32) of the code table, and FP4's code of each sorted magnitude."""
    table = code_4bit(quant_type)
    if quant_type == "nf4":
        return ((table[:-1] + table[1:]) / np.float32(2)).astype(np.float32), None
    order = np.argsort(table[:8], kind="stable")
    mags = table[order]
    return ((mags[:-1] + mags[1:]) / np.float32(2)).astype(np.float32), order.astype(np.uint8)


def _encode(x: np.ndarray, absmax: np.ndarray, full: np.ndarray, quant_type: str) -> np.ndarray:
    """bitsandbytes' decision: float32 x times the float32 reciprocal of the absmax (divided in
    a trailing partial block), the nearest code, ties to the lower one."""
    x = x.astype(np.float32)
    div = np.maximum(absmax.astype(np.float32), MIN_ABSMAX)
    with np.errstate(over="ignore"):
        s = np.where(full, x * (np.float32(1) / div), x / div).astype(np.float32)
    bounds, fp4_codes = _bounds(quant_type)
    if fp4_codes is None:
        return (s[:, None] > bounds[None, :]).sum(1).astype(np.uint8)
    idx = (np.abs(s)[:, None] > bounds[None, :]).sum(1)
    return fp4_codes[idx] | ((s < 0).astype(np.uint8) << 3)


def gptq_reference(w, h, blocksize=64, quant_type="nf4", damp=0.01, act_order=False):
    """GPTQ in float64, column by column, every update applied to the whole rest of the row at
    once (no lazy batching), ``U`` from ``inv`` + ``cholesky``. A block's absmax is max|w| of its
    current weights when its first column is reached; blocks spanning two rows take it from the
    original weights. Returns (unpacked codes (n,), absmax float32, loss)."""
    rows, k = w.shape
    n = rows * k
    h = np.array(h, dtype=np.float64)
    w = np.array(w, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    inv_perm = np.argsort(perm)
    hp = h[perm][:, perm] + damp * np.mean(np.diag(h)) * np.eye(k)
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # H^-1 = U^T U, U upper
    work = w[:, perm].copy()
    nb = -(-n // blocksize)
    absmax = np.full(nb, np.nan, dtype=np.float32)
    flat = w.reshape(-1)
    for j in range(nb):
        start, end = j * blocksize, min((j + 1) * blocksize, n)
        if start // k != (end - 1) // k:
            absmax[j] = np.float32(np.abs(flat[start:end]).max())
    codes = np.zeros(n, dtype=np.uint8)
    table = code_4bit(quant_type)
    row_ids = np.arange(rows)
    loss = 0.0
    for t in range(k):
        c = perm[t]
        blocks = (row_ids * k + c) // blocksize
        for r, j in zip(row_ids, blocks):
            if np.isnan(absmax[j]):
                cols = np.arange(j * blocksize, min((j + 1) * blocksize, n)) - r * k
                absmax[j] = np.float32(np.abs(work[r, inv_perm[cols]]).max())
        a = absmax[blocks]
        full = (blocks + 1) * blocksize <= n
        code = _encode(work[:, t], a, full, quant_type)
        q = (table[code] * a).astype(np.float32).astype(np.float64)
        codes[row_ids * k + c] = code
        e = (work[:, t] - q) / u[t, t]
        loss += float(e @ e) / 2
        work[:, t + 1:] -= np.outer(e, u[t, t + 1:])
    return codes, absmax, loss


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    p = packed.reshape(-1)
    out = np.empty(2 * p.size, dtype=np.uint8)
    out[0::2], out[1::2] = p >> 4, p & 15
    return out[:n]


def correlated_inputs(rng, samples: int, k: int, dead=()) -> np.ndarray:
    """Inputs with strongly correlated neighbouring features and uneven scales."""
    z = rng.standard_normal((samples, k))
    mix = rng.standard_normal((k, k)) * np.exp(-np.abs(np.subtract.outer(np.arange(k), np.arange(k))) / 3.0)
    x = (z @ mix) * rng.uniform(0.2, 2.2, k)
    x[:, list(dead)] = 0.0
    return x


def rust_gptq(w, h, blocksize=64, quant_type="nf4", damp=0.01, act_order=False, **kw):
    rows, k = w.shape
    f = _core.GptqHessian(np.ascontiguousarray(h, dtype=np.float64).reshape(-1), k, damp, act_order)
    packed, absmax, loss = f.quantize(np.ascontiguousarray(w, dtype=np.float32).reshape(-1), rows, blocksize,
                                      quant_type, **kw)
    return packed, absmax, loss


def dequant(packed, absmax, shape, blocksize, quant_type) -> np.ndarray:
    n = int(np.prod(shape))
    return _core.dequantize_4bit(packed, absmax, n, blocksize, quant_type, "float32").reshape(shape)


def rtn(w, blocksize, quant_type) -> np.ndarray:
    packed, state = nybble.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    return nybble.dequantize_4bit(packed, state, "float32")


def out_err(x, w, w_hat) -> float:
    """Relative output error on the calibration inputs: |X W^T - X W_hat^T| / |X W^T|."""
    return float(np.linalg.norm(x @ (w - w_hat).T) / np.linalg.norm(x @ w.T))


# ----------------------------------------------------------------------------- tests


CASES = [
    # rows, k, blocksize, quant_type, act_order, dead columns
    (16, 128, 64, "nf4", False, ()),
    (16, 128, 64, "nf4", True, ()),
    (12, 96, 64, "nf4", False, (3,)),  # blocks spanning two rows
    (9, 80, 32, "fp4", True, (0, 41)),  # fp4, dead columns, act-order
    (5, 45, 32, "nf4", True, ()),  # odd element count: trailing partial block
]


@pytest.mark.parametrize("rows, k, bs, qt, act_order, dead", CASES)
def test_rust_matches_float64_reference(rng, rows, k, bs, qt, act_order, dead):
    x = correlated_inputs(rng, 3 * k, k, dead)
    h = 2 * x.T @ x
    w = rng.standard_normal((rows, k)).astype(np.float32)
    codes_ref, absmax_ref, loss_ref = gptq_reference(w, h, bs, qt, act_order=act_order)
    for lazy in (128, 7):
        packed, absmax, loss = rust_gptq(w, h, bs, qt, act_order=act_order, lazy_block=lazy)
        codes = unpack(packed, rows * k)
        # Same decisions: a float64 rounding difference could flip a code at a decision
        # boundary (and change the rest of that row), which random data essentially never hits.
        same_rows = (codes.reshape(rows, k) == codes_ref.reshape(rows, k)).all(1).mean()
        assert same_rows >= 0.9, f"lazy {lazy}: {same_rows:.2f} of rows agree"
        np.testing.assert_allclose(absmax, absmax_ref, rtol=1e-6)
        if same_rows == 1:
            assert loss == pytest.approx(loss_ref, rel=1e-9)
    # Dead columns (inputs always zero) quantize to exactly zero.
    w_hat = dequant(packed, absmax, (rows, k), bs, qt)
    assert np.all(w_hat[:, list(dead)] == 0)


def test_factor_matches_numpy(rng):
    k = 150
    x = correlated_inputs(rng, 400, k)
    h = 2 * x.T @ x
    for act_order in (False, True):
        f = _core.GptqHessian(h.reshape(-1), k, 0.02, act_order)
        perm = f.perm()
        assert sorted(perm) == list(range(k))
        hp = h[perm][:, perm] + 0.02 * np.mean(np.diag(h)) * np.eye(k)
        u_ref = np.linalg.cholesky(np.linalg.inv(hp)).T
        np.testing.assert_allclose(f.upper().reshape(k, k), u_ref, rtol=1e-7, atol=1e-9 * np.abs(u_ref).max())
        assert f.damp == pytest.approx(0.02 * np.mean(np.diag(h)))


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_gptq_output_error_below_rtn(rng, qt):
    rows, k, bs = 64, 256, 64
    x = correlated_inputs(rng, 1024, k)
    h = 2 * x.T @ x
    w = rng.standard_normal((rows, k)).astype(np.float32)
    e_rtn = out_err(x, w, rtn(w, bs, qt))
    for act_order in (False, True):
        for grid in (0, 10):
            packed, absmax, _ = rust_gptq(w, h, bs, qt, act_order=act_order, search_grid=grid)
            e = out_err(x, w, dequant(packed, absmax, (rows, k), bs, qt))
            print(f"{qt} act_order={act_order} grid={grid}: GPTQ {e:.4f} vs RTN {e_rtn:.4f}")
            assert e < 0.8 * e_rtn


def test_diagonal_hessian_is_round_to_nearest(rng):
    rows, k, bs = 10, 192, 64
    w = rng.standard_normal((rows, k)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, k))
    packed, absmax, _ = rust_gptq(w, h, bs, "nf4", act_order=True)
    ref_packed, state = nybble.quantize_4bit(w, blocksize=bs, quant_type="nf4")
    np.testing.assert_array_equal(packed, ref_packed.reshape(-1))
    np.testing.assert_array_equal(absmax, state.absmax)


def test_errors(rng):
    k = 8
    h = np.eye(k)
    h[3, 3] = -1.0
    with pytest.raises(ValueError, match="not positive definite") as exc:
        _core.GptqHessian(h.reshape(-1), k, 0.0)
    assert exc.value.column == 3 and exc.value.pivot < 0
    with pytest.raises(ValueError, match="non-finite"):
        _core.GptqHessian(np.full(k * k, np.nan), k)
    with pytest.raises(ValueError, match="damp"):
        _core.GptqHessian(np.eye(k).reshape(-1), k, -0.1)
    f = _core.GptqHessian(np.eye(k).reshape(-1), k)
    w = rng.standard_normal(4 * k).astype(np.float32)
    with pytest.raises(ValueError, match="4x8"):
        f.quantize(w[:-1], 4, 32)
    w[5] = np.inf
    with pytest.raises(nybble.NonFiniteError):
        f.quantize(w, 4, 32)
    with pytest.raises(ValueError, match="objective"):
        f.quantize(np.zeros(4 * k, np.float32), 4, 32, search_grid=4, objective="nope")


def _backend_cases():
    return [(16, 128, 64, "nf4", False, 0), (12, 128, 64, "fp4", True, 0), (8, 192, 64, "nf4", True, 6),
            (8, 128, 32, "nf4", False, 6)]


def _compare_backends(rng, device, rows, k, bs, qt, act_order, grid):
    torch = pytest.importorskip("torch")
    from nybble.gptq import HessianFactor

    x = correlated_inputs(rng, 3 * k, k, dead=(5,))
    h = 2 * x.T @ x
    w = torch.from_numpy(rng.standard_normal((rows, k)).astype(np.float32))
    rust = HessianFactor(h, 0.01, act_order)
    other = HessianFactor(torch.from_numpy(h).to(device), 0.01, act_order, backend="torch")
    assert torch.equal(rust.perm, other.perm)
    torch.testing.assert_close(other.upper().cpu(), rust.upper(), rtol=1e-9, atol=1e-12)
    for objective in ("sequential", "diagonal") if grid else ("sequential",):
        p1, a1, l1 = rust.quantize(w, bs, qt, absmax_search=grid, search_objective=objective)
        p2, a2, l2 = other.quantize(w.to(device), bs, qt, lazy_block=32, absmax_search=grid,
                                    search_objective=objective)
        codes1, codes2 = unpack(p1.numpy(), rows * k), unpack(p2.cpu().numpy(), rows * k)
        assert (codes1.reshape(rows, k) == codes2.reshape(rows, k)).all(1).mean() >= 0.9
        np.testing.assert_allclose(a2.cpu().numpy(), a1.numpy(), rtol=1e-6)
        assert l2 == pytest.approx(l1, rel=1e-6)


@pytest.mark.parametrize("rows, k, bs, qt, act_order, grid", _backend_cases())
def test_torch_backend_matches_rust(rng, rows, k, bs, qt, act_order, grid):
    """The torch implementation (what CUDA tensors use), run on the CPU, against the core."""
    _compare_backends(rng, "cpu", rows, k, bs, qt, act_order, grid)


@pytest.mark.gpu
@pytest.mark.parametrize("rows, k, bs, qt, act_order, grid", _backend_cases())
def test_cuda_matches_rust(rng, rows, k, bs, qt, act_order, grid):
    from conftest import has_cuda

    if not has_cuda():
        pytest.skip("no CUDA device")
    _compare_backends(rng, "cuda", rows, k, bs, qt, act_order, grid)


def test_damping_is_raised_when_the_hessian_is_singular(rng):
    from nybble.gptq import HessianFactor

    k = 64
    x = correlated_inputs(rng, 16, k)  # 16 samples: rank 16 < 64, singular without damping
    h = 2 * x.T @ x
    with pytest.raises(ValueError, match="not positive definite"):
        _core.GptqHessian(h.reshape(-1), k, 0.0)
    with pytest.warns(UserWarning, match="retrying"):
        f = HessianFactor(h, damp=0.0)
    assert f.damp > 0
    w = rng.standard_normal((4, k)).astype(np.float32)
    packed, absmax, _ = f.quantize(__import__("torch").from_numpy(w), 32)
    assert packed.shape == (4 * k // 2, 1) and absmax.shape == (4 * k // 32,)
