"""nybble.kernels on CPU: the kernel sources compile (NVRTC, sm_80 / sm_90), every torch
reference matches the Rust core bit for bit or float64 math, and the dispatch layer works on
CPU tensors. The CUDA kernels themselves are tested in test_kernels_gpu.py."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nybble
from nybble import int8 as core_int8
from nybble import kernels
from nybble.kernels import _source
from nybble.kernels import reference as ref

REPO = Path(__file__).resolve().parents[1]
BLOCKSIZES = (32, 64, 128, 256, 1024, 4096)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _load_script(name: str):
    path = REPO / "benches" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_nybble_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gen(rng) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(rng.integers(2**62)))
    return g


def weights(gen, shape, kind="normal", dtype=torch.float32):
    if kind == "normal":
        w = torch.randn(shape, generator=gen)
    elif kind == "heavy":  # Student-t-like outliers, as real LLM weights have
        w = torch.randn(shape, generator=gen) / torch.rand(shape, generator=gen).clamp_min(0.05) * 0.02
    else:
        w = torch.rand(shape, generator=gen) * 6 - 3
    return w.to(dtype)


# --- the compile check -----------------------------------------------------------------------


def test_kernels_compile_with_nvrtc_for_sm80_and_sm90(capsys):
    ran = os.environ.get("NYBBLE_KERNELS_COMPILED_BY", "")
    if ran.startswith("benches/check_kernels_compile.py") and "--werror" in ran:
        # .ci/run compiled every kernel with this same check (plus the ptxas report) just before.
        pytest.skip(f"every kernel was just compiled by {ran}")
    check = _load_script("check_kernels_compile")
    if not check.find_nvrtc():
        pytest.skip("libnvrtc not found (torch's nvidia-cuda-nvrtc wheel or a CUDA toolkit; or set NYBBLE_NVRTC)")
    status = check.check(["sm_80", "sm_90"], werror=True)
    out = capsys.readouterr().out
    assert status == 0, out
    for arch in ("sm_80", "sm_90"):
        for f in _source.KERNELS:
            assert f"ok   {arch} {f} (as loaded)" in out


def test_sources_ship_inside_the_package():
    d = _source.cuda_dir()
    assert d.parent == Path(kernels.__file__).resolve().parent or d == REPO / "cuda"
    assert sorted(p.name for p in _source.kernel_files()) == sorted(_source.KERNELS)
    for name in _source.KERNELS:
        text = _source.read_source(name)
        assert '#include "' not in text  # local headers inlined: the text is the whole cache key
        assert "NYBBLE_FOR_EACH_FLOAT" in text


# --- references against the Rust core --------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_quantize_4bit_bit_identical_to_core(gen, quant_type, blocksize, dtype):
    for shape in [(1,), (3, 5), (7, 33), (blocksize * 3 + 1,), (65, 127), (2, 3, 4097)]:
        for kind in ("normal", "heavy", "uniform"):
            w = weights(gen, shape, kind, dtype)
            packed, state = nybble.quantize_4bit(w, blocksize, quant_type)
            p_ref, a_ref = ref.quantize_4bit(w, blocksize, quant_type)
            assert torch.equal(p_ref, packed), (shape, kind)
            assert np.array_equal(a_ref.numpy(), state.absmax), (shape, kind)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reference_quantize_4bit_edges(quant_type):
    # Exact decision points (ties go to the lower code), zero blocks, -0.0, odd length.
    table = ref.code_table(quant_type)
    values = torch.sort(table).values
    mids = (values[:-1] + values[1:]) * 0.5
    w = torch.cat([mids, -mids, values, torch.tensor([-0.0, 0.0, 1.0]), torch.zeros(64)])
    packed, state = nybble.quantize_4bit(w, 32, quant_type)
    p_ref, a_ref = ref.quantize_4bit(w, 32, quant_type)
    assert torch.equal(p_ref, packed)
    assert np.array_equal(a_ref.numpy(), state.absmax)
    decoded = ref.dequantize_4bit(p_ref, a_ref, w.shape, 32, quant_type)
    assert torch.all(decoded[-64:] == 0)
    with pytest.raises(ValueError, match="non-finite"):
        ref.quantize_4bit(torch.tensor([1.0, float("nan")]), 32, quant_type)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_dequantize_4bit_bit_identical_to_core(gen, quant_type, blocksize, dtype):
    for shape in [(1,), (5, 7), (blocksize + 3,), (129, 67)]:
        w = weights(gen, shape, "heavy")
        packed, state = nybble.quantize_4bit(w, blocksize, quant_type)
        expected = nybble.dequantize_4bit(packed, state, dtype)
        got = ref.dequantize_4bit(packed, torch.from_numpy(state.absmax), shape, blocksize, quant_type, dtype)
        assert got.dtype == dtype and got.shape == shape
        assert torch.equal(got, expected)
        # float64 decode is exact: it rounds to the float32 decode.
        exact = ref.dequantize_4bit(packed, torch.from_numpy(state.absmax), shape, blocksize, quant_type, torch.float64)
        assert torch.equal(exact.float(), ref.dequantize_4bit(packed, torch.from_numpy(state.absmax), shape, blocksize, quant_type))


def test_reference_decode_absmax_bit_identical_to_core(gen):
    for nblocks in (1, 255, 256, 257, 70_001):
        absmax = weights(gen, (nblocks,), "heavy").abs()
        codes, nested = nybble.double_quantize(absmax.numpy())
        expected = nybble.double_dequantize(codes, nested)
        got = ref.decode_absmax(
            torch.from_numpy(codes), torch.from_numpy(nested.nested_absmax), torch.from_numpy(nested.code),
            nested.offset, nested.blocksize,
        )
        assert np.array_equal(got.numpy(), expected)
        got_dispatch = kernels.decode_absmax(
            torch.from_numpy(codes), torch.from_numpy(nested.nested_absmax), torch.from_numpy(nested.code),
            nested.offset,
        )
        assert np.array_equal(got_dispatch.numpy(), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 1.5, 6.0])
def test_reference_int8_vectorwise_quant_equals_core(gen, dtype, threshold):
    for shape in [(1, 1), (3, 17), (64, 257), (2, 5, 96)]:
        x = (weights(gen, shape) * 2).to(dtype)
        q, row_absmax, cols = core_int8.vectorwise_quant(x, threshold)
        q_ref, a_ref, c_ref = ref.int8_vectorwise_quant(x, threshold)
        assert torch.equal(q_ref, q)
        assert torch.equal(a_ref, row_absmax)
        assert torch.equal(c_ref, cols.to(torch.int64))
        q_d, a_d, c_d = kernels.int8_vectorwise_quant(x, threshold)
        assert torch.equal(q_d, q) and torch.equal(a_d, row_absmax) and c_d.dtype == torch.int64
    with pytest.raises(ValueError):
        ref.int8_vectorwise_quant(torch.ones(2, 2), -1.0)


# --- references against float64 math --------------------------------------------------------


def test_reference_int8_matmul_dequant_float64(gen):
    m, k, n = 33, 200, 19
    q_a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    q_b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    sa, sb = torch.rand(m, generator=gen) * 4, torch.rand(n, generator=gen) * 4
    bias = torch.randn(n, generator=gen)
    expected = (q_a.numpy().astype(np.int64) @ q_b.numpy().astype(np.int64).T) * np.outer(sa.double(), sb.double()) / 127**2 + bias.double().numpy()
    got64 = ref.int8_matmul_dequant(q_a, q_b, sa, sb, bias, torch.float64)
    assert np.allclose(got64.numpy(), expected, rtol=1e-12, atol=1e-12)
    got32 = kernels.int8_matmul_dequant(q_a, q_b, sa, sb, bias, torch.float32)
    assert np.allclose(got32.double().numpy(), expected, rtol=1e-5, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_4bit_against_float64(gen, quant_type, dtype):
    for m, out_f, in_f, blocksize in [(1, 7, 33, 32), (5, 64, 96, 64), (70, 33, 256, 128), (3, 130, 1024, 4096)]:
        w = weights(gen, (out_f, in_f), "heavy")
        packed, absmax = kernels.quantize_4bit(w, blocksize, quant_type)
        x = weights(gen, (m, in_f)).to(dtype)
        bias = weights(gen, (out_f,)).to(dtype)
        w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), blocksize, quant_type, torch.float64)
        w_dt = w64.to(dtype).double()  # the weight as the dequant + matmul path sees it
        expected = x.double() @ w_dt.t() + bias.double()
        got = kernels.matmul_4bit(x, packed, absmax, (out_f, in_f), blocksize, quant_type, bias)
        scale = (x.double().abs() @ w_dt.abs().t()) + bias.double().abs()
        eps = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-20
        assert torch.all((got.double() - expected).abs() <= eps * scale + 1e-6), (m, out_f, in_f)
        r = ref.matmul_4bit(x, packed, absmax, (out_f, in_f), blocksize, quant_type, bias)
        assert torch.all((r.double() - expected).abs() <= eps * scale + 1e-6)


def test_dispatch_dequantize_quantize_on_cpu_equal_core(gen):
    w = weights(gen, (37, 129), "heavy", torch.bfloat16)
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    p_core, state = nybble.quantize_4bit(w, 64, "nf4")
    assert torch.equal(packed, p_core) and np.array_equal(absmax.numpy(), state.absmax)
    for dtype in DTYPES + (torch.float64,):
        got = kernels.dequantize_4bit(packed, absmax, w.shape, 64, "nf4", dtype)
        assert got.dtype == dtype and got.shape == w.shape
        assert torch.equal(got, ref.dequantize_4bit(packed, absmax, w.shape, 64, "nf4", dtype))
    with pytest.raises(nybble.NonFiniteError):
        kernels.quantize_4bit(torch.tensor([1.0, float("inf")]), 64, "nf4")
    with pytest.raises(ValueError):
        kernels.dequantize_4bit(packed, absmax, (37, 128), 64, "nf4")


def test_lora_linear_4bit_gradients_against_float64_autograd(gen):
    m, out_f, in_f, r, scale = 6, 24, 64, 4, 2.0
    w = weights(gen, (out_f, in_f), "heavy")
    packed, absmax = kernels.quantize_4bit(w, 32, "fp4")
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), 32, "fp4", torch.float64)
    x = weights(gen, (2, m // 2, in_f)).double()
    a = (weights(gen, (r, in_f)) * 0.1).double()
    b = (weights(gen, (out_f, r)) * 0.1).double()
    bias = weights(gen, (out_f,)).double()
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    out = kernels.lora_linear_4bit(leaves[0], packed, absmax, (out_f, in_f), 32, "fp4", leaves[1], leaves[2], scale, leaves[3])
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad)
    expect_leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    xe, ae, be, biase = expect_leaves
    expected = xe @ w64.t() + biase + scale * (xe @ ae.t()) @ be.t()
    expected.backward(grad)
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    for got, exp in zip(leaves, expect_leaves):
        assert torch.allclose(got.grad, exp.grad, rtol=1e-10, atol=1e-12)
    # The functional helpers give the same gradients.
    _, xa = ref.lora_forward(x, x @ w64.t(), a, b, scale)
    gx, ga, gb = ref.lora_backward(grad, x, xa, w64, a, b, scale)
    assert torch.allclose(gx, expect_leaves[0].grad) and torch.allclose(ga, ae.grad) and torch.allclose(gb, be.grad)


def test_matmul_4bit_grad_x_against_float64(gen):
    w = weights(gen, (10, 64))
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    w64 = ref.dequantize_4bit(packed, absmax, (10, 64), 64, "nf4", torch.float64)
    x = weights(gen, (3, 64)).double().requires_grad_()
    kernels.matmul_4bit(x, packed, absmax, (10, 64), 64, "nf4").sum().backward()
    assert torch.allclose(x.grad, w64.sum(0).expand(3, 64))


def test_int8_linear_against_float64(gen):
    m, k, n = 20, 96, 24
    x = weights(gen, (m, k))
    x[:, 5] *= 40  # an outlier feature dimension
    w = weights(gen, (n, k)) * 0.1
    qw = core_int8.quantize_absmax(w, "row")
    bias = weights(gen, (n,))
    w_deq = qw.q.double() * (qw.absmax.double()[:, None] / 127)
    expected = x.double() @ w_deq.t() + bias.double()
    for fn in (kernels.int8_linear, ref.int8_linear):
        got = fn(x, qw.q, qw.absmax, bias, 6.0)
        # Error budget: int8 rounding of x (half a step of the non-outlier row absmax).
        step = x.abs().masked_fill(x.abs() >= 6.0, 0).amax(1, keepdim=True).double() / 127
        budget = 0.5 * step * (w_deq.abs().sum(1)[None, :]) + 1e-4
        assert torch.all((got.double() - expected).abs() <= budget)


def test_cuda_available_is_false_without_a_gpu():
    if not torch.cuda.is_available():
        assert kernels.cuda_available() is False


def test_bench_gpu_dry_run(tmp_path):
    bench = _load_script("bench_gpu")
    results = bench.main(["--dry-run", "--out", str(tmp_path)])
    assert (tmp_path / "bench_gpu.json").is_file() and (tmp_path / "bench_gpu.md").is_file()
    assert results["checks"] and all(c["ok"] for c in results["checks"])
