"""Whole checkpoints: quantize a safetensors model folder into the packed layout that
transformers + bitsandbytes load, and read such checkpoints back (inspect, dequantize,
verify).

The heavy lifting of :func:`quantize_checkpoint` happens in Rust (``nybble._core.Converter``),
one tensor per ``step()`` with the GIL released; this module picks the tensors, reports
progress, and assembles the output folder. Every output folder is built in a hidden staging
folder beside the target and renamed into place only when complete, so a failed or
interrupted run leaves nothing where the result belongs.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from . import _core, _files, outputs
from . import formats as fmt
from .errors import CorruptFileError
from .formats import QUANT_STATE_PREFIX, quantization_config  # noqa: F401 - re-exported
from .outputs import OutputError, OutputExistsError, OutputInterrupted, OutputLockedError  # noqa: F401 - re-exported
from .quant import QuantState4bit, dequantize_4bit

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
METHODS = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Weight files of other formats are not copied into the output: they would hold the
# unquantized weights again.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

_NUMPY_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_SAFETENSORS_NAMES = fmt.FLOAT_SAFETENSORS_NAMES


class CheckpointError(ValueError):
    """A checkpoint cannot be converted or read (the message names the file / tensor)."""


# ----------------------------------------------------------------------------- sizes, patterns


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5 * 10**9 (decimal units as transformers; ``"GiB"`` etc. are binary)."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE_RE.match(text)
        if m is None:
            raise ValueError(f"cannot parse size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
        unit = m.group(2).upper() if m.group(2) else None
        size = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def matches(pattern: str, name: str) -> bool:
    """Whether a ``--skip`` / ``--only`` pattern selects tensor ``name``.

    Patterns are shell globs (``fnmatch``, case-sensitive) matched against the full tensor
    name and against its module name (the name without ``.weight``), so ``*.attention.*`` and
    ``pooler.dense`` both work. Prefix a pattern with ``re:`` for a Python regular expression
    searched anywhere in the tensor name (``re:layer\\.(0|1)\\.``).
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    module = name.removesuffix(".weight")
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(module, pattern)


def _is_quantizable(dtype: str, shape: list[int]) -> bool:
    return dtype in ("F32", "F16", "BF16") and len(shape) == 2 and shape[0] * shape[1] > 0


def select_tensors(
    tensors: Iterable[tuple[str, str, list[int]]],
    only: Iterable[str] = (),
    skip: Iterable[str] = (),
) -> set[str]:
    """Names of the tensors to quantize.

    Default: 2-D float ``.weight`` tensors of linear layers, never embeddings (``embed``,
    ``wte``, ``wpe``), ``lm_head``, norms (``norm``, ``ln_``, ``LayerNorm``) or biases.
    ``only`` replaces the default rule: the 2-D float tensors matching any ``only`` pattern.
    ``skip`` then removes the tensors matching any ``skip`` pattern.
    """
    only, skip = list(only), list(skip)
    for p in only + skip:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"bad regular expression {p!r}: {e}") from None
    chosen = set()
    for name, dtype, shape in tensors:
        if only:
            take = _is_quantizable(dtype, shape) and any(matches(p, name) for p in only)
        else:
            take = _core.is_default_quantizable(name, dtype, list(shape))
        if take and not any(matches(p, name) for p in skip):
            chosen.add(name)
    return chosen


# ----------------------------------------------------------------------------- reading


@dataclass
class TensorEntry:
    name: str
    dtype: str  # safetensors name: "BF16", "U8", ...
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the data
    nbytes: int
    file: Path


