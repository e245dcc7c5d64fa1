"""nybble.formats, the one home of the bitsandbytes layout: the Rust writer, the modules and
bitsandbytes itself agree with it byte for byte, and every ``quant_storage`` (uint8, bf16,
fp16, fp32) round-trips through nybble, transformers + bitsandbytes with identical outputs."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from click.testing import CliRunner  # noqa: E402
from test_convert import write_checkpoint  # noqa: E402
from torch import nn  # noqa: E402

import nybble  # noqa: E402
from nybble import checkpoint as ck  # noqa: E402
from nybble import formats  # noqa: E402
from nybble.cli import main  # noqa: E402
from nybble.nn import Linear4bit, Linear8bitLt  # noqa: E402

STORAGES = ["uint8", "bfloat16", "float16", "float32"]
TORCH_STORAGES = {"uint8": torch.uint8, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ST_NAMES = {torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "QLoRA fine-tunes 4-bit models.", "Hello world"]


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def file_entries(ckpt: ck.Checkpoint, prefix: str) -> list[str]:
    """The entries under ``prefix`` in the order the writer laid them out."""
    return [e.name for e in sorted(ckpt.entries.values(), key=lambda e: e.offset) if e.name.startswith(prefix)]


# ----------------------------------------------------------------------------- the Rust writer


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False), ("nf4", False)])
def test_rust_writer_is_formats_byte_for_byte(tmp_path, rng, storage, dtype, quant_type, double_quant):
    """The real converter on a small random checkpoint against what formats.py (through
    Linear4bit's state dict) produces for the same module."""
    w = (rng.standard_normal((48, 40)) * 0.05).astype(NP_DTYPES[dtype])
    bias = rng.standard_normal(48).astype(np.float32)
    src = tmp_path / "src"
    src.mkdir()
    write_checkpoint(src / "model.safetensors", {"l.weight": w, "l.bias": bias})
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = tmp_path / "out"
    ck.quantize_checkpoint(src, out, method=quant_type, double_quant=double_quant, compute_dtype="fp32",
                           quant_storage=storage, error_stats=False)
    written = ck.Checkpoint(out)

    # Keys, in the writer's order, are formats' keys.
    keys = formats.four_bit_keys("l.weight", quant_type, double_quant)
    assert file_entries(written, "l.weight") == keys

    lin = nn.Linear(40, 48)
    with torch.no_grad():
        lin.weight = nn.Parameter(torch.from_numpy(w.view(np.int16) if dtype == "bfloat16" else w)
                                  .view(torch.bfloat16 if dtype == "bfloat16" else getattr(torch, dtype)))
        lin.bias.copy_(torch.from_numpy(bias))
    module = Linear4bit.from_linear(lin, quant_type, 64, double_quant, quant_storage=TORCH_STORAGES[storage])
    sd = module.state_dict(prefix="l.")
    assert set(sd) == set(keys) | {"l.bias"}
    for k in keys:
        e = written.entries[k]
        if k == formats.quant_state_key("l.weight", quant_type):
            assert e.dtype == ST_NAMES[sd[k].dtype] == "U8"  # its bytes: below
            continue
        assert (e.dtype, e.shape) == (ST_NAMES[sd[k].dtype], tuple(sd[k].shape)), k
        assert written.read(k).tobytes() == tensor_bytes(sd[k]), k
    e = written.entries["l.weight"]
    assert e.shape == formats.packed_shape(48 * 40, storage)
    assert formats.quant_storage_of(e.dtype) == storage

    # The quant_state JSON: the writer's bytes are formats' padded encoding of the module's
    # fields; without the padding, exactly the module's (and bitsandbytes') encoding.
    qs_key = formats.quant_state_key("l.weight", quant_type)
    rust_json = written.read(qs_key).tobytes()
    fields = module.quant_state_json()
    assert fields == formats.quant_state_dict(quant_type, 64, dtype, (48, 40),
                                              fields.get("nested_offset") if double_quant else None)
    assert rust_json == formats.encode_quant_state(fields, padded=True)
    assert rust_json.rstrip(b" ") == formats.encode_quant_state(fields) == tensor_bytes(sd[qs_key])
    if not double_quant:
        assert rust_json == formats.encode_quant_state(fields)

    # QuantState4bit.from_dict / to_dict over the written entries reproduce them.
    state = nybble.QuantState4bit.from_dict({k: written.read(k) for k in keys[1:]})
    again = state.to_dict(packed=True)
    assert list(again) == [k.removeprefix("l.weight.") for k in keys[1:]]
    for k, v in again.items():
        mine = written.read(f"l.weight.{k}").tobytes()
        assert v.tobytes() == (mine.rstrip(b" ") if k.startswith("quant_state.") else mine), k

    # The quantization_config is formats'.
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == formats.quantization_config(quant_type, double_quant, "float32", ["lm_head"], storage)
    assert formats.parse_quantization_config(qc).quant_storage == storage


def test_rust_writer_int8_is_formats_byte_for_byte(tmp_path, rng):
    w = (rng.standard_normal((24, 40)) * 0.05).astype(np.float16)
    src = tmp_path / "src.safetensors"
    write_checkpoint(src, {"l.weight": w})
    out = tmp_path / "out"
    ck.quantize_checkpoint(src, out, method="int8", error_stats=False)
    written = ck.Checkpoint(out)
    keys = formats.int8_keys("l.weight")
    assert keys == ["l.weight", "l.SCB", "l.weight_format"]
    assert file_entries(written, "l.") == keys
    lin = nn.Linear(40, 24, bias=False)
    lin.weight = nn.Parameter(torch.from_numpy(w))
    sd = Linear8bitLt.from_linear(lin).state_dict(prefix="l.")
    assert list(sd) == keys
    for k in keys:
        e = written.entries[k]
        assert (e.dtype, e.shape) == (ST_NAMES[sd[k].dtype], tuple(sd[k].shape)), k
        assert written.read(k).tobytes() == tensor_bytes(sd[k]), k
    with pytest.raises(ValueError, match="4-bit weights only"):
        ck.quantize_checkpoint(src, tmp_path / "x", method="int8", quant_storage="bf16")


def test_storage_that_cannot_hold_the_bytes_is_refused(tmp_path):
    src = tmp_path / "odd.safetensors"
    write_checkpoint(src, {"o.weight": np.ones((3, 3), np.float32), "p.weight": np.ones((4, 4), np.float32)})
    # 9 elements pack into 5 bytes: no bf16 / fp32 view of them (bitsandbytes cannot either).
    with pytest.raises(ck.CheckpointError, match="'o.weight'.*5 bytes"):
        ck.quantize_checkpoint(src, tmp_path / "out", quant_storage="float32")
    assert not (tmp_path / "out").exists()
    ck.quantize_checkpoint(src, tmp_path / "u8", quant_storage="uint8")
    with pytest.raises(ValueError, match="quant_storage"):
        ck.quantize_checkpoint(src, tmp_path / "bad", quant_storage="int32")
    with pytest.raises(ValueError, match="5 bytes"):
        Linear4bit(3, 3, quant_storage=torch.float32)
    with pytest.raises(ValueError, match="5 bytes"):
        formats.packed_shape(9, "bf16")
    assert formats.packed_shape(9, "uint8") == (5, 1)
    assert formats.packed_shape(16, "float32") == (2, 1)


# ----------------------------------------------------------------------------- formats vs bitsandbytes


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", True), ("nf4", False)])
def test_quant_state_dicts_match_bitsandbytes(rng, storage, quant_type, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.from_numpy((rng.standard_normal((64, 72)) * 0.05).astype(np.float32)).bfloat16()
    packed, state = bnb.functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=double_quant,
                                                 quant_storage=TORCH_STORAGES[storage])
    # bitsandbytes' storage layout is formats'.
    assert packed.dtype == TORCH_STORAGES[storage]
    assert tuple(packed.shape) == formats.packed_shape(w.numel(), storage)
    ref_u8, _ = bnb.functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=double_quant)
    assert torch.equal(formats.packed_as_uint8(packed), ref_u8)
    assert formats.packed_as_uint8(packed).data_ptr() == packed.data_ptr()  # a view
    assert torch.equal(formats.packed_as_storage(ref_u8, storage).view(torch.uint8), packed.view(torch.uint8))

    theirs = state.as_dict(packed=True)
    mine = nybble.QuantState4bit.from_dict({f"w.{k}": v for k, v in theirs.items()})
    ours = mine.to_dict(packed=True)
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].tobytes() == theirs[k].numpy().tobytes(), k
    unpacked = mine.to_dict(packed=False)
    ref = state.as_dict(packed=False)
    assert list(unpacked) == list(ref)
    assert {k: v for k, v in unpacked.items() if not isinstance(v, np.ndarray)} == {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in ref.items() if not isinstance(v, torch.Tensor)}
    # Unpacked fields load too, and both sides decode every storage to the same numbers.
    decoded = nybble.dequantize_4bit(packed, nybble.QuantState4bit.from_dict(unpacked))
    assert decoded.dtype == torch.bfloat16
    assert torch.equal(decoded, bnb.functional.dequantize_4bit(packed, state))
    back = bnb.functional.QuantState.from_dict({k: torch.from_numpy(v) for k, v in ours.items()}, torch.device("cpu"))
    assert torch.equal(bnb.functional.dequantize_4bit(packed, back), bnb.functional.dequantize_4bit(packed, state))


