"""The CUDA kernels (through CuPy) against their float64 torch references, on random inputs of
odd and large shapes. Outputs are poisoned (NaN / sentinel bytes) before each launch so every
element must be written, and each kernel runs twice to catch races. Skipped without CUDA and
CuPy."""

from __future__ import annotations

import pytest
import torch

from nybble import kernels
from nybble.kernels import _cuda
from nybble.kernels import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not kernels.cuda_available(), reason="CuPy is not importable"),
]

DEV = "cuda"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def gen(rng) -> torch.Generator:
    g = torch.Generator(device=DEV)
    g.manual_seed(int(rng.integers(2**62)))
    return g


@pytest.fixture(scope="module")
def k():
    from nybble.kernels import _cupy

    return _cupy


def poisoned(shape, dtype) -> torch.Tensor:
    """An output buffer full of values no kernel writes: NaN for floats, 0x5A bytes otherwise."""
    t = torch.empty(shape, dtype=dtype, device=DEV)
    if dtype.is_floating_point:
        return t.fill_(float("nan"))
    return t.view(torch.uint8).fill_(0x5A).view(dtype) if t.element_size() == 1 else t.fill_(-123456789)


def twice(launch, make_out):
    """Launches into two fresh poisoned outputs; both must be bitwise equal."""
    outs = []
    for _ in range(2):
        out = make_out()
        launch(*out) if isinstance(out, tuple) else launch(out)
        outs.append(out)
    torch.cuda.synchronize()
    a, b = outs
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), "two launches differ: a race?"
    return a


SHAPES = [(1,), (7,), (33, 65), (1000, 333), (4096, 4097)]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_4bit_kernel_bit_identical(k, gen, quant_type, blocksize, dtype):
    for shape in SHAPES + [(blocksize * 3 + 1,)]:
        w = (torch.randn(shape, generator=gen, device=DEV) / torch.rand(shape, generator=gen, device=DEV).clamp_min(0.05)).to(dtype)
        n = w.numel()
        packed, absmax = twice(
            lambda p, a: k.launch_quantize_4bit(w, p, a, blocksize, quant_type),
            lambda: (poisoned(((n + 1) // 2, 1), torch.uint8), poisoned((-(-n // blocksize),), torch.float32)),
        )
        p_ref, a_ref = ref.quantize_4bit(w.cpu(), blocksize, quant_type)
        assert torch.equal(packed.cpu(), p_ref), shape
        assert torch.equal(absmax.cpu(), a_ref), shape


def test_quantize_4bit_non_finite_raises(gen):
    import nybble

    w = torch.randn(1000, device=DEV)
    w[517] = float("nan")
    with pytest.raises(nybble.NonFiniteError, match="block 8"):
        kernels.quantize_4bit(w, 64, "nf4")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_4bit_kernel_against_float64(k, gen, quant_type, blocksize, dtype):
    for shape in SHAPES:
        w = torch.randn(shape, generator=gen, device=DEV)
        packed, absmax = ref.quantize_4bit(w, blocksize, quant_type)
        out = twice(lambda o: k.launch_dequantize_4bit(packed, absmax, o, blocksize, quant_type), lambda: poisoned(shape, dtype))
        exact = ref.dequantize_4bit(packed, absmax, shape, blocksize, quant_type, torch.float64)
        assert torch.equal(out, exact.to(dtype)), shape  # one rounding of an exact product


def test_decode_absmax_kernel_bit_identical(k, gen):
    import nybble

    for nblocks in (1, 255, 257, 300_001):
        absmax = torch.rand(nblocks, generator=gen, device=DEV) * 3
        codes, nested = nybble.double_quantize(absmax.cpu().numpy())
        args = [torch.from_numpy(a).to(DEV) for a in (codes, nested.nested_absmax, nested.code)]
        offset = torch.tensor([nested.offset], dtype=torch.float32, device=DEV)
        out = twice(lambda o: k.launch_decode_absmax(*args, offset, o, 256), lambda: poisoned((nblocks,), torch.float32))
        assert torch.equal(out.cpu(), torch.from_numpy(nybble.double_dequantize(codes, nested)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 13, 16, 17, 33, 64])
def test_fused_gemv_kernel_against_float64(k, gen, quant_type, dtype, m):
    for out_f, in_f, blocksize in [(1, 32, 32), (37, 96, 64), (257, 4096, 4096), (4099, 1024, 128)]:
        w = torch.randn(out_f, in_f, generator=gen, device=DEV) * 0.02
        packed, absmax = ref.quantize_4bit(w, blocksize, quant_type)
        x = torch.randn(m, in_f, generator=gen, device=DEV).to(dtype)
        bias = torch.randn(out_f, generator=gen, device=DEV).to(dtype)
        out = twice(lambda o: k.launch_gemv_4bit(x, packed, absmax, bias, o, blocksize, quant_type), lambda: poisoned((m, out_f), dtype))
        w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), blocksize, quant_type, torch.float64)
        expected = x.double() @ w64.t() + bias.double()
        scale = x.double().abs() @ w64.abs().t() + bias.double().abs()
        eps = {torch.float32: 2.0**-14, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7}[dtype]
        assert torch.all((out.double() - expected).abs() <= eps * scale + 1e-6), (out_f, in_f)


@pytest.mark.parametrize("m", [1, 16, 64, 65, 300])
def test_matmul_4bit_dispatch_on_gpu(gen, m):
    out_f, in_f = 515, 640
    w = torch.randn(out_f, in_f, generator=gen, device=DEV) * 0.02
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    x = torch.randn(2, m, in_f, generator=gen, device=DEV).to(torch.bfloat16)
    got = kernels.matmul_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4")
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", torch.float64)
    expected = x.double() @ w64.t()
    assert torch.all((got.double() - expected).abs() <= 2.0**-6 * (x.double().abs() @ w64.abs().t()) + 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 3.0, 6.0])
