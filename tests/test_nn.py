"""torch modules: quantized Linear layers and LoRA, against dense float64 references."""

import numpy as np
import pytest
import torch
from torch import nn

import nybble
from nybble.nn import Linear4bit, Linear8bitLt, LoraLinear


def make_linear(rng, in_f, out_f, bias=True):
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.05))
        if bias:
            lin.bias.copy_(torch.from_numpy(rng.standard_normal(out_f).astype(np.float32)))
    return lin


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(17, 5), (64, 48), (33, 129)])
def test_linear4bit_forward_backward_against_float64(rng, quant_type, double_quant, shape):
    lin = make_linear(rng, *shape)
    q = Linear4bit.from_linear(lin, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float64)
    # The decoded weight is the module's definition of W; the float64 reference uses it.
    packed, st = nybble.quantize_4bit(lin.weight.detach(), quant_type=quant_type, double_quant=double_quant)
    w = torch.from_numpy(np.asarray(nybble.dequantize_4bit(packed, st))).double()
    assert torch.equal(q.dequantized_weight(torch.float32).double(), w)
    x = torch.from_numpy(rng.standard_normal((7, shape[0]))).requires_grad_(True)
    y = q(x)
    ref = x.detach() @ w.t() + lin.bias.detach().double()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(q, (x,))
    g = torch.from_numpy(rng.standard_normal(y.shape))
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ w, rtol=1e-12, atol=1e-12)
    assert not q.bias.requires_grad