def test_quant_state_from_dict_rejects_bad_states():
    _, state = nybble.quantize_4bit(np.ones((8, 8), np.float32), double_quant=True)
    items = state.to_dict()
    with pytest.raises(ValueError, match="lacks"):
        nybble.QuantState4bit.from_dict({k: v for k, v in items.items() if k != "nested_absmax"})
    with pytest.raises(ValueError, match="neither"):
        nybble.QuantState4bit.from_dict({"absmax": items["absmax"]})
    with pytest.raises(ValueError, match="not quant_state items"):
        nybble.QuantState4bit.from_dict({**items, "w.bias": items["absmax"]})
    fields = formats.decode_quant_state(items["quant_state.bitsandbytes__nf4"])
    with pytest.raises(ValueError, match="does not match"):
        formats.parse_quant_state(fields, "fp4")
    with pytest.raises(ValueError, match="unsupported quant_type 'int4'"):
        formats.parse_quant_state({**fields, "quant_type": "int4"})
    with pytest.raises(ValueError, match="not valid JSON"):
        formats.decode_quant_state(b"{nope")


def test_int8_scb_rule_is_bitsandbytes(rng):
    """``(q * SCB) * float32(1/127)`` (bitsandbytes' int8_vectorwise_dequant), not
    ``q * (SCB / 127)``, which rounds differently in about a quarter of the elements."""
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.from_numpy((rng.standard_normal((96, 128)) * 0.05).astype(np.float32))
    q, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
    ref = bnb.functional.int8_vectorwise_dequant(q, scb)
    assert torch.equal(formats.int8_dequantize(q, scb), ref)
    assert formats.int8_dequantize(q.numpy(), scb.numpy()).tobytes() == ref.numpy().tobytes()
    assert (q.float() * (scb[:, None] / 127.0) != ref).any()  # the rule the layer used before
    lin = nn.Linear(128, 96, bias=False)
    lin.weight = nn.Parameter(w.half())
    layer = Linear8bitLt.from_linear(lin)
    assert torch.equal(layer.weight, q) and torch.equal(layer.SCB, scb)
    assert torch.equal(layer.dequantized_weight(torch.float32), ref)