def test_int8_vectorwise_quant_kernels_equal_reference(k, gen, dtype, threshold):
    for rows, cols in [(1, 1), (3, 17), (33, 4097), (4096, 256)]:
        x = (torch.randn(rows, cols, generator=gen, device=DEV) * 2).to(dtype)
        flags = None
        if threshold > 0:
            flags = torch.zeros(cols, dtype=torch.int32, device=DEV)
            k.launch_int8_outlier_flags(x, flags, threshold)
        q, row_absmax = twice(
            lambda q, a: k.launch_int8_vectorwise_quant(x, flags, q, a, threshold),
            lambda: (poisoned((rows, cols), torch.int8), poisoned((rows,), torch.float32)),
        )
        q_ref, a_ref, cols_ref = ref.int8_vectorwise_quant(x.cpu(), threshold)
        assert torch.equal(q.cpu(), q_ref) and torch.equal(row_absmax.cpu(), a_ref)
        got_cols = torch.nonzero(flags).reshape(-1).cpu() if flags is not None else torch.zeros(0, dtype=torch.int64)
        assert torch.equal(got_cols, cols_ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_mm_dequant_kernel_against_float64(k, gen, dtype):
    for m, kdim, n in [(1, 8, 8), (17, 64, 24), (33, 100, 30), (512, 4096, 1000)]:
        q_a = torch.randint(-128, 128, (m, kdim), generator=gen, device=DEV, dtype=torch.int8)
        q_b = torch.randint(-128, 128, (n, kdim), generator=gen, device=DEV, dtype=torch.int8)
        sa = torch.rand(m, generator=gen, device=DEV) * 4
        sb = torch.rand(n, generator=gen, device=DEV) * 4
        bias = torch.randn(n, generator=gen, device=DEV).to(dtype)
        acc = _cuda.int_mm_padded(q_a, q_b)
        assert torch.equal(acc[:m, :n].double(), q_a.double() @ q_b.double().t())  # exact, padding included
        out = twice(lambda o: k.launch_int8_mm_dequant(acc, sa, sb, bias, o), lambda: poisoned((m, n), dtype))
        # Bitwise equal to the float32 reference (same operation order), close to float64.
        assert torch.equal(out.cpu(), ref.int8_matmul_dequant(q_a.cpu(), q_b.cpu(), sa.cpu(), sb.cpu(), bias.cpu(), dtype))
        exp = ref.int8_matmul_dequant(q_a, q_b, sa, sb, bias, torch.float64)
        eps = {torch.float32: 2.0**-20, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
        assert torch.all((out.double() - exp).abs() <= eps * exp.abs() + 1e-3)


@pytest.mark.parametrize("m", [4, 300])  # the fused small-M kernels; the scratch + cuBLAS path
def test_lora_linear_4bit_on_gpu_against_float64(gen, m):
    out_f, in_f, r, scale = 256, 512, 8, 2.0
    w = torch.randn(out_f, in_f, generator=gen, device=DEV) * 0.02
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", torch.float64)
    x = torch.randn(m, in_f, generator=gen, device=DEV)
    a = torch.randn(r, in_f, generator=gen, device=DEV) * 0.05
    b = torch.randn(out_f, r, generator=gen, device=DEV) * 0.05
    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    out = kernels.lora_linear_4bit(leaves[0], packed, absmax, (out_f, in_f), 64, "nf4", leaves[1], leaves[2], scale)
    grad = torch.randn(out.shape, generator=gen, device=DEV)
    out.backward(grad)
    e = [t.double().clone().requires_grad_() for t in (x, a, b)]
    expected = e[0] @ w64.t() + scale * (e[0] @ e[1].t()) @ e[2].t()
    expected.backward(grad.double())
    assert torch.allclose(out.double(), expected, rtol=1e-4, atol=1e-4)
    for got, exp in zip(leaves, e):
        assert torch.allclose(got.grad.double(), exp.grad, rtol=1e-4, atol=1e-3)


def _bound(exact, magnitude, dtype):
    eps = {torch.float32: 2.0**-14, torch.float16: 2.0**-9, torch.bfloat16: 2.0**-7}[dtype]
    return eps * magnitude + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 8, 64])
