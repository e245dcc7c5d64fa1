"""The ``nybble`` CLI through click's CliRunner: the main job and every bad-input path."""

from __future__ import annotations

import errno
import hashlib
import json
import resource
import shutil
import signal
import struct
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from test_convert import write_checkpoint

from nybble import checkpoint as ck
from nybble.cli import main


def tree_hash(path):
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_failed_cleanly(result, tmp_path, expected_names, *must_mention):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    for text in must_mention:
        assert text in result.output, result.output
    # No output and no staging folder left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected_names)


@pytest.fixture
def minilm_copy(tmp_path, minilm_path):
    src = tmp_path / "minilm"
    shutil.copytree(minilm_path, src)
    return src


def test_quantize_defaults_run_the_builtin_example(tmp_path, monkeypatch, minilm_path):
    monkeypatch.chdir(tmp_path)
    before = tree_hash(minilm_path)
    result = invoke("quantize")
    assert result.exit_code == 0, result.output
    out = tmp_path / "minilm-nf4"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "1_Pooling" / "config.json").exists()
    assert "37 quantized (nf4) of 104" in result.output
    assert "bits/param   4.1" in result.output and "SQNR" in result.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"]
    assert qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert tree_hash(minilm_path) == before

    # Existing output: refused before any work, output untouched; --overwrite replaces it.
    stamp = tree_hash(out)
    result = invoke("quantize")
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    assert tree_hash(out) == stamp
    result = invoke("quantize", "--quant", "int8", "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm-nf4"]


def test_inspect_verify_dequantize(tmp_path, minilm_path):
    out = tmp_path / "q"
    assert invoke("quantize", minilm_path, "-o", out, "--no-stats").exit_code == 0
    result = invoke("inspect", out)
    assert result.exit_code == 0
    assert "nf4+dq/64" in result.output and "quantization_config" in result.output
    line = next(x for x in result.output.splitlines() if x.startswith("encoder.layer.0.intermediate.dense.weight "))
    # 1536 x 384: 4 bits + 0.127 for the DQ constants, plus the two code tables (1088 bytes)
    # and ~175 bytes of JSON spread over 589,824 parameters (+0.017).
    n = 1536 * 384
    expected = 4 + 8 / 64 + 32 / (64 * 256) + 8 * (16 * 4 + 256 * 4 + 175) / n
    assert abs(float(line.split()[-1]) - expected) < 1e-3
    info = json.loads(invoke("inspect", out, "--json").output)
    assert info["quantization_config"]["quant_method"] == "bitsandbytes"
    result = invoke("verify", minilm_path, out)
    assert result.exit_code == 0, result.output
    assert "37 packed weights compared" in result.output and "0 problems" in result.output
    back = tmp_path / "back"
    result = invoke("dequantize", out, "-o", back, "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert ck.Checkpoint(back).entries["pooler.dense.weight"].dtype == "F32"
    # The dequantized copy is close to the original but not equal to it: verify says so.
    assert invoke("verify", back, out).exit_code == 0
    assert invoke("verify", out, minilm_path).exit_code == 1


def test_inspect_dtype_column_uses_one_spelling(tmp_path, minilm_path):
    out = tmp_path / "q"
    assert invoke("quantize", minilm_path, "-o", out, "--no-stats").exit_code == 0
    info = json.loads(invoke("inspect", out, "--json").output)
    dtypes = {r["dtype"] for r in info["tensors"]}
    # packed rows give the original dtype, plain rows their stored one: both spelled as torch does
    assert dtypes == {"float32", "int64"}, dtypes
    by_name = {r["name"]: r for r in info["tensors"]}
    assert by_name["embeddings.position_ids"]["dtype"] == "int64"
    assert by_name["encoder.layer.0.intermediate.dense.weight"]["dtype"] == "float32"


def test_inspect_an_adapter_folder(tmp_path, minilm_path):
    import nybble

    model = nybble.load_quantized(_quantized(tmp_path, minilm_path))
    nybble.add_lora(model, r=4, alpha=8, target_modules=["query", "value"])
    nybble.save_adapter(model, tmp_path / "adapter")
    result = invoke("inspect", tmp_path / "adapter")
    assert result.exit_code == 0, result.output
    assert "adapter_model.safetensors" in result.output and "lora_A" in result.output
    info = json.loads(invoke("inspect", tmp_path / "adapter", "--json").output)
    assert info["adapter"]["r"] == 4 and info["adapter"]["lora_alpha"] == 8
    assert sorted(info["adapter"]["target_modules"]) == ["query", "value"]
    # 6 layers x (query, value) x (A, B)
    assert len(info["tensors"]) == 24 and all(r["format"] == "plain" for r in info["tensors"])
    # A broken adapter config is a clean error naming the file.
    (tmp_path / "adapter" / "adapter_config.json").write_text("[1, 2]")
    result = invoke("inspect", tmp_path / "adapter")
    assert result.exit_code == 1 and "adapter_config.json" in result.output and "Traceback" not in result.output


def _quantized(tmp_path, minilm_path):
    out = tmp_path / "q"
    assert invoke("quantize", minilm_path, "-o", out, "--no-stats").exit_code == 0
    return out


def test_every_option_has_help_text():
    import click

    missing = [f"{name} {p.opts[0]}" for name, cmd in main.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert missing == []


def test_missing_input(tmp_path):
    result = invoke("quantize", tmp_path / "nope", "-o", tmp_path / "out")
    assert_failed_cleanly(result, tmp_path, [], "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("quantize", empty, "-o", tmp_path / "out")
    assert_failed_cleanly(result, tmp_path, ["empty"], "no model.safetensors")


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "truncated"),
        ("garbage_header", "not valid JSON"),
        ("huge_header", "not a safetensors file"),
        ("unknown_dtype", "unknown dtype"),
        ("overlap", "overlapping"),
    ],
)
def test_corrupt_input(tmp_path, minilm_copy, damage, message):
    f = minilm_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n].decode()
    if damage == "truncate":
        data = data[: len(data) - 1000]
    elif damage == "garbage_header":
        data[8:16] = b"{{{{{{{{"
    elif damage == "huge_header":
        data[:8] = struct.pack("<Q", 2**62)
    elif damage == "unknown_dtype":
        data[8 : 8 + n] = header.replace('"F32"', '"F4X"', 1).encode()
    elif damage == "overlap":
        h = json.loads(header)
        name = "encoder.layer.0.attention.self.query.weight"
        b, e = h[name]["data_offsets"]
        h[name]["data_offsets"] = [b - 4, e - 4]
        text = json.dumps(h, separators=(",", ":")).encode()
        text += b" " * (n - len(text))
        assert len(text) == n
        data[8 : 8 + n] = text
    f.write_bytes(bytes(data))
    before = tree_hash(minilm_copy)
    result = invoke("quantize", minilm_copy, "-o", tmp_path / "out")
    assert_failed_cleanly(result, tmp_path, ["minilm"], "model.safetensors", message)
    assert tree_hash(minilm_copy) == before


