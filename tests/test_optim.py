"""nybble.optim: AdamW with 32-bit / 8-bit block-wise states (Rust on the CPU, CUDA kernel on
the GPU), paged variants, state_dict round trips, against torch.optim.AdamW and float64."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import nybble  # noqa: E402
from nybble import _core  # noqa: E402
from nybble.kernels import optim as kopt  # noqa: E402
from nybble.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit  # noqa: E402

CUDA = torch.cuda.is_available()


def _params(shapes, seed, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype).to(device)) for s in shapes]


def _run(opt_cls_pairs, shapes, steps, seed=0, **kw):
    """Applies the same random gradients to copies of the same params under each optimizer."""
    base = _params(shapes, seed)
    copies = []
    for make in opt_cls_pairs:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in base]
        copies.append((ps, make(ps)))
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for ps, opt in copies:
            for p, gr in zip(ps, grads):
                p.grad = gr.clone()
            opt.step()
    return copies


def test_32bit_equals_torch_adamw_over_many_steps():
    shapes = [(300, 70), (33,), (4096 + 5,)]
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.1},  # noqa: E731
                         {"params": ps[2:], "lr": 1e-3, "weight_decay": 0.0}]
    (ours, _), (ref, _) = _run(
        [lambda ps: AdamW(groups(ps), betas=(0.9, 0.95), eps=1e-6),
         lambda ps: torch.optim.AdamW(groups(ps), betas=(0.9, 0.95), eps=1e-6, foreach=False)],
        shapes, steps=150)
    for a, b, start in zip(ours, ref, _params(shapes, 0)):
        # float32 rounding only: a few ulps after 150 steps.
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
        assert (a - start).abs().max() > 0.02  # it did move


def test_32bit_matches_float64_reference():
    n = 5000
    g = torch.Generator().manual_seed(3)
    p = torch.randn(n, generator=g)
    p64, m64, v64 = p.double().clone(), torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    param = torch.nn.Parameter(p.clone())
    opt = AdamW([param], lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.05)
    for t in range(1, 51):
        grad = torch.randn(n, generator=g)
        param.grad = grad.clone()
        opt.step()
        gd = grad.double()
        p64 *= 1 - 1e-2 * 0.05
        m64 = 0.8 * m64 + 0.2 * gd
        v64 = 0.99 * v64 + 0.01 * gd * gd
        p64 -= 1e-2 / (1 - 0.8**t) * m64 / (v64.sqrt() / math.sqrt(1 - 0.99**t) + 1e-8)
    assert (param.double() - p64).abs().max() < 2e-5


def test_8bit_states_are_8bit_and_small_tensors_stay_32bit():
    big, small = torch.nn.Parameter(torch.randn(64, 100)), torch.nn.Parameter(torch.randn(4095))
    opt = AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    sb, ss = opt.state[big], opt.state[small]
    assert sb["state1"].dtype == torch.uint8 and sb["state1"].numel() == 6400
    assert sb["absmax1"].shape == (math.ceil(6400 / 256),) and sb["absmax1"].dtype == torch.float32
    assert "exp_avg" in ss and ss["exp_avg"].dtype == torch.float32
    # 8-bit states: 2 bytes + 2 float32 per 256 elements.
    assert sum(t.numel() * t.element_size() for t in sb.values() if torch.is_tensor(t)) == 2 * 6400 + 8 * 25


def _regression(opt_factory, steps=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 128, generator=g)
    w_true = torch.randn(128, 64, generator=g) / 8
    y = x @ w_true + 0.01 * torch.randn(512, 64, generator=g)
    w = torch.nn.Parameter(torch.zeros(128, 64))
    opt = opt_factory([w])
    losses = []
    for _ in range(steps):
        loss = ((x @ w - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return w.detach(), losses, opt


def test_8bit_tracks_torch_adamw_on_a_regression_problem():
    """Stated tolerance: after 200 steps the 8-bit parameters stay within 2% (relative to the
    largest weight) of torch.optim.AdamW's, and the loss within 10% of it."""
    w8, l8, opt = _regression(lambda ps: AdamW8bit(ps, lr=1e-2))
    w32, l32, _ = _regression(lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    assert opt.state[next(iter(opt.state))]["state1"].dtype == torch.uint8
    assert l8[-1] < 0.05 * l8[0]  # it learned
    assert abs(l8[-1] - l32[-1]) <= 0.1 * l32[-1] + 1e-4
    assert (w8 - w32).abs().max() <= 0.02 * w32.abs().max()


def test_rust_8bit_step_matches_torch_reference():
    """The Rust step and the torch implementation of the same math (what CUDA users without
    CuPy run) agree to the last bit or two; torch's CPU kernels do not round every division
    exactly, so an occasional code may land on the neighbouring entry."""
    n = 256 * 7 + 77
    g = torch.Generator().manual_seed(5)
    p = torch.randn(n, generator=g)
    s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    nb = math.ceil(n / 256)
    a1, a2 = torch.zeros(nb), torch.zeros(nb)
    p_ref, s1r, s2r, a1r, a2r = p.clone(), s1.clone(), s2.clone(), a1.clone(), a2.clone()
    c1, c2 = torch.from_numpy(_core.dynamic_map(True)), torch.from_numpy(_core.dynamic_map(False))
    for step in range(1, 8):
        grad = torch.randn(n, generator=g) * 10 ** float(torch.empty(1).uniform_(-3, 1, generator=g))
        _core.adamw_step_8bit(p.numpy(), grad.numpy(), "float32", s1.numpy(), s2.numpy(), a1.numpy(), a2.numpy(),
                              c1.numpy(), c2.numpy(), 256, step, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        c = kopt.adamw_constants(1e-3, 0.9, 0.999, 1e-8, 0.01, step)
        kopt.adamw_8bit_reference(p_ref, grad, s1r, s2r, a1r, a2r, c1, c2, c)
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(a1, a1r, rtol=1e-5, atol=0)
        torch.testing.assert_close(a2, a2r, rtol=1e-5, atol=0)
        for q, qr in ((s1, s1r), (s2, s2r)):
            diff = (q.int() - qr.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_params_match_reference(dtype):
    n = 3000
    g = torch.Generator().manual_seed(9)
    p = torch.randn(n, generator=g).to(dtype)
    param = torch.nn.Parameter(p.clone())
    opt = AdamW([param], lr=1e-2, weight_decay=0.0)
    ref, m, v = p.clone(), torch.zeros(n), torch.zeros(n)
    for step in range(1, 6):
        grad = torch.randn(n, generator=g).to(dtype)
        param.grad = grad.clone()
        opt.step()
        kopt.adamw_32bit_reference(ref, grad, m, v, kopt.adamw_constants(1e-2, 0.9, 0.999, 1e-8, 0.0, step))
    assert param.dtype == dtype
    assert torch.equal(param.detach(), ref)
    torch.testing.assert_close(opt.state[param]["exp_avg"], m, rtol=0, atol=0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3000), log_scale=st.floats(-6, 3), seed=st.integers(0, 2**31 - 1))
def test_quantized_state_round_trip(n, log_scale, seed):
    """After a step, decoding the 8-bit states gives the float32 states to within half the
    widest gap of the dynamic map (1/128 of the block absmax), and absmax is the block max."""
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=g) * 10**log_scale
    p = torch.randn(n, generator=g)
    nb = math.ceil(n / 256)
    s1, s2 = torch.full((n,), 127, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(nb), torch.zeros(nb)
    c1, c2 = _core.dynamic_map(True), _core.dynamic_map(False)
    _core.adamw_step_8bit(p.numpy(), grad.numpy(), "float32", s1.numpy(), s2.numpy(), a1.numpy(), a2.numpy(),
                          c1, c2, 256, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    m = grad.double() * 0.1
    v = grad.double() ** 2 * 0.001
    m_dec = torch.from_numpy(c1)[s1.long()].double() * a1.double().repeat_interleave(256)[:n]
    v_dec = torch.from_numpy(c2)[s2.long()].double() * a2.double().repeat_interleave(256)[:n]
    blocks_m = torch.nn.functional.pad(m.abs(), (0, nb * 256 - n)).reshape(nb, 256).amax(1)
    torch.testing.assert_close(a1.double(), blocks_m, rtol=1e-6, atol=0)
    tol1 = a1.double().repeat_interleave(256)[:n] / 128
    tol2 = a2.double().repeat_interleave(256)[:n] / 128
    assert ((m_dec - m).abs() <= tol1 * 1.0001).all()
    assert ((v_dec - v).abs() <= tol2 * 1.0001 + 1e-30).all()


@pytest.mark.parametrize("factory", [lambda ps: AdamW(ps, lr=1e-2), lambda ps: AdamW8bit(ps, lr=1e-2),
                                     lambda ps: PagedAdamW8bit(ps, lr=1e-2)], ids=["32bit", "8bit", "paged8bit"])
def test_state_dict_round_trip_continues_identically(factory, tmp_path):
    shapes = [(80, 64), (100,)]
    (ps, opt), = _run([factory], shapes, steps=10)
    path = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), path)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = factory(ps2)
    opt2.load_state_dict(torch.load(path, weights_only=False))
    for k, v in opt.state[ps[0]].items():
        v2 = opt2.state[ps2[0]][k]
        assert (torch.equal(v, v2) and v.dtype == v2.dtype) if torch.is_tensor(v) else v == v2
    g = torch.Generator().manual_seed(77)
    for _ in range(10):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for pp, o in ((ps, opt), (ps2, opt2)):
            for p, gr in zip(pp, grads):
                p.grad = gr.clone()
            o.step()
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)


