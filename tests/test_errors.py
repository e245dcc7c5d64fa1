"""Errors as data: core failures reach Python as typed exceptions carrying their fields."""

from __future__ import annotations

import errno
import json
import pickle
import struct

import ml_dtypes
import numpy as np
import pytest
from test_convert import write_checkpoint

import nybble
from nybble import _core
from nybble import checkpoint as ck
from nybble.errors import CorruptFileError, NonFiniteError


def test_classes_are_shared_and_keep_their_bases():
    assert nybble.NonFiniteError is _core.NonFiniteError is NonFiniteError
    assert nybble.CorruptFileError is _core.CorruptFileError is CorruptFileError
    assert issubclass(NonFiniteError, ValueError) and issubclass(CorruptFileError, ValueError)
    # Raised from Python with a message only, the fields read as None rather than missing.
    e = NonFiniteError("no details")
    assert (e.index, e.value, e.position, e.tensor, e.path) == (None, None, None, None, None)
    assert e.locate((3, 4)) is e and e.position is None and str(e) == "no details"


def _random_with(rng, shape, value, dtype=np.float32):
    x = rng.standard_normal(shape).astype(dtype)
    pos = tuple(int(rng.integers(0, d)) for d in shape)
    x[pos] = value
    return x, pos


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_fields_numpy(rng, dtype, bad):
    shape = (int(rng.integers(3, 20)), int(rng.integers(3, 90)))
    x, pos = _random_with(rng, shape, bad, dtype)
    with pytest.raises(nybble.NonFiniteError) as info:
        nybble.quantize_4bit(x, blocksize=64)
    e = info.value
    assert e.index == pos[0] * shape[1] + pos[1]
    assert e.position == pos
    assert isinstance(e.index, int) and all(isinstance(i, int) for i in e.position)
    assert np.isnan(e.value) if np.isnan(bad) else e.value == bad
    assert e.tensor is None and e.path is None
    # The message still says it, for people.
    assert f"flat index {e.index}" in str(e) and f"position {pos} of shape {shape}" in str(e)
    # Fields survive pickling (multiprocessing, DDP workers).
    back = pickle.loads(pickle.dumps(e))
    assert (back.index, back.position, str(back)) == (e.index, e.position, str(e))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_non_finite_fields_torch(rng, dtype):
    torch = pytest.importorskip("torch")
    shape = (int(rng.integers(2, 9)), int(rng.integers(2, 9)), int(rng.integers(2, 40)))
    x, pos = _random_with(rng, shape, np.nan)
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    with pytest.raises(nybble.NonFiniteError) as info:
        nybble.quantize_4bit(t, blocksize=32, quant_type="fp4")
    e = info.value
    assert e.index == int(np.ravel_multi_index(pos, shape))
    assert e.position == pos and np.isnan(e.value)


def test_non_finite_fields_blockwise_and_1d(rng):
    x, pos = _random_with(rng, (5, 300), np.inf)
    with pytest.raises(nybble.NonFiniteError) as info:
        nybble.quantize_blockwise(x, blocksize=256)
    assert info.value.position == pos and info.value.value == np.inf
    flat, (i,) = _random_with(rng, (777,), -np.inf)
    with pytest.raises(nybble.NonFiniteError) as info:
        nybble.quantize_4bit(flat)
    assert info.value.index == i and info.value.position == (i,)
    assert "position" not in str(info.value)  # as before: 1-D messages need no position


