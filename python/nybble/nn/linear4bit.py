"""4-bit (NF4 / FP4) Linear holding its packed weight, state-dict compatible with
bitsandbytes / transformers checkpoints."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import formats, kernels
from ..kernels import _cpu
from ..codebooks import code_4bit

# State-dict keys under the module's prefix (nybble.formats spells the layout).
_WEIGHT = "weight"
_ABSMAX, _QUANT_MAP = f"weight.{formats.ABSMAX}", f"weight.{formats.QUANT_MAP}"
_NESTED_ABSMAX, _NESTED_QUANT_MAP = f"weight.{formats.NESTED_ABSMAX}", f"weight.{formats.NESTED_QUANT_MAP}"


def _quant_state_key(quant_type: str) -> str:
    return formats.quant_state_key(_WEIGHT, quant_type)


def _storage_dtype(quant_storage) -> torch.dtype:
    return getattr(torch, formats.quant_storage_name(quant_storage))


def _f32_bits(t: torch.Tensor) -> torch.Tensor:
    # float32 constants live in int32 buffers so module.to(dtype) cannot round them, in
    # aligned memory (the core reads them as f32 slices).
    return _cpu.aligned_float32(t.detach()).view(torch.int32)


def _version(t: torch.Tensor) -> int | None:
    # In-place torch ops bump a tensor's version; inference tensors have no counter (they
    # can be changed in place only inside inference mode).
    return None if t.is_inference() else t._version


def _decode_dtype(dtype: torch.dtype) -> torch.dtype:
    # 16/32-bit floats decode directly; others (float64) from the float32 decode.
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


class Linear4bit(nn.Module):
    """A frozen Linear whose weight is stored block-wise in 4 bits.

    State-dict keys follow bitsandbytes (:mod:`nybble.formats`): ``weight`` (packed uint8, or
    the same bytes as the ``quant_storage`` dtype), ``weight.absmax``,
    ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map`` and
    ``weight.quant_state.bitsandbytes__nf4`` (JSON), so checkpoints written by
    transformers + bitsandbytes load directly.

    With double quantization the float32 absmax is decoded once and cached
    (:meth:`float_absmax`); the state dict still holds the bitsandbytes layout.
    """

    #: Keep the decoded float32 absmax of a double-quantized weight between calls.
    cache_absmax: bool = True

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype = torch.float32,
        device=None,
        quant_storage: torch.dtype = torch.uint8,
    ):
        super().__init__()
        if quant_type not in formats.QUANT_TYPES:
            raise ValueError(f"quant_type {quant_type!r} is not 'nf4' or 'fp4'")
        # bitsandbytes' quant_storage: the packed bytes as uint8, or viewed as bf16 / fp16 / fp32
        # (for FSDP); ``weight`` is that stored tensor, ``packed_uint8()`` its bytes.
        self.quant_storage = _storage_dtype(quant_storage)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        self.weight_dtype = weight_dtype  # dtype of the original weight (quant_state "dtype")
        n = in_features * out_features
        nblocks = math.ceil(n / blocksize)
        shape = formats.packed_shape(n, self.quant_storage)
        self.register_buffer("weight", torch.zeros(shape, dtype=self.quant_storage, device=device))
        if double_quant:
            self.register_buffer("absmax_codes", torch.zeros(nblocks, dtype=torch.uint8, device=device))
            nested = math.ceil(nblocks / formats.NESTED_BLOCKSIZE)
            self.register_buffer("nested_absmax_bits", torch.zeros(nested, dtype=torch.int32, device=device))
            self.register_buffer("nested_code_bits", torch.zeros(256, dtype=torch.int32, device=device))
            self.register_buffer("offset_bits", torch.zeros((), dtype=torch.int32, device=device))
            self.absmax_bits = None
        else:
            self.register_buffer("absmax_bits", torch.zeros(nblocks, dtype=torch.int32, device=device))
            self.absmax_codes = self.nested_absmax_bits = self.nested_code_bits = self.offset_bits = None
        self.register_buffer("quant_map_bits", _f32_bits(torch.from_numpy(code_4bit(quant_type))).to(device))
        self._absmax_cache = None
        self._cpu_views = None  # see _cpu_inference_forward
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    # ------------------------------------------------------------------ building

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> "Linear4bit":
        w = linear.weight.detach()
        m = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            quant_type=quant_type,
            blocksize=blocksize,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            weight_dtype=w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32,
            device=w.device,
            quant_storage=quant_storage,
        )
        m.set_weight(w)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return m

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        """Quantizes a dense (out, in) weight into this module."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(w.shape)} != ({self.out_features}, {self.in_features})")
        packed, absmax = kernels.quantize_4bit(w, self.blocksize, self.quant_type)
        self.set_packed(packed, absmax)

    @torch.no_grad()
    def set_packed(self, packed: torch.Tensor, absmax: torch.Tensor) -> None:
        """Stores 4-bit codes chosen elsewhere (GPTQ, :mod:`nybble.gptq`): ``packed`` uint8
        ``((n+1)//2, 1)`` in :func:`nybble.kernels.quantize_4bit`'s layout and the float32
        ``absmax`` per block, double-quantized here when the module is."""
        n = self.in_features * self.out_features
        if packed.dtype != torch.uint8 or packed.numel() != formats.packed_nbytes(n):
            raise ValueError(f"packed must be {formats.packed_nbytes(n)} uint8 codes, got {packed.numel()} {packed.dtype}")
        if absmax.numel() != math.ceil(n / self.blocksize):
            raise ValueError(f"absmax must hold {math.ceil(n / self.blocksize)} values, got {absmax.numel()}")
        packed = packed.reshape(-1, 1).contiguous()
        absmax = absmax.reshape(-1).to(torch.float32)
        self.invalidate_absmax_cache()
        self.weight = formats.packed_as_storage(packed, self.quant_storage).to(self.weight.device)
        if self.double_quant:
            codes, nested = kernels.double_quantize(absmax)
            self.absmax_codes = codes.to(self.weight.device)
            self.nested_absmax_bits = _f32_bits(nested["nested_absmax"]).to(self.weight.device)
            self.nested_code_bits = _f32_bits(nested["nested_code"]).to(self.weight.device)
            self.offset_bits = _f32_bits(nested["offset"].reshape(())).to(self.weight.device)
        else:
            self.absmax_bits = _f32_bits(absmax).to(self.weight.device)

    # ------------------------------------------------------------------ decoding

    def packed_uint8(self) -> torch.Tensor:
        """The packed codes as uint8 ((n+1)//2, 1), whatever the storage dtype (a view)."""
        return self.weight.view(torch.uint8).reshape(-1, 1)

    def _absmax_args(self) -> tuple:
        """(absmax or its DQ codes, nested_absmax, nested_code, offset): the stored constants,
        as a compute path that decodes per call takes them (torch.compile traces that). The
        offset stays a tensor on the module's device: no host sync."""
        if not self.double_quant:
            return self.absmax_bits.view(torch.float32), None, None, None
        return (self.absmax_codes, self.nested_absmax_bits.view(torch.float32),
                self.nested_code_bits.view(torch.float32), self.offset_bits.view(torch.float32))

    def _member(self, name: str):
        """``self.<name>`` for a buffer without ``Module.__getattr__`` (read per call at
        decode), or the attribute once FSDP2 made it a (frozen) parameter."""
        t = self._buffers.get(name)
        return t if t is not None else getattr(self, name)

    def _dq_sources(self) -> tuple:
        b = self._buffers  # per call at decode: one dict lookup each, not _member's
        if "absmax_codes" in b:
            return (b["absmax_codes"], b["nested_absmax_bits"], b["nested_code_bits"], b["offset_bits"])
        return tuple(map(self._member, ("absmax_codes", "nested_absmax_bits", "nested_code_bits", "offset_bits")))

    def invalidate_absmax_cache(self) -> None:
        """Drops the decoded absmax. Loading, ``set_weight`` / ``set_packed``, device / dtype
        moves, reassigning a constant and in-place torch ops on one do this by themselves;
        call it after writing the constants behind torch's back (``.data``, numpy views)."""
        self._absmax_cache = None

    def _cached_absmax(self) -> torch.Tensor | None:
        """The cached float32 absmax decoded from the DQ constants, if it is still theirs: the
        same tensors (``is``), unchanged since (version counters), the cache itself untouched,
        and not an inference tensor outside inference mode (autograd could not save it)."""
        cache = self.__dict__.get("_absmax_cache")
        if cache is None:
            return None
        (s0, s1, s2, s3), versions, value, value_version = cache
        c0, c1, c2, c3 = self._dq_sources()
        # Checked per forward at decode: spelled out, no generator or map per call.
        if c0 is not s0 or c1 is not s1 or c2 is not s2 or c3 is not s3:
            return None
        if versions != (_version(c0), _version(c1), _version(c2), _version(c3)):
            return None
        if _version(value) != value_version or (value.is_inference() and not torch.is_inference_mode_enabled()):
            return None
        return value

    def float_absmax(self) -> torch.Tensor:
        """The float32 absmax per block (1-D). With double quantization it is decoded once and
        cached on the module (load-time work; 4 bytes per block, an eighth of the packed
        weight's bytes at blocksize 64) until the constants change; ``cache_absmax = False``
        (class or instance attribute) decodes per call instead, keeping only the 8-bit codes."""
        if not self.double_quant:
            return self._absmax_args()[0]
        value = self._cached_absmax()
        if value is not None:
            return value
        absmax, nested_absmax, nested_code, offset = self._absmax_args()
        with torch.no_grad():
            value = kernels.decode_absmax(absmax, nested_absmax, nested_code, offset, 256)
        if self.cache_absmax:
            sources = self._dq_sources()
            self._absmax_cache = (sources, tuple(map(_version, sources)), value, _version(value))
        return value

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in ``dtype`` (default: the compute dtype). The module's W
        is the float32 decode (bitsandbytes' arithmetic); other dtypes are cast from it."""
        dtype = dtype or self.compute_dtype or self.weight_dtype
        w = kernels.dequantize_4bit(self.packed_uint8(), self.float_absmax(), (self.out_features, self.in_features),
                                    self.blocksize, self.quant_type, _decode_dtype(dtype))
        return w.to(dtype)

    def forward(self, x: torch.Tensor, lora=None) -> torch.Tensor:
        """``x W^T + bias`` through the one 4-bit autograd path; x is cast to the compute dtype
        and the result back to x's dtype. ``lora = (A, B, scale, x_lora)`` (from
        :class:`LoraLinear`, through ``__call__`` so module hooks still run) adds the adapter
        term in the same Function; ``x_lora`` None means x as given (before the cast)."""
        if lora is None:
            y = self._cpu_inference_forward(x)
            if y is not None:
                return y
        in_dtype = x.dtype
        x_in = x
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if torch.compiler.is_compiling():  # traced: the decode is one more op in the graph
            absmax, nested_absmax, nested_code, offset = self._absmax_args()
        else:  # eager: the absmax decoded once (load-time work), not per forward
            absmax, nested_absmax, nested_code, offset = self.float_absmax(), None, None, None
        a = b = x_lora = None
        scale = 1.0
        if lora is not None:
            a, b, scale, x_lora = lora
            if x_lora is None and x is not x_in:
                x_lora = x_in  # the adapter runs on the caller's activations, not the cast ones
        return kernels.linear_4bit(x, self.packed_uint8(), absmax, (self.out_features, self.in_features),
                                   self.blocksize, self.quant_type, bias, nested_absmax=nested_absmax,
                                   nested_code=nested_code, offset=offset, lora_a=a, lora_b=b, scale=scale,
                                   x_lora=x_lora, out_dtype=in_dtype, decode_dtype=_decode_dtype(x.dtype))

    def _cpu_inference_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The forward of an eager no-grad call on CPU straight into the fused Rust kernel, or
        None where it does not apply (then :meth:`forward` takes the general path, with the same
        result). At decode the general path's Python costs 0.1 ms per layer in a model (cold
        caches) around a 0.05-0.5 ms kernel: this one reads the buffers without
        ``Module.__getattr__`` and keeps the packed bytes' numpy views."""
        bias = self._parameters.get("bias")
        if not kernels.eager_cpu_inference(x, bias):
            return None
        cd = self.compute_dtype
        xc = x if cd is None or x.dtype == cd else x.to(cd)
        packed = self._member("weight")
        if not packed.is_cpu or x.shape[-1] != self.in_features or not _cpu.fused_4bit_applies(xc, None):
            return None
        if self.double_quant:
            key = absmax = self.float_absmax()  # the cached decode
        else:  # the float32 bits buffer itself: float_absmax() would be a new view per call
            absmax, key = None, self._member("absmax_bits")
        views = self.__dict__.get("_cpu_views")
        if (views is None or views[0] is not packed or views[1] != packed.data_ptr() or views[2] is not key
                or views[3] != key.data_ptr()):
            # The views point at the tensors' memory: rebuilt whenever a tensor or its storage
            # changes (load_state_dict replacing it, FSDP freeing and re-gathering it).
            am = key.view(torch.float32) if absmax is None else absmax
            views = (packed, packed.data_ptr(), key, key.data_ptr(), _cpu.np_view(packed.view(torch.uint8)),
                     _cpu.np_view(am))
            self._cpu_views = views
        y = _cpu.matmul_4bit_views(xc, views[4], views[5], self.out_features, self.in_features, self.blocksize,
                                   self.quant_type, bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}")

    # ------------------------------------------------------------------ state dict (bnb layout)

    def quant_state_json(self) -> dict:
        """The quant_state fields (bitsandbytes' ``QuantState.as_dict`` non-tensor part)."""
        offset = float(self.offset_bits.view(torch.float32)) if self.double_quant else None
        return formats.quant_state_dict(self.quant_type, self.blocksize, str(self.weight_dtype),
                                        (self.out_features, self.in_features), offset)

    def _apply(self, fn, recurse=True):
        # module.to(dtype) / .half() cast floating buffers; a bf16 / fp16 / fp32 quant_storage
        # holds packed codes, not numbers, so it moves (device) as its bytes and never casts.
        self.invalidate_absmax_cache()  # decoded again, on the new device, when next needed
        storage = self.weight.dtype
        if storage == torch.uint8:
            return super()._apply(fn, recurse)
        self.weight = self.weight.view(torch.uint8)
        try:
            return super()._apply(fn, recurse)
        finally:
            self.weight = self.weight.view(storage)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        destination[prefix + _WEIGHT] = self.weight.detach()  # in its quant_storage dtype
        if self.double_quant:
            destination[prefix + _ABSMAX] = self.absmax_codes.detach()
            destination[prefix + _NESTED_ABSMAX] = self.nested_absmax_bits.view(torch.float32).detach()
            destination[prefix + _NESTED_QUANT_MAP] = self.nested_code_bits.view(torch.float32).detach()
        else:
            destination[prefix + _ABSMAX] = self.absmax_bits.view(torch.float32).detach()
        destination[prefix + _QUANT_MAP] = self.quant_map_bits.view(torch.float32).detach()
        blob = formats.encode_quant_state(self.quant_state_json())
        destination[prefix + _quant_state_key(self.quant_type)] = torch.frombuffer(
            bytearray(blob), dtype=torch.uint8
        ).to(self.weight.device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + _quant_state_key(self.quant_type)
        other_type = "fp4" if self.quant_type == "nf4" else "nf4"
        if prefix + _quant_state_key(other_type) in state_dict:
            error_msgs.append(f"{prefix}weight: checkpoint is {other_type}, module is {self.quant_type}")
            return
        needed = [prefix + _WEIGHT, prefix + _ABSMAX, prefix + _QUANT_MAP, key]
        absent = [k for k in needed if k not in state_dict]
        if absent:
            missing_keys.extend(absent)
            return
        # Every field and tensor is validated by the one format module before anything is
        # taken: a bad quant_state is an error message, never a silently wrong layer.
        try:
            qs = formats.parse_quant_state(formats.decode_quant_state(state_dict[key]), self.quant_type)
        except ValueError as err:
            error_msgs.append(f"{key}: {err}")
            return
        if list(qs.shape) != [self.out_features, self.in_features] or qs.blocksize != self.blocksize:
            error_msgs.append(f"{prefix}weight: checkpoint shape {list(qs.shape)} blocksize {qs.blocksize} "
                              f"!= module ({self.out_features}, {self.in_features}) blocksize {self.blocksize}")
            return
        if qs.double_quant != self.double_quant:
            error_msgs.append(f"{prefix}weight: checkpoint double_quant={qs.double_quant}, "
                              f"module double_quant={self.double_quant}")
            return
        if qs.double_quant:
            absent = [prefix + k for k in (_NESTED_ABSMAX, _NESTED_QUANT_MAP) if prefix + k not in state_dict]
            if absent:
                missing_keys.extend(absent)
                return
        try:
            formats.check_4bit_tensors(qs, packed=state_dict[prefix + _WEIGHT], absmax=state_dict[prefix + _ABSMAX],
                                       quant_map=state_dict[prefix + _QUANT_MAP],
                                       nested_absmax=state_dict.get(prefix + _NESTED_ABSMAX),
                                       nested_quant_map=state_dict.get(prefix + _NESTED_QUANT_MAP))
        except ValueError as err:
            error_msgs.append(f"{prefix}weight: {err}")
            return
        # A module built on the meta device (load_quantized) takes the tensors where they are.
        dev = state_dict[prefix + _WEIGHT].device if self.weight.is_meta else self.weight.device
        self.invalidate_absmax_cache()

        def take(name):
            return state_dict[prefix + name].to(dev)

        # The stored bytes, whatever their quant_storage, viewed as this module's storage.
        packed = formats.packed_as_uint8(take(_WEIGHT))
        self.weight = formats.packed_as_storage(packed.contiguous(), self.quant_storage)
        self.weight_dtype = getattr(torch, qs.dtype)
        if qs.double_quant:
            self.absmax_codes = take(_ABSMAX).to(torch.uint8).contiguous()
            self.nested_absmax_bits = _f32_bits(take(_NESTED_ABSMAX))
            self.nested_code_bits = _f32_bits(take(_NESTED_QUANT_MAP))
            self.offset_bits = _f32_bits(torch.tensor(qs.nested_offset, device=dev))
        else:
            self.absmax_bits = _f32_bits(take(_ABSMAX))
        self.quant_map_bits = _f32_bits(take(_QUANT_MAP))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias = nn.Parameter(take("bias").detach().clone(), requires_grad=False)
            else:
                missing_keys.append(prefix + "bias")
        known = {prefix + k for k in (_WEIGHT, "bias", _ABSMAX, _QUANT_MAP, _NESTED_ABSMAX, _NESTED_QUANT_MAP)} | {key}
        # The module has no children: any other key under its prefix is not ours.
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)