def test_loads_torch_adamw_state_dict():
    shapes = [(50, 30)]
    (ps, topt), = _run([lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False)], shapes, steps=5)
    ours_p = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = AdamW(ours_p, lr=1e-2)
    ours.load_state_dict(topt.state_dict())
    assert ours.state[ours_p[0]]["step"] == 5
    grad = torch.randn(shapes[0])
    ps[0].grad, ours_p[0].grad = grad.clone(), grad.clone()
    topt.step()
    ours.step()
    torch.testing.assert_close(ours_p[0], ps[0], rtol=2e-6, atol=2e-6)


def test_non_finite_grad_raises_and_leaves_param_untouched():
    p = torch.nn.Parameter(torch.randn(5000))
    before = p.detach().clone()
    for opt in (AdamW([p]), AdamW8bit([p])):
        grad = torch.randn(5000)
        grad[1234] = float("inf")
        p.grad = grad
        with pytest.raises(nybble.NonFiniteError, match="1234"):
            opt.step()
        assert torch.equal(p.detach(), before)


def test_non_finite_grad_in_a_later_param_leaves_everything_untouched():
    a, b = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(300))
    for opt in (AdamW([a, b]), AdamW8bit([a, b])):
        a.grad, b.grad = torch.randn(5000), torch.randn(300)
        opt.step()
        before = [a.detach().clone(), b.detach().clone()]
        steps = [int(opt.state[p]["step"]) for p in (a, b)]
        a.grad, b.grad = torch.randn(5000), torch.randn(300)
        b.grad[7] = float("nan")
        with pytest.raises(nybble.NonFiniteError, match="parameter 1 .*flat index 7"):
            opt.step()
        assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
        assert [int(opt.state[p]["step"]) for p in (a, b)] == steps