def test_linear4bit_does_not_keep_dense_weight_for_backward(rng, monkeypatch):
    import weakref

    from nybble.kernels import _cpu

    lin = make_linear(rng, 256, 256)
    q = Linear4bit.from_linear(lin, compute_dtype=torch.float32)
    decoded = []
    original = _cpu.dequantize_4bit

    def spy(*args):
        w = original(*args)
        decoded.append(weakref.ref(w))
        return w

    # The CPU kernel of nybble::dequantize_4bit, which the module's one autograd path calls.
    monkeypatch.setattr(_cpu, "dequantize_4bit", spy)
    # Few rows: the fused CPU kernel decodes in registers, no dense weight at all in forward;
    # many rows: dequantize + BLAS, the decoded weight gone once forward returns. Either way
    # backward decodes it again for dX.
    for rows, forward_decodes in ((4, 0), (_cpu.FUSED_4BIT_MAX_M + 1, 1)):
        decoded.clear()
        x = torch.randn(rows, 256, requires_grad=True)
        y = q(x)
        assert len(decoded) == forward_decodes and all(ref() is None for ref in decoded)
        y.sum().backward()
        assert len(decoded) == forward_decodes + 1
        torch.testing.assert_close(x.grad, torch.ones(rows, 256) @ q.dequantized_weight(torch.float32))
    # Whatever the path, autograd keeps nothing of the dense weight's size between forward
    # and backward: what it saves is the packed weight, the float32 absmax and x.
    saved = []
    for rows in (4, _cpu.FUSED_4BIT_MAX_M + 1):
        x = torch.randn(rows, 256, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = q(x)
        y.sum().backward()
    assert saved and max(saved) <= (_cpu.FUSED_4BIT_MAX_M + 1) * 256 and 256 * 256 not in saved


def _count_absmax_decodes(monkeypatch):
    """Counts calls of the CPU kernel of nybble::decode_absmax (the DQ decode)."""
    from nybble.kernels import _cpu

    calls = []
    original = _cpu.decode_absmax

    def spy(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_cpu, "decode_absmax", spy)
    return calls


def test_linear4bit_decodes_double_quantized_absmax_once_and_the_fused_kernel_gets_it(rng, monkeypatch):
    from nybble.kernels import _cpu

    q = Linear4bit.from_linear(make_linear(rng, 96, 40), compute_dtype=torch.float32)
    calls = _count_absmax_decodes(monkeypatch)
    fused_absmax = []
    original_fused = _cpu.matmul_4bit_views  # what every CPU fused call runs

    def fused_spy(x, packed, absmax, *args, **kwargs):
        fused_absmax.append(absmax)
        return original_fused(x, packed, absmax, *args, **kwargs)

    monkeypatch.setattr(_cpu, "matmul_4bit_views", fused_spy)
    x = torch.randn(3, 96)
    ys = [q(x) for _ in range(4)]
    with torch.no_grad():  # the module's own eager CPU path, straight to the kernel
        ys += [q(x) for _ in range(2)]
    assert len(calls) == 1 and len(fused_absmax) == 6
    cached = q.float_absmax()
    # The cached float32 tensor's memory itself, every call.
    assert all(a.__array_interface__["data"][0] == cached.data_ptr() for a in fused_absmax)
    assert fused_absmax[0].dtype == np.float32 and fused_absmax[0].size == 96 * 40 // 64
    reference_absmax = nybble.kernels.decode_absmax(*q._absmax_args())
    assert torch.equal(torch.from_numpy(fused_absmax[0]), reference_absmax)
    assert all(torch.equal(y, ys[0]) for y in ys)
    # The state dict still holds bitsandbytes' layout: uint8 codes plus the nested constants.
    sd = q.state_dict()
    assert sd["weight.absmax"].dtype == torch.uint8 and "weight.nested_absmax" in sd
    # Without double quantization there is nothing to decode.
    plain = Linear4bit.from_linear(make_linear(rng, 96, 40), double_quant=False)
    plain(x)
    assert len(calls) == 2  # the reference decode above, nothing for `plain`


def test_linear4bit_absmax_cache_follows_every_change_of_the_constants(rng, monkeypatch):
    lin_a, lin_b = make_linear(rng, 64, 24, bias=False), make_linear(rng, 64, 24, bias=False)
    q = Linear4bit.from_linear(lin_a, compute_dtype=torch.float32)
    other = Linear4bit.from_linear(lin_b, compute_dtype=torch.float32)
    calls = _count_absmax_decodes(monkeypatch)
    x = torch.randn(2, 64)

    def fresh(module):  # the same module's output with its absmax decoded now
        module.invalidate_absmax_cache()
        return module(x)

    y_a = q(x)
    # load_state_dict
    q.load_state_dict(other.state_dict())
    torch.testing.assert_close(q(x), other(x), rtol=0, atol=0)
    assert not torch.equal(q(x), y_a)
    # set_weight
    q.set_weight(lin_a.weight.detach())
    torch.testing.assert_close(q(x), y_a, rtol=0, atol=0)
    n = len(calls)
    q(x)
    assert len(calls) == n  # valid again: no decode
    # in-place change of each constant: the codes, the nested absmax, the offset
    with torch.no_grad():
        q.absmax_codes[0] ^= 0x55
    y = q(x)
    assert len(calls) == n + 1 and torch.equal(y, fresh(q)) and not torch.equal(y, y_a)
    with torch.no_grad():
        q.nested_absmax_bits.copy_((q.nested_absmax_bits.view(torch.float32) * 2).view(torch.int32))
    y = q(x)
    assert torch.equal(y, fresh(q))
    with torch.no_grad():
        q.offset_bits.copy_((q.offset_bits.view(torch.float32) + 0.5).view(torch.int32))
    y = q(x)
    assert torch.equal(y, fresh(q))
    # reassigning a constant
    q.absmax_codes = other.absmax_codes.clone()
    y = q(x)
    assert torch.equal(y, fresh(q))
    # the cached tensor changed in place by a caller of float_absmax()
    before = q(x)
    with torch.no_grad():
        q.float_absmax().mul_(3)
    torch.testing.assert_close(q(x), before, rtol=0, atol=0)
    # device / dtype moves (module.to casts floating buffers; the int32 constants survive)
    n = len(calls)
    q.to(torch.bfloat16)
    assert q._absmax_cache is None
    torch.testing.assert_close(q(x.bfloat16()), q(x.bfloat16()), rtol=0, atol=0)
    assert len(calls) == n + 1
    # an absmax cached in inference mode is decoded again for autograd, which cannot save it
    q = Linear4bit.from_linear(lin_a, compute_dtype=torch.float32)
    with torch.inference_mode():
        y_inf = q(x)
    xg = x.clone().requires_grad_(True)
    y = q(xg)
    y.sum().backward()
    assert torch.equal(y.detach(), y_inf) and xg.grad is not None


def test_linear4bit_absmax_cache_survives_adapter_training_and_can_be_off(rng, monkeypatch):
    q = Linear4bit.from_linear(make_linear(rng, 64, 32), compute_dtype=torch.float32)
    lora = LoraLinear(q, r=4, alpha=8)
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    calls = _count_absmax_decodes(monkeypatch)
    x = torch.randn(5, 64)
    losses = []
    for _ in range(3):  # only the adapter changes: the base's decode stays valid
        loss = lora(x).square().mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert len(calls) == 1 and losses[-1] < losses[0]
    q.cache_absmax = False  # per call, as before (memory: only the 8-bit codes)
    q.invalidate_absmax_cache()
    y1, y2 = q(x), q(x)
    assert len(calls) == 3 and torch.equal(y1, y2) and q._absmax_cache is None


def test_linear4bit_state_dict_round_trip_and_to(rng):
    lin = make_linear(rng, 40, 24)
    q = Linear4bit.from_linear(lin)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == (480, 1)
    assert sd["weight.absmax"].dtype == torch.uint8
    assert "weight.quant_state.bitsandbytes__nf4" in sd
    q2 = Linear4bit(40, 24)
    assert q2.load_state_dict(sd).missing_keys == []
    x = torch.randn(3, 40)
    torch.testing.assert_close(q2(x), q(x), rtol=0, atol=0)
    before = q.float_absmax().clone()
    q.to(torch.bfloat16)  # must not round the float32 constants
    torch.testing.assert_close(q.float_absmax(), before, rtol=0, atol=0)
    assert q(x.bfloat16()).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="blocksize"):
        Linear4bit(40, 24, blocksize=128).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="fp4"):
        Linear4bit(40, 24, quant_type="nf4").load_state_dict(Linear4bit.from_linear(lin, quant_type="fp4").state_dict())


