"""nybble as a transformers quantization backend.

``transformers.AutoModel*.from_pretrained(path, quantization_config=NybbleConfig(...))``:

* ``path`` dense: every ``nn.Linear`` (and GPT-2's ``Conv1D``) but the output layer, the
  model's ``_keep_in_fp32_modules`` and ``skip_modules`` becomes a :class:`nybble.nn.Linear4bit`
  (``quant="nf4"|"fp4"``) or :class:`nybble.nn.Linear8bitLt` (``"int8"``). Each weight is
  quantized as transformers reads it (on the device ``device_map`` gives it), so the dense
  model is never held: peak memory is the packed model plus about one dense layer.
* ``path`` packed (``nybble quantize`` or transformers + bitsandbytes ``save_pretrained``):
  the checkpoint decides, layer by layer, which Linear is packed and how (quant type,
  blocksize, double quant, storage dtype from each weight's quant_state); the packed bytes
  load as they are, nothing is dequantized.

``save_pretrained`` writes the bitsandbytes layout with the bytes ``nybble quantize`` writes
(:mod:`nybble.formats` spells it) and a bitsandbytes ``quantization_config``, so plain
transformers + bitsandbytes load the result.

Hooks: :func:`transformers.quantizers.register_quantization_config` /
:func:`~transformers.quantizers.register_quantizer` (name ``"nybble"``) and an ``HfQuantizer``
subclass using transformers 5's weight-conversion API (``get_quantize_ops``,
``serialized_names``, ``get_load_operations``). One thing the public hooks cannot express:
a checkpoint whose ``config.json`` carries a bitsandbytes ``quantization_config`` always gets
a ``BitsAndBytesConfig``, and transformers refuses a ``quantization_config`` argument of
another class. :func:`register` therefore wraps ``AutoHfQuantizer.merge_quantization_configs``
so that a :class:`NybbleConfig` argument takes over such a checkpoint (any other argument is
passed through unchanged).

Supported: transformers 5 with that conversion API (tested with 5.24.0). transformers 4's
quantizer API (``create_quantized_param``) is not supported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch
import transformers
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoHfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import formats
from ..model import _name_matches, _output_layer_names, _set_module
from ..nn import Linear4bit, Linear8bitLt

try:
    from transformers.core_model_loading import ConversionOps
except ImportError as err:  # pragma: no cover - transformers 4
    raise ImportError(
        f"nybble's transformers integration needs transformers 5 (weight-conversion API); found "
        f"transformers {transformers.__version__}"
    ) from err

__all__ = ["METHOD", "NybbleConfig", "NybbleHfQuantizer", "register"]

#: The name nybble is registered under with transformers (``quant_method``).
METHOD = "nybble"
QUANTS = ("nf4", "fp4", "int8")
_QUANTIZED = (Linear4bit, Linear8bitLt)


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    name = str(dtype).replace("torch.", "")
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(name, name)


def _torch_dtype(dtype: Any) -> torch.dtype | None:
    name = _dtype_name(dtype)
    if name is None:
        return None
    out = getattr(torch, name, None)
    if not isinstance(out, torch.dtype) or not out.is_floating_point:
        raise ValueError(f"compute_dtype {dtype!r} is not a torch floating dtype")
    return out


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``peft`` is first imported, wraps its loader so that nybble's
    PEFT dispatch (:mod:`nybble.integrations.peft`) is installed right after peft's own code
    runs. nybble never imports peft itself: peft imports bitsandbytes, which prints warnings
    (and costs seconds) on every import, and a user who never imports peft pays for neither."""

    def find_spec(self, name, path, target=None):
        if name != "peft":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # by the finders after this one
        if spec is not None and spec.loader is not None:
            spec.loader = _InstallAfter(spec.loader)
        return spec


