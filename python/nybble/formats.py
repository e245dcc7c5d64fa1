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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .quant import QuantState4bit

__all__ = [
    "ABSMAX",
    "FLOAT_DTYPES",
    "INT8_DEQUANT_SCALE",
    "MAX_FLOAT_REPR",
    "NESTED_ABSMAX",
    "NESTED_BLOCKSIZE",
    "NESTED_DTYPE",
    "NESTED_QUANT_MAP",
    "QUANT_MAP",
    "QUANT_STATE_PREFIX",
    "QUANT_STORAGES",
    "QUANT_STORAGE_ALIASES",
    "QUANT_TYPES",
    "SCB",
    "WEIGHT_FORMAT",
    "WEIGHT_FORMAT_ROW",
    "BnbConfig",
    "QuantStateInfo",
    "decode_quant_state",
    "encode_quant_state",
    "four_bit_keys",
    "int8_dequantize",
    "int8_keys",
    "packed_as_storage",
    "packed_as_uint8",
    "packed_nbytes",
    "packed_shape",
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


def decode_quant_state(blob: Any) -> dict[str, Any]:
    """The fields of a stored quant_state entry (bytes, or a uint8 numpy / torch tensor)."""
    if _is_torch(blob):
        blob = blob.detach().cpu().contiguous().numpy()
    if isinstance(blob, np.ndarray):
        blob = np.ascontiguousarray(blob).tobytes()
    try:
        fields = json.loads(bytes(blob).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"quant_state is not valid JSON: {err}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"quant_state is a JSON {type(fields).__name__}, not an object")
    return fields


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

    def to_dict(self) -> dict[str, Any]:
        d = quant_state_dict(self.quant_type, self.blocksize, self.dtype, self.shape, self.nested_offset)
        if self.double_quant:
            d["nested_blocksize"] = self.nested_blocksize
        return d


def parse_quant_state(fields: Mapping[str, Any], quant_type: str | None = None) -> QuantStateInfo:
    """Validates quant_state fields (:func:`decode_quant_state`'s result); ``quant_type`` is
    the one the entry's key names, which the JSON must repeat. Raises ``ValueError``."""
    qt = fields.get("quant_type")
    if qt not in QUANT_TYPES:
        raise ValueError(f"unsupported quant_type {qt!r}")
    if quant_type is not None and qt != quant_type:
        raise ValueError(f"quant_type {qt!r} does not match its key's {quant_type!r}")
    try:
        blocksize = int(fields["blocksize"])
        dtype = str(fields["dtype"]).replace("torch.", "")
        shape = tuple(int(d) for d in fields["shape"])
        nested = "nested_offset" in fields or "nested_blocksize" in fields
        offset = float(fields["nested_offset"]) if nested else None
        nested_blocksize = int(fields.get("nested_blocksize", NESTED_BLOCKSIZE))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"bad quant_state ({err!r})") from None
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"bad quant_state: dtype {dtype!r} is not one of {FLOAT_DTYPES}")
    if nested and str(fields.get("nested_dtype", NESTED_DTYPE)).replace("torch.", "") != NESTED_DTYPE:
        raise ValueError(f"bad quant_state: nested_dtype {fields.get('nested_dtype')!r} is not {NESTED_DTYPE}")
    return QuantStateInfo(qt, blocksize, dtype, shape, offset, nested_blocksize)


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
    numpy arrays or torch tensors. Raises ``ValueError`` for a bad or incomplete state."""
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
    spelled ``"torch.bfloat16"``). Raises ``ValueError`` for one that is not bitsandbytes'."""
    method = qc.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise ValueError(f"quantization_config: quant_method {method!r} is not 'bitsandbytes'")
    four = bool(qc.get("load_in_4bit", qc.get("_load_in_4bit", False)))
    eight = bool(qc.get("load_in_8bit", qc.get("_load_in_8bit", False)))
    compute = qc.get("bnb_4bit_compute_dtype")
    skip = qc.get("llm_int8_skip_modules")
    return BnbConfig(
        load_in_4bit=four,
        load_in_8bit=eight,
        compute_dtype=None if compute is None else str(compute).replace("torch.", ""),
        quant_type=str(qc.get("bnb_4bit_quant_type", "fp4")),
        double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)),
        quant_storage=quant_storage_name(qc.get("bnb_4bit_quant_storage")),
        threshold=float(qc.get("llm_int8_threshold", 6.0)),
        skip_modules=None if skip is None else tuple(skip),
    )