def test_non_finite_in_checkpoint_names_tensor_and_path(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    w = rng.standard_normal((48, 80)).astype(ml_dtypes.bfloat16)
    r, c = int(rng.integers(0, 48)), int(rng.integers(0, 80))
    w[r, c] = np.nan
    ok = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    write_checkpoint(src / "model.safetensors", {"a.weight": ok, "b.weight": w})
    with pytest.raises(nybble.NonFiniteError) as info:
        ck.quantize_checkpoint(src, tmp_path / "out")
    e = info.value
    assert e.tensor == "b.weight" and e.path == src / "model.safetensors"
    assert e.index == r * 80 + c and np.isnan(e.value)
    assert "b.weight" in str(e) and "model.safetensors" in str(e)
    assert not (tmp_path / "out").exists()


def test_corrupt_file_fields(tmp_path, rng):
    f = tmp_path / "model.safetensors"
    tensors = {
        "a.weight": rng.standard_normal((8, 8)).astype(np.float32),
        "b.weight": rng.standard_normal((16, 8)).astype(np.float32),
    }
    write_checkpoint(f, tensors)
    f.write_bytes(f.read_bytes()[:-100])  # truncated: b.weight (the last tensor) loses its tail
    with pytest.raises(nybble.CorruptFileError) as info:
        _core.read_safetensors_header(f)
    e = info.value
    assert e.path == f and e.tensor == "b.weight" and "truncated" in e.reason
    assert str(e).startswith(str(f)) and e.reason in str(e)
    # The converter reports the same file.
    with pytest.raises(nybble.CorruptFileError) as info:
        ck.quantize_checkpoint(f, tmp_path / "out")
    assert info.value.path == f

    # A defect of the header as a whole names no tensor.
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    f.write_bytes(struct.pack("<Q", n) + b"[" + b" " * (n - 1))
    with pytest.raises(nybble.CorruptFileError) as info:
        _core.read_safetensors_header(f)
    assert info.value.path == f and info.value.tensor is None


def test_invalid_index_is_a_corrupt_file(tmp_path):
    (tmp_path / ck.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(nybble.CorruptFileError) as info:
        _core.resolve_checkpoint(tmp_path)
    assert info.value.path == tmp_path / ck.INDEX_FILE and "missing.safetensors" in info.value.reason


def test_writer_misuse_is_a_value_error_not_a_corrupt_file(tmp_path, rng):
    path = tmp_path / "w.safetensors"
    data = rng.integers(0, 256, 7, dtype=np.uint8)
    cases = [
        ([("w", "F32", [2], data)], "w", "expected 8 bytes, got 7"),  # wrong length
        ([("w", "U8", [7], data), ("w", "U8", [7], data)], "w", "more than once"),  # duplicate name
        ([("__metadata__", "U8", [7], data)], None, "reserved"),
    ]
    for tensors, tensor, text in cases:
        with pytest.raises(ValueError) as info:
            _core.write_safetensors_file(path, tensors)
        e = info.value
        assert type(e) is ValueError and not isinstance(e, nybble.CorruptFileError)
        assert e.path == path and e.tensor == tensor and text in e.reason and text in str(e)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_value_error_fields():
    with pytest.raises(ValueError, match="blocksize 48") as info:
        nybble.quantize_4bit(np.ones((4, 4), np.float32), blocksize=48)
    assert info.value.blocksize == 48
    with pytest.raises(ValueError) as info:
        _core.dequantize_4bit(np.zeros(2, np.uint8), np.ones(3, np.float32), 4, 64, "nf4", "float32")
    assert (info.value.what, info.value.expected, info.value.got) == ("absmax", 1, 3)
    with pytest.raises(ValueError) as info:
        _core.is_default_quantizable("x.weight", "F4X", [2, 2])
    assert info.value.dtype == "F4X"


def test_overflow_fields():
    x = np.ones(4, np.float32)
    with pytest.raises(OverflowError) as info:
        _core.int8_quantize_absmax(x, "float32", 2**40, 2**40, "row")
    assert info.value.what == "rows * cols"


def test_os_error_fields(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        _core.read_safetensors_header(missing)
    e = info.value
    assert e.errno == errno.ENOENT and e.filename == str(missing) and e.path == missing
    # A path that does not exist at all, and a folder without a checkpoint: FileNotFoundError.
    with pytest.raises(FileNotFoundError) as info:
        _core.resolve_checkpoint(missing)
    assert info.value.path == missing
    with pytest.raises(FileNotFoundError, match="no model.safetensors") as info:
        _core.resolve_checkpoint(tmp_path)
    assert info.value.path == tmp_path