class _InstallAfter(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        install_peft_dispatch()


def install_peft_dispatch() -> None:
    """PEFT's LoRA over nybble layers: installed now when peft is imported already, else as
    soon as it is (nybble does not import peft for it)."""
    if "peft" in sys.modules and getattr(sys.modules["peft"], "LoraConfig", None) is not None:
        from . import peft as _peft  # noqa: F401 - importing it installs the dispatch
    elif importlib.util.find_spec("peft") is not None and not any(
            isinstance(f, _AfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())


class NybbleConfig(QuantizationConfigMixin):
    """How ``from_pretrained`` quantizes (or reads) a model with nybble.

    Args:
        quant: ``"nf4"`` / ``"fp4"`` (block-wise 4-bit, :class:`nybble.nn.Linear4bit`) or
            ``"int8"`` (LLM.int8(), :class:`nybble.nn.Linear8bitLt`).
        blocksize: 4-bit block size (64 as in QLoRA).
        double_quant: quantize the 4-bit absmax constants again (QLoRA's double quant).
        compute_dtype: dtype of the 4-bit matmuls (``torch.bfloat16``, ``"float32"``, ...);
            ``None`` computes in the activations' dtype.
        quant_storage: dtype the packed 4-bit bytes are stored as (``torch.uint8``, or
            ``torch.bfloat16`` / ``float16`` / ``float32`` for FSDP), bitsandbytes'
            ``bnb_4bit_quant_storage``.
        skip_modules: module names (full path or last components, PEFT's rule) kept dense, on
            top of the output layer and the model's ``_keep_in_fp32_modules``.
        threshold: LLM.int8() outlier threshold.

    For a packed checkpoint the checkpoint's own format wins; only ``compute_dtype`` (when
    given) and ``threshold`` apply. ``to_dict()`` is the bitsandbytes ``quantization_config``
    that ``save_pretrained`` writes into ``config.json``.
    """

    def __init__(
        self,
        quant: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: Any = None,
        quant_storage: Any = torch.uint8,
        skip_modules: Iterable[str] | None = None,
        threshold: float = 6.0,
        **kwargs,
    ):
        if quant not in QUANTS:
            raise ValueError(f"quant {quant!r} is not one of {QUANTS}")
        self.quant_method = METHOD
        self.quant = quant
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.compute_dtype = _torch_dtype(compute_dtype)
        self.quant_storage = getattr(torch, formats.quant_storage_name(quant_storage))
        if quant == "int8" and self.quant_storage != torch.uint8:
            raise ValueError("quant_storage applies to 4-bit weights only, not int8")
        if quant != "int8":
            from ..kernels.reference import check_blocksize

            check_blocksize(self.blocksize)
        self.skip_modules = None if skip_modules is None else list(skip_modules)
        self.threshold = float(threshold)
        # Set by the quantizer: the dense 2-D modules save_pretrained lists as skipped.
        self._saved_skip_modules: list[str] | None = None
        self.unused_kwargs = kwargs

    # -------------------------------------------------------------- transformers' config API

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """A NybbleConfig from its own fields or from a bitsandbytes ``quantization_config``."""
        config_dict = dict(config_dict)
        if config_dict.get("quant_method", METHOD) == METHOD and "quant" in config_dict:
            config_dict.pop("quant_method", None)
            config_dict = {k: v for k, v in config_dict.items() if not k.startswith("_")}
            config = cls(**config_dict)
        else:
            config = cls.from_bitsandbytes(config_dict)
        unused = config.update(**kwargs)
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def from_bitsandbytes(cls, qc: Any, loading: NybbleConfig | None = None) -> NybbleConfig:
        """The NybbleConfig reading a checkpoint saved with bitsandbytes' ``quantization_config``
        (a dict or a ``BitsAndBytesConfig``); ``loading``'s compute dtype and threshold apply."""
        if not isinstance(qc, dict):
            qc = qc.to_dict()
        bnb = formats.parse_quantization_config(qc)
        if not (bnb.load_in_4bit or bnb.load_in_8bit):
            raise ValueError("quantization_config: neither load_in_4bit nor load_in_8bit is set")
        compute = bnb.compute_dtype
        if loading is not None and loading.compute_dtype is not None:
            compute = loading.compute_dtype
        config = cls(
            quant=bnb.quant_type if bnb.load_in_4bit else "int8",
            double_quant=bnb.double_quant if bnb.load_in_4bit else False,
            compute_dtype=compute,
            quant_storage=bnb.quant_storage if bnb.load_in_4bit else "uint8",
            skip_modules=bnb.skip_modules,
            threshold=loading.threshold if loading is not None else bnb.threshold,
        )
        if loading is not None:
            config.blocksize = loading.blocksize
        return config

    def to_dict(self) -> dict[str, Any]:
        """The bitsandbytes ``quantization_config`` (:func:`nybble.formats.quantization_config`),
        what ``save_pretrained`` writes: plain transformers + bitsandbytes load the folder."""
        skip = self._saved_skip_modules if self._saved_skip_modules is not None else self.skip_modules
        compute = _dtype_name(self.compute_dtype) or "float32"
        out = formats.quantization_config(self.quant, self.double_quant, compute, skip, self.quant_storage)
        out["llm_int8_threshold"] = self.threshold
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __repr__(self) -> str:
        return (f"NybbleConfig(quant={self.quant!r}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}, quant_storage={self.quant_storage}, "
                f"skip_modules={self.skip_modules}, threshold={self.threshold})")


# ------------------------------------------------------------------------ modules being loaded


class _Pending:
    """Mixin of a nybble layer whose weight transformers has not delivered yet (it lives on
    the meta device). Its state dict is ``weight`` (and ``bias``) as bitsandbytes' modules
    have before loading, which is what transformers' loader expects of a leaf module; the
    quantizer's conversion ops fill the module and turn it into the plain nybble class."""

    _nybble_final: type

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def forward(self, x):
        raise RuntimeError("this nybble layer has not been loaded yet (its weight is still on the meta device)")


class _Pending4bit(_Pending, Linear4bit):
    _nybble_final = Linear4bit


class _Pending8bit(_Pending, Linear8bitLt):
    _nybble_final = Linear8bitLt


def _finish(module: nn.Module) -> None:
    """The layer is loaded: its plain nybble class, and every tensor flagged as initialised so
    that transformers' weight init (which a parent's ``_init_weights`` may apply to a child's
    ``weight`` by name, as GPT-2's does to ``c_proj.weight``) leaves the packed bytes alone."""
    if isinstance(module, _Pending):
        module.__class__ = module._nybble_final
    module._is_hf_initialized = True
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        t._is_hf_initialized = True


def _materialize_constants(module: nn.Module, device: torch.device) -> None:
    """Moves the constants built at construction (the 4-bit code table) to ``device``."""
    if isinstance(module, Linear4bit) and module.quant_map_bits.device != device:
        module.quant_map_bits = module.quant_map_bits.to(device)


def _layer_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from transformers.pytorch_utils import Conv1D

    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear or isinstance(m, Conv1D)]


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    in_features, out_features = module.weight.shape  # Conv1D stores (in, out)
    return int(in_features), int(out_features)


# ------------------------------------------------------------------------ checkpoint headers


class _CheckpointIndex:
    """Names and dtypes of the tensors of the safetensors files transformers is about to read
    (headers only), and the small quant_state JSON entries."""

    def __init__(self, files: Iterable[str] | None):
        self.files: dict[str, str] = {}
        self.dtypes: dict[str, str] = {}
        for f in files or ():
            if not str(f).endswith(".safetensors"):
                continue
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    self.files[k] = str(f)
                    self.dtypes[k] = h.get_slice(k).get_dtype()

    def __bool__(self) -> bool:
        return bool(self.files)

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[key], framework="pt") as h:
            return h.get_tensor(key)

    def key_for(self, model: nn.Module, name: str) -> str | None:
        """The checkpoint key of module ``name``'s weight, with or without the model's
        ``base_model_prefix`` (as transformers matches them)."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        candidates = [f"{name}.weight"]
        if prefix:
            candidates += [f"{name.removeprefix(prefix + '.')}.weight", f"{prefix}.{name}.weight"]
        return next((k for k in candidates if k in self.files), None)


# ------------------------------------------------------------------------ conversion ops


class _Identity(ConversionOps):
    """Saving: the modules' state dicts already hold the serialized (bitsandbytes) names."""

    def convert(self, input_dict, **kwargs):
        return input_dict

    @property
    def reverse_op(self):
        return _Identity()


