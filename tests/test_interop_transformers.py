"""Interop with Hugging Face transformers + bitsandbytes on the CPU, offline, on real MiniLM.

nybble's packed checkpoints load in transformers and compute what transformers' own
bitsandbytes quantization computes; checkpoints saved by transformers + bitsandbytes have the
layout nybble writes and dequantize in nybble to exactly what bitsandbytes decodes.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

from nybble import checkpoint as ck  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "QLoRA fine-tunes 4-bit quantized language models with low-rank adapters.",
    "Hello world",
]


def bnb_config(method: str, double_quant: bool = True):
    if method == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
    )


def load(path, **kwargs):
    return transformers.AutoModel.from_pretrained(path, device_map="cpu", **kwargs).eval()


@pytest.fixture(scope="module")
def batch(minilm_path):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    return tok(SENTENCES, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def hf_saved(minilm_path, tmp_path_factory):
    """MiniLM quantized and saved by transformers + bitsandbytes (the reference layout)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for method in ["nf4", "int8"]:
        load(minilm_path, quantization_config=bnb_config(method)).save_pretrained(root / method)
        out[method] = root / method
    return out


def hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_layout_matches_transformers(minilm_path, hf_saved, tmp_path, method):
    ours_dir = tmp_path / "ours"
    ck.quantize_checkpoint(minilm_path, ours_dir, method=method, compute_dtype="fp32")
    ours, theirs = ck.Checkpoint(ours_dir), ck.Checkpoint(hf_saved[method])
    # transformers drops the non-persistent position_ids buffer; nybble copies every input tensor.
    assert set(ours.entries) - set(theirs.entries) == {"embeddings.position_ids"}
    assert set(theirs.entries) <= set(ours.entries)
    differing = []
    for name, e in theirs.entries.items():
        mine = ours.entries[name]
        if ck.QUANT_STATE_PREFIX in name and method != "int8":
            # nybble pads the DQ JSON with trailing spaces (its length is fixed before the
            # offset is known).
            assert mine.dtype == e.dtype == "U8" and mine.shape[0] >= e.shape[0], name
            assert ours.read(name).tobytes().rstrip(b" ").endswith(b"}")
        else:
            assert (mine.dtype, mine.shape) == (e.dtype, e.shape), name
        if ck.QUANT_STATE_PREFIX in name:
            a, b = ours.read_json(name), theirs.read_json(name)
            assert list(a) == list(b), name
            # nested_offset: nybble averages in float64, torch in float32 (<= 1 ulp apart).
            assert a.pop("nested_offset") == pytest.approx(b.pop("nested_offset"), rel=1e-6)
            assert a == b
        elif ours.read(name).tobytes() != theirs.read(name).tobytes():
            differing.append(name)
    if method == "int8":
        assert differing == []
    else:
        # Only the double-quantized constants may differ, through that offset.
        assert all(n.endswith((".absmax", ".nested_absmax")) for n in differing), differing
    ours_cfg = json.loads((ours_dir / "config.json").read_text())["quantization_config"]
    theirs_cfg = json.loads((hf_saved[method] / "config.json").read_text())["quantization_config"]
    assert set(ours_cfg) == set(theirs_cfg)
    for key in theirs_cfg:
        if key != "llm_int8_skip_modules":
            assert ours_cfg[key] == theirs_cfg[key], key


@pytest.mark.parametrize("method", ["nf4", "fp4", "int8"])
def test_outputs_equal_transformers_quantization_without_dq(minilm_path, batch, tmp_path, method):
    out = tmp_path / method
    ck.quantize_checkpoint(minilm_path, out, method=method, double_quant=False, compute_dtype="fp32")
    ours = load(out)
    layer = ours.encoder.layer[0].attention.self.query
    assert isinstance(layer, bnb.nn.Linear8bitLt if method == "int8" else bnb.nn.Linear4bit)
    ref = load(minilm_path, quantization_config=bnb_config(method, double_quant=False))
    if method != "fp4":
        assert torch.equal(hidden(ours, batch), hidden(ref, batch))
        return
    # FP4 differs from bitsandbytes' CPU kernel in two places (both in the core quantizer):
    # a tiny negative weight that rounds to zero gets code 0b1000 (-0) from nybble, as from
    # bitsandbytes' CUDA kernel, but 0b0000 on the CPU (same number); and an input within
    # float32 rounding of a decision midpoint can land on the other side (1 in ~10^6).
    ref_dir = tmp_path / "ref"
    ref.save_pretrained(ref_dir)
    mine, theirs = ck.Checkpoint(out), ck.Checkpoint(ref_dir)
    differing = total = 0
    for name, w in ck.packed_weights(mine).items():
        a, b = bnb_dequantize(mine, w), bnb_dequantize(theirs, ck.packed_weights(theirs)[name])
        differing += int((a != b).sum())
        total += a.numel()
    assert differing <= total * 1e-5, (differing, total)
    torch.testing.assert_close(hidden(ours, batch), hidden(ref, batch), atol=2e-2, rtol=0)


def test_outputs_close_to_transformers_nf4_dq(minilm_path, batch, tmp_path):
    out = tmp_path / "nf4"
    ck.quantize_checkpoint(minilm_path, out, compute_dtype="fp32")
    ours = hidden(load(out), batch)
    ref = hidden(load(minilm_path, quantization_config=bnb_config("nf4")), batch)
    full = hidden(load(minilm_path), batch)
    quant_error = (ref - full).abs().max()
    # The DQ offsets differ by <= 1 float32 ulp (see above), which moves a few absmax codes.
    assert (ours - ref).abs().max() < 0.1 * quant_error
    assert (ours - ref).abs().mean() < 0.05 * (ref - full).abs().mean()


def bnb_dequantize(ckpt: ck.Checkpoint, w: ck.PackedWeight) -> torch.Tensor:
    """bitsandbytes' own decoding of one packed weight, straight from the file's tensors."""
    tensors = {k: torch.from_numpy(ckpt.read(k).copy()) for k in w.keys}
    if w.format == "int8":
        return bnb.functional.int8_vectorwise_dequant(tensors[w.name], tensors[w.keys[1]])
    packed = tensors.pop(w.name)
    state = bnb.functional.QuantState.from_dict(tensors, torch.device("cpu"))
    return bnb.functional.dequantize_4bit(packed, state)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_dequantize_transformers_checkpoint_equals_bnb(hf_saved, tmp_path, method):
    back = tmp_path / "back"
    assert ck.dequantize_checkpoint(hf_saved[method], back, dtype="fp32") == 37
    plain, packed = ck.Checkpoint(back), ck.Checkpoint(hf_saved[method])
    for w in ck.packed_weights(packed).values():
        got = torch.from_numpy(plain.read(w.name).copy())
        assert torch.equal(got, bnb_dequantize(packed, w).float()), w.name