def test_quantization_config_matches_transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    for storage in STORAGES:
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.bfloat16,
                                              bnb_4bit_quant_storage=TORCH_STORAGES[storage]).to_dict()
        assert formats.quantization_config("nf4", True, "bfloat16", None, storage) == cfg
        parsed = formats.parse_quantization_config(cfg)
        assert (parsed.load_in_4bit, parsed.quant_storage, parsed.compute_dtype) == (True, storage, "bfloat16")
    cfg = transformers.BitsAndBytesConfig(load_in_8bit=True).to_dict()
    assert formats.quantization_config("int8", False, None, None) == {**cfg, "bnb_4bit_compute_dtype": None}
    assert formats.quant_storage_name(torch.bfloat16) == formats.quant_storage_name("bf16") == "bfloat16"
    assert formats.quant_storage_name(None) == formats.quant_storage_name(np.uint8) == "uint8"


# ----------------------------------------------------------------------------- modules


def make_linear(rng, in_f=40, out_f=24):
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.05))
    return lin


@pytest.mark.parametrize("double_quant", [True, False])
def test_linear4bit_quant_storage_state_dict_and_forward(rng, double_quant):
    lin = make_linear(rng)
    base = Linear4bit.from_linear(lin, double_quant=double_quant, compute_dtype=torch.float32)
    x = torch.randn(5, 40)
    y = base(x)
    base_sd = base.state_dict()
    for name, storage in TORCH_STORAGES.items():
        q = Linear4bit.from_linear(lin, double_quant=double_quant, compute_dtype=torch.float32, quant_storage=storage)
        assert q.quant_storage == storage
        assert q.weight.dtype == storage and tuple(q.weight.shape) == formats.packed_shape(40 * 24, name)
        packed = q.packed_uint8()
        assert packed.dtype == torch.uint8 and packed.shape == (480, 1)
        assert packed.data_ptr() == q.weight.data_ptr()  # a view, no copy
        assert torch.equal(packed, base.weight)
        assert torch.equal(q(x), y)  # forward identical whatever the storage
        sd = q.state_dict()
        assert sd["weight"].dtype == storage and list(sd) == list(base_sd)
        assert all(tensor_bytes(sd[k]) == tensor_bytes(base_sd[k]) for k in sd)
        # Round trip into a module of the same storage, and across storages.
        same = Linear4bit(40, 24, double_quant=double_quant, compute_dtype=torch.float32, quant_storage=storage)
        assert same.load_state_dict(sd).missing_keys == []
        assert same.weight.dtype == storage and torch.equal(same(x), y)
        into_u8 = Linear4bit(40, 24, double_quant=double_quant, compute_dtype=torch.float32)
        into_u8.load_state_dict(sd)
        assert into_u8.weight.dtype == torch.uint8 and torch.equal(into_u8(x), y)
        from_u8 = Linear4bit(40, 24, double_quant=double_quant, compute_dtype=torch.float32, quant_storage=storage)
        from_u8.load_state_dict(base_sd)
        assert from_u8.weight.dtype == storage and torch.equal(from_u8(x), y)
        # module.to(dtype) moves the packed bytes but never casts them as numbers.
        for cast in (torch.float16, torch.float64, torch.bfloat16):
            q.to(cast)
            assert q.weight.dtype == storage and torch.equal(q.packed_uint8(), base.weight)