class Checkpoint:
    """The tensors of a checkpoint file or model folder, read lazily one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = [Path(p) for p in _core.resolve_checkpoint(self.path)]
        self.entries: dict[str, TensorEntry] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            tensors, metadata = _core.read_safetensors_header(f)
            if metadata and not self.metadata:
                self.metadata = dict(metadata)
            for name, dtype, shape, offset, nbytes in tensors:
                if name in self.entries:
                    raise CheckpointError(f"tensor {name!r} is in both {self.entries[name].file} and {f}")
                self.entries[name] = TensorEntry(name, dtype, tuple(shape), offset, nbytes, f)

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def config(self) -> dict[str, Any] | None:
        """config.json of the folder, ``None`` when there is none. One that exists must be a
        regular file holding a JSON object (strict JSON, nesting bounded): else
        :class:`CheckpointError` (or ``CorruptFileError`` for a FIFO and the like)."""
        cfg = self.folder / CONFIG_FILE
        if not os.path.lexists(cfg):
            return None
        try:
            config = _files.read_json_file(cfg)
        except FileNotFoundError:
            return None  # a dangling link: no config, as before
        except CorruptFileError:
            raise
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg}: expected a JSON object, got {type(config).__name__}")
        return config

    def check_side_files(self) -> None:
        """Refuses, before anything is written, a side file of the folder (what
        :func:`copy_side_files` copies along) that is not a regular file or folder: a FIFO would
        block the copy, a link to ``/dev/zero`` would never end, a folder link back to an
        ancestor would recurse forever. Raises :class:`~nybble.errors.CorruptFileError`."""
        if not self.path.is_dir():
            return

        def walk(folder: Path, ancestors: frozenset[str], top: bool) -> None:
            for item in sorted(folder.iterdir()):
                if top and (item.name in (CONFIG_FILE, INDEX_FILE, outputs.MARKER)
                            or item.name.endswith(_WEIGHT_SUFFIXES)):
                    continue
                try:
                    mode = item.stat().st_mode
                except FileNotFoundError:
                    raise CorruptFileError(f"{item}: a dangling link; cannot copy it", path=item,
                                           reason="dangling link") from None
                if stat.S_ISDIR(mode):
                    real = os.path.realpath(item)
                    if real in ancestors:
                        raise CorruptFileError(f"{item}: links back to a folder above it; cannot copy it",
                                               path=item, reason="link loop")
                    walk(item, ancestors | {real}, False)
                elif not stat.S_ISREG(mode):
                    raise _files.not_regular_error(item, mode)

        walk(self.path, frozenset({os.path.realpath(self.path)}), True)

    def model_dtype(self) -> str | None:
        """The dtype ``config.json`` records for the model (``dtype`` or ``torch_dtype``), when
        it is one of float32 / float16 / bfloat16."""
        config = self.config() or {}
        dtype = config.get("dtype") or config.get("torch_dtype")
        return dtype if isinstance(dtype, str) and dtype in _SAFETENSORS_NAMES else None

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> np.ndarray:
        """One tensor as a writable numpy array that owns its bytes (bfloat16 as
        ``ml_dtypes.bfloat16``): torch can take it as it is, without a second copy."""
        e = self.entries[name]
        dtype = _NUMPY_DTYPES.get(e.dtype)
        if dtype is None:
            raise CheckpointError(f"{e.file}: tensor {name!r}: dtype {e.dtype} is not supported here")
        data = bytearray(e.nbytes)
        view, got = memoryview(data), 0
        with open(e.file, "rb") as f:
            while got < e.nbytes:  # one read returns at most ~2 GiB on Linux
                n = os.preadv(f.fileno(), [view[got:]], e.offset + got)
                if n == 0:
                    break
                got += n
        if got != e.nbytes:
            raise CheckpointError(f"{e.file}: tensor {name!r}: file shrank while reading")
        return np.frombuffer(data, dtype=dtype).reshape(e.shape)

    def read_json(self, name: str) -> dict[str, Any]:
        e = self.entries[name]
        try:
            if e.dtype != "U8" or e.nbytes > fmt.MAX_QUANT_STATE_BYTES:
                # Checked on the header, before reading: a hostile entry may claim gigabytes.
                raise ValueError(f"quant_state entry is {e.dtype} of {e.nbytes} bytes; expected U8 of at most "
                                 f"{fmt.MAX_QUANT_STATE_BYTES}")
            return fmt.decode_quant_state(self.read(name))
        except ValueError as err:
            raise CheckpointError(f"{e.file}: tensor {name!r}: {err}") from None


@dataclass
class PackedWeight:
    """One quantized weight in a checkpoint and the keys that belong to it."""

    name: str  # "P.weight"
    format: str  # "nf4" | "fp4" | "int8"
    shape: tuple[int, ...]
    # Original dtype ("bfloat16", ...). The int8 layout records none per tensor: int8 weights
    # take the model dtype from config.json, float32 when it has none.
    dtype: str
    keys: list[str] = field(default_factory=list)
    blocksize: int | None = None
    double_quant: bool = False
    # How the packed 4-bit codes are stored ("uint8", or the bytes as "bfloat16" / ...).
    quant_storage: str | None = None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _where(ckpt: Checkpoint, name: str) -> str:
    e = ckpt.entries.get(name)
    return f"{e.file if e is not None else ckpt.path}: tensor {name!r}"


def packed_weights(ckpt: Checkpoint) -> dict[str, PackedWeight]:
    """The quantized weights of a checkpoint by name (4-bit via their quant_state entry,
    LLM.int8() via their ``SCB``), each validated against the file headers: every quant_state
    field (:func:`nybble.formats.parse_quant_state`) and the dtype and shape of every tensor of
    the weight (:func:`nybble.formats.check_4bit_tensors` / ``check_int8_tensors``). Values
    (absmax, SCB, quant_map) are checked when a weight is decoded (:func:`dequantize_weight`).
    Raises :class:`CheckpointError` naming the file and tensor."""
    out: dict[str, PackedWeight] = {}
    int8_dtype: str | None = None

    def spec(key: str) -> tuple[str, tuple[int, ...]] | None:
        e = ckpt.entries.get(key)
        return None if e is None else (e.dtype, e.shape)

    for key in ckpt.entries:
        split = fmt.split_quant_state_key(key)
        if split is not None:
            name, quant_type = split
            try:
                info = fmt.parse_quant_state(ckpt.read_json(key), quant_type)
            except ValueError as err:
                raise CheckpointError(f"{_where(ckpt, key)}: {err}") from None
            if name in out:
                raise CheckpointError(f"{_where(ckpt, key)}: {name!r} has a second quant_state entry")
            keys = fmt.four_bit_keys(name, quant_type, info.double_quant)
            for k in keys:
                if k not in ckpt:
                    raise CheckpointError(f"{ckpt.path}: {name!r} is 4-bit but {k!r} is missing")
            try:
                fmt.check_4bit_tensors(info, packed=spec(name), absmax=spec(f"{name}.{fmt.ABSMAX}"),
                                       quant_map=spec(f"{name}.{fmt.QUANT_MAP}"),
                                       nested_absmax=spec(f"{name}.{fmt.NESTED_ABSMAX}"),
                                       nested_quant_map=spec(f"{name}.{fmt.NESTED_QUANT_MAP}"))
            except ValueError as err:
                raise CheckpointError(f"{_where(ckpt, name)}: {err}") from None
            storage = fmt.quant_storage_of(ckpt.entries[name].dtype)
            out[name] = PackedWeight(name, quant_type, info.shape, info.dtype, keys, info.blocksize,
                                     info.double_quant, storage)
        elif key.endswith("." + fmt.SCB):
            name, scb_key, format_key = fmt.int8_keys(key.removesuffix("." + fmt.SCB) + ".weight")
            if name not in ckpt or ckpt.entries[name].dtype != "I8":
                raise CheckpointError(f"{ckpt.path}: {key!r} has no int8 weight {name!r}")
            if name in out:
                raise CheckpointError(f"{_where(ckpt, key)}: {name!r} is both 4-bit and int8")
            try:
                fmt.check_int8_tensors(spec(name), spec(scb_key), spec(format_key))
            except ValueError as err:
                raise CheckpointError(f"{_where(ckpt, name)}: {err}") from None
            keys = [name, scb_key] + ([format_key] if format_key in ckpt else [])
            if int8_dtype is None:
                int8_dtype = ckpt.model_dtype() or "float32"
            out[name] = PackedWeight(name, "int8", ckpt.entries[name].shape, int8_dtype, keys)
    return out


def _nbytes(ckpt: Checkpoint, keys: Iterable[str]) -> int:
    return sum(ckpt.entries[k].nbytes for k in keys)


def dequantize_weight(ckpt: Checkpoint, w: PackedWeight, dtype: str | None = None) -> np.ndarray:
    """Decodes one packed weight to ``dtype`` (default: its recorded original dtype), after
    checking the values of its constants (:mod:`nybble.formats`: absmax / SCB finite and
    >= 0, the standard quant_map). Raises :class:`CheckpointError` naming file and tensor."""
    where = _where(ckpt, w.name)
    if w.format == "int8":
        q = ckpt.read(w.name)
        scb = ckpt.read(w.keys[1])
        try:
            fmt.check_int8_tensors(q, scb, ckpt.read(w.keys[2]) if len(w.keys) > 2 else None)
        except ValueError as err:
            raise CheckpointError(f"{where}: {err}") from None
        out = fmt.int8_dequantize(q, scb)
        return out.astype(_NUMPY_DTYPES[_SAFETENSORS_NAMES[dtype or w.dtype]])
    try:
        # quant_state_from_dict validates every field and every constant (quant_map included).
        state = QuantState4bit.from_dict({k: ckpt.read(k) for k in w.keys[1:]})
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None
    try:
        # Any quant_storage: dequantize_4bit reads the stored bytes as uint8.
        return dequantize_4bit(ckpt.read(w.name), state, dtype or w.dtype)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


# ----------------------------------------------------------------------------- output folders


@contextmanager
def staged_output(out: Path, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                  command: str = "quantize") -> Iterator[Path]:
    """Yields a fresh hidden folder beside ``out``; on success moves it to ``out``
    atomically (replacing a nybble output there when ``overwrite``), on any failure or
    signal deletes it. The rules (inputs, what may be replaced, lock, signals) are
    :func:`nybble.outputs.staged_output`'s."""
    with outputs.staged_output(out, overwrite=overwrite, inputs=inputs, command=command) as staging:
        yield staging


