"""The nybble:: op registry: every op registered for CPU, CUDA and the default key; the
NYBBLE_KERNELS=torch switch; torch.compile(fullgraph=True) over every layer kind, forward and
backward, equal to eager."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import nybble  # noqa: E402
import nybble.optim  # noqa: E402
from nybble import kernels  # noqa: E402
from nybble.kernels import _cpu, ops, reference  # noqa: E402
from nybble.kernels import optim as kopt  # noqa: E402
from nybble.nn import Linear4bit, Linear8bitLt, LoraLinear  # noqa: E402

EXPECTED_OPS = {
    "quantize_4bit", "dequantize_4bit", "decode_absmax", "double_quantize", "matmul_4bit", "int8_vectorwise_quant",
    "int8_matmul", "int8_matmul_dequant", "int8_linear", "adamw_8bit", "adamw_32bit",
    "matmul_4bit_lora", "matmul_4bit_grad_input", "int8_linear_lora",
}  # fmt: skip


def test_every_op_has_cpu_cuda_and_default_kernels():
    assert set(ops.OPS) == EXPECTED_OPS
    for name in EXPECTED_OPS:
        qualname = f"nybble::{name}"
        for key in ops.BACKEND_KEYS:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key), (qualname, key)
        assert hasattr(torch.ops.nybble, name)


def test_ops_have_schemas_and_fakes():
    for name, op in ops.OPS.items():
        schema = str(torch.ops.nybble.__getattr__(name).default._schema)
        assert schema.startswith(f"nybble::{name}("), schema
        assert op._abstract_fn is not None, name  # the fake torch.compile traces shapes with


@pytest.fixture
def gen(rng) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def _raise(*args, **kwargs):
    raise AssertionError("a Rust kernel ran under NYBBLE_KERNELS=torch")


def test_nybble_kernels_torch_selects_the_reference_everywhere(monkeypatch, gen):
    w = torch.randn(24, 64, generator=gen)
    packed, absmax = kernels.quantize_4bit(w, 64, "nf4")
    x = torch.randn(3, 64, generator=gen)
    with_rust = kernels.matmul_4bit(x, packed, absmax, (24, 64), 64, "nf4")
    monkeypatch.setenv("NYBBLE_KERNELS", "torch")
    for name in ("quantize_4bit", "dequantize_4bit", "decode_absmax", "double_quantize", "matmul_4bit",
                 "int8_vectorwise_quant", "adamw_8bit", "adamw_32bit"):
        monkeypatch.setattr(_cpu, name, _raise)
    p2, a2 = kernels.quantize_4bit(w, 64, "nf4")
    assert torch.equal(p2, packed) and torch.equal(a2, absmax)
    got = kernels.matmul_4bit(x, packed, absmax, (24, 64), 64, "nf4")
    assert torch.equal(got, reference.matmul_4bit(x, packed, absmax, (24, 64), 64, "nf4"))
    torch.testing.assert_close(got, with_rust)
    codes, nested = kernels.double_quantize(absmax)
    decoded = kernels.decode_absmax(codes, nested["nested_absmax"], nested["nested_code"], nested["offset"])
    assert decoded.shape == absmax.shape
    kernels.int8_vectorwise_quant(x, 1.0)
    # Optimizers too: both AdamW flavours step through the torch reference.
    for bits in (8, 32):
        p = nn.Parameter(torch.randn(5000, generator=gen))
        p.grad = torch.randn(5000, generator=gen)
        expected = p.detach().clone()
        opt = nybble.optim.AdamW([p], lr=1e-2, optim_bits=bits)
        opt.step()
        st = opt.state[p]
        c = kopt.adamw_constants(1e-2, 0.9, 0.999, 1e-8, 1e-2, 1)
        if bits == 32:
            m, v = torch.zeros(5000), torch.zeros(5000)
            kopt.adamw_32bit_reference(expected, p.grad, m, v, c)
            assert torch.equal(st["exp_avg"], m) and torch.equal(p.detach(), expected)
        else:  # the Rust step would have raised; the reference moved every element
            assert "state1" in st and bool((p.detach() != expected).all())


def test_double_quantize_reference_equals_core(gen):
    """The torch double quantization (what CUDA tensors run: no host round trip) gives the
    Rust core's codes, nested absmax and offset."""
    for n in (1, 255, 256, 257, 5000):
        absmax = torch.rand(n, generator=gen) * 3 + 0.01
        core_codes, core_nested = nybble.quant.double_quantize(absmax.numpy())
        codes, nested_absmax, offset = reference.double_quantize(absmax, ops.dynamic_map(True), 256)
        assert torch.equal(codes, torch.from_numpy(core_codes))
        assert torch.equal(nested_absmax, torch.from_numpy(core_nested.nested_absmax))
        assert float(offset) == core_nested.offset


# ---------------------------------------------------------------------- torch.compile


def _linear(gen, n_in, n_out):
    lin = nn.Linear(n_in, n_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.2)
        lin.bias.copy_(torch.randn(n_out, generator=gen) * 0.1)
    return lin


def _model(gen, kind: str, lora: bool) -> nn.Module:
    if kind == "4bit":
        make = lambda n_in, n_out: Linear4bit.from_linear(_linear(gen, n_in, n_out), compute_dtype=torch.float32)  # noqa: E731
    else:
        make = lambda n_in, n_out: Linear8bitLt.from_linear(_linear(gen, n_in, n_out), threshold=2.0)  # noqa: E731
    layers = [make(32, 48), make(48, 16)]
    if lora:
        layers = [LoraLinear(m, r=4, alpha=8) for m in layers]
        with torch.no_grad():
            for m in layers:
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.1)
    return nn.Sequential(layers[0], nn.GELU(), layers[1])


