"""The serialized bitsandbytes layout, spelled once.

Every fact about how transformers + bitsandbytes store quantized weights lives here: the
state-dict key names, the quant_state JSON (bitsandbytes' ``QuantState.as_dict(packed=True)``
and ``from_dict``), the 4-bit ``quant_storage`` dtypes, LLM.int8()'s SCB rule and the
``quantization_config`` of ``config.json``. The checkpoint reader (:mod:`nybble.checkpoint`),
the modules (:mod:`nybble.nn`), :func:`nybble.load_quantized` and the CLI use these names; the
Rust writer (``rust/core/src/convert.rs``) spells the same layout and a test
(``tests/test_formats.py``) holds its output to this module byte for byte.

The layout, for a 4-bit weight ``P.weight`` of ``n`` elements (``quant_type`` nf4 or fp4)::

    P.weight                                   packed codes: (n+1)//2 bytes, two codes a byte
                                               (element 2j in the high nibble), stored as
                                               quant_storage: shape ((n+1)//2 // itemsize, 1)
    P.weight.absmax                            float32 per block, or uint8 codes with DQ
    P.weight.quant_map                         float32 (16,): the nf4 / fp4 table
    P.weight.nested_absmax                     DQ only: float32 per 256 absmax codes
    P.weight.nested_quant_map                  DQ only: float32 (256,): the dynamic map
    P.weight.quant_state.bitsandbytes__nf4     uint8: the JSON of the non-tensor fields

and for an LLM.int8() weight: ``P.weight`` int8 (out, in), ``P.SCB`` float32 (out,) row absmax,
``P.weight_format`` uint8 scalar 0 (row-major).

numpy and torch arrays are both accepted; torch is imported only when a torch value is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .quant import QuantState4bit

__all__ = [
    "ABSMAX",
    "BLOCKSIZES",
    "FLOAT_DTYPES",
    "INT8_DEQUANT_SCALE",
    "MAX_FLOAT_REPR",
    "MAX_QUANT_STATE_BYTES",
    "NESTED_ABSMAX",
    "NESTED_BLOCKSIZE",
    "NESTED_DTYPE",
    "NESTED_QUANT_MAP",
    "QUANT_MAP",
    "QUANT_STATE_FIELDS",
    "QUANT_STATE_PREFIX",
    "QUANT_STORAGES",
    "QUANT_STORAGE_ALIASES",
    "QUANT_TYPES",
    "SCB",
    "WEIGHT_FORMAT",
    "WEIGHT_FORMAT_ROW",
    "BnbConfig",
    "QuantStateInfo",
    "check_4bit_tensors",
    "check_blocksize",
    "check_int8_tensors",
    "decode_quant_state",
    "encode_quant_state",
    "four_bit_keys",
    "int8_dequantize",
    "int8_keys",
    "packed_as_storage",
    "packed_as_uint8",
    "packed_nbytes",
    "packed_shape",
    "parse_json",
    "parse_quant_state",
    "parse_quantization_config",
    "quant_state_dict",
    "quant_state_from_dict",
    "quant_state_key",
    "quant_state_to_dict",
    "quant_storage_name",
    "quant_storage_of",
    "quantization_config",
    "split_quant_state_key",
    "storage_itemsize",
]

# ----------------------------------------------------------------------------- key names

QUANT_TYPES = ("nf4", "fp4")
#: Original weight dtypes a quant_state may record.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
#: ``P.weight`` + this + quant_type: the JSON entry (bitsandbytes' ``quant_state.bitsandbytes__nf4``).
QUANT_STATE_PREFIX = ".quant_state.bitsandbytes__"
ABSMAX = "absmax"
QUANT_MAP = "quant_map"
NESTED_ABSMAX = "nested_absmax"
NESTED_QUANT_MAP = "nested_quant_map"
#: Double quantization: 256 absmax codes share one float32 scale; the scales stay float32.
NESTED_BLOCKSIZE = 256
NESTED_DTYPE = "float32"
#: LLM.int8(): ``P.SCB`` (row absmax) and ``P.weight_format`` (0: row-major) beside ``P.weight``.
SCB = "SCB"
WEIGHT_FORMAT = "weight_format"
WEIGHT_FORMAT_ROW = 0

#: Block sizes a 4-bit quant_state may record (and the Rust core, and bitsandbytes, support):
#: powers of two from 32 to 4096.
BLOCKSIZES = tuple(2**k for k in range(5, 13))
#: Longest quant_state entry read: nybble's and bitsandbytes' are about 200 bytes.
MAX_QUANT_STATE_BYTES = 64 * 1024
#: Largest element count a quant_state may record (2**48, far above any real weight): a bound
#: that keeps every size computed from it exact.
MAX_NUMEL = 2**48

#: Longest ``repr`` of a float32 widened to float64 ("-1.1754943508222875e-38"): the Rust writer
#: right-pads the double-quant JSON to hold it (see :func:`encode_quant_state`).
MAX_FLOAT_REPR = 24


def quant_state_key(weight: str, quant_type: str) -> str:
    """``"P.weight"`` -> ``"P.weight.quant_state.bitsandbytes__nf4"``."""
    return f"{weight}{QUANT_STATE_PREFIX}{quant_type}"


def split_quant_state_key(key: str) -> tuple[str, str] | None:
    """``"P.weight.quant_state.bitsandbytes__nf4"`` -> ``("P.weight", "nf4")``; ``None`` for
    any other key. The quant_type is returned as written (it may be unsupported)."""
    if QUANT_STATE_PREFIX not in key:
        return None
    weight, quant_type = key.split(QUANT_STATE_PREFIX, 1)
    return weight, quant_type


def four_bit_keys(weight: str, quant_type: str, double_quant: bool) -> list[str]:
    """The keys of one 4-bit weight, in the order bitsandbytes' ``_save_to_state_dict`` and
    nybble's writer emit them: weight, then ``QuantState.as_dict(packed=True)``'s keys."""
    keys = [weight, f"{weight}.{ABSMAX}", f"{weight}.{QUANT_MAP}"]
    if double_quant:
        keys += [f"{weight}.{NESTED_ABSMAX}", f"{weight}.{NESTED_QUANT_MAP}"]
    return keys + [quant_state_key(weight, quant_type)]


def int8_keys(weight: str) -> list[str]:
    """``"P.weight"`` -> ``["P.weight", "P.SCB", "P.weight_format"]`` (write order)."""
    module = weight.removesuffix(".weight")
    return [weight, f"{module}.{SCB}", f"{module}.{WEIGHT_FORMAT}"]


# ----------------------------------------------------------------------------- quant_storage

#: 4-bit storage dtypes: name -> (safetensors dtype, item size). bitsandbytes keeps the packed
#: bytes as uint8, or (for FSDP, which wants one dtype per flat parameter) views the same bytes
#: as bfloat16 / float16 / float32. transformers records it as ``bnb_4bit_quant_storage``.
QUANT_STORAGES: dict[str, tuple[str, int]] = {
    "uint8": ("U8", 1),
    "bfloat16": ("BF16", 2),
    "float16": ("F16", 2),
    "float32": ("F32", 4),
}
#: Short spellings accepted for a storage name (the CLI's ``--quant-storage bf16``).
QUANT_STORAGE_ALIASES = {"u8": "uint8", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_SAFETENSORS_STORAGES = {st: name for name, (st, _) in QUANT_STORAGES.items()}
_NUMPY_STORAGES = {
    "uint8": np.dtype(np.uint8),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}


def quant_storage_name(storage: Any) -> str:
    """Normalizes a storage dtype (``"bf16"``, ``"bfloat16"``, ``"torch.bfloat16"``,
    ``torch.bfloat16``, a numpy dtype, ``None`` for the default) to its name in
    :data:`QUANT_STORAGES`."""
    if storage is None:
        return "uint8"
    if isinstance(storage, str):
        name = storage.replace("torch.", "")
        name = QUANT_STORAGE_ALIASES.get(name, name)
    elif type(storage).__name__ == "dtype" and type(storage).__module__ == "torch":
        name = str(storage).replace("torch.", "")
    else:
        try:
            dt = np.dtype(storage)
        except TypeError:
            raise ValueError(f"quant_storage {storage!r} is not one of {list(QUANT_STORAGES)}") from None
        name = next((k for k, v in _NUMPY_STORAGES.items() if v == dt), str(dt))
    if name not in QUANT_STORAGES:
        raise ValueError(f"quant_storage {storage!r} is not one of {list(QUANT_STORAGES)}")
    return name


def storage_itemsize(storage: Any) -> int:
    return QUANT_STORAGES[quant_storage_name(storage)][1]


def quant_storage_of(safetensors_dtype: str) -> str | None:
    """The storage name of a packed 4-bit weight stored with this safetensors dtype
    (``"BF16"`` -> ``"bfloat16"``), ``None`` when no storage uses it."""
    return _SAFETENSORS_STORAGES.get(safetensors_dtype)


def packed_nbytes(numel: int) -> int:
    """Bytes of the packed 4-bit codes of ``numel`` elements (the last byte half-used when odd)."""
    return (int(numel) + 1) // 2


def packed_shape(numel: int, storage: Any = "uint8") -> tuple[int, int]:
    """Shape of the stored packed weight: ``((n+1)//2 // itemsize, 1)`` as bitsandbytes'
    ``quantize_4bit(..., quant_storage=)`` makes it. bitsandbytes cannot view a byte count that
    is not a multiple of the item size (and neither does nybble): that is a ``ValueError``."""
    name = quant_storage_name(storage)
    nbytes, itemsize = packed_nbytes(numel), QUANT_STORAGES[name][1]
    if nbytes % itemsize:
        raise ValueError(
            f"{numel} elements pack into {nbytes} bytes, not a whole number of {name} "
            f"({itemsize}-byte) storage elements; use quant_storage uint8 for this weight"
        )
    return nbytes // itemsize, 1


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "untyped_storage")


def packed_as_uint8(packed: Any) -> Any:
    """The packed codes of a stored 4-bit weight as uint8 ``((n+1)//2, 1)``, whatever its
    storage dtype: a view for torch tensors and contiguous numpy arrays (no copy)."""
    if _is_torch(packed):
        import torch

        if packed.dtype == torch.uint8:
            return packed.reshape(-1, 1)
        return packed.contiguous().view(torch.uint8).reshape(-1, 1)
    arr = np.ascontiguousarray(packed)
    if arr.dtype == np.uint8:
        return arr.reshape(-1, 1)
    name = next((k for k, v in _NUMPY_STORAGES.items() if v == arr.dtype), None)
    if name is None:
        raise ValueError(f"packed 4-bit weight has dtype {arr.dtype}; expected one of {list(QUANT_STORAGES)}")
    return arr.reshape(-1).view(np.uint8).reshape(-1, 1)


def packed_as_storage(packed: Any, storage: Any) -> Any:
    """uint8 packed codes (any shape) viewed as the storage dtype, shaped as
    :func:`packed_shape` says (a view, no copy)."""
    name = quant_storage_name(storage)
    if _is_torch(packed):
        import torch

        flat = packed.contiguous().reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        rows, _ = packed_shape(2 * flat.numel(), name)
        return flat.view(getattr(torch, name)).reshape(rows, 1)
    flat = packed_as_uint8(packed).reshape(-1)
    rows, _ = packed_shape(2 * flat.size, name)
    return flat.view(_NUMPY_STORAGES[name]).reshape(rows, 1)


# ----------------------------------------------------------------------------- quant_state JSON


def quant_state_dict(
    quant_type: str,
    blocksize: int,
    dtype: str,
    shape: Iterable[int],
    nested_offset: float | None = None,
) -> dict[str, Any]:
    """The non-tensor fields of a 4-bit weight, in the order bitsandbytes'
    ``QuantState.as_dict`` lists them; the nested (DQ) fields when ``nested_offset`` is given."""
    d: dict[str, Any] = {
        "quant_type": quant_type,
        "blocksize": int(blocksize),
        "dtype": str(dtype).replace("torch.", ""),
        "shape": [int(s) for s in shape],
    }
    if nested_offset is not None:
        d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype=NESTED_DTYPE, nested_offset=float(nested_offset))
    return d


def encode_quant_state(fields: Mapping[str, Any], padded: bool = False) -> bytes:
    """The JSON bytes of a quant_state entry: Python's ``json.dumps`` spelling, as
    bitsandbytes' ``pack_dict_to_tensor`` writes it.

    ``padded=True`` gives what nybble's Rust writer stores: it fixes the header before the
    double-quant offset is known, so a JSON ending in ``nested_offset`` is right-padded with
    spaces to room for the longest float repr (:data:`MAX_FLOAT_REPR`); JSON allows trailing
    whitespace and every loader reads it the same."""
    text = json.dumps(dict(fields))
    if padded and "nested_offset" in fields:
        marker = '"nested_offset": '
        head = text.rindex(marker) + len(marker)
        if not text.endswith("}") or "," in text[head:]:
            raise ValueError("nested_offset must be the last quant_state field to pad the JSON")
        text = text.ljust(head + MAX_FLOAT_REPR + 1)
    return text.encode("utf-8")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, what: str = "JSON") -> Any:
    """Strict JSON for the files nybble reads (quant_state entries, config.json, the shard
    index, adapter_config.json, data lines): ``NaN`` / ``Infinity`` (which Python's ``json``
    accepts) and nesting deep enough to exhaust the recursion limit are ``ValueError``s with
    ``what`` in the message, never a ``RecursionError``."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not valid UTF-8: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} is not valid JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as err:
        raise ValueError(f"{what} is not valid JSON: {err}") from None


def decode_quant_state(blob: Any) -> dict[str, Any]:
    """The fields of a stored quant_state entry (bytes, or a uint8 numpy / torch tensor):
    a JSON object of at most :data:`MAX_QUANT_STATE_BYTES` bytes. Raises ``ValueError``."""
    if _is_torch(blob):
        if str(blob.dtype) != "torch.uint8":
            raise ValueError(f"quant_state entry has dtype {str(blob.dtype).replace('torch.', '')}, not uint8")
        blob = blob.detach().cpu().contiguous().numpy()
    if isinstance(blob, np.ndarray):
        if blob.dtype != np.uint8:
            raise ValueError(f"quant_state entry has dtype {blob.dtype}, not uint8")
        blob = np.ascontiguousarray(blob).tobytes()
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ValueError(f"quant_state entry is a {type(blob).__name__}, not bytes")
    if len(blob) > MAX_QUANT_STATE_BYTES:
        raise ValueError(f"quant_state entry is {len(blob)} bytes, above the {MAX_QUANT_STATE_BYTES}-byte limit")
    fields = parse_json(bytes(blob), "quant_state")
    if not isinstance(fields, dict):
        raise ValueError(f"quant_state is a JSON {type(fields).__name__}, not an object")
    return fields


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def check_blocksize(blocksize: Any, what: str = "blocksize") -> int:
    """``blocksize`` as an int when it is one of :data:`BLOCKSIZES`; else ``ValueError`` (a
    bool, a float, a string, 0 and -64 included)."""
    if not _is_int(blocksize) or int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"{what} {blocksize!r} is not supported: use a power of two from 32 to 4096")
    return int(blocksize)


@dataclass(frozen=True)
class QuantStateInfo:
    """The validated non-tensor fields of a quant_state."""

    quant_type: str
    blocksize: int
    dtype: str  # the original weight's dtype
    shape: tuple[int, ...]
    nested_offset: float | None = None  # set iff double-quantized
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_offset is not None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nblocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def to_dict(self) -> dict[str, Any]:
        d = quant_state_dict(self.quant_type, self.blocksize, self.dtype, self.shape, self.nested_offset)
        if self.double_quant:
            d["nested_blocksize"] = self.nested_blocksize
        return d


#: The non-tensor fields a quant_state may hold (bitsandbytes' ``QuantState.valid_qs_keys``
#: less the tensors): ``from_dict`` refuses any other key, and so does nybble.
QUANT_STATE_FIELDS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                      "nested_offset")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")


