"""Issue 11: no silent wrong model, no panic, no hang, whatever the input.

Hostile or damaged inputs to every reader: quant_state fields, tensor layouts and values,
missing / unexpected tensors, shard indexes, adapters, argument sizes at the Rust boundary,
non-regular files. Each must end in a nybble error naming file and tensor (exit 1 with one
line from the CLI), never a wrong result, a traceback, a panic or a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import nybble
from nybble import _core
from nybble import checkpoint as ck
from nybble import formats as fmt
from nybble.cli import main
from nybble.errors import CorruptFileError, InternalError, NonFiniteError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from nybble.codebooks import code_4bit, dynamic_map  # noqa: E402
from nybble.model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_layers  # noqa: E402
from nybble.nn import Linear4bit, Linear8bitLt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
UP = "model.layers.0.mlp.up_proj.weight"  # (128, 64): 8192 elements, 128 blocks of 64
QS = f"{UP}.quant_state.bitsandbytes__nf4"


# ----------------------------------------------------------------------------- helpers


def tiny_llama(path: Path, tie: bool = False, seed: int = 0, **save_kwargs) -> Path:
    """A tiny random Llama saved by transformers (config.json + safetensors)."""
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, **save_kwargs)
    return path


def rewrite(folder: Path, edit, name: str = "model.safetensors") -> None:
    """Rewrites a safetensors file of ``folder`` through ``edit(tensors) -> tensors``."""
    f = folder / name
    tensors = edit(dict(load_file(str(f))))
    f.unlink()
    save_file(tensors, str(f), metadata={"format": "pt"})


def set_quant_state(folder: Path, text: str | bytes, key: str = QS) -> None:
    blob = text.encode() if isinstance(text, str) else text
    rewrite(folder, lambda t: {**t, key: np.frombuffer(blob, dtype=np.uint8).copy()})


def quant_state_text(folder: Path, key: str = QS) -> str:
    return load_file(str(folder / "model.safetensors"))[key].tobytes().decode()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_failure(result, *must_mention):
    """Exit 1, one line on the output, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    for text in must_mention:
        assert text in result.output, result.output


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fails (instead of hanging the suite) when the body blocks, e.g. in open() on a FIFO."""
    def alarm(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("dense") / "m")


@pytest.fixture(scope="module")
def packed_dq(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "nf4-dq"
    ck.quantize_checkpoint(dense, out)
    return out


@pytest.fixture(scope="module")
def packed_plain(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "nf4"
    ck.quantize_checkpoint(dense, out, double_quant=False)
    return out


@pytest.fixture(scope="module")
def packed_int8(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "int8"
    ck.quantize_checkpoint(dense, out, method="int8")
    return out


@pytest.fixture
def copy_of(tmp_path):
    count = iter(range(1000))

    def make(folder: Path) -> Path:
        dst = tmp_path / f"copy{next(count)}-{folder.name}"
        shutil.copytree(folder, dst)
        return dst
    return make


def load(folder):
    return nybble.load_quantized(folder, transformers.AutoModelForCausalLM)


def module_state(folder: Path, prefix: str) -> dict:
    """The state dict of one layer, from a checkpoint, as torch tensors."""
    out = {}
    for k, v in load_file(str(folder / "model.safetensors")).items():
        if k.startswith(prefix + "."):
            out[k[len(prefix) + 1:]] = torch.from_numpy(v.copy())
    return out


def linear4bit_load(folder: Path, double_quant: bool = True):
    layer = Linear4bit(64, 128, bias=False, quant_type="nf4", blocksize=64, double_quant=double_quant)
    layer.load_state_dict(module_state(folder, UP.removesuffix(".weight")))
    return layer


def every_reader(folder: Path, dense: Path, tmp_path: Path, values: bool):
    """(name, call) for every reader of a packed checkpoint; ``values``: the defect is in
    tensor values, which inspect (headers only) does not read."""
    readers = [
        ("dequantize", lambda: ck.dequantize_checkpoint(folder, tmp_path / "plain")),
        ("verify", lambda: ck.verify_checkpoint(dense, folder)),
        ("load_quantized", lambda: load(folder)),
    ]
    if not values:
        readers.insert(0, ("inspect", lambda: ck.inspect_checkpoint(folder)))
    return readers


def assert_every_reader_refuses(folder, dense, tmp_path, *, values=False, tensor=UP, match=None):
    for name, call in every_reader(folder, dense, tmp_path, values):
        with pytest.raises((ck.CheckpointError, CorruptFileError)) as info:
            call()
        message = str(info.value)
        assert tensor in message and str(folder) in message, f"{name}: {message}"
        if match is not None:
            assert re.search(match, message), f"{name}: {message}"
        assert not (tmp_path / "plain").exists()


# ----------------------------------------------------------------------------- quant_state fields


def test_valid_checkpoints_load_in_every_reader(dense, packed_dq, packed_plain, packed_int8, tmp_path):
    for folder in (packed_dq, packed_plain, packed_int8):
        for _name, call in every_reader(folder, dense, tmp_path, values=False):
            call()
            shutil.rmtree(tmp_path / "plain", ignore_errors=True)
    linear4bit_load(packed_dq)
    linear4bit_load(packed_plain, double_quant=False)


BAD_FIELDS = [
    ("blocksize", 0, "blocksize"),
    ("blocksize", 48, "blocksize"),
    ("blocksize", -64, "blocksize"),
    ("blocksize", 64.0, "blocksize"),
    ("blocksize", "64", "blocksize"),
    ("blocksize", True, "blocksize"),
    ("blocksize", None, "blocksize"),
    ("blocksize", 10**30, "blocksize"),
    ("blocksize", 128, "absmax"),  # valid on its own, inconsistent with the absmax length
    ("shape", [1, 2], "bytes"),
    ("shape", [64, 128], None),  # same size, the module's shape differs: only some readers can tell
    ("shape", None, "shape"),
    ("shape", [128, "64"], "shape"),
    ("shape", [-128, -64], "shape"),
    ("shape", [0, 64], "shape"),
    ("shape", [128.0, 64], "shape"),
    ("shape", [], "shape"),
    ("shape", [100000, 80000], "bytes"),
    ("shape", [2**40, 2**40], "shape"),
    ("dtype", "int8", "dtype"),
    ("dtype", 5, "dtype"),
    ("quant_type", "fp4", "quant_type"),
    ("quant_type", None, "quant_type"),
    ("nested_offset", None, "nested_offset"),
    ("nested_offset", -1.0, "nested_offset"),
    ("nested_offset", "0.1", "nested_offset"),
    ("nested_offset", [0.1], "nested_offset"),
    ("nested_blocksize", 128, "nested_blocksize"),
    ("nested_blocksize", 0, "nested_blocksize"),
    ("nested_dtype", "float16", "nested_dtype"),
    ("extra_field", 1, "unknown field"),
]


@pytest.mark.parametrize("field, value, match", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_bad_quant_state_field_is_refused_by_every_reader(packed_dq, dense, copy_of, tmp_path, field, value, match):
    folder = copy_of(packed_dq)
    fields = json.loads(quant_state_text(folder))
    fields[field] = value
    set_quant_state(folder, json.dumps(fields))
    if field == "shape" and value == [64, 128]:
        # Same element count: the layout is consistent, but the model's layer is (128, 64).
        with pytest.raises(ck.CheckpointError, match="shape"):
            load(folder)
        with pytest.raises(RuntimeError, match="shape"):
            linear4bit_load(folder)
        return
    assert_every_reader_refuses(folder, dense, tmp_path, tensor=UP, match=match)
    with pytest.raises(RuntimeError, match=f"{match}|!= module"):  # or the module's own shape check
        linear4bit_load(folder)


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "JSON list, not an object"),
    ("null", "not an object"),
    ('"nf4"', "not an object"),
    ("{not json", "not valid JSON"),
    ("", "not valid JSON"),
    ("[" * 20_000 + "]" * 20_000, "nested too deeply"),
    ("[" * 100_000 + "]" * 100_000, "at most"),  # too large to be read at all
    (b"\xff\xfe{}", "UTF-8"),
])
def test_quant_state_that_is_not_an_object_is_refused(packed_dq, dense, copy_of, tmp_path, text, match):
    folder = copy_of(packed_dq)
    set_quant_state(folder, text)
    assert_every_reader_refuses(folder, dense, tmp_path, tensor=QS, match=match)
    result = invoke("inspect", folder)
    assert_clean_failure(result, QS)


@pytest.mark.parametrize("old, new", [
    ('"blocksize": 64', '"blocksize": Infinity'),
    ('"blocksize": 64', '"blocksize": -Infinity'),
    ('"blocksize": 64', '"blocksize": NaN'),
    ('"shape": [128, 64]', '"shape": [Infinity, 64]'),
    ('"shape": [128, 64]', '"shape": [128, -64]'),
    ('"nested_offset": ', '"nested_offset": NaN, "x": '),
])
def test_non_json_numbers_and_negatives_are_clean_errors(packed_dq, dense, copy_of, tmp_path, old, new):
    folder = copy_of(packed_dq)
    text = quant_state_text(folder)
    assert old in text
    set_quant_state(folder, text.replace(old, new, 1))
    assert_every_reader_refuses(folder, dense, tmp_path, tensor=QS if "Infinity" in new or "NaN" in new else UP)
    assert_clean_failure(invoke("inspect", folder), QS if "Infinity" in new or "NaN" in new else UP)
    assert_clean_failure(invoke("dequantize", folder, "-o", tmp_path / "cli-out"))


def test_quant_state_entry_of_the_wrong_dtype_or_size_is_refused(packed_dq, dense, copy_of, tmp_path):
    folder = copy_of(packed_dq)
    rewrite(folder, lambda t: {**t, QS: np.zeros(fmt.MAX_QUANT_STATE_BYTES + 1, np.uint8)})
    assert_every_reader_refuses(folder, dense, tmp_path, tensor=QS, match="U8 of at most")
    folder = copy_of(packed_dq)
    rewrite(folder, lambda t: {**t, QS: np.frombuffer(quant_state_text(packed_dq).encode(), np.uint8).astype(np.int8)})
    assert_every_reader_refuses(folder, dense, tmp_path, tensor=QS)


# ----------------------------------------------------------------------------- tensor layouts and values


def _scaled(t, key, f):
    t[key] = f(t[key].copy())
    return t


@pytest.mark.parametrize("case", ["absmax_short", "absmax_dtype", "quant_map_short", "nested_absmax_long",
                                  "nested_quant_map_short", "packed_short", "orphan_nested"])
def test_tensor_layout_inconsistent_with_quant_state_is_refused(packed_dq, packed_plain, dense, copy_of, tmp_path,
                                                                case):
    folder = copy_of(packed_plain if case == "orphan_nested" else packed_dq)
    edits = {
        "absmax_short": lambda t: {**t, f"{UP}.absmax": t[f"{UP}.absmax"][:-1].copy()},
        "absmax_dtype": lambda t: {**t, f"{UP}.absmax": t[f"{UP}.absmax"].astype(np.float32)},
        "quant_map_short": lambda t: {**t, f"{UP}.quant_map": t[f"{UP}.quant_map"][:8].copy()},
        "nested_absmax_long": lambda t: {**t, f"{UP}.nested_absmax": np.ones(3, np.float32)},
        "nested_quant_map_short": lambda t: {**t, f"{UP}.nested_quant_map": np.ones(16, np.float32)},
        "packed_short": lambda t: {**t, UP: t[UP][:-2].copy()},
        "orphan_nested": lambda t: {**t, f"{UP}.nested_absmax": np.ones(1, np.float32)},
    }
    rewrite(folder, edits[case])
    assert_every_reader_refuses(folder, dense, tmp_path)


@pytest.mark.parametrize("case", ["absmax_nan", "absmax_negative", "absmax_inf", "custom_quant_map", "nf4_map_as_fp4"])
def test_bad_values_without_double_quant_are_refused(packed_plain, dense, copy_of, tmp_path, case):
    folder = copy_of(packed_plain)

    def edit(t):
        a, q = f"{UP}.absmax", f"{UP}.quant_map"
        if case == "absmax_nan":
            t = _scaled(t, a, lambda v: np.where(np.arange(v.size) == 7, np.nan, v).astype(np.float32))
        elif case == "absmax_negative":
            t = _scaled(t, a, lambda v: -v)
        elif case == "absmax_inf":
            t = _scaled(t, a, lambda v: np.where(np.arange(v.size) == 3, np.inf, v).astype(np.float32))
        elif case == "custom_quant_map":
            t = _scaled(t, q, lambda v: (v * 0.5).astype(np.float32))
        else:
            t = {**t, q: code_4bit("fp4")}
        return t

    rewrite(folder, edit)
    match = "quant_map" if "map" in case else "absmax"
    assert_every_reader_refuses(folder, dense, tmp_path, values=True, match=match)
    with pytest.raises(RuntimeError, match=match):
        linear4bit_load(folder, double_quant=False)


@pytest.mark.parametrize("case", ["nested_absmax_nan", "nested_absmax_negative", "nested_quant_map_nan",
                                  "custom_quant_map"])
def test_bad_values_with_double_quant_are_refused(packed_dq, dense, copy_of, tmp_path, case):
    folder = copy_of(packed_dq)
    key = {"nested_absmax_nan": "nested_absmax", "nested_absmax_negative": "nested_absmax",
           "nested_quant_map_nan": "nested_quant_map", "custom_quant_map": "quant_map"}[case]
    value = {"nested_absmax_nan": np.nan, "nested_absmax_negative": -1.0, "nested_quant_map_nan": np.nan,
             "custom_quant_map": 0.123}[case]
    rewrite(folder, lambda t: _scaled(t, f"{UP}.{key}", lambda v: np.where(np.arange(v.size) == 0, value, v)
                                      .astype(np.float32)))
    assert_every_reader_refuses(folder, dense, tmp_path, values=True, match=key)
    with pytest.raises(RuntimeError, match=key):
        linear4bit_load(folder)


@pytest.mark.parametrize("value", [np.nan, -1.0, np.inf])
def test_bad_scb_is_refused(packed_int8, dense, copy_of, tmp_path, value):
    folder = copy_of(packed_int8)
    scb = UP.removesuffix(".weight") + ".SCB"
    rewrite(folder, lambda t: _scaled(t, scb, lambda v: np.where(np.arange(v.size) == 5, value, v).astype(np.float32)))
    assert_every_reader_refuses(folder, dense, tmp_path, values=True, match="SCB")
    layer = Linear8bitLt(64, 128, bias=False)
    with pytest.raises(RuntimeError, match="SCB"):
        layer.load_state_dict(module_state(folder, UP.removesuffix(".weight")))


def test_bad_weight_format_is_refused(packed_int8, dense, copy_of, tmp_path):
    folder = copy_of(packed_int8)
    key = UP.removesuffix(".weight") + ".weight_format"
    rewrite(folder, lambda t: {**t, key: np.array(1, np.uint8)})
    assert_every_reader_refuses(folder, dense, tmp_path, values=True, match="weight_format")


def test_quant_state_from_dict_validates_everything():
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    _, state = nybble.quantize_4bit(x, 64, "nf4", double_quant=False)
    items = state.to_dict()
    assert nybble.QuantState4bit.from_dict(items).blocksize == 64
    for key, value, match in [("absmax", -state.absmax, "absmax"),
                              ("absmax", np.full_like(state.absmax, np.nan), "absmax"),
                              ("quant_map", state.code[::-1].copy(), "quant_map")]:
        with pytest.raises(ValueError, match=match):
            nybble.QuantState4bit.from_dict({**items, key: value})
    blob = json.loads(bytes(items["quant_state.bitsandbytes__nf4"]).decode())
    for field, value in [("blocksize", 0), ("shape", [1, 2]), ("shape", [float("inf"), 64])]:
        bad = json.dumps({**blob, field: value}).encode()
        with pytest.raises(ValueError):
            nybble.QuantState4bit.from_dict({**items, "quant_state.bitsandbytes__nf4": np.frombuffer(bad, np.uint8)})


@pytest.mark.parametrize("fields", [
    {"quant_type": "nf4", "blocksize": float("inf"), "dtype": "float32", "shape": [2, 64]},
    {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [float("inf"), 64]},
    {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [float("nan")]},
    {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": 5},
    {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 64], "nested_offset": None},
    {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 64], "nested_offset": float("nan")},
    {"quant_type": "nf4", "blocksize": 64, "dtype": None, "shape": [2, 64]},
    {"quant_type": ["nf4"], "blocksize": 64, "dtype": "float32", "shape": [2, 64]},
    {"blocksize": 64, "dtype": "float32", "shape": [2, 64]},
])
def test_parse_quant_state_raises_value_error_only(fields):
    with pytest.raises(ValueError):
        fmt.parse_quant_state(fields)


def test_parse_quant_state_rejects_non_mappings():
    for value in ([1, 2], None, "x", 3):
        with pytest.raises(ValueError):
            fmt.parse_quant_state(value)


# ----------------------------------------------------------------------------- load_quantized: missing / unexpected


@pytest.mark.parametrize("drop", ["model.norm.weight", "model.layers.0.input_layernorm.weight",
                                  "model.embed_tokens.weight", UP, f"{UP}.absmax", f"{UP}.nested_absmax",
                                  QS, "lm_head.weight"])
def test_load_quantized_refuses_a_missing_tensor(packed_dq, copy_of, drop):
    folder = copy_of(packed_dq)
    rewrite(folder, lambda t: {k: v for k, v in t.items() if k != drop})
    shown = UP if drop.startswith(UP) else drop
    with pytest.raises(ck.CheckpointError, match=re.escape(shown)):
        load(folder)


def test_load_quantized_refuses_unexpected_tensors(packed_dq, copy_of):
    folder = copy_of(packed_dq)
    rewrite(folder, lambda t: {**t, "model.extra.weight": np.ones(4, np.float32)})
    with pytest.raises(ck.CheckpointError, match="model.extra.weight"):
        load(folder)
    folder = copy_of(packed_dq)
    rewrite(folder, lambda t: {**t, f"{UP}.stray": np.ones(4, np.float32)})
    with pytest.raises(ck.CheckpointError, match=re.escape(f"{UP}.stray")):
        load(folder)


def test_load_quantized_allows_tied_and_recomputed_tensors_only(tmp_path):
    dense = tiny_llama(tmp_path / "tied", tie=True)
    assert "lm_head.weight" not in load_file(str(dense / "model.safetensors"))
    packed = tmp_path / "tied-nf4"
    ck.quantize_checkpoint(dense, packed)
    model = load(packed)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = transformers.AutoModelForCausalLM.from_pretrained(dense)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    # Tied the other way round: the embedding the head ties to is not in the file.
    rewrite(packed, lambda t: {**{k: v for k, v in t.items() if k != "model.embed_tokens.weight"},
                               "lm_head.weight": t["model.embed_tokens.weight"]})
    with pytest.raises(ck.CheckpointError, match="model.embed_tokens.weight"):
        load(packed)


def test_load_quantized_allows_non_persistent_buffers_in_the_file(minilm_path, tmp_path):
    assert "embeddings.position_ids" in ck.Checkpoint(minilm_path).entries
    ck.quantize_checkpoint(minilm_path, tmp_path / "p")
    model = nybble.load_quantized(tmp_path / "p")
    assert torch.equal(model.embeddings.position_ids.flatten()[:4], torch.arange(4))


def test_load_quantized_refuses_bad_quantization_config(packed_dq, copy_of):
    for edit, match in [({"load_in_4bit": "true"}, "load_in_4bit"),
                        ({"bnb_4bit_use_double_quant": "false"}, "double_quant"),
                        ({"llm_int8_threshold": "x"}, "threshold"),
                        ({"llm_int8_skip_modules": 5}, "skip_modules"),
                        ({"load_in_8bit": True}, "exactly one"),
                        ({"bnb_4bit_quant_type": "int4"}, "quant_type")]:
        folder = copy_of(packed_dq)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"].update(edit)
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ck.CheckpointError, match=match):
            load(folder)
        shutil.rmtree(folder)


# ----------------------------------------------------------------------------- verify


def _damage_absmax(folder):
    """Scales a block constant tenfold: a valid file that decodes to the wrong weight."""
    rewrite(folder, lambda t: _scaled(t, f"{UP}.absmax", lambda v: (v * 10).astype(np.float32)))


def test_verify_fails_a_weight_below_the_floor(dense, packed_plain, copy_of):
    rows = ck.verify_checkpoint(dense, packed_plain)
    assert all(r.ok for r in rows)
    assert min(r.sqnr_db for r in rows if r.sqnr_db is not None) > ck.DEFAULT_MIN_SQNR_DB["nf4"] + 8
    folder = copy_of(packed_plain)
    _damage_absmax(folder)
    bad = [r for r in ck.verify_checkpoint(dense, folder) if not r.ok]
    assert [r.name for r in bad] == [UP] and "below" in bad[0].note and bad[0].sqnr_db < 0
    result = invoke("verify", dense, folder)
    assert result.exit_code == 1 and UP in result.output and "below the 8 dB floor" in result.output


def test_verify_thresholds_are_overridable(dense, packed_dq):
    assert invoke("verify", dense, packed_dq).exit_code == 0
    assert invoke("verify", dense, packed_dq, "--min-sqnr-db", "10").exit_code == 0
    result = invoke("verify", dense, packed_dq, "--min-sqnr-db", "30")
    assert result.exit_code == 1 and "below the 30 dB floor" in result.output
    result = invoke("verify", dense, packed_dq, "--max-rmse", "1e-9")
    assert result.exit_code == 1 and "RMSE" in result.output
    assert invoke("verify", dense, packed_dq, "--max-rmse", "1").exit_code == 0
    with pytest.raises(ValueError):
        ck.verify_checkpoint(dense, packed_dq, max_rmse=-1)


def test_verify_detects_swapped_arguments(dense, packed_dq):
    with pytest.raises(ck.CheckpointError, match="swapped"):
        ck.verify_checkpoint(packed_dq, dense)
    assert_clean_failure(invoke("verify", packed_dq, dense), "swapped")
    assert_clean_failure(invoke("verify", dense, dense), "no packed weights")


def test_verify_default_floor_has_margin_on_minilm_nf4(minilm_path, tmp_path):
    ck.quantize_checkpoint(minilm_path, tmp_path / "p", error_stats=False)
    rows = ck.verify_checkpoint(minilm_path, tmp_path / "p")
    sqnr = [r.sqnr_db for r in rows if r.sqnr_db is not None]
    assert len(sqnr) == 37 and all(r.ok for r in rows)
    # Measured: 20.1 dB worst tensor; the 8 dB floor leaves 12 dB.
    assert min(sqnr) > ck.DEFAULT_MIN_SQNR_DB["nf4"] + 10


# ----------------------------------------------------------------------------- sharded folders


@pytest.fixture
def sharded(tmp_path):
    src = tiny_llama(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((src / ck.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    return src, index, shards


def _write_index(src, index):
    (src / ck.INDEX_FILE).write_text(json.dumps(index))


def _assert_index_refused(src, tmp_path, match):
    for call in (lambda: ck.quantize_checkpoint(src, tmp_path / "out"), lambda: ck.inspect_checkpoint(src)):
        with pytest.raises(CorruptFileError, match=match) as info:
            call()
        assert ck.INDEX_FILE in str(info.value)
    assert not (tmp_path / "out").exists()
    assert_clean_failure(invoke("quantize", src, "-o", tmp_path / "out"), ck.INDEX_FILE)


def test_consistent_sharded_folder_converts(sharded, tmp_path):
    src, index, shards = sharded
    s = ck.quantize_checkpoint(src, tmp_path / "out")
    assert s.tensors == len(index["weight_map"])


def test_index_omitting_a_shard_is_refused(sharded, tmp_path):
    src, index, shards = sharded
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shards[1]}
    _write_index(src, index)
    _assert_index_refused(src, tmp_path, re.escape(shards[1]) + ".*exists")


def test_index_listing_a_tensor_in_the_wrong_shard_is_refused(sharded, tmp_path):
    src, index, shards = sharded
    for name in [k for k, v in index["weight_map"].items() if v == shards[0]]:  # one, or the whole shard
        index["weight_map"][name] = shards[1]
        _write_index(src, index)
        _assert_index_refused(src, tmp_path, f"listed in {shards[1]!r}".replace("'", '"') + " but stored in")


def test_index_naming_a_ghost_tensor_is_refused(sharded, tmp_path):
    src, index, shards = sharded
    index["weight_map"]["model.ghost.weight"] = shards[0]
    _write_index(src, index)
    _assert_index_refused(src, tmp_path, "no shard holds it")


def test_index_omitting_one_tensor_is_refused(sharded, tmp_path):
    src, index, shards = sharded
    counts = {s: list(index["weight_map"].values()).count(s) for s in shards}
    del index["weight_map"][next(k for k, v in index["weight_map"].items() if counts[v] > 1)]
    _write_index(src, index)
    _assert_index_refused(src, tmp_path, "not in the index")


def test_missing_shard_is_refused(sharded, tmp_path):
    src, index, shards = sharded
    (src / shards[1]).unlink()
    _assert_index_refused(src, tmp_path, "does not exist")
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shards[1]}
    _write_index(src, index)
    _assert_index_refused(src, tmp_path, "is missing")


def test_index_of_a_packed_checkpoint_is_checked_too(dense, tmp_path):
    out = tmp_path / "packed"
    ck.quantize_checkpoint(dense, out, max_shard_size="30KB")
    index = json.loads((out / ck.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 2
    del index["weight_map"][f"{UP}.absmax"]
    _write_index(out, index)
    for call in (lambda: ck.inspect_checkpoint(out), lambda: load(out)):
        with pytest.raises(CorruptFileError, match="absmax"):
            call()


def test_shard_symlinked_to_another_file_is_not_a_safetensors_file(sharded, tmp_path):
    src, index, shards = sharded
    (src / shards[1]).unlink()
    (src / shards[1]).symlink_to(ROOT / "README.md")
    assert_clean_failure(invoke("quantize", src, "-o", tmp_path / "out"), "not a safetensors file", shards[1])
    # The file's first 8 bytes are not presented as a header length.
    assert not re.search(r"header length \d", invoke("quantize", src, "-o", tmp_path / "out").output)
    assert_clean_failure(invoke("inspect", ROOT / "README.md"), "README.md", "not a safetensors file")


# ----------------------------------------------------------------------------- load_adapter


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    dense = tiny_llama(root / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(dense)
    nybble.add_lora(model, r=8, alpha=16)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.normal_()
    nybble.save_adapter(model, root / "adapter")
    return dense, root / "adapter"


def _fresh(dense):
    return transformers.AutoModelForCausalLM.from_pretrained(dense)


def test_valid_adapter_loads(adapter):
    dense, path = adapter
    model = nybble.load_adapter(_fresh(dense), path)
    assert len(lora_layers(model)) == 7


@pytest.mark.parametrize("edit, match", [
    ({"r": 4}, "rank 8.*r = 4"),
    ({"r": "8"}, "r must be"),
    ({"r": True}, "r must be"),
    ({"target_modules": ["q_proj"]}, "does not name it"),
    ({"target_modules": "q_proj|v_proj"}, "does not name it"),
    ({"target_modules": "(("}, "regular expression"),
    ({"target_modules": []}, "target_modules"),
    ({"use_rslora": "false"}, "use_rslora must be true or false"),
    ({"use_dora": "no"}, "use_dora"),
    ({"use_dora": True}, "DoRA"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"lora_alpha": "16"}, "lora_alpha"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "NaN is not a JSON number"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"bias": "all"}, "bias"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 4}}, "rank 8.*r = 4"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ({"peft_type": "IA3"}, "peft_type"),
])
def test_adapter_config_disagreeing_with_the_weights_is_refused(adapter, tmp_path, edit, match):
    dense, path = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / ADAPTER_CONFIG).read_text())
    cfg.update(edit)
    (bad / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    model = _fresh(dense)
    with pytest.raises(ck.CheckpointError, match=match) as info:
        nybble.load_adapter(model, bad)
    assert str(bad) in str(info.value)
    assert not lora_layers(model)  # untouched


def test_adapter_lacking_weights_for_a_target_is_refused(adapter, tmp_path):
    dense, path = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    rewrite(bad, lambda t: {k: v for k, v in t.items() if ".v_proj." not in k}, ADAPTER_WEIGHTS)
    with pytest.raises(ck.CheckpointError, match="no weights for"):
        nybble.load_adapter(_fresh(dense), bad)


def test_adapter_with_extra_tensors_is_refused(adapter, tmp_path):
    dense, path = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    rewrite(bad, lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.bias": np.ones(64, np.float32)},
            ADAPTER_WEIGHTS)
    with pytest.raises(ck.CheckpointError, match="q_proj.bias"):
        nybble.load_adapter(_fresh(dense), bad)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_adapter_weights_are_refused(adapter, tmp_path, value):
    dense, path = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"
    rewrite(bad, lambda t: _scaled(t, key, lambda v: np.where(np.arange(v.size).reshape(v.shape) == 9, value, v)
                                   .astype(np.float32)), ADAPTER_WEIGHTS)
    model = _fresh(dense)
    with pytest.raises(NonFiniteError) as info:
        nybble.load_adapter(model, bad)
    e = info.value
    assert e.tensor == key and e.path == bad / ADAPTER_WEIGHTS and e.index == 9
    assert not lora_layers(model)


def test_corrupt_adapter_safetensors_names_its_path(adapter, tmp_path):
    dense, path = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    f = bad / ADAPTER_WEIGHTS
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptFileError) as info:
        nybble.load_adapter(_fresh(dense), bad)
    assert info.value.path == f and str(f) in str(info.value)


@pytest.mark.parametrize("text, match", [("[1]", "JSON object"), ("{" * 100_000, "not valid JSON"),
                                         ('{"r": NaN}', "not valid JSON"), ("\xff", "not valid")])
def test_adapter_config_that_is_not_json_is_refused(adapter, tmp_path, text, match):
    dense, path = adapter
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / ADAPTER_CONFIG).write_bytes(text.encode("latin-1"))
    with pytest.raises(ck.CheckpointError, match=match):
        nybble.load_adapter(_fresh(dense), bad)


# ----------------------------------------------------------------------------- the Rust boundary


def test_dequantize_4bit_n_is_checked_against_the_buffers():
    packed, absmax = np.zeros(4, np.uint8), np.ones(1, np.float32)
    for n in (10**12, 2**64 - 1, 9, 6):
        with pytest.raises(ValueError, match="packed input"):
            _core.dequantize_4bit(packed, absmax, n, 64, "nf4", "float32")
    with pytest.raises(ValueError, match="absmax"):
        _core.dequantize_4bit(packed, np.ones(2, np.float32), 8, 64, "nf4", "float32")
    with pytest.raises(ValueError, match="blocksize"):
        _core.dequantize_4bit(packed, absmax, 8, 0, "nf4", "float32")
    assert _core.dequantize_4bit(packed, absmax, 8, 64, "nf4", "float32").shape == (8,)


def test_huge_quant_state_shape_on_a_small_tensor_is_an_error():
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    packed, state = nybble.quantize_4bit(x, 64, "nf4", double_quant=False)
    state.shape = (100000, 80000)
    with pytest.raises(ValueError):
        nybble.dequantize_4bit(packed, state)


def test_bits_per_parameter_checks_the_blocksize():
    for blocksize in (0, 1, 48):
        with pytest.raises(ValueError, match="blocksize"):
            _core.bits_per_parameter(100, blocksize, False)
    assert _core.bits_per_parameter(128, 64, False) == 4.5


def test_array_passed_twice_is_a_value_error():
    p, g = np.zeros(4, np.float32), np.ones(4, np.float32)
    args = (1, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    for call in (lambda: _core.adamw_step_32bit(p, g, "float32", p, p.copy(), *args),
                 lambda: _core.adamw_step_32bit(p, p, "float32", g.copy(), g.copy(), *args),
                 lambda: _core.adamw_step_32bit(p, g, "float32", g, g, *args)):
        with pytest.raises(ValueError, match="passed for two arguments"):
            call()
    buf = np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="passed for two arguments"):  # overlapping views of one buffer
        _core.adamw_step_32bit(buf[:4], g, "float32", buf[2:6], np.zeros(4, np.float32), *args)
    _core.adamw_step_32bit(buf[:4], g, "float32", buf[4:], np.zeros(4, np.float32), *args)  # disjoint: fine
    read_only = np.zeros(4, np.float32)
    read_only.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        _core.adamw_step_32bit(p, g, "float32", read_only, np.zeros(4, np.float32), *args)
    codes = np.zeros(64, np.uint8)
    with pytest.raises(ValueError):
        _core.adamw_step_8bit(p, g, "float32", codes, codes, np.ones(1, np.float32), np.ones(1, np.float32),
                              dynamic_map(True), dynamic_map(False), 256, *args)
    # Unharmed afterwards.
    _core.adamw_step_32bit(p, g, "float32", np.zeros(4, np.float32), np.zeros(4, np.float32), *args)
    assert (p != 0).all()


def test_a_panic_is_an_internal_error_not_an_abort():
    with pytest.raises(InternalError, match="internal error") as info:
        _core._test_panic("boom")
    assert "boom" in str(info.value) and isinstance(info.value, Exception)
    # pyo3 turns a panic into an exception only if it unwinds: no profile may abort.
    for manifest in (ROOT / "Cargo.toml", ROOT / "rust/core/Cargo.toml", ROOT / "rust/py/Cargo.toml"):
        assert not re.search(r'^\s*panic\s*=\s*"abort"', manifest.read_text(), re.MULTILINE), manifest


def test_thread_pools_are_capped_and_cached():
    def threads():
        return len(os.listdir("/proc/self/task"))

    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    cap = _core.max_threads()
    assert cap == 4 * os.cpu_count() or cap <= 4 * os.cpu_count()
    before = threads()
    for n in range(300, 3001, 100):
        _core.quantize_4bit(x, "float32", 64, "nf4", n)
    for n in range(1, 40):
        _core.quantize_4bit(x, "float32", 64, "nf4", n)
    # At most 4 pools of at most `cap` threads stay alive (dropped pools' threads exit lazily).
    assert threads() - before <= 4 * cap + 4, (before, threads())


# ----------------------------------------------------------------------------- clean errors, no hangs


def test_bad_cli_numbers_are_clean_errors(dense, tmp_path):
    for blocksize in ("-64", "0", "48", "99999999999999999999999"):
        result = invoke("quantize", dense, "-o", tmp_path / "out", "--blocksize", blocksize)
        assert_clean_failure(result, "blocksize")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="threads"):
        ck.quantize_checkpoint(dense, tmp_path / "out", threads=-1)


def _deep_config(folder: Path):
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")


def test_deeply_nested_config_is_a_clean_error(dense, packed_dq, copy_of, tmp_path):
    folder = copy_of(packed_dq)
    _deep_config(folder)
    assert_clean_failure(invoke("inspect", folder), "config.json", "nested too deeply")
    with pytest.raises(ck.CheckpointError, match="nested too deeply"):
        load(folder)
    src = copy_of(dense)
    _deep_config(src)
    assert_clean_failure(invoke("quantize", src, "-o", tmp_path / "out"), "config.json")


def test_deeply_nested_jsonl_line_is_a_data_error(tmp_path):
    from nybble.train.data import DataError, load_jsonl

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: .*nested too deeply"):
        load_jsonl(f)
    f.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid UTF-8"):
        load_jsonl(f)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def cli_in_subprocess(*args, timeout: int = 60):
    """The CLI in a child process: a read blocked in Rust retries EINTR and ignores signals,
    so only a separate process can be stopped when it hangs."""
    def limit_file_size():  # a copy of an endless device stops at 50 MB (EFBIG), not a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000_000, 50_000_000))

    try:
        proc = subprocess.run([sys.executable, "-c", "from nybble.cli import main; main()", *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, preexec_fn=limit_file_size)
    except subprocess.TimeoutExpired:
        pytest.fail(f"nybble {' '.join(map(str, args))} hung for {timeout} s")
    return proc


def assert_clean_failure_proc(proc, *must_mention):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    for text in must_mention:
        assert text in proc.stderr, proc.stderr


def test_fifo_inputs_are_refused_up_front(dense, packed_dq, adapter, copy_of, tmp_path):
    from nybble.train.data import load_jsonl

    fifo = _fifo(tmp_path / "pipe.safetensors")
    assert_clean_failure_proc(cli_in_subprocess("inspect", fifo), "not a regular file (a FIFO)")
    folder = copy_of(dense)
    (folder / "model.safetensors").unlink()
    _fifo(folder / "model.safetensors")
    assert_clean_failure_proc(cli_in_subprocess("quantize", folder, "-o", tmp_path / "out"), "not a regular file")
    folder = copy_of(packed_dq)
    (folder / "config.json").unlink()
    _fifo(folder / "config.json")
    assert_clean_failure_proc(cli_in_subprocess("inspect", folder), "config.json", "not a regular file")
    sharded_dir = tiny_llama(tmp_path / "sharded", max_shard_size="40KB")
    (sharded_dir / ck.INDEX_FILE).unlink()
    _fifo(sharded_dir / ck.INDEX_FILE)
    assert_clean_failure_proc(cli_in_subprocess("inspect", sharded_dir), ck.INDEX_FILE, "not a regular file")
    assert_clean_failure_proc(cli_in_subprocess("inspect", "/dev/zero"), "not a regular file (a character device)")
    assert_clean_failure(invoke("inspect", tmp_path), "no model.safetensors")
    with no_hang():  # Python-level opens: the alarm interrupts them if they block
        dense_dir, path = adapter
        bad = tmp_path / "bad-adapter"
        shutil.copytree(path, bad)
        (bad / ADAPTER_CONFIG).unlink()
        _fifo(bad / ADAPTER_CONFIG)
        with pytest.raises(CorruptFileError, match="not a regular file"):
            nybble.load_adapter(_fresh(dense_dir), bad)
        with pytest.raises(CorruptFileError, match="not a regular file"):
            load_jsonl(_fifo(tmp_path / "data.jsonl"))


@pytest.mark.parametrize("kind", ["fifo", "device", "loop", "dangling"])
def test_side_files_that_cannot_be_copied_are_refused_up_front(dense, copy_of, tmp_path, kind):
    src = copy_of(dense)
    side = src / "extra" / "tokenizer.json"
    side.parent.mkdir()
    if kind == "fifo":
        _fifo(side)
    elif kind == "device":
        side.symlink_to("/dev/zero")  # would copy forever
    elif kind == "loop":
        side.symlink_to(src)  # a folder link back to the input: endless recursion
    else:
        side.symlink_to(tmp_path / "gone")
    assert_clean_failure_proc(cli_in_subprocess("quantize", src, "-o", tmp_path / "out", timeout=120), "tokenizer.json")
    assert not (tmp_path / "out").exists()


def test_missing_path_says_no_such_file(tmp_path):
    for args in (("inspect", tmp_path / "nope"), ("quantize", tmp_path / "nope", "-o", tmp_path / "out"),
                 ("dequantize", tmp_path / "nope", "-o", tmp_path / "out")):
        result = invoke(*args)
        assert_clean_failure(result, "No such file or directory", "nope")
        assert "entity not found" not in result.output