def _run(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("kind", ["4bit", "int8"])
def test_compile_fullgraph_forward_backward_equals_eager(gen, kind, lora, backend):
    torch._dynamo.reset()
    model = _model(gen, kind, lora)
    x = torch.randn(2, 5, 32, generator=gen)
    x[..., 3] *= 8  # an outlier column for LLM.int8()
    y_eager, gx_eager, grads_eager = _run(model, x)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y, gx, grads = _run(compiled, x)
    def close(got, expected):
        if backend == "aot_eager":  # the same kernels in the same order: equal
            torch.testing.assert_close(got, expected)
        else:  # inductor fuses the float32 glue (GELU and its backward): float32 rounding apart
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))

    close(y, y_eager)
    close(gx, gx_eager)
    assert set(grads) == set(grads_eager) and (set(grads) != set() if lora else True)
    for name in grads:
        close(grads[name], grads_eager[name])


# ---------------------------------------------------------------------- the fused LoRA path


def _unfused_lora(lora: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The LoRA layer as separate modules: base layer, then the adapter in the activations'
    16-bit dtype (float32 for float32 / float64 activations) over float32 masters."""
    out = lora.base_layer(x)
    a, b = lora.lora_A.weight, lora.lora_B.weight
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else a.dtype
    h = lora.lora_dropout(x).to(dtype)
    delta = nn.functional.linear(nn.functional.linear(h, a.to(dtype)), b.to(dtype)) * lora.scaling
    return out + delta.to(out.dtype)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "act,compute",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
     (torch.float16, torch.bfloat16), (torch.bfloat16, None), (torch.float32, None)],
)
def test_fused_lora_equals_unfused_for_any_activation_and_compute_dtype(gen, act, compute, double_quant):
    """Fused (one Function) and unfused (base module + adapter matmuls) agree bit for bit in
    the forward pass and in every gradient, whatever the activation and compute dtypes."""
    base = Linear4bit.from_linear(_linear(gen, 64, 24), double_quant=double_quant, compute_dtype=compute)
    lora = LoraLinear(base, r=4, alpha=8)
    with torch.no_grad():
        lora.lora_B.weight.copy_(torch.randn(lora.lora_B.weight.shape, generator=gen) * 0.1)
    x0 = torch.randn(3, 5, 64, generator=gen).to(act)
    results = []
    for fn in (lora, lambda x: _unfused_lora(lora, x)):
        x = x0.clone().requires_grad_(True)
        y = fn(x)
        y.float().square().sum().backward()
        results.append((y.detach(), x.grad, lora.lora_A.weight.grad.clone(), lora.lora_B.weight.grad.clone()))
        lora.zero_grad(set_to_none=True)
    for got, expected in zip(*results):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_eager_cpu_inference_skips_the_dispatcher_with_the_same_result(monkeypatch):
    """Under no_grad (decode), a CPU Linear4bit calls the op's registered CPU kernel directly;
    the result is the Function + dispatcher path's bit for bit, and anything autograd records,
    a compile trace or NYBBLE_KERNELS=torch still goes through the Function and the ops."""
    torch.manual_seed(0)
    layer = Linear4bit(256, 96, bias=True, compute_dtype=torch.bfloat16)
    layer.set_weight(torch.randn(96, 256))
    applied = []
    real_apply = kernels.Linear4bitFunction.apply
    monkeypatch.setattr(kernels.Linear4bitFunction, "apply", lambda *a: applied.append(1) or real_apply(*a))
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        fast = layer(x)
    assert applied == []
    slow = layer(x.clone().requires_grad_(True))
    assert applied == [1]
    assert torch.equal(fast, slow.detach())
    monkeypatch.setenv("NYBBLE_KERNELS", "torch")
    with torch.no_grad():
        ref = layer(x)
    assert applied == [1, 1]
    torch.testing.assert_close(ref.float(), fast.float(), rtol=2e-2, atol=0.125)  # bf16 rounding of ~10s
    assert set(ops.CPU_KERNELS) == set(ops.OPS) and ops.cpu_kernel("matmul_4bit") is ops.CPU_KERNELS["matmul_4bit"]


def test_eager_cpu_inference_skips_the_dispatcher_for_int8_layers(monkeypatch):
    """The same for Linear8bitLt (LLM.int8()): no_grad CPU calls run the fused kernel without
    the Function, bit for bit the Function's result; with an outlier column too."""
    torch.manual_seed(1)
    layer = Linear8bitLt.from_linear(torch.nn.Linear(128, 40))
    applied = []
    real_apply = kernels.Linear8bitFunction.apply
    monkeypatch.setattr(kernels.Linear8bitFunction, "apply", lambda *a: applied.append(1) or real_apply(*a))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 3, 128).to(dtype)
        x[0, 1, 7] = 9.0  # above the threshold: an outlier column
        with torch.no_grad():
            fast = layer(x)
        assert applied == [] and fast.dtype == dtype and fast.shape == (2, 3, 40)
        slow = layer(x.clone().requires_grad_(True))
        assert applied == [1]
        assert torch.equal(fast, slow.detach())
        applied.clear()
    monkeypatch.setenv("NYBBLE_KERNELS", "torch")
    with torch.no_grad():
        layer(x)
    assert applied == [1]