def test_meta_built_layers_take_the_loaded_tensors_where_they_are(rng):
    """load_quantized builds its quantized layers on the meta device (no zero-filled buffers
    beside the loaded ones): loading a state dict gives them real tensors, the same outputs."""
    lin = make_linear(rng, 40, 24)
    x = torch.randn(3, 40)
    for src in (Linear4bit.from_linear(lin), Linear4bit.from_linear(lin, quant_type="fp4", double_quant=False),
                Linear8bitLt.from_linear(lin)):
        args = dict(quant_type=src.quant_type, double_quant=src.double_quant) if isinstance(src, Linear4bit) else {}
        meta = type(src)(40, 24, device="meta", **args)
        assert meta.weight.is_meta
        assert meta.load_state_dict(src.state_dict()).missing_keys == []
        assert not any(t.is_meta for t in list(meta.parameters()) + list(meta.buffers()))
        torch.testing.assert_close(meta(x), src(x), rtol=0, atol=0)


def test_load_quantized_builds_quantized_layers_on_meta(tmp_path, monkeypatch):
    import transformers

    from nybble.checkpoint import quantize_checkpoint

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(dense))
    quantize_checkpoint(dense, tmp_path / "packed", error_stats=False)
    devices = []
    init = Linear4bit.__init__

    def spy(self, *a, **kw):
        devices.append(str(kw.get("device")))
        init(self, *a, **kw)

    monkeypatch.setattr(Linear4bit, "__init__", spy)
    model = nybble.load_quantized(tmp_path / "packed", transformers.AutoModelForCausalLM)
    assert devices and set(devices) == {"meta"}
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == len(devices) and all(m.weight.device.type == "cpu" for m in layers)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_load_quantized_dtype_auto_follows_the_checkpoint(tmp_path):
    """``dtype="auto"`` (the default, as in transformers): the dtype config.json records, else
    the first non-quantized float tensor's, else float32; an explicit dtype (or its name) wins;
    a bad one is a ValueError naming it."""
    import json

    import transformers

    from nybble.checkpoint import quantize_checkpoint

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = tmp_path / "dense"
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(dense))
    packed = tmp_path / "packed"
    quantize_checkpoint(dense, packed, error_stats=False)

    def dense_dtypes(model):
        return {p.dtype for n, p in model.named_parameters() if not isinstance(
            model.get_submodule(n.rsplit(".", 1)[0]), (Linear4bit, Linear8bitLt))}

    model = nybble.load_quantized(packed, transformers.AutoModelForCausalLM)
    assert dense_dtypes(model) == {torch.bfloat16}
    x = torch.tensor([[1, 2, 3]])
    assert model(x).logits.dtype == torch.bfloat16
    assert dense_dtypes(nybble.load_quantized(packed, transformers.AutoModelForCausalLM,
                                              dtype=torch.float32)) == {torch.float32}
    # No dtype in config.json: the tensors' own (bf16 here), not float32.
    config = json.loads((packed / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        config.pop(key, None)
    (packed / "config.json").write_text(json.dumps(config))
    assert dense_dtypes(nybble.load_quantized(packed, transformers.AutoModelForCausalLM)) == {torch.bfloat16}
    assert dense_dtypes(nybble.load_quantized(packed, transformers.AutoModelForCausalLM,
                                              dtype="float16")) == {torch.float16}
    for bad in (torch.int8, "int8", "fp33", 32):
        with pytest.raises(ValueError, match="dtype"):
            nybble.load_quantized(packed, transformers.AutoModelForCausalLM, dtype=bad)


def test_linear8bit_forward_matches_llm_int8_reference(rng):
    lin = make_linear(rng, 64, 32)
    q = Linear8bitLt.from_linear(lin, threshold=6.0)
    x = torch.from_numpy(rng.standard_normal((9, 64)).astype(np.float32))
    x[2, 5] = 10.0
    x[7, 40] = -8.0
    y = q(x)
    # float64 reference of the decomposition.
    w = lin.weight.detach().double()
    scb = w.abs().max(1).values.float().double()
    wq = torch.round(w.float() * ((1.0 / scb.float()) * 127)[:, None]).double()
    cols = torch.tensor([5, 40])
    xd = x.double().clone()
    xo = xd[:, cols].clone()
    xd[:, cols] = 0
    # Row scales leave out the outlier elements only (bitsandbytes' rule), not whole columns.
    ra = torch.where(x.double().abs() >= 6.0, 0.0, x.double()).abs().max(1).values
    xq = torch.round(xd.float() * ((1.0 / ra.float()) * 127)[:, None]).double()
    ref = (xq @ wq.t()) * ra[:, None] * scb[None, :] / 127**2 + xo @ (wq[:, cols] * scb[:, None] / 127).t()
    ref = ref + lin.bias.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    # Close to the dense layer (quantization error only).
    assert (y - lin(x)).abs().max() < 0.05
    # Backward: dX through the decoded int8 weight.
    xg = x.clone().requires_grad_(True)
    g = torch.randn(9, 32)
    (gx,) = torch.autograd.grad(q(xg), xg, g)
    torch.testing.assert_close(gx, g @ q.dequantized_weight(torch.float32), rtol=1e-6, atol=1e-6)
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.int8 and sd["SCB"].dtype == torch.float32 and int(sd["weight_format"]) == 0
    q2 = Linear8bitLt(64, 32)
    q2.load_state_dict(sd)
    torch.testing.assert_close(q2(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("base_kind", ["linear", "nf4", "int8"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_forward_and_gradients(rng, base_kind, rslora):
    lin = make_linear(rng, 24, 16)
    base = {"linear": lin, "nf4": Linear4bit.from_linear(lin, compute_dtype=torch.float64),
            "int8": Linear8bitLt.from_linear(lin)}[base_kind]
    lora = LoraLinear(base, r=4, alpha=8, use_rslora=rslora)
    assert lora.scaling == (8 / 2 if rslora else 8 / 4)
    x = torch.randn(5, 24, dtype=torch.float64 if base_kind == "nf4" else torch.float32)
    # B starts at zero: the adapter changes nothing.
    torch.testing.assert_close(lora(x), base(x))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["lora_A.weight", "lora_B.weight"]
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    lora.double()
    xd = x.double()
    out = lora(xd)
    a, b = lora.lora_A.weight, lora.lora_B.weight
    torch.testing.assert_close(out - base(xd).double(), lora.scaling * (xd @ a.t() @ b.t()), rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    ga, gb = torch.autograd.grad(out, [a, b], g)
    torch.testing.assert_close(gb, lora.scaling * g.t() @ (xd @ a.t()), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ga, lora.scaling * (g @ b).t() @ xd, rtol=1e-10, atol=1e-10)
    if base_kind != "int8":  # int8 quantizes x: piecewise constant, no finite differences
        xg = xd.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda t: lora(t), (xg,))


def test_lora_with_bf16_activations_keeps_float32_master_weights(rng):
    lin = make_linear(rng, 64, 32)
    lora = LoraLinear(Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16), r=8, alpha=16)
    with torch.no_grad():
        lora.lora_B.weight.normal_(std=0.1)
    x = torch.from_numpy(rng.standard_normal((6, 64)).astype(np.float32))
    out = lora(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    a, b = lora.lora_A.weight, lora.lora_B.weight
    assert a.dtype == b.dtype == torch.float32 and a.grad.dtype == b.grad.dtype == torch.float32
    # The adapter's contribution and its gradients agree with float64 to bf16 precision.
    base = lora.base_layer(x.to(torch.bfloat16)).double()
    ref = lora.scaling * (x.double() @ a.double().t() @ b.double().t())
    assert torch.allclose(out.double() - base, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    g = 2 * out.double()
    gb_ref = lora.scaling * g.t() @ (x.double() @ a.double().t())
    assert torch.allclose(b.grad.double(), gb_ref, rtol=0.05, atol=0.05 * gb_ref.abs().max().item())


@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_compile_matches_eager(rng, double_quant):
    lin = make_linear(rng, 32, 16)
    base = Linear4bit.from_linear(lin, double_quant=double_quant, compute_dtype=torch.float32)
    model = nn.Sequential(LoraLinear(base, r=4), nn.ReLU())
    with torch.no_grad():
        model[0].lora_B.weight.normal_()
    x = torch.randn(4, 32)
    eager = model(x)
    # fullgraph: the packed-weight ops must trace without a graph break.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)


def test_quantize_model_add_lora_merge(rng):
    model = nn.Sequential(make_linear(rng, 16, 32), nn.GELU(), make_linear(rng, 32, 8))
    x = torch.randn(6, 16)
    dense = model(x).detach()
    nybble.quantize_model(model, "nf4", compute_dtype=torch.float32)
    assert isinstance(model[0], Linear4bit) and isinstance(model[2], Linear4bit)
    assert (model(x) - dense).abs().max() < 0.1
    nybble.add_lora(model, r=4, alpha=8)
    assert isinstance(model[0], LoraLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"}
    with torch.no_grad():
        for m in nybble.model.lora_layers(model).values():
            m.lora_B.weight.normal_(std=0.1)
    y = model(x).detach()
    with nybble.adapters_disabled(model):
        y0 = model(x).detach()
    assert (y - y0).abs().max() > 1e-3
    nybble.merge_adapters(model, dtype=torch.float32)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_adapter_save_load_round_trip(rng, tmp_path):
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        return nybble.quantize_model(m, "nf4", compute_dtype=torch.float32)

    model = nybble.add_lora(build(), r=4, alpha=8)
    with torch.no_grad():
        for m in nybble.model.lora_layers(model).values():
            m.lora_B.weight.normal_()
    nybble.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    fresh = nybble.load_adapter(build(), tmp_path / "adapter")
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LoRA"):
        nybble.save_adapter(build(), tmp_path / "none")


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def test_load_adapter_replaces_existing_scaling(tmp_path):
    src = nybble.add_lora(_small_model(), r=4, alpha=64)
    with torch.no_grad():
        for m in nybble.model.lora_layers(src).values():
            m.lora_B.weight.normal_()
    nybble.save_adapter(src, tmp_path / "a")
    # A model that already carries adapters with another alpha (and rank) takes the file's.
    dst = nybble.add_lora(_small_model(), r=4, alpha=16)
    nybble.load_adapter(dst, tmp_path / "a")
    assert all(m.scaling == 16.0 for m in nybble.model.lora_layers(dst).values())
    x = torch.randn(3, 16)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    trainable = {n for n, p in dst.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_load_adapter_validates_before_changing_the_model(tmp_path):
    src = nybble.add_lora(_small_model(), r=4, alpha=8)
    nybble.save_adapter(src, tmp_path / "a")
    wrong = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 9))
    with pytest.raises(ValueError, match="do not fit"):
        nybble.load_adapter(wrong, tmp_path / "a")
    assert not nybble.model.lora_layers(wrong)


def test_second_add_lora_keeps_first_adapters_trainable():
    model = nybble.add_lora(_small_model(), r=4, target_modules=["0"])
    nybble.add_lora(model, r=4, target_modules=["2"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A.weight", "0.lora_B.weight", "2.lora_A.weight", "2.lora_B.weight"]


def test_merge_defaults_to_base_dtype_and_skips_disabled():
    model = nybble.add_lora(_small_model(), r=4)
    with torch.no_grad():
        for m in nybble.model.lora_layers(model).values():
            m.lora_B.weight.normal_()
    x = torch.randn(2, 16)
    with nybble.adapters_disabled(model):
        base_out = model(x).detach()
    y = model(x).detach()
    merged = nybble.merge_adapters(model)
    assert merged[0].weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), y, rtol=1e-5, atol=1e-5)
    model2 = nybble.add_lora(_small_model(), r=4)
    with torch.no_grad():
        for m in nybble.model.lora_layers(model2).values():
            m.lora_B.weight.normal_()
    nybble.set_adapters_enabled(model2, False)
    torch.testing.assert_close(nybble.merge_adapters(model2)(x), base_out, rtol=1e-5, atol=1e-5)


def test_saved_target_modules_select_only_adapted_layers(tmp_path):
    import json

    model = nybble.add_lora(_small_model(), r=4, target_modules=["2"])
    nybble.save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["2"]


def test_save_adapter_on_a_full_disk_keeps_the_previous_adapter(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    torch.manual_seed(0)
    model = nybble.add_lora(nybble.quantize_model(nn.Sequential(nn.Linear(16, 32)), "nf4"), r=4, alpha=8)
    nybble.save_adapter(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        nybble.model.lora_layers(model)["0"].lora_B.weight.fill_(1.0)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        nybble.save_adapter(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no partial file, old adapter intact


def test_linear4bit_eager_cpu_path_equals_the_general_one_and_follows_its_tensors(rng):
    """No-grad CPU calls go straight to the fused kernel with cached views of the packed bytes:
    the same result as the autograd path, and the views follow a replaced weight and a storage
    that was freed and gathered again (FSDP2)."""
    lin = make_linear(rng, 96, 40)
    q = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    x = torch.randn(5, 96)
    with torch.no_grad():
        fast = q(x)
    assert q._cpu_views is not None and fast.dtype == torch.float32
    slow = q(x.clone().requires_grad_())  # the Function path
    assert torch.equal(fast, slow.detach())
    w64 = q.dequantized_weight(torch.float32).double()
    want = x.bfloat16().double() @ w64.t() + q.bias.bfloat16().double()
    assert (fast.double() - want).abs().max() < 0.05 * want.abs().max()
    # A new weight: new tensors, new views.
    q.set_weight(make_linear(rng, 96, 40).weight)
    with torch.no_grad():
        fresh = q(x)
    assert not torch.equal(fresh, fast)
    assert torch.equal(fresh, q(x.clone().requires_grad_()).detach())
    # The packed storage freed and gathered again at another address (what FSDP2 does).
    q.weight = q.weight.clone()  # torch-owned (resizable) storage, as FSDP2's parameters have
    with torch.no_grad():
        assert torch.equal(q(x), fresh)
    saved = q.weight.detach().clone()
    storage = q.weight.untyped_storage()
    storage.resize_(0)
    storage.resize_(saved.numel() * saved.element_size())
    q.weight.copy_(saved)
    with torch.no_grad():
        again = q(x)
    assert q._cpu_views[1] == q.weight.data_ptr()
    assert torch.equal(again, fresh)