def parse_quant_state(fields: Mapping[str, Any], quant_type: str | None = None) -> QuantStateInfo:
    """Validates quant_state fields (:func:`decode_quant_state`'s result); ``quant_type`` is
    the one the entry's key names, which the JSON must repeat. Raises ``ValueError``.

    Every field is checked for type and range, none is defaulted silently: ``quant_type`` nf4
    or fp4; ``blocksize`` an int in :data:`BLOCKSIZES`; ``dtype`` one of
    :data:`FLOAT_DTYPES`; ``shape`` a non-empty list of positive ints with at most
    :data:`MAX_NUMEL` elements; with double quantization ``nested_offset`` a finite number
    >= 0 (the mean of the block absmaxes), ``nested_blocksize`` 256 and ``nested_dtype``
    float32 when given (bitsandbytes always writes 256 / float32, and nybble's decoders
    assume them). Unknown fields are refused, as bitsandbytes' ``from_dict`` does."""
    if not isinstance(fields, Mapping):
        raise ValueError(f"quant_state is a {type(fields).__name__}, not a JSON object")
    unknown = sorted(str(k) for k in fields if k not in QUANT_STATE_FIELDS)
    if unknown:
        raise ValueError(f"bad quant_state: unknown field(s) {unknown}")
    missing = [k for k in ("quant_type", "blocksize", "dtype", "shape") if k not in fields]
    if missing:
        raise ValueError(f"bad quant_state: missing field(s) {missing}")
    qt = fields["quant_type"]
    if not isinstance(qt, str) or qt not in QUANT_TYPES:
        raise ValueError(f"unsupported quant_type {qt!r}")
    if quant_type is not None and qt != quant_type:
        raise ValueError(f"quant_type {qt!r} does not match its key's {quant_type!r}")
    blocksize = check_blocksize(fields["blocksize"], "bad quant_state: blocksize")
    dtype = fields["dtype"]
    if not isinstance(dtype, str) or dtype.replace("torch.", "") not in FLOAT_DTYPES:
        raise ValueError(f"bad quant_state: dtype {dtype!r} is not one of {FLOAT_DTYPES}")
    dtype = dtype.replace("torch.", "")
    shape = fields["shape"]
    if not isinstance(shape, (list, tuple)) or not shape or not all(_is_int(d) and d >= 1 for d in shape):
        raise ValueError(f"bad quant_state: shape {shape!r} is not a non-empty list of positive ints")
    shape = tuple(int(d) for d in shape)
    numel = 1
    for d in shape:
        numel *= d
    if numel > MAX_NUMEL:
        raise ValueError(f"bad quant_state: shape {list(shape)} has {numel} elements, above the limit of {MAX_NUMEL}")
    offset, nested_blocksize = None, NESTED_BLOCKSIZE
    if any(k in fields for k in _NESTED_FIELDS):
        if "nested_offset" not in fields:
            raise ValueError("bad quant_state: nested fields without nested_offset")
        offset = fields["nested_offset"]
        if not _is_number(offset) or not math.isfinite(offset) or offset < 0:
            raise ValueError(f"bad quant_state: nested_offset {offset!r} is not a finite number >= 0")
        offset = float(offset)
        nb = fields.get("nested_blocksize", NESTED_BLOCKSIZE)
        if not _is_int(nb) or nb != NESTED_BLOCKSIZE:
            raise ValueError(f"bad quant_state: nested_blocksize {nb!r} is not {NESTED_BLOCKSIZE} "
                             "(bitsandbytes' double quantization always uses 256)")
        nested_blocksize = int(nb)
        nd = fields.get("nested_dtype", NESTED_DTYPE)
        if not isinstance(nd, str) or nd.replace("torch.", "") != NESTED_DTYPE:
            raise ValueError(f"bad quant_state: nested_dtype {nd!r} is not {NESTED_DTYPE}")
    return QuantStateInfo(qt, blocksize, dtype, shape, offset, nested_blocksize)