def test_invalid_hyper_parameters():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError):
        AdamW([p], betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        AdamW([p], optim_bits=4)
    with pytest.raises(ValueError):
        _core.adamw_step_32bit(np.zeros(3, np.float32), np.zeros(3, np.float32), "float32", np.zeros(3, np.float32),
                               np.zeros(2, np.float32), 1, 1e-3, 0.9, 0.999, 1e-8, 0.0)


def test_paged_optimizer_on_cpu_parameters_equals_plain():
    # Paging concerns CUDA parameters only: CPU parameters keep plain host states.
    (p_paged, o_paged), (p_plain, _) = _run([lambda ps: PagedAdamW(ps, lr=1e-2), lambda ps: AdamW(ps, lr=1e-2)],
                                           [(70, 70)], steps=5)
    assert torch.equal(p_paged[0], p_plain[0])
    assert all(v.device.type == "cpu" for v in o_paged.state[p_paged[0]].values() if torch.is_tensor(v))


# ---------------------------------------------------------------------- GPU


gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_step_equals_cpu_rust_step(dtype, bits):
    shapes = [(257, 33), (4096 + 300,)]
    cpu = [torch.nn.Parameter(p.to(dtype)) for p in _params(shapes, 11)]
    gpu_ = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    o_cpu, o_gpu = AdamW(cpu, lr=1e-2, optim_bits=bits), AdamW(gpu_, lr=1e-2, optim_bits=bits)
    g = torch.Generator().manual_seed(12)
    for _ in range(5):
        for pc, pg in zip(cpu, gpu_):
            grad = torch.randn(pc.shape, generator=g).to(dtype)
            pc.grad, pg.grad = grad.clone(), grad.cuda()
        o_cpu.step()
        o_gpu.step()
    torch.cuda.synchronize()
    for pc, pg in zip(cpu, gpu_):
        assert torch.equal(pc.detach(), pg.detach().cpu())
        for k, v in o_cpu.state[pc].items():
            if torch.is_tensor(v):
                assert torch.equal(v, o_gpu.state[pg][k].cpu()), k


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [32, 8])
def test_paged_states_live_in_managed_memory(bits):
    pytest.importorskip("cupy")
    from nybble.optim import paged

    if not paged.managed_memory_available():
        pytest.skip("no managed memory on this device")
    shapes = [(8192,), (300, 70)]
    params = [torch.nn.Parameter(p.cuda()) for p in _params(shapes, 21)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    before = paged.managed_bytes()
    opt = AdamW(params, lr=1e-2, optim_bits=bits, paged=True)
    ref = AdamW(plain, lr=1e-2, optim_bits=bits)
    g = torch.Generator(device="cuda").manual_seed(22)
    for _ in range(4):
        for p, q in zip(params, plain):
            p.grad = torch.randn(p.shape, device="cuda", generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(params, plain):
        tensors = [v for v in opt.state[p].values() if torch.is_tensor(v)]
        assert all(paged.is_paged(v) for v in tensors)
        assert torch.equal(p, q)  # managed memory changes where states live, not the math
    assert paged.managed_bytes() - before >= sum(p.numel() for p in params) * (2 if bits == 8 else 8)


@gpu
@pytest.mark.gpu
def test_paged_states_that_do_not_fit_stay_on_the_host_together(monkeypatch):
    pytest.importorskip("cupy")
    from nybble.optim import paged

    if not paged.managed_memory_available():
        pytest.skip("no managed memory on this device")
    monkeypatch.setattr(paged, "_free_bytes", lambda device: 0)
    p = torch.nn.Parameter(torch.randn(8192, device="cuda"))
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = PagedAdamW8bit([p], lr=1e-2), AdamW8bit([q], lr=1e-2)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        with pytest.warns(UserWarning, match="do not fit") if not opt.state else contextlib.nullcontext():
            opt.step()
        ref.step()
    # Every state of the parameter on the host (never some on the GPU), same result.
    assert {v.device.type for v in opt.state[p].values() if torch.is_tensor(v)} == {"cpu"}
    assert torch.equal(p, q)
    sd = opt.state_dict()
    opt2 = PagedAdamW8bit([p], lr=1e-2)
    opt2.load_state_dict(sd)
    assert {v.device.type for v in opt2.state[p].values() if torch.is_tensor(v)} == {"cpu"}


@gpu
@pytest.mark.gpu
def test_paged_without_managed_memory_keeps_states_on_the_gpu(monkeypatch):
    from nybble.optim import adamw, paged

    monkeypatch.setattr(paged, "managed_memory_available", lambda device=None: False)
    monkeypatch.setattr(adamw, "_NO_MANAGED_WARNED", False)
    p = torch.nn.Parameter(torch.randn(8192, device="cuda"))
    opt = PagedAdamW([p], lr=1e-2)
    p.grad = torch.randn_like(p)
    with pytest.warns(UserWarning, match="managed memory is unavailable"):
        opt.step()
    assert all(v.is_cuda for v in opt.state[p].values() if torch.is_tensor(v))