def test_linear4bit_loads_bitsandbytes_state_dict_of_any_storage(rng):
    bnb = pytest.importorskip("bitsandbytes")
    lin = make_linear(rng, 64, 32)
    x = torch.randn(3, 64)
    outs = []
    for name, storage in TORCH_STORAGES.items():
        ref = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4", quant_storage=storage)
        ref.load_state_dict(lin.state_dict())
        ref = ref.to("cpu")  # quantizes
        sd = {k: v.clone() for k, v in ref.state_dict().items()}
        assert sd["weight"].dtype == storage
        mine = Linear4bit(64, 32, compute_dtype=torch.float32, quant_storage=storage)
        assert mine.load_state_dict(sd).missing_keys == []
        outs.append(mine(x))
        # And nybble's state dict is what bitsandbytes wrote.
        for k, v in mine.state_dict().items():
            assert tensor_bytes(v) == tensor_bytes(sd[k]), (name, k)
    assert all(torch.equal(o, outs[0]) for o in outs)


# ----------------------------------------------------------------------------- whole models


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.fixture(scope="module")
def batch(minilm_path):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    return tok(SENTENCES, padding=True, return_tensors="pt")


def test_cli_quant_storage_loads_in_transformers_and_nybble(minilm_path, batch, tmp_path):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    hf, ours, files = {}, {}, {}
    for storage in STORAGES:
        out = tmp_path / storage
        spelled = {"bfloat16": "bf16"}.get(storage, storage)  # the short spelling works too
        r = CliRunner().invoke(main, ["quantize", str(minilm_path), "-o", str(out), "--compute-dtype", "fp32",
                                      "--no-stats", "--quant-storage", spelled])
        assert r.exit_code == 0, r.output
        packed = ck.Checkpoint(out)
        e = packed.entries["encoder.layer.0.attention.self.query.weight"]
        assert (e.dtype, e.shape) == (formats.QUANT_STORAGES[storage][0], formats.packed_shape(384 * 384, storage))
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["bnb_4bit_quant_storage"] == storage
        model = transformers.AutoModel.from_pretrained(str(out), device_map="cpu").eval()
        assert isinstance(model.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
        hf[storage] = _hidden(model, batch)
        mine = nybble.load_quantized(out)
        assert mine.encoder.layer[0].attention.self.query.weight.dtype == TORCH_STORAGES[storage]
        ours[storage] = _hidden(mine, batch)
        # Only the packed weights' headers differ from the uint8 checkpoint: same bytes.
        files[storage] = {k: packed.read(k).tobytes() for k in packed.entries}
        info = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
        row = next(t for t in info["tensors"] if t["name"] == "encoder.layer.0.attention.self.query.weight")
        assert row["quant_storage"] == storage and row["format"] == "nf4+dq/64"
    for storage in STORAGES[1:]:
        assert torch.equal(hf[storage], hf["uint8"]), storage
        assert torch.equal(ours[storage], ours["uint8"]), storage
        assert files[storage] == files["uint8"]


def test_transformers_bf16_storage_checkpoint_loads_in_nybble(minilm_path, batch, tmp_path):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    saved = {}
    for storage in ("uint8", "bfloat16"):
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                              bnb_4bit_compute_dtype=torch.float32,
                                              bnb_4bit_quant_storage=TORCH_STORAGES[storage])
        model = transformers.AutoModel.from_pretrained(str(minilm_path), device_map="cpu", quantization_config=cfg)
        model.save_pretrained(tmp_path / storage)
        saved[storage] = tmp_path / storage
    packed = ck.Checkpoint(saved["bfloat16"])
    name = "encoder.layer.0.attention.self.query.weight"
    assert (packed.entries[name].dtype, packed.entries[name].shape) == ("BF16", (384 * 384 // 4, 1))
    weights = ck.packed_weights(packed)
    assert weights[name].quant_storage == "bfloat16" and len(weights) == 37

    # load_quantized: identical outputs to the uint8 checkpoint's.
    mine = nybble.load_quantized(saved["bfloat16"])
    layer = mine.encoder.layer[0].attention.self.query
    assert isinstance(layer, Linear4bit) and layer.weight.dtype == torch.bfloat16
    assert torch.equal(_hidden(mine, batch), _hidden(nybble.load_quantized(saved["uint8"]), batch))

    # inspect and dequantize: the same as for uint8, and dequantize is bitsandbytes' decode.
    r = CliRunner().invoke(main, ["inspect", str(saved["bfloat16"])])
    assert r.exit_code == 0 and "nf4+dq/64" in r.output and '"bnb_4bit_quant_storage": "bfloat16"' in r.output
    backs = {}
    for storage, path in saved.items():
        back = tmp_path / f"{storage}-back"
        r = CliRunner().invoke(main, ["dequantize", str(path), "-o", str(back), "--dtype", "fp32"])
        assert r.exit_code == 0, r.output
        backs[storage] = ck.Checkpoint(back)
    for w in weights.values():
        got = backs["bfloat16"].read(w.name)
        assert got.tobytes() == backs["uint8"].read(w.name).tobytes(), w.name
    w = weights[name]
    tensors = {k: torch.from_numpy(packed.read(k).copy()) for k in w.keys[1:]}
    state = bnb.functional.QuantState.from_dict(tensors, torch.device("cpu"))
    stored = torch.from_numpy(packed.read(name).view(np.int16).copy()).view(torch.bfloat16)
    assert backs["bfloat16"].read(name).tobytes() == bnb.functional.dequantize_4bit(stored, state).float().numpy().tobytes()