# ----------------------------------------------------------------------------- tensor checks

#: safetensors dtype -> the name numpy / torch give it (what nybble prints and records).
SAFETENSORS_DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
                           "I32": "int32", "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16",
                           "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: The float dtypes a weight may have (long name -> safetensors name).
FLOAT_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def dtype_name(safetensors_dtype: str) -> str:
    """``"F32"`` -> ``"float32"``; a name safetensors does not define comes back unchanged."""
    return SAFETENSORS_DTYPE_NAMES.get(safetensors_dtype, safetensors_dtype)


_FLOAT_NAMES = tuple(FLOAT_SAFETENSORS_NAMES)


def _spec(x: Any) -> tuple[str, tuple[int, ...]]:
    """(dtype name, shape) of a numpy array, a torch tensor, or a ``(dtype, shape)`` pair
    (dtype as numpy / torch / safetensors spells it): what the checks below look at when no
    values are at hand (a checkpoint's header)."""
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str):
        dtype, shape = x
        return SAFETENSORS_DTYPE_NAMES.get(dtype, dtype.replace("torch.", "")), tuple(int(d) for d in shape)
    if _is_torch(x):
        return str(x.dtype).replace("torch.", ""), tuple(int(d) for d in x.shape)
    arr = np.asarray(x)
    return str(arr.dtype), tuple(int(d) for d in arr.shape)