def input_paths(ckpt: Checkpoint) -> list[Path]:
    """Everything a conversion of ``ckpt`` reads: the path given, every shard, config.json
    and (for a folder) every entry copied along; an output must overlap none of them."""
    paths = [ckpt.path, *ckpt.files, ckpt.folder / CONFIG_FILE]
    if ckpt.path.is_dir():
        paths.extend(sorted(ckpt.path.iterdir()))
    return paths


def copy_side_files(src_folder: Path, dst: Path) -> list[str]:
    """Copies tokenizer files, sub-folders (e.g. ``1_Pooling``) and other non-weight files
    (links followed; modes from the umask, as every file nybble writes)."""
    copied = []
    for item in sorted(src_folder.iterdir()):
        if item.name in (CONFIG_FILE, INDEX_FILE, outputs.MARKER) or item.name.endswith(_WEIGHT_SUFFIXES):
            continue
        outputs.copy_tree(item, dst / item.name)
        copied.append(item.name)
    return copied


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


# ----------------------------------------------------------------------------- quantize


@dataclass
class QuantizeSummary:
    output: Path
    method: str
    tensors: int
    quantized: int
    params_quantized: int
    bytes_in: int
    bytes_out: int
    bytes_quantized_out: int
    seconds: float
    shards: list[str]
    # Element-weighted over the quantized tensors (None when stats were off).
    rmse: float | None = None
    max_abs: float | None = None
    sqnr_db: float | None = None

    @property
    def bits_per_parameter(self) -> float:
        """Bits per parameter of the quantized tensors, constants included."""
        return 8 * self.bytes_quantized_out / max(self.params_quantized, 1)


def quantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    method: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: str = "bfloat16",
    threads: int | None = None,
    overwrite: bool = False,
    skip: Iterable[str] = (),
    only: Iterable[str] = (),
    max_shard_size: str | int = "5GB",
    error_stats: bool = True,
    on_plan: Callable[[list[dict[str, Any]]], None] | None = None,
    on_tensor: Callable[[dict[str, Any]], None] | None = None,
    quant_storage: Any = "uint8",
) -> QuantizeSummary:
    """Converts a safetensors checkpoint (file or model folder) into a packed checkpoint
    folder. ``on_tensor`` is called on this thread after each tensor; an exception it raises
    (KeyboardInterrupt included) aborts the run and leaves no output behind.

    ``quant_storage`` (uint8, bfloat16 / bf16, float16 / fp16, float32 / fp32): the dtype the
    packed 4-bit weights are stored as (bitsandbytes' ``bnb_4bit_quant_storage``, for FSDP);
    the bytes, and so every output, are the same whatever it is."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    # Checked here, not left to the binding's integer conversion (-64 would be an OverflowError).
    blocksize = fmt.check_blocksize(blocksize) if method != "int8" else 64  # int8 has no blocks
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(max_shard_size, (str, int)) or isinstance(max_shard_size, bool):
        raise ValueError(f"max_shard_size must be a size such as 5GB or a byte count, got {max_shard_size!r}")
    quant_storage = fmt.quant_storage_name(quant_storage)
    if method == "int8" and quant_storage != "uint8":
        raise ValueError(f"quant_storage {quant_storage!r} applies to 4-bit weights only, not int8")
    compute_dtype = COMPUTE_DTYPES.get(compute_dtype, compute_dtype)
    if compute_dtype not in COMPUTE_DTYPES.values():
        raise ValueError(f"compute dtype {compute_dtype!r} is not one of {list(COMPUTE_DTYPES)}")
    src, out = Path(src), Path(out)
    max_shard_bytes = parse_size(max_shard_size)
    started = time.perf_counter()
    ckpt = Checkpoint(src)
    ckpt.check_side_files()  # what will be copied along: regular files and folders only
    outputs.check_output(out, input_paths(ckpt), overwrite)  # before any work (again once locked)
    already = [k for k in ckpt.entries if fmt.split_quant_state_key(k) or k.endswith("." + fmt.SCB)]
    if already:
        raise CheckpointError(f"{src} is already quantized ({already[0]!r}); dequantize it first")
    listing = [(e.name, e.dtype, list(e.shape)) for e in ckpt.entries.values()]
    chosen = select_tensors(listing, only, skip)
    if not chosen:
        # A checkpoint with nothing packed would still claim a quantization_config.
        what = f"--only {' '.join(only)}" if list(only) else "the default rule (2-D float .weight of linear layers)"
        raise CheckpointError(f"{src}: no tensor to quantize matches {what}")
    if quant_storage != "uint8":
        for name in sorted(chosen):
            e = ckpt.entries[name]
            try:
                fmt.packed_shape(int(np.prod(e.shape, dtype=np.int64)), quant_storage)
            except ValueError as err:
                raise CheckpointError(f"{e.file}: tensor {name!r} {list(e.shape)}: {err}") from None
    config = ckpt.config()

    with staged_output(out, overwrite, input_paths(ckpt), "quantize") as staging:
        conv = _core.Converter(
            [str(f) for f in ckpt.files],
            str(staging),
            chosen,
            method=method,
            blocksize=blocksize,
            double_quant=double_quant,
            max_shard_bytes=max_shard_bytes,
            error_stats=error_stats,
            threads=threads,
            quant_storage=quant_storage,
        )
        plan = conv.plan()
        if on_plan is not None:
            on_plan(plan)
        reports = []
        try:
            while (report := conv.step()) is not None:
                reports.append(report)
                if on_tensor is not None:
                    on_tensor(report)
            conv.finish()
        except BaseException:
            conv.abort()
            raise
        if src.is_dir():
            copy_side_files(src, staging)
        if config is not None:
            # Linear-shaped weights left in full precision must stay plain nn.Linear on load;
            # lm_head is listed even when absent (tied) because transformers would otherwise
            # expect a packed one.
            kept = sorted(
                {t["name"].removesuffix(".weight") for t in plan if not t["quantize"] and len(t["shape"]) == 2}
                | {"lm_head"}
            )
            config["quantization_config"] = fmt.quantization_config(method, double_quant, compute_dtype, kept,
                                                                    quant_storage)
            _write_json(staging / CONFIG_FILE, config)
        shards = sorted(p.name for p in staging.glob("*.safetensors"))

    quantized = [r for r in reports if r["quantized"]]
    n_q = sum(r["num_elements"] for r in quantized)
    summary = QuantizeSummary(
        output=out,
        method=method,
        tensors=len(reports),
        quantized=len(quantized),
        params_quantized=n_q,
        bytes_in=sum(r["in_bytes"] for r in reports),
        bytes_out=sum(r["out_bytes"] for r in reports),
        bytes_quantized_out=sum(r["out_bytes"] for r in quantized),
        seconds=time.perf_counter() - started,
        shards=shards,
    )
    with_stats = [r for r in quantized if r["stats"] is not None]
    if with_stats and n_q:
        summary.rmse = float(np.sqrt(sum(r["stats"]["rmse"] ** 2 * r["num_elements"] for r in with_stats) / n_q))
        summary.max_abs = max(r["stats"]["max_abs"] for r in with_stats)
        summary.sqnr_db = float(np.mean([r["stats"]["sqnr_db"] for r in with_stats]))
    return summary


# ----------------------------------------------------------------------------- dequantize


def dequantize_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> int:
    """Writes a plain safetensors copy of a packed checkpoint (one output shard per input
    shard, so memory peaks at one shard). Dequantized weights take ``dtype`` (default: the
    dtype recorded in their quant state; for int8, config.json's model dtype, else float32);
    other tensors are copied as they are. Returns the number of weights dequantized."""
    dtype = COMPUTE_DTYPES.get(dtype, dtype) if dtype else None
    if dtype is not None and dtype not in COMPUTE_DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not one of {list(COMPUTE_DTYPES)}")
    src, out = Path(src), Path(out)
    ckpt = Checkpoint(src)
    ckpt.check_side_files()  # what will be copied along: regular files and folders only
    outputs.check_output(out, input_paths(ckpt), overwrite)  # before any work (again once locked)
    weights = packed_weights(ckpt)
    owned = {k: w for w in weights.values() for k in w.keys}
    sharded = len(ckpt.files) > 1
    weight_map: dict[str, str] = {}
    total = 0
    with staged_output(out, overwrite, input_paths(ckpt), "dequantize") as staging:
        for f in ckpt.files:
            file_name = f.name if sharded else SINGLE_FILE
            items = []
            for e in ckpt.entries.values():
                if e.file != f:
                    continue
                w = owned.get(e.name)
                if w is not None and e.name != w.name:
                    continue  # a constant of a packed weight
                if w is not None:
                    arr = dequantize_weight(ckpt, w, dtype)
                    arr_dtype = dtype or w.dtype
                    st_dtype = _SAFETENSORS_NAMES[arr_dtype]
                else:
                    arr, st_dtype = ckpt.read(e.name), e.dtype
                arr = np.ascontiguousarray(arr)
                items.append((e.name, st_dtype, list(arr.shape), arr.reshape(-1).view(np.uint8)))
                weight_map[e.name] = file_name
                total += arr.nbytes
                if on_tensor is not None:
                    on_tensor(e.name)
            _core.write_safetensors_file(str(staging / file_name), items, {"format": "pt"})
        if sharded:
            _write_json(staging / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        if ckpt.path.is_dir():
            copy_side_files(ckpt.path, staging)
        config = ckpt.config()
        if config is not None:
            config.pop("quantization_config", None)
            _write_json(staging / CONFIG_FILE, config)
    return len(weights)


# ----------------------------------------------------------------------------- inspect, verify


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A description of every tensor: format, shape, dtype, bytes and bits per parameter. A
    PEFT / nybble adapter folder is described too: its tensors, and under ``"adapter"`` the
    fields of its adapter_config.json."""
    from .model import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    path = Path(path)
    adapter = None
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not _model_files_in(path):
        config = _files.read_json_file(path / ADAPTER_CONFIG)
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: expected a JSON object, got {type(config).__name__}")
        adapter = {k: config.get(k) for k in _ADAPTER_FIELDS if k in config}
        path = path / ADAPTER_WEIGHTS
    ckpt = Checkpoint(path)
    weights = packed_weights(ckpt)
    owned = {k for w in weights.values() for k in w.keys}
    rows = []
    for w in weights.values():
        nbytes = _nbytes(ckpt, w.keys)
        fmt_name = w.format + ("+dq" if w.double_quant else "") + (f"/{w.blocksize}" if w.blocksize else "")
        rows.append(
            {
                "name": w.name,
                "format": fmt_name,
                "shape": list(w.shape),
                "dtype": w.dtype,
                "bytes": nbytes,
                "params": w.numel,
                "bits_per_param": 8 * nbytes / max(w.numel, 1),
                **({"quant_storage": w.quant_storage} if w.quant_storage else {}),
            }
        )
    for e in ckpt.entries.values():
        if e.name in owned:
            continue
        n = int(np.prod(e.shape, dtype=np.int64))
        rows.append(
            {
                "name": e.name,
                "format": "plain",
                "shape": list(e.shape),
                "dtype": fmt.dtype_name(e.dtype),
                "bytes": e.nbytes,
                "params": n,
                "bits_per_param": 8 * e.nbytes / n if n else 0.0,
            }
        )
    rows.sort(key=lambda r: r["name"])
    config = ckpt.config() or {}
    return {
        "path": str(ckpt.path),
        "files": [str(f) for f in ckpt.files],
        "metadata": ckpt.metadata,
        "quantization_config": config.get("quantization_config"),
        "tensors": rows,
        "total_bytes": sum(r["bytes"] for r in rows),
        "total_params": sum(r["params"] for r in rows),
        **({"adapter": adapter} if adapter is not None else {}),
    }


#: The adapter_config.json fields ``inspect`` reports.
_ADAPTER_FIELDS = ("peft_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
                   "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def _model_files_in(folder: Path) -> bool:
    return any((folder / name).exists() for name in (SINGLE_FILE, INDEX_FILE))


@dataclass
class VerifyRow:
    name: str
    format: str
    ok: bool
    note: str = ""
    rmse: float | None = None
    max_abs: float | None = None
    sqnr_db: float | None = None


#: verify's default floor on each packed weight's SQNR (dB) against the original, by format.
#: Measured on all-MiniLM-L6-v2 (37 linear weights; min / mean per-tensor SQNR): nf4
#: blocksize 64 + DQ (the default) 20.1 / 20.6 dB, fp4/64 17.2 / 17.9, nf4/4096 14.0 / 17.4,
#: fp4/4096 10.2 / 13.9, int8 33.5 / 41.2. 8 dB leaves the default NF4 pass 12 dB of margin
#: and every supported 4-bit setting 2 dB or more; a wrong decode (bad scales, codebook or
#: blocksize) lands near or below 0 dB.
DEFAULT_MIN_SQNR_DB = {"nf4": 8.0, "fp4": 8.0, "int8": 20.0}


def verify_checkpoint(
    original: str | os.PathLike,
    packed: str | os.PathLike,
    *,
    min_sqnr_db: float | None = None,
    max_rmse: float | None = None,
) -> list[VerifyRow]:
    """Compares every tensor of ``packed`` with ``original``: error statistics for packed
    weights, exact equality for everything else. A row is not ok when a tensor is missing,
    shapes differ, a copied tensor changed, or a packed weight's SQNR is below
    ``min_sqnr_db`` (default: :data:`DEFAULT_MIN_SQNR_DB` for its format; NaN fails) or its
    RMSE above ``max_rmse`` (default: no limit).

    ``original`` must be the dense checkpoint and ``packed`` the quantized one: either the
    wrong way round (``original`` holding packed weights, or ``packed`` none) is a
    :class:`CheckpointError` (swapped arguments), not a table of mismatches."""
    from .stats import error_stats

    for name, value in (("min_sqnr_db", min_sqnr_db), ("max_rmse", max_rmse)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or value != value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if max_rmse is not None and max_rmse < 0:
        raise ValueError(f"max_rmse must be >= 0, got {max_rmse}")
    orig, pk = Checkpoint(original), Checkpoint(packed)
    dense_side = packed_weights(orig)
    if dense_side:
        first = next(iter(dense_side))
        raise CheckpointError(f"{original}: holds packed weights ({first!r}, ...); the first argument must be the "
                              f"dense original and the second the packed checkpoint (are they swapped?)")
    weights = packed_weights(pk)
    if not weights:
        raise CheckpointError(f"{packed}: holds no packed weights; the second argument must be the packed "
                              f"checkpoint (are the arguments swapped?)")
    owned = {k for w in weights.values() for k in w.keys}
    rows = []
    for w in weights.values():
        if w.name not in orig:
            rows.append(VerifyRow(w.name, w.format, False, "missing from the original"))
            continue
        if orig.entries[w.name].dtype not in _SAFETENSORS_NAMES.values():
            rows.append(VerifyRow(w.name, w.format, False, f"original is {orig.entries[w.name].dtype}, not a float"))
            continue
        ref = orig.read(w.name)
        if tuple(ref.shape) != tuple(w.shape):
            rows.append(VerifyRow(w.name, w.format, False, f"shape {list(ref.shape)} vs {list(w.shape)}"))
            continue
        s = error_stats(np.ascontiguousarray(ref), dequantize_weight(pk, w, "float32"))
        floor = DEFAULT_MIN_SQNR_DB[w.format] if min_sqnr_db is None else float(min_sqnr_db)
        notes = []
        if not s.sqnr_db >= floor:  # NaN fails too
            notes.append(f"SQNR {s.sqnr_db:.2f} dB below the {floor:g} dB floor")
        if max_rmse is not None and not s.rmse <= max_rmse:
            notes.append(f"RMSE {s.rmse:.3g} above the {max_rmse:g} limit")
        rows.append(VerifyRow(w.name, w.format, not notes, "; ".join(notes), s.rmse, s.max_abs, s.sqnr_db))
    for e in pk.entries.values():
        if e.name in owned:
            continue
        if e.name not in orig:
            rows.append(VerifyRow(e.name, "plain", False, "missing from the original"))
        elif orig.entries[e.name].dtype != e.dtype or orig.entries[e.name].shape != e.shape:
            rows.append(VerifyRow(e.name, "plain", False, "dtype or shape differs"))
        else:
            same = orig.read(e.name).tobytes() == pk.read(e.name).tobytes()
            rows.append(VerifyRow(e.name, "plain", same, "identical" if same else "bytes differ"))
    for name in orig.entries:
        if name not in pk and name not in weights:
            rows.append(VerifyRow(name, "-", False, "missing from the packed checkpoint"))
    rows.sort(key=lambda r: r.name)
    return rows