@pytest.mark.parametrize("m", [1, 3, 9, 16, 17, 64])
def test_gemv_4bit_lora_kernels_against_float64(k, gen, dtype, rank, m):
    for out_f, in_f, blocksize in [(37, 96, 64), (4099, 1024, 128), (257, 4096, 4096)]:
        w = torch.randn(out_f, in_f, generator=gen, device=DEV) * 0.02
        packed, absmax = ref.quantize_4bit(w, blocksize, "nf4")
        x = torch.randn(m, in_f, generator=gen, device=DEV).to(dtype)
        xl = torch.randn(m, in_f, generator=gen, device=DEV).to(dtype)
        a = (torch.randn(rank, in_f, generator=gen, device=DEV) * 0.05).to(dtype)
        b = (torch.randn(out_f, rank, generator=gen, device=DEV) * 0.05).to(dtype)
        bias = torch.randn(out_f, generator=gen, device=DEV).to(dtype)
        xa = twice(lambda o: k.launch_lora_down(xl, a, None, o), lambda: poisoned((m, rank), torch.float32))
        xa64 = xl.double() @ a.double().t()
        assert torch.all((xa.double() - xa64).abs() <= 2.0**-18 * (xl.double().abs() @ a.double().abs().t()) + 1e-6)
        out = twice(lambda o: k.launch_gemv_4bit_lora(x, packed, absmax, bias, xa, b, None, None, 1.5, o, blocksize,
                                                      "nf4"), lambda: poisoned((m, out_f), dtype))
        w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), blocksize, "nf4", torch.float64)
        exact = x.double() @ w64.t() + bias.double() + 1.5 * xa64 @ b.double().t()
        mag = x.double().abs() @ w64.abs().t() + bias.double().abs() + 1.5 * xa64.abs() @ b.double().abs().t()
        assert torch.all((out.double() - exact).abs() <= _bound(exact, mag, dtype)), (out_f, in_f)