def test_bad_index(tmp_path, minilm_copy):
    (minilm_copy / ck.INDEX_FILE).write_text('{"weight_map": {"a": "missing.safetensors"}}')
    result = invoke("quantize", minilm_copy, "-o", tmp_path / "out")
    assert_failed_cleanly(result, tmp_path, ["minilm"], ck.INDEX_FILE, "missing.safetensors")


def test_nan_names_file_and_tensor(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    w = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    w[3, 5] = np.nan
    ok = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    write_checkpoint(src / "model.safetensors", {"a.weight": ok, "b.weight": w})
    before = tree_hash(src)
    result = invoke("quantize", src, "-o", tmp_path / "out")
    assert_failed_cleanly(result, tmp_path, ["src"], "model.safetensors", "b.weight", "non-finite", "flat index 197")
    assert tree_hash(src) == before


def test_bad_options(tmp_path, minilm_path):
    result = invoke("quantize", minilm_path, "-o", tmp_path / "o", "--blocksize", "48")
    assert_failed_cleanly(result, tmp_path, [], "blocksize 48")
    result = invoke("quantize", minilm_path, "-o", tmp_path / "o", "--max-shard-size", "big")
    assert result.exit_code == 2 and "max-shard-size" in result.output
    # 1-D tensors are never quantizable: nothing selected is an error, not an unpacked "quantized" model.
    result = invoke("quantize", minilm_path, "-o", tmp_path / "o", "--only", "*embeddings.LayerNorm*")
    assert_failed_cleanly(result, tmp_path, [], "no tensor to quantize matches --only")
    result = invoke("quantize", minilm_path, "-o", minilm_path / "inside")
    assert result.exit_code == 1 and "must not be the input or inside it" in result.output


def test_ctrl_c_mid_run(tmp_path, minilm_copy, monkeypatch):
    real = ck.quantize_checkpoint
    calls = []

    def interrupting(*args, on_tensor, **kwargs):
        def cb(report):
            on_tensor(report)
            calls.append(report["name"])
            if len(calls) == 20:
                raise KeyboardInterrupt

        return real(*args, on_tensor=cb, **kwargs)

    monkeypatch.setattr(ck, "quantize_checkpoint", interrupting)
    before = tree_hash(minilm_copy)
    result = invoke("quantize", minilm_copy, "-o", tmp_path / "out")
    assert_failed_cleanly(result, tmp_path, ["minilm"], "interrupted")
    assert len(calls) == 20
    assert tree_hash(minilm_copy) == before


def test_disk_full_while_copying_side_files(tmp_path, minilm_copy, monkeypatch):
    def full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shutil, "copy2", full)
    result = invoke("quantize", minilm_copy, "-o", tmp_path / "out")
    assert_failed_cleanly(result, tmp_path, ["minilm"], "No space left on device")


def _limit_file_size():
    # Writes past 2 MB fail with EFBIG, as on a full disk (SIGXFSZ would kill us instead).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))


def test_disk_full_in_the_rust_writer(tmp_path, minilm_copy):
    before = tree_hash(minilm_copy)
    proc = subprocess.run(
        [sys.executable, "-c", "from nybble.cli import main; main()", "quantize", str(minilm_copy), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "model.safetensors" in proc.stderr and "too large" in proc.stderr.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minilm"]
    assert tree_hash(minilm_copy) == before