def _file_mappings() -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of this process's safetensors file mappings (Linux; else none)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].strip().endswith(".safetensors"):
            lo, hi = parts[0].split("-")
            out.append((int(lo, 16), int(hi, 16), parts[5].strip()))
    return out


_MAPPINGS: list[tuple[int, int, str]] = []


_LIBC: list = []


def _libc():
    if not _LIBC:
        import ctypes

        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:  # pragma: no cover - no C library to call
            _LIBC.append(None)
    return _LIBC[0]


def _trim_heap() -> None:
    """Returns freed heap memory to the system (glibc ``malloc_trim``). A dense weight cast at
    load (a bf16 checkpoint read as float32) is a heap copy of a few MiB; glibc keeps such
    freed blocks, so without this the process would grow by about the dense model's size."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def _release_file_pages(t: torch.Tensor) -> bool:
    """Drops from this process the checkpoint pages a dense weight was read through, once it
    is quantized: transformers reads safetensors through a shared read-only file mapping, so
    without this every weight's pages would stay resident (as page cache mapped into the
    process) until the load ends. Only whole pages inside a safetensors file mapping are
    touched (``madvise(MADV_DONTNEED)``; the file's data stays in the page cache). Returns
    whether ``t`` lies in such a mapping."""
    if t.device.type != "cpu" or t.numel() == 0 or not hasattr(os, "sysconf"):
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = -(-start // page) * page, end // page * page
    if hi <= lo:
        return False
    if not any(a <= lo and hi <= b for a, b, _ in _MAPPINGS):
        _MAPPINGS[:] = _file_mappings()  # a file opened since the last look
        if not any(a <= lo and hi <= b for a, b, _ in _MAPPINGS):
            return False
    import ctypes

    libc = _libc()
    if libc is not None:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED
    return True


def _release_checkpoint_mappings(paths: set[str]) -> None:
    """Drops the resident pages of every mapping of the checkpoint files being loaded: a weight
    cast at load (bf16 read as float32) was read through them, then copied, so its pages
    cannot be found from the copy. Safe for a read-only file mapping (pages come back from
    the page cache on the next access, e.g. a dense weight still viewing the file)."""
    libc = _libc()
    if libc is None or not paths:
        return
    import ctypes

    if not any(path in paths for _, _, path in _MAPPINGS):
        _MAPPINGS[:] = _file_mappings()  # (they stay put during a load: read once)
    for lo, hi, path in _MAPPINGS:
        if path in paths:
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


class NybbleQuantize(ConversionOps):
    """Quantizes a dense weight into its (pending) nybble layer as transformers reads it."""

    def __init__(self, hf_quantizer: NybbleHfQuantizer):
        self.hf_quantizer = hf_quantizer

    #: The previous weight was a heap copy (freed once its op returned): trim before the next.
    _heap_copy = False

    @torch.no_grad()
    def convert(self, input_dict, model=None, missing_keys=None, **kwargs):
        if NybbleQuantize._heap_copy:
            _trim_heap()
        for name, value in input_dict.items():
            raw = value = value[0] if isinstance(value, list) else value
            module_name = name.rpartition(".")[0]
            module = model.get_submodule(module_name)
            if getattr(module, "_nybble_transpose", False):
                value = value.t()
            value = value.contiguous()
            if isinstance(module, Linear4bit):
                module.weight = torch.empty(0, dtype=module.quant_storage, device=value.device)
                module.weight_dtype = value.dtype if value.dtype in (torch.float16, torch.bfloat16) else torch.float32
            else:
                module.weight = torch.empty(0, dtype=torch.int8, device=value.device)
                # bitsandbytes' Int8Params quantizes the float16 cast (so does nybble quantize):
                # the same SCB and codes, bit for bit.
                value = value.to(torch.float16)
            module.set_weight(value)
            _materialize_constants(module, value.device)
            _finish(module)
            del value
            copied = not _release_file_pages(raw)
            if copied:
                _release_checkpoint_mappings(getattr(self.hf_quantizer, "_checkpoint_paths", set()))
            NybbleQuantize._heap_copy = copied and raw.device.type == "cpu"
            if missing_keys is not None:
                missing_keys.discard(name)
        return {}

    @property
    def reverse_op(self):
        return _Identity()


class NybbleDeserialize(ConversionOps):
    """Loads the serialized tensors of one packed weight (bitsandbytes' names) into its nybble
    layer through the layer's own ``load_state_dict``; any other ``*.weight`` passes through."""

    def __init__(self, hf_quantizer: NybbleHfQuantizer):
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict, model=None, full_layer_name=None, missing_keys=None, **kwargs):
        tensors = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
        module_name, _, _ = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if not isinstance(module, _Pending):
            # A dense weight (norm, embedding, a skipped Linear) matched by the "weight" pattern.
            if len(tensors) != 1:
                raise ValueError(f"{full_layer_name}: packed tensors {sorted(tensors)} for a "
                                 f"{type(module).__name__} that nybble does not quantize")
            ((key, value),) = tensors.items()
            try:
                target = model.get_parameter_or_buffer(full_layer_name)
            except AttributeError:
                target = None
            if target is not None and target.is_floating_point() and value.is_floating_point():
                value = value.to(target.dtype)
            return {key: value}
        weight = tensors.get("weight")
        if weight is None:
            raise ValueError(f"{full_layer_name}: the checkpoint has {sorted(tensors)} but no packed weight")
        device = weight.device
        final = module._nybble_final
        module.__class__ = final
        module.weight = torch.empty(0, dtype=module.weight.dtype, device=device)
        result = module.load_state_dict(tensors, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{module_name}: unexpected packed tensors {result.unexpected_keys}")
        _materialize_constants(module, device)
        _finish(module)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}

    @property
    def reverse_op(self):
        return _Identity()


# ------------------------------------------------------------------------ the quantizer


class NybbleHfQuantizer(HfQuantizer):
    """transformers' quantizer for :class:`NybbleConfig` (see the module docstring)."""

    requires_calibration = False
    quantization_config: NybbleConfig

    #: The bitsandbytes names a packed weight is stored under ("weight" first: saving maps
    #: each key to itself).
    serialized_names = {
        "weight": [
            "weight",
            f"weight.{formats.ABSMAX}",
            f"weight.{formats.QUANT_MAP}",
            f"weight.{formats.NESTED_ABSMAX}",
            f"weight.{formats.NESTED_QUANT_MAP}",
            *(formats.quant_state_key("weight", t) for t in formats.QUANT_TYPES),
            formats.SCB,
            formats.WEIGHT_FORMAT,
        ]
    }

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("nybble layers cannot be offloaded to disk; use a device_map of CPU and GPU devices")

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module_name, _, name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            return False
        return isinstance(module, _Pending) and name == "weight"

    # -------------------------------------------------------------- building the layers

    def _skip_rule(self, model) -> set[str]:
        skip = set(_output_layer_names(model))
        skip |= set(self.quantization_config.skip_modules or ())
        skip |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
        return skip

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        index = _CheckpointIndex(checkpoint_files)
        self._index = index
        _MAPPINGS.clear()  # mappings of an earlier load are gone
        self._checkpoint_paths = {os.path.realpath(f) for f in checkpoint_files or ()}
        if self.pre_quantized and index:
            plan = self._plan_from_checkpoint(model, index)
        else:
            plan = self._plan_from_config(model, index)
        for name, module, new in plan:
            from transformers.pytorch_utils import Conv1D

            if isinstance(module, Conv1D):
                new._nybble_transpose = True
            if not self.pre_quantized and index:
                key = index.key_for(model, name)
                if key is not None:
                    # Where the dense weight came from (LoftQ / PiSSA read it again).
                    new._nybble_dense_source = (index.files[key], key)
            new.requires_grad_(False)
            _set_module(model, name, new)
        return model

    def _new_layer(self, module, quant, blocksize, double_quant, weight_dtype=torch.float32, storage=None):
        cfg = self.quantization_config
        in_f, out_f = _in_out(module)
        bias = getattr(module, "bias", None) is not None
        if quant == "int8":
            return _Pending8bit(in_f, out_f, bias, cfg.threshold)
        return _Pending4bit(in_f, out_f, bias, quant, blocksize, double_quant, cfg.compute_dtype,
                            weight_dtype=weight_dtype,
                            quant_storage=cfg.quant_storage if storage is None else storage)

    def _plan_from_config(self, model, index):
        cfg = self.quantization_config
        skip = self._skip_rule(model)
        plan = []
        for name, module in _layer_modules(model):
            if _name_matches(name, skip):
                continue
            if index and index.key_for(model, name) is None:
                continue  # not in the checkpoint (a new head): initialised by transformers, kept dense
            if cfg.quant != "int8":
                formats.packed_shape(math_prod(_in_out(module)), cfg.quant_storage)  # raises for odd sizes
            plan.append((name, module, self._new_layer(module, cfg.quant, cfg.blocksize, cfg.double_quant)))
        return plan

    def _plan_from_checkpoint(self, model, index):
        """One layer per packed weight the checkpoint holds, in that weight's own format."""
        plan = []
        for name, module in _layer_modules(model):
            key = index.key_for(model, name)
            if key is None:
                continue
            qs_key = next((k for k in (formats.quant_state_key(key, t) for t in formats.QUANT_TYPES) if k in index),
                          None)
            scb_key = formats.int8_keys(key)[1]
            if qs_key is not None:
                qs = formats.parse_quant_state(formats.decode_quant_state(index.read(qs_key)))
                storage = formats.quant_storage_of(index.dtypes[key]) or "uint8"
                new = self._new_layer(module, qs.quant_type, qs.blocksize, qs.double_quant,
                                      getattr(torch, qs.dtype), storage)
            elif scb_key in index:
                new = self._new_layer(module, "int8", 0, False)
            else:
                continue
            plan.append((name, module, new))
        return plan

    # -------------------------------------------------------------- after loading

    def _process_model_after_weight_loading(self, model, **kwargs):
        pending = [n for n, m in model.named_modules() if isinstance(m, _Pending)]
        if pending:
            raise ValueError(f"the checkpoint has no weights for the nybble layers {pending[:5]}"
                             f"{' ...' if len(pending) > 5 else ''}")
        layers = [m for m in model.modules() if isinstance(m, _QUANTIZED)]
        for m in layers:
            m.requires_grad_(False)
        four = any(isinstance(m, Linear4bit) for m in layers)
        eight = any(isinstance(m, Linear8bitLt) for m in layers)
        # PEFT's / TRL's k-bit recipes (prepare_model_for_kbit_training, gradient checkpointing
        # with input grads) key on these flags; transformers' num_parameters() imports
        # bitsandbytes when is_loaded_in_4bit is set, so they are set only where it imports.
        if importlib.util.find_spec("bitsandbytes") is not None:
            model.is_loaded_in_4bit = four
            model.is_loaded_in_8bit = eight and not four
        model.is_nybble_quantized = True
        install_peft_dispatch()
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: dense ``nn.Linear`` layers (adapters merged first)."""
        from ..model import dequantize_model

        return dequantize_model(model, _torch_dtype(dtype) or torch.bfloat16)

    def get_quantize_ops(self):
        return NybbleQuantize(self)

    def get_load_operations(self):
        return {"deserialize": NybbleDeserialize}

    def get_state_dict_and_metadata(self, model):
        """The state dict in bitsandbytes' layout with the bytes ``nybble quantize`` writes:
        the double-quant JSON padded as its Rust writer pads it; the config's skip list names
        every dense 2-D weight (as ``nybble quantize`` does) so bitsandbytes keeps them dense."""
        state = model.state_dict()
        for key, value in list(state.items()):
            if formats.split_quant_state_key(key) is not None:
                fields = formats.decode_quant_state(value)
                blob = formats.encode_quant_state(fields, padded=True)
                state[key] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(value.device)
        packed = {n for n, m in model.named_modules() if isinstance(m, _QUANTIZED)}
        prefix = getattr(model, "base_model_prefix", "") or ""
        kept = {k.removesuffix(".weight") for k, t in state.items()
                if k.endswith(".weight") and t.ndim == 2 and t.is_floating_point()
                and k.removesuffix(".weight") not in packed}
        if prefix:
            kept = {k.removeprefix(prefix + ".") if k.startswith(prefix + ".") else k for k in kept} | kept
        self.quantization_config._saved_skip_modules = sorted(kept | {"lm_head"})
        return state, {}


def math_prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


# ------------------------------------------------------------------------ registration

def _merge_quantization_configs(cls, quantization_config, quantization_config_from_args):
    """``AutoHfQuantizer.merge_quantization_configs`` with one addition: a NybbleConfig
    argument reads a checkpoint saved with a bitsandbytes quantization_config."""
    if isinstance(quantization_config_from_args, NybbleConfig):
        if isinstance(quantization_config, NybbleConfig):
            return quantization_config
        qc = quantization_config if isinstance(quantization_config, dict) else quantization_config.to_dict()
        method = qc.get("quant_method")
        if method not in ("bitsandbytes", METHOD, None) and not (qc.get("load_in_4bit") or qc.get("load_in_8bit")):
            raise ValueError(f"the checkpoint is quantized with {method!r}; NybbleConfig reads bitsandbytes-layout "
                             f"checkpoints (nybble's or transformers + bitsandbytes')")
        return NybbleConfig.from_bitsandbytes(qc, loading=quantization_config_from_args)
    return AutoHfQuantizer._nybble_original_merge(quantization_config, quantization_config_from_args)


def register() -> None:
    """Registers :class:`NybbleConfig` and :class:`NybbleHfQuantizer` with transformers under
    ``"nybble"`` (idempotent; done when this module is imported)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not NybbleConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)  # a stale class from a reloaded module
        register_quantization_config(METHOD)(NybbleConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is not NybbleHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        register_quantizer(METHOD)(NybbleHfQuantizer)
    if not hasattr(AutoHfQuantizer, "_nybble_original_merge"):
        AutoHfQuantizer._nybble_original_merge = AutoHfQuantizer.merge_quantization_configs
    AutoHfQuantizer.merge_quantization_configs = classmethod(_merge_quantization_configs)


register()