def test_gemv_4bit_lora_adapter_per_row_on_gpu(gen):
    out_f, in_f, adapters, rank, m = 515, 640, 5, 16, 40
    w = torch.randn(out_f, in_f, generator=gen, device=DEV) * 0.02
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    a = (torch.randn(adapters, rank, in_f, generator=gen, device=DEV) * 0.05).to(torch.bfloat16)
    b = (torch.randn(adapters, out_f, rank, generator=gen, device=DEV) * 0.05).to(torch.bfloat16)
    idx = torch.randint(-1, adapters, (m,), generator=gen, device=DEV)
    scales = torch.rand(adapters, generator=gen, device=DEV) + 0.5
    x = torch.randn(m, in_f, generator=gen, device=DEV).to(torch.bfloat16)
    got = kernels.multi_lora_linear_4bit(x, packed, absmax, (out_f, in_f), 64, "nf4", a, b, idx, 2.0, scales)
    exp, _ = ref.matmul_4bit_lora(x.double(), packed, absmax, (out_f, in_f), 64, "nf4", None, None, a.double(),
                                  b.double(), 2.0, idx, scales)
    w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), 64, "nf4", torch.float64)
    mag = x.double().abs() @ w64.abs().t() + exp.abs()
    assert torch.all((got.double() - exp).abs() <= _bound(exp, mag, torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [None, 1, 8, 64])
@pytest.mark.parametrize("m", [1, 2, 5, 8, 13, 33, 64])
def test_gemv_4bit_t_kernels_against_float64(k, gen, dtype, rank, m):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for out_f, in_f, blocksize, splits in [(40, 264, 64, None), (4099, 1024, 128, None), (1000, 4104, 64, 7),
                                           (257, 4096, 4096, None)]:
        w = torch.randn(out_f, in_f, generator=gen, device=DEV) * 0.02
        packed, absmax = ref.quantize_4bit(w, blocksize, "nf4")
        g = torch.randn(m, out_f, generator=gen, device=DEV).to(dtype)
        gxa = a = None
        if rank is not None:
            gxa = torch.randn(m, rank, generator=gen, device=DEV) * 0.3
            a = (torch.randn(rank, in_f, generator=gen, device=DEV) * 0.05).to(dtype)
        _, splits, rows = k.gemv_t_plan(m, out_f, in_f, sms, splits)
        ws, out = twice(lambda ws, o: k.launch_gemv_4bit_t(g, packed, absmax, gxa, a, ws, o, blocksize, "nf4", rows),
                        lambda: (poisoned((splits, m, in_f), torch.float32), poisoned((m, in_f), dtype)))
        w64 = ref.dequantize_4bit(packed, absmax, (out_f, in_f), blocksize, "nf4", torch.float64)
        exact, mag = g.double() @ w64, g.double().abs() @ w64.abs()
        if rank is not None:
            exact, mag = exact + gxa.double() @ a.double(), mag + gxa.double().abs() @ a.double().abs()
        assert torch.all((out.double() - exact).abs() <= _bound(exact, mag, dtype)), (out_f, in_f, splits)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_mm_dequant_lora_kernel_against_float64(k, gen, dtype):
    for m, kdim, n, rank in [(1, 64, 24, 1), (17, 256, 1000, 8), (64, 4096, 4096, 64)]:
        q_a = torch.randint(-128, 128, (m, kdim), generator=gen, device=DEV, dtype=torch.int8)
        q_b = torch.randint(-128, 128, (n, kdim), generator=gen, device=DEV, dtype=torch.int8)
        sa = torch.rand(m, generator=gen, device=DEV) * 4
        sb = torch.rand(n, generator=gen, device=DEV) * 4
        addend = torch.randn(m, n, generator=gen, device=DEV)
        bias = torch.randn(n, generator=gen, device=DEV)
        xa = torch.randn(m, rank, generator=gen, device=DEV)
        b = (torch.randn(n, rank, generator=gen, device=DEV) * 0.1).to(dtype)
        acc = _cuda.int_mm_padded(q_a, q_b)
        out = twice(lambda o: k.launch_int8_mm_dequant_lora(acc, sa, sb, addend, bias, xa, b, 1.5, o),
                    lambda: poisoned((m, n), dtype))
        base = ref.int8_matmul_dequant(q_a, q_b, sa, sb, None, torch.float64) + addend.double() + bias.double()
        exact = base + 1.5 * xa.double() @ b.double().t()
        mag = base.abs() + 1.5 * xa.double().abs() @ b.double().abs().t()
        assert torch.all((out.double() - exact).abs() <= _bound(exact, mag, dtype) + 2.0**-20 * mag)


def test_qlora_layers_take_the_fused_kernels_on_gpu(gen, monkeypatch):
    """LoraLinear over Linear4bit / Linear8bitLt at decode size: the fused kernels run (forward
    and backward), and the scratch buffer is reused across large-M calls."""
    from nybble.kernels import _cupy
    from nybble.nn import Linear4bit, Linear8bitLt, LoraLinear

    launched = []
    real = _cupy._launch
    monkeypatch.setattr(_cupy, "_launch", lambda file, name, *a: (launched.append(name), real(file, name, *a)))
    lin = torch.nn.Linear(512, 384).to(DEV)
    for base, expect in ((Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16), "nybble_gemv_4bit_lora_nf4_bf16_m4"),
                         (Linear8bitLt.from_linear(lin), "nybble_int8_mm_dequant_lora_bf16")):
        layer = LoraLinear(base.to(DEV), r=8, alpha=16)
        with torch.no_grad():
            layer.lora_B.weight.normal_(std=0.05)
        x = torch.randn(4, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        launched.clear()
        layer(x).float().sum().backward()
        assert expect in launched, launched
        if isinstance(base, Linear4bit):
            assert "nybble_gemv_4bit_t_partial_nf4_bf16_m4" in launched, launched
    kernels.release_scratch()
    w = torch.randn(1024, 512, device=DEV) * 0.02
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    x = torch.randn(300, 512, device=DEV, dtype=torch.bfloat16)
    kernels.matmul_4bit(x, packed, absmax, (1024, 512), 64, "nf4")
    buffers = [t.data_ptr() for t in _cuda._SCRATCH.values()]
    kernels.matmul_4bit(x, packed, absmax, (1024, 512), 64, "nf4")
    assert buffers and [t.data_ptr() for t in _cuda._SCRATCH.values()] == buffers


def test_module_cache_is_keyed_by_file_options_and_arch(k):
    k.get_module("dequant_4bit.cu", 0)
    keys = [key for key in k.MODULES if key[0] == "dequant_4bit.cu"]
    assert keys and keys[0][1] == k.nvrtc_options() and keys[0][2] == torch.cuda.get_device_capability(0)
    assert k.get_module("dequant_4bit.cu", 0) is k.MODULES[keys[0]]
