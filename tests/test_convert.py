"""Whole-checkpoint conversion (nybble.checkpoint): layouts, selection, sharding, round trips."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest

import nybble
from nybble import _core
from nybble import checkpoint as ck

LAYER = "model.layers.0.self_attn.q_proj"


def write_checkpoint(path, tensors: dict[str, np.ndarray], metadata=None):
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8"}
    items = [(k, names[v.dtype], list(v.shape), np.ascontiguousarray(v).reshape(-1).view(np.uint8))
             for k, v in tensors.items()]
    _core.write_safetensors_file(str(path), items, metadata)


def llama_like(rng, dtype=ml_dtypes.bfloat16):
    """A tiny decoder checkpoint; the odd q_proj size exercises padding and partial blocks."""
    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(dtype)
    return {
        "model.embed_tokens.weight": w(50, 16),
        f"{LAYER}.weight": w(33, 65),
        f"{LAYER}.bias": w(33),
        "model.layers.0.mlp.up_proj.weight": w(600, 64),
        "model.layers.0.input_layernorm.weight": w(16),
        "model.norm.weight": w(16),
        "lm_head.weight": w(50, 16),
        "position_ids": np.arange(8, dtype=np.int64),
    }


@pytest.fixture
def model_dir(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    tensors = llama_like(rng)
    write_checkpoint(src / "model.safetensors", tensors, {"format": "pt", "note": "kept"})
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (src / "tokenizer.json").write_text("{}")
    (src / "1_Pooling").mkdir()
    (src / "1_Pooling" / "config.json").write_text("{}")
    return src, tensors


def test_nf4_dq_layout_matches_design(model_dir, tmp_path):
    src, tensors = model_dir
    out = tmp_path / "out"
    s = ck.quantize_checkpoint(src, out)
    assert s.quantized == 2 and s.shards == ["model.safetensors"]
    packed = ck.Checkpoint(out)
    x = tensors[f"{LAYER}.weight"]
    n = x.size
    nblocks = -(-n // 64)
    e = packed.entries
    w = f"{LAYER}.weight"
    assert (e[w].dtype, e[w].shape) == ("U8", ((n + 1) // 2, 1))
    assert (e[f"{w}.absmax"].dtype, e[f"{w}.absmax"].shape) == ("U8", (nblocks,))
    assert (e[f"{w}.quant_map"].dtype, e[f"{w}.quant_map"].shape) == ("F32", (16,))
    assert (e[f"{w}.nested_absmax"].dtype, e[f"{w}.nested_absmax"].shape) == ("F32", (-(-nblocks // 256),))
    assert (e[f"{w}.nested_quant_map"].dtype, e[f"{w}.nested_quant_map"].shape) == ("F32", (256,))
    # Same bits as the array API.
    ref_packed, ref_state = nybble.quantize_4bit(x, 64, "nf4", double_quant=True)
    np.testing.assert_array_equal(packed.read(w), ref_packed)
    np.testing.assert_array_equal(packed.read(f"{w}.absmax"), ref_state.absmax)
    np.testing.assert_array_equal(packed.read(f"{w}.nested_absmax"), ref_state.nested.nested_absmax)
    np.testing.assert_array_equal(packed.read(f"{w}.quant_map"), nybble.codebooks.code_4bit("nf4"))
    raw = packed.read(f"{w}.quant_state.bitsandbytes__nf4").tobytes().decode()
    state = json.loads(raw)
    assert list(state) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"]
    assert state["dtype"] == "bfloat16" and state["shape"] == [33, 65] and state["nested_blocksize"] == 256
    assert np.float32(state["nested_offset"]) == np.float32(ref_state.nested.offset)
    assert raw.rstrip().endswith("}")
    # Everything else is copied bit for bit, metadata kept, side files and config written.
    for name in ["model.embed_tokens.weight", f"{LAYER}.bias", "model.norm.weight", "lm_head.weight", "position_ids"]:
        assert packed.read(name).tobytes() == tensors[name].tobytes(), name
    assert packed.metadata == {"format": "pt", "note": "kept"}
    assert (out / "tokenizer.json").exists() and (out / "1_Pooling" / "config.json").exists()
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and not qc["load_in_8bit"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16" and qc["bnb_4bit_quant_storage"] == "uint8"
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.embed_tokens"]
    # The input folder is left alone and nothing else appears beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_without_dq(model_dir, tmp_path, quant_type):
    src, tensors = model_dir
    out = tmp_path / "out"
    ck.quantize_checkpoint(src, out, method=quant_type, double_quant=False, blocksize=128)
    packed = ck.Checkpoint(out)
    w = f"{LAYER}.weight"
    assert packed.entries[f"{w}.absmax"].dtype == "F32"
    assert f"{w}.nested_absmax" not in packed and f"{w}.nested_quant_map" not in packed
    raw = packed.read(f"{w}.quant_state.bitsandbytes__{quant_type}").tobytes().decode()
    assert raw == f'{{"quant_type": "{quant_type}", "blocksize": 128, "dtype": "bfloat16", "shape": [33, 65]}}'
    ref_packed, ref_state = nybble.quantize_4bit(tensors[w], 128, quant_type)
    np.testing.assert_array_equal(packed.read(w), ref_packed)
    np.testing.assert_array_equal(packed.read(f"{w}.absmax"), ref_state.absmax)


def test_int8_layout(model_dir, tmp_path):
    src, tensors = model_dir
    out = tmp_path / "out"
    ck.quantize_checkpoint(src, out, method="int8")
    packed = ck.Checkpoint(out)
    x = tensors[f"{LAYER}.weight"]
    assert (packed.entries[f"{LAYER}.weight"].dtype, packed.entries[f"{LAYER}.weight"].shape) == ("I8", (33, 65))
    assert (packed.entries[f"{LAYER}.SCB"].dtype, packed.entries[f"{LAYER}.SCB"].shape) == ("F32", (33,))
    assert packed.entries[f"{LAYER}.weight_format"].shape == ()
    assert packed.read(f"{LAYER}.weight_format").item() == 0
    # bitsandbytes casts to float16 first: SCB is the float16 row absmax.
    x16 = x.astype(np.float32).astype(np.float16).astype(np.float32)
    scb = np.abs(x16).max(axis=1)
    np.testing.assert_array_equal(packed.read(f"{LAYER}.SCB"), scb)
    # The codes as bitsandbytes' default int8_vectorwise_quant kernel computes them (torch's
    # float16 x float32 product rounds differently from numpy's at exact .5 boundaries).
    torch = pytest.importorskip("torch")
    a = torch.from_numpy(x16).to(torch.float16)
    q = torch.round(a * (127.0 / torch.from_numpy(scb).unsqueeze(-1))).to(torch.int8).numpy()
    np.testing.assert_array_equal(packed.read(f"{LAYER}.weight"), q)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["load_in_8bit"] and not qc["load_in_4bit"]


def test_int8_original_dtype_comes_from_config(model_dir, tmp_path):
    # The int8 layout records no dtype per tensor; config.json's model dtype stands in.
    src, _ = model_dir
    out = tmp_path / "out"
    ck.quantize_checkpoint(src, out, method="int8")
    name = f"{LAYER}.weight"
    assert ck.packed_weights(ck.Checkpoint(out))[name].dtype == "float32"
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    rows = {r["name"]: r for r in ck.inspect_checkpoint(out)["tensors"]}
    assert rows[name]["dtype"] == "bfloat16" and rows[name]["format"] == "int8"
    ck.dequantize_checkpoint(out, tmp_path / "plain")
    assert ck.Checkpoint(tmp_path / "plain").entries[name].dtype == "BF16"
    (out / "config.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match="not valid JSON"):
        ck.inspect_checkpoint(out)


def test_selection_rules():
    listing = [
        ("a.attn.q.weight", "BF16", [4, 4]),
        ("a.mlp.up.weight", "BF16", [4, 4]),
        ("a.attn.q.bias", "BF16", [4]),
        ("model.embed_tokens.weight", "BF16", [4, 4]),
        ("x.ids", "I64", [4, 4]),
    ]
    assert ck.select_tensors(listing) == {"a.attn.q.weight", "a.mlp.up.weight"}
    assert ck.select_tensors(listing, skip=["*.mlp.*"]) == {"a.attn.q.weight"}
    assert ck.select_tensors(listing, skip=["a.attn.q"]) == {"a.mlp.up.weight"}  # module name
    assert ck.select_tensors(listing, only=["*embed*"]) == {"model.embed_tokens.weight"}
    assert ck.select_tensors(listing, only=["re:attn|mlp"], skip=["re:up"]) == {"a.attn.q.weight"}
    assert ck.select_tensors(listing, only=["x.*"]) == set()  # not a float matrix
    with pytest.raises(ValueError, match="bad regular expression"):
        ck.select_tensors(listing, only=["re:("])


def test_parse_size():
    assert ck.parse_size("5GB") == 5 * 10**9
    assert ck.parse_size("500MB") == 500 * 10**6
    assert ck.parse_size("2GiB") == 2 * 2**30
    assert ck.parse_size("1.5kb") == 1500
    assert ck.parse_size(123) == 123
    for bad in ["", "5 parsecs", "-1GB", "0"]:
        with pytest.raises(ValueError):
            ck.parse_size(bad)


def test_sharded_output_and_sharded_input_round_trip(model_dir, tmp_path):
    src, tensors = model_dir
    out = tmp_path / "sharded"
    s = ck.quantize_checkpoint(src, out, max_shard_size="20KB")
    assert len(s.shards) > 1
    index = json.loads((out / ck.INDEX_FILE).read_text())
    packed = ck.Checkpoint(out)
    assert set(index["weight_map"]) == set(packed.entries)
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in packed.entries.values())
    # A weight and its constants share a shard (transformers loads them together).
    w = f"{LAYER}.weight"
    assert len({index["weight_map"][k] for k in index["weight_map"] if k.startswith(w)}) == 1
    # A sharded plain folder (the same tensors split over two files and an index) is a
    # valid input and converts to the same tensors as the single file.
    plain = tmp_path / "plain-sharded"
    plain.mkdir()
    shutil.copy(src / "config.json", plain / "config.json")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in halves.items():
        write_checkpoint(plain / fname, {k: tensors[k] for k in keys}, {"format": "pt"})
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (plain / ck.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    again = tmp_path / "again"
    ck.quantize_checkpoint(plain, again)
    one = ck.Checkpoint(again)
    assert set(one.entries) == set(packed.entries)
    for name in packed.entries:
        assert one.read(name).tobytes() == packed.read(name).tobytes(), name


def test_dequantize_round_trip(model_dir, tmp_path):
    src, tensors = model_dir
    out = tmp_path / "out"
    ck.quantize_checkpoint(src, out)
    back = tmp_path / "back"
    assert ck.dequantize_checkpoint(out, back) == 2
    plain = ck.Checkpoint(back)
    assert set(plain.entries) == set(tensors)
    w = f"{LAYER}.weight"
    packed, state = nybble.quantize_4bit(tensors[w], 64, "nf4", double_quant=True)
    np.testing.assert_array_equal(plain.read(w), nybble.dequantize_4bit(packed, state))
    assert plain.entries[w].dtype == "BF16"
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    ck.dequantize_checkpoint(out, back, dtype="fp32", overwrite=True)
    assert ck.Checkpoint(back).entries[w].dtype == "F32"


def test_verify_reports_error_and_changes(model_dir, tmp_path):
    src, tensors = model_dir
    out = tmp_path / "out"
    ck.quantize_checkpoint(src, out)
    rows = {r.name: r for r in ck.verify_checkpoint(src, out)}
    w = rows[f"{LAYER}.weight"]
    assert w.ok and 10 < w.sqnr_db < 30 and w.rmse > 0
    assert rows["lm_head.weight"].note == "identical"
    changed = dict(tensors)
    changed["lm_head.weight"] = (tensors["lm_head.weight"].astype(np.float32) + 1).astype(ml_dtypes.bfloat16)
    other = tmp_path / "other.safetensors"
    write_checkpoint(other, changed)
    rows = {r.name: r for r in ck.verify_checkpoint(other, out)}
    assert not rows["lm_head.weight"].ok


def test_already_quantized_input_is_refused(model_dir, tmp_path):
    src, _ = model_dir
    out = tmp_path / "out"
    ck.quantize_checkpoint(src, out, method="int8")
    with pytest.raises(ck.CheckpointError, match="already quantized"):
        ck.quantize_checkpoint(out, tmp_path / "twice", only=["*"])
    assert not (tmp_path / "twice").exists()


def test_interrupt_from_callback_leaves_nothing(model_dir, tmp_path):
    src, _ = model_dir
    out = tmp_path / "out"
    seen = []

    def on_tensor(report):
        seen.append(report["name"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.quantize_checkpoint(src, out, on_tensor=on_tensor)
    assert len(seen) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_streamed_conversion_writes_the_same_bytes(model_dir, tmp_path):
    """Without error statistics the converter streams tensors in chunks through its read-ahead
    and write-behind threads; with them it reads each quantized tensor whole. Same bytes."""
    src, _ = model_dir
    for method in ["nf4", "fp4"]:
        for dq in [True, False]:
            a, b = tmp_path / f"a-{method}-{dq}", tmp_path / f"b-{method}-{dq}"
            ck.quantize_checkpoint(src, a, method=method, double_quant=dq, error_stats=True)
            ck.quantize_checkpoint(src, b, method=method, double_quant=dq, error_stats=False)
            assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def _limit_file_size():
    import resource
    import signal

    # Writes past 1 MB fail with EFBIG, as on a full disk (SIGXFSZ would kill the child).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))


@pytest.mark.parametrize("stats", [False, True])
def test_write_error_in_the_write_behind_thread_is_clean(tmp_path, rng, stats):
    """A full disk under the write-behind thread stops the conversion with the writer's error
    naming the shard, and leaves no output (no shard, no temporary file, no staging folder)."""
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": (rng.standard_normal((512, 1024)) * 0.05).astype(ml_dtypes.bfloat16)
               for i in range(4)}
    tensors["model.embed_tokens.weight"] = (rng.standard_normal((1024, 512))).astype(np.float32)
    write_checkpoint(src / "model.safetensors", tensors, {"format": "pt"})
    out = tmp_path / "out"
    code = ("import sys\nfrom nybble import checkpoint as ck\n"
            "try:\n    ck.quantize_checkpoint(sys.argv[1], sys.argv[2], error_stats=sys.argv[3] == '1')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n    sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(out), "1" if stats else "0"],
                          capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "model.safetensors" in proc.stdout and "too large" in proc.stdout.lower(), proc.stdout
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