def _values(x: Any) -> np.ndarray | None:
    """The float32 values of an array (numpy or torch, any device), ``None`` for a spec."""
    if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str):
        return None
    if _is_torch(x):
        import torch

        return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().reshape(-1)
    return np.asarray(x).astype(np.float32, copy=False).reshape(-1)


def _check_spec(name: str, x: Any, dtypes: tuple[str, ...], count: int) -> None:
    dtype, shape = _spec(x)
    if dtype not in dtypes:
        raise ValueError(f"{name} has dtype {dtype}, expected {' or '.join(dtypes)}")
    if len(shape) != 1 or shape[0] != count:
        raise ValueError(f"{name} has shape {list(shape)}, expected [{count}]")


def _check_scales(name: str, x: Any) -> None:
    """Block / row scales: finite and >= 0 (a negative one flips the block's signs, a NaN
    poisons it; neither is what any quantizer writes)."""
    v = _values(x)
    if v is None or v.size == 0:
        return
    bad = np.flatnonzero(~np.isfinite(v) | (v < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}[{i}] is {float(v[i])!r}: scales must be finite and >= 0 "
                         f"({bad.size} of {v.size} are not)")


def check_4bit_tensors(
    info: QuantStateInfo,
    *,
    packed: Any = None,
    absmax: Any,
    quant_map: Any,
    nested_absmax: Any = None,
    nested_quant_map: Any = None,
) -> None:
    """Checks the tensors of one 4-bit weight against its quant_state ``info``. Each is a
    numpy array or torch tensor (values checked too) or a ``(dtype, shape)`` pair from a file
    header (layout only). Raises ``ValueError`` naming the tensor.

    - ``packed`` (optional): a storage dtype of :data:`QUANT_STORAGES` holding exactly
      ``(n + 1) // 2`` bytes for the ``n`` elements of ``info.shape``.
    - ``absmax``: ``ceil(n / blocksize)`` entries, float32 / float16 / bfloat16 and finite and
      >= 0, or uint8 codes with double quantization.
    - ``quant_map``: 16 floats equal to nybble's (and bitsandbytes') table of the quant_type.
      Every decoder (Rust, CUDA, torch) uses the built-in table, so a custom 4-bit codebook is
      refused rather than silently ignored.
    - double quantization: ``nested_absmax`` ``ceil(nblocks / 256)`` finite floats >= 0;
      ``nested_quant_map`` 256 finite floats, used as stored by every decoder (bitsandbytes
      writes its dynamic map).
    """
    n = info.numel
    nblocks = -(-n // info.blocksize)
    if packed is not None:
        dtype, shape = _spec(packed)
        if dtype not in QUANT_STORAGES:
            raise ValueError(f"packed weight has dtype {dtype}, expected one of {list(QUANT_STORAGES)}")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * QUANT_STORAGES[dtype][1]
        if nbytes != packed_nbytes(n):
            raise ValueError(f"packed weight holds {nbytes} bytes ({dtype} {list(shape)}), but shape "
                             f"{list(info.shape)} packs into {packed_nbytes(n)}")
    if info.double_quant:
        _check_spec(ABSMAX, absmax, ("uint8",), nblocks)
        if nested_absmax is None or nested_quant_map is None:
            raise ValueError(f"double-quantized, but {NESTED_ABSMAX} or {NESTED_QUANT_MAP} is missing")
        _check_spec(NESTED_ABSMAX, nested_absmax, _FLOAT_NAMES, -(-nblocks // info.nested_blocksize))
        _check_scales(NESTED_ABSMAX, nested_absmax)
        _check_spec(NESTED_QUANT_MAP, nested_quant_map, _FLOAT_NAMES, 256)
        v = _values(nested_quant_map)
        if v is not None and not np.isfinite(v).all():
            raise ValueError(f"{NESTED_QUANT_MAP} holds non-finite values")
    else:
        if nested_absmax is not None or nested_quant_map is not None:
            raise ValueError(f"{NESTED_ABSMAX} / {NESTED_QUANT_MAP} given, but the quant_state has no nested fields")
        _check_spec(ABSMAX, absmax, _FLOAT_NAMES, nblocks)
        _check_scales(ABSMAX, absmax)
    _check_spec(QUANT_MAP, quant_map, _FLOAT_NAMES, 16)
    v = _values(quant_map)
    if v is not None:
        from .codebooks import code_4bit

        if not np.array_equal(v, code_4bit(info.quant_type)):
            raise ValueError(f"{QUANT_MAP} is not the standard {info.quant_type} table: nybble decodes with its "
                             "built-in table only, so a custom 4-bit codebook is refused")


def check_int8_tensors(weight: Any, scb: Any, weight_format: Any = None) -> tuple[int, int]:
    """Checks an LLM.int8() weight: ``weight`` int8 (out, in), ``SCB`` (out,) floats finite
    and >= 0, ``weight_format`` (when present) one integer equal to 0 (row-major). Arrays or
    ``(dtype, shape)`` pairs as for :func:`check_4bit_tensors`. Returns (out, in)."""
    dtype, shape = _spec(weight)
    if dtype != "int8" or len(shape) != 2:
        raise ValueError(f"int8 weight has dtype {dtype} shape {list(shape)}, expected int8 (out, in)")
    _check_spec(SCB, scb, _FLOAT_NAMES, shape[0])
    _check_scales(SCB, scb)
    if weight_format is not None:
        fdtype, fshape = _spec(weight_format)
        count = 1
        for d in fshape:
            count *= d
        if count != 1 or not (fdtype.startswith("int") or fdtype.startswith("uint")):
            raise ValueError(f"{WEIGHT_FORMAT} has dtype {fdtype} shape {list(fshape)}, expected one integer")
        v = _values(weight_format)
        if v is not None and int(v[0]) != WEIGHT_FORMAT_ROW:
            raise ValueError(f"{WEIGHT_FORMAT} {int(v[0])} is not row-major ({WEIGHT_FORMAT_ROW})")
    return shape[0], shape[1]


_QUANT_STATE_ITEMS = (ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP, "quant_type", "blocksize", "dtype",
                      "shape", "nested_blocksize", "nested_dtype", "nested_offset")


def _strip(key: str) -> str:
    """A state-dict key without its module prefix (bitsandbytes' ``from_dict`` rule; the
    quant_state entry keeps its ``quant_state.`` part)."""
    if QUANT_STATE_PREFIX.lstrip(".") in key:
        return "quant_state.bitsandbytes__" + key.rsplit("bitsandbytes__", 1)[1]
    return key.rsplit(".", 1)[-1]


def quant_state_to_dict(state: QuantState4bit, packed: bool = True) -> dict[str, Any]:
    """bitsandbytes' ``QuantState.as_dict``: the tensors (float32 / uint8 numpy arrays) and,
    with ``packed=True``, the other fields packed into one uint8 JSON array under
    ``quant_state.bitsandbytes__<quant_type>`` (what a state dict stores, prefixed by
    ``P.weight.``); with ``packed=False`` the fields themselves, in bitsandbytes' order."""
    n = state.nested
    fields = quant_state_dict(state.quant_type, state.blocksize, state.dtype, state.shape,
                              None if n is None else n.offset)
    absmax = np.ascontiguousarray(state.absmax, dtype=np.uint8 if n is not None else np.float32)
    tensors: dict[str, Any] = {ABSMAX: absmax, QUANT_MAP: np.ascontiguousarray(state.code, dtype=np.float32)}
    if n is not None:
        tensors[NESTED_ABSMAX] = np.ascontiguousarray(n.nested_absmax, dtype=np.float32)
        tensors[NESTED_QUANT_MAP] = np.ascontiguousarray(n.code, dtype=np.float32)
        fields["nested_blocksize"] = int(n.blocksize)
    if not packed:
        order = ["quant_type", ABSMAX, "blocksize", QUANT_MAP, "dtype", "shape",
                 NESTED_ABSMAX, "nested_blocksize", NESTED_QUANT_MAP, "nested_dtype", "nested_offset"]
        merged = {**fields, **tensors}
        return {k: merged[k] for k in order if k in merged}
    blob = np.frombuffer(encode_quant_state(fields), dtype=np.uint8).copy()
    return {**tensors, f"quant_state.bitsandbytes__{state.quant_type}": blob}


def quant_state_from_dict(items: Mapping[str, Any]) -> QuantState4bit:
    """bitsandbytes' ``QuantState.from_dict``: builds a :class:`~nybble.quant.QuantState4bit`
    from the quant-state entries of one weight, prefixed (``P.weight.absmax``) or not
    (``absmax``), packed (one ``quant_state.bitsandbytes__*`` entry) or not. Tensors may be
    numpy arrays or torch tensors. Raises ``ValueError`` for a bad or incomplete state: every
    field is validated (:func:`parse_quant_state`) and every tensor against it
    (:func:`check_4bit_tensors`)."""
    from ._arrays import to_numpy
    from .quant import NestedState, QuantState4bit

    stripped = {_strip(k): v for k, v in items.items()}
    unknown = [k for k in stripped if not k.startswith("quant_state.") and k not in _QUANT_STATE_ITEMS]
    if unknown:
        raise ValueError(f"not quant_state items: {unknown}")
    packed_keys = [k for k in stripped if k.startswith("quant_state.")]
    if len(packed_keys) > 1:
        raise ValueError(f"expected one quant_state entry, found {packed_keys}")
    fields = {k: v for k, v in stripped.items() if not k.startswith("quant_state.") and k not in
              (ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP)}
    key_type = None
    if packed_keys:
        key_type = packed_keys[0].split("bitsandbytes__", 1)[1]
        fields.update(decode_quant_state(stripped[packed_keys[0]]))
    elif "quant_type" not in fields:
        raise ValueError("expected packed or unpacked quant_state items, found neither")
    info = parse_quant_state(fields, key_type)
    missing = [k for k in (ABSMAX, QUANT_MAP) + ((NESTED_ABSMAX, NESTED_QUANT_MAP) if info.double_quant else ())
               if k not in stripped]
    if missing:
        raise ValueError(f"quant_state lacks {missing}")
    check_4bit_tensors(info, absmax=stripped[ABSMAX], quant_map=stripped[QUANT_MAP],
                       nested_absmax=stripped.get(NESTED_ABSMAX), nested_quant_map=stripped.get(NESTED_QUANT_MAP))
    nested = None
    if info.double_quant:
        nested = NestedState(
            nested_absmax=to_numpy(stripped[NESTED_ABSMAX], np.float32).reshape(-1),
            offset=float(info.nested_offset),
            code=to_numpy(stripped[NESTED_QUANT_MAP], np.float32).reshape(-1),
            blocksize=info.nested_blocksize,
        )
    absmax = to_numpy(stripped[ABSMAX], np.uint8 if nested is not None else np.float32).reshape(-1)
    return QuantState4bit(
        shape=info.shape,
        dtype=info.dtype,
        blocksize=info.blocksize,
        quant_type=info.quant_type,
        absmax=absmax,
        nested=nested,
        code=to_numpy(stripped[QUANT_MAP], np.float32).reshape(-1),
    )


# ----------------------------------------------------------------------------- LLM.int8()

#: bitsandbytes' ``int8_vectorwise_dequant`` multiplies by this float32 reciprocal of 127
#: (``float32(1/127)`` printed as a float64): ``(q * SCB) * (1/127)``, left to right in float32.
INT8_DEQUANT_SCALE = 7.874015718698502e-3


def int8_dequantize(q: Any, scb: Any) -> Any:
    """LLM.int8() row-wise int8 (out, in) and its float32 SCB (out,) back to float32, with
    bitsandbytes' ``int8_vectorwise_dequant`` rule: ``(q * SCB[:, None]) * float32(1/127)`` in
    float32, bit for bit. (``q * (SCB / 127)`` rounds differently in about a quarter of the
    elements.) numpy in, numpy out; torch in, torch out (on the input's device)."""
    if _is_torch(q):
        import torch

        return (q.to(torch.float32) * scb.to(torch.float32).reshape(-1, 1)) * INT8_DEQUANT_SCALE
    q = np.asarray(q)
    scb = np.asarray(scb, dtype=np.float32).reshape(-1, 1)
    return (q.astype(np.float32) * scb) * np.float32(INT8_DEQUANT_SCALE)


# ----------------------------------------------------------------------------- quantization_config


def quantization_config(
    method: str,
    double_quant: bool,
    compute_dtype: str,
    skip_modules: list[str] | None,
    quant_storage: Any = "uint8",
) -> dict[str, Any]:
    """``config.json``'s ``quantization_config`` as transformers' ``BitsAndBytesConfig``
    writes it (keys sorted as its ``to_dict`` gives them)."""
    four = method in QUANT_TYPES
    return {
        "_load_in_4bit": four,
        "_load_in_8bit": not four,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": quant_storage_name(quant_storage),
        "bnb_4bit_quant_type": method if four else "fp4",
        "bnb_4bit_use_double_quant": bool(double_quant) if four else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four,
        "load_in_8bit": not four,
        "quant_method": "bitsandbytes",
    }


@dataclass(frozen=True)
class BnbConfig:
    """The fields of a ``quantization_config`` that decide how to load a checkpoint."""

    load_in_4bit: bool
    load_in_8bit: bool
    compute_dtype: str | None  # bnb_4bit_compute_dtype, e.g. "bfloat16"; None when unset
    quant_type: str
    double_quant: bool
    quant_storage: str  # "uint8" | "bfloat16" | "float16" | "float32"
    threshold: float  # llm_int8_threshold
    skip_modules: tuple[str, ...] | None


def parse_quantization_config(qc: Mapping[str, Any]) -> BnbConfig:
    """Reads a ``quantization_config`` written by transformers or nybble (dtypes may be
    spelled ``"torch.bfloat16"``). Raises ``ValueError`` for one that is not bitsandbytes',
    or whose fields have the wrong type or range: flags must be JSON booleans (``"false"`` is
    not false), exactly one of 4-bit / 8-bit set, the quant type nf4 / fp4, the compute dtype
    a float dtype, the threshold a finite number >= 0, skip modules a list of strings."""
    if not isinstance(qc, Mapping):
        raise ValueError(f"quantization_config is a {type(qc).__name__}, not a JSON object")
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"quantization_config: quant_method {method!r} is not 'bitsandbytes'")

    def flag(*keys: str) -> bool:
        for k in keys:
            v = qc.get(k)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"quantization_config: {k} must be true or false, got {v!r}")
        return next((qc[k] for k in keys if qc.get(k) is not None), False)

    four, eight = flag("load_in_4bit", "_load_in_4bit"), flag("load_in_8bit", "_load_in_8bit")
    if four == eight:
        raise ValueError("quantization_config: exactly one of load_in_4bit / load_in_8bit must be true, "
                         f"got {four} / {eight}")
    double_quant = flag("bnb_4bit_use_double_quant")
    flag("llm_int8_has_fp16_weight")
    flag("llm_int8_enable_fp32_cpu_offload")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quantization_config: bnb_4bit_quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    compute = qc.get("bnb_4bit_compute_dtype")
    if compute is not None:
        if not isinstance(compute, str) or compute.replace("torch.", "") not in FLOAT_DTYPES:
            raise ValueError(f"quantization_config: bnb_4bit_compute_dtype {compute!r} is not one of {FLOAT_DTYPES}")
        compute = compute.replace("torch.", "")
    storage = qc.get("bnb_4bit_quant_storage")
    if storage is not None and not isinstance(storage, str):
        raise ValueError(f"quantization_config: bnb_4bit_quant_storage {storage!r} is not a dtype name")
    threshold = qc.get("llm_int8_threshold", 6.0)
    if not _is_number(threshold) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"quantization_config: llm_int8_threshold {threshold!r} is not a finite number >= 0")
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise ValueError(f"quantization_config: llm_int8_skip_modules {skip!r} is not a list of module names")
    try:
        storage = quant_storage_name(storage)
    except ValueError as err:
        raise ValueError(f"quantization_config: {err}") from None
    return BnbConfig(
        load_in_4bit=four,
        load_in_8bit=eight,
        compute_dtype=compute,
        quant_type=str(quant_type),
        double_quant=double_quant,
        quant_storage=storage,
        threshold=float(threshold),
        skip_modules=None if skip is None else tuple(skip),
    )
