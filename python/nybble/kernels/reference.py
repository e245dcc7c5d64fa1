"""Pure-torch reference of every nybble kernel, on any device.

These are the semantics the CUDA kernels implement and the tests compare against; they also
serve CUDA machines without CuPy. In float32 they round exactly like the CPU core (one float32
multiply per decoded weight, then one rounding to the output dtype), so on CPU they are
bit-identical to ``nybble.quantize_4bit`` / ``dequantize_4bit`` / ``int8.vectorwise_quant``.
Passing ``dtype=torch.float64`` gives exact decoded weights (code * absmax fits in 53 bits)
for float64 ground truth.
"""

from __future__ import annotations

import math

import torch

QUANT_TYPES = ("nf4", "fp4")

# Float32 tables, as in DESIGN.md (the CPU core ships the same values).
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
_FP4_MAGNITUDE = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# FP4 magnitude codes sorted by value, and the code of each.
_FP4_SORTED_CODE = (0, 1, 6, 7, 4, 5, 2, 3)
_MIN_ABSMAX = 1e-38  # bitsandbytes clamps the divisor so an all-zero block stays zero
_INV_127_SQ = 1.0 / (127.0 * 127.0)


def check_quant_type(quant_type: str) -> str:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r} is not one of {QUANT_TYPES}")
    return quant_type


def check_blocksize(blocksize: int) -> int:
    # Powers of two from 32 to 4096, as the CPU core accepts; kernels rely on multiples of 32.
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize {blocksize} must be a power of two in [32, 4096]")
    return blocksize


def code_table(quant_type: str, device=None) -> torch.Tensor:
    """The 16 float32 levels of ``quant_type``, index = 4-bit code."""
    if check_quant_type(quant_type) == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    mag = torch.tensor(_FP4_MAGNITUDE, dtype=torch.float32, device=device) / 12.0
    return torch.cat([mag, -mag])


def zero_code(quant_type: str) -> int:
    return 7 if check_quant_type(quant_type) == "nf4" else 0


def numel(shape) -> int:
    return math.prod([int(s) for s in shape])  # a list, not a generator: torch.compile traces it


def decode_absmax(
    codes: torch.Tensor,
    nested_absmax: torch.Tensor,
    nested_code: torch.Tensor,
    offset: float | torch.Tensor,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Double-quant decode: ``code[q] * nested_absmax[i // nested_blocksize] + offset``,
    two separately rounded float32 operations."""
    idx = torch.arange(codes.numel(), device=codes.device) // nested_blocksize
    code = nested_code.to(device=codes.device, dtype=torch.float32).reshape(-1)
    scaled = code[codes.reshape(-1).long()] * nested_absmax.to(codes.device, torch.float32).reshape(-1)[idx]
    return scaled + torch.as_tensor(offset, dtype=torch.float32, device=codes.device).reshape(())


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` 4-bit codes (int64) of a packed tensor, element 2j from the high nibble."""
    p = packed.reshape(-1)
    if p.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {p.numel()} bytes; {n} elements need {(n + 1) // 2}")
    codes = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)
    return codes[:n].long()


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int,
    quant_type: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decodes to ``dtype``: ``code[q] * absmax[i // blocksize]`` computed in float32 (float64
    when ``dtype`` is float64) and rounded once."""
    check_blocksize(blocksize)
    n = numel(shape)
    nblocks = -(-n // blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(f"absmax has {absmax.numel()} values; {n} elements in blocks of {blocksize} need {nblocks}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    table = code_table(quant_type, packed.device).to(work)
    scale = absmax.reshape(-1).to(device=packed.device, dtype=work)
    idx = torch.arange(n, device=packed.device) // blocksize
    return (table[unpack_codes(packed, n)] * scale[idx]).to(dtype).reshape(tuple(shape))


def _bounds(values: torch.Tensor) -> torch.Tensor:
    """Float32 midpoints between sorted neighbours (an exact tie goes to the lower code)."""
    return (values[:-1] + values[1:]) * 0.5


def quantize_4bit(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4") -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise NF4 / FP4: ``(packed uint8 ((n+1)//2, 1), absmax float32 (nblocks,))``.

    Full blocks are scaled by the float32 reciprocal of their absmax, the trailing partial
    block is divided by it (bitsandbytes' behaviour, which the CPU core reproduces); codes are
    the count of decision bounds below the scaled value. Raises ValueError on NaN / Inf.
    """
    check_blocksize(blocksize)
    check_quant_type(quant_type)
    x = w.detach().reshape(-1).to(torch.float32)
    n = x.numel()
    if not bool(torch.isfinite(x).all()):
        bad = int(torch.nonzero(~torch.isfinite(x))[0])
        raise ValueError(f"non-finite value {float(x[bad])} at flat index {bad}")
    nblocks = -(-n // blocksize)
    full = n // blocksize
    absmax = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    scaled = torch.empty_like(x)
    if full:
        xb = x[: full * blocksize].reshape(full, blocksize)
        amax = xb.abs().amax(dim=1)
        absmax[:full] = amax
        scaled[: full * blocksize] = (xb * torch.reciprocal(amax.clamp_min(_MIN_ABSMAX))[:, None]).reshape(-1)
    if nblocks > full:
        tail = x[full * blocksize :]
        amax = tail.abs().amax()
        absmax[full] = amax
        scaled[full * blocksize :] = tail / amax.clamp_min(_MIN_ABSMAX)
    table = code_table(quant_type, x.device)
    if quant_type == "nf4":
        codes = torch.bucketize(scaled, _bounds(table), right=False)
    else:
        sorted_code = torch.tensor(_FP4_SORTED_CODE, device=x.device)
        k = torch.bucketize(scaled.abs(), _bounds(table[:8][sorted_code]), right=False)
        codes = sorted_code[k] | ((scaled < 0).long() << 3)  # -0.0 is not < 0: encodes as +0
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), zero_code(quant_type))])
    codes = codes.to(torch.uint8).reshape(-1, 2)
    packed = (codes[:, 0] << 4) | codes[:, 1]
    return packed.reshape(-1, 1), absmax


def non_finite_error(message: str, index: int | None = None, value: float | None = None,
                     shape: tuple[int, ...] | None = None) -> Exception:
    """nybble's NonFiniteError (a ValueError) for a NaN / Inf found by a torch path, with its
    ``index`` / ``value`` and, given the input's shape, ``position``."""
    from ..errors import NonFiniteError

    err = NonFiniteError(message, index=index, value=value)
    return err.locate(shape) if shape is not None else err


def quantize_4bit_checked(w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """:func:`quantize_4bit`, raising NonFiniteError (with ``.index``) on NaN / Inf."""
    x = w.detach().reshape(-1)
    if not bool(torch.isfinite(x).all()):
        bad = int(torch.nonzero(~torch.isfinite(x))[0])
        value = float(x[bad])
        raise non_finite_error(f"input holds a non-finite value ({value}) at flat index {bad}; quantization needs "
                               "finite numbers", bad, value, tuple(w.shape))
    return quantize_4bit(w, blocksize, quant_type)


def check_finite_absmax(absmax: torch.Tensor, blocksize: int) -> None:
    """Raises NonFiniteError for the first block whose absmax is NaN / Inf (a kernel marks a
    block holding a non-finite value that way)."""
    if not bool(torch.isfinite(absmax).all()):
        block = int(torch.nonzero(~torch.isfinite(absmax))[0])
        raise non_finite_error(f"non-finite value in block {block} (elements {block * blocksize}..)")


def nearest_code(code: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the nearest entry of an ascending table, ties to the lower index (the
    core's rule for 8-bit codes)."""
    right = torch.searchsorted(code, s, right=True)
    idx = (right - 1).clamp(min=0)
    nxt = (idx + 1).clamp(max=code.numel() - 1)
    take_next = (idx + 1 < code.numel()) & ((s - code[nxt]).abs() < (s - code[idx]).abs())
    return torch.where(take_next, nxt, idx).to(torch.uint8)


def double_quantize(absmax: torch.Tensor, nested_code: torch.Tensor, nested_blocksize: int = 256):
    """QLoRA's double quantization on absmax's device, as the core computes it: ``offset =
    mean(absmax)`` (summed in float64, rounded to float32), then ``absmax - offset`` block-wise
    8-bit with ``nested_code`` (the signed dynamic map). Returns ``(codes uint8, nested_absmax
    float32, offset float32 0-d)``."""
    check_blocksize(nested_blocksize)
    a = absmax.detach().reshape(-1).to(torch.float32)
    n = a.numel()
    if n == 0:
        return (torch.zeros(0, dtype=torch.uint8, device=a.device), torch.zeros(0, device=a.device),
                torch.zeros((), device=a.device))
    offset = (a.double().sum() / n).to(torch.float32)
    centered = a - offset
    nb = -(-n // nested_blocksize)
    blocks = torch.nn.functional.pad(centered, (0, nb * nested_blocksize - n)).reshape(nb, nested_blocksize)
    nested_absmax = blocks.abs().amax(dim=1)  # zero padding never raises a block maximum
    scaled = blocks / nested_absmax.clamp_min(_MIN_ABSMAX)[:, None]
    codes = nearest_code(nested_code.to(a.device, torch.float32), scaled).reshape(-1)[:n]
    return codes, nested_absmax, offset


def int8_dequantize_rows(q: torch.Tensor, row_absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Row-wise int8 back to floats with bitsandbytes' rule (:func:`nybble.formats.int8_dequantize`,
    float32), rounded once to ``dtype``."""
    from ..formats import int8_dequantize

    return int8_dequantize(q, row_absmax).to(dtype)


def matmul_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int,
    quant_type: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with W (out, in) decoded to x's dtype first (dequantize, then a
    dense matmul: the large-M path)."""
    w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, x.dtype)
    return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def lora_forward(
    x: torch.Tensor,
    base_out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``base_out + scale * (x A^T) B^T`` with A (r, in), B (out, r) as in PEFT. Returns
    ``(out, x A^T)``; the second is saved for the backward pass (M x r, small)."""
    xa = torch.matmul(x, lora_a.t())
    return base_out + scale * torch.matmul(xa, lora_b.t()), xa


def lora_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    xa: torch.Tensor,
    weight: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of ``x W^T + scale * (x A^T) B^T`` with the frozen W dense (out, in).

    Returns ``(grad_x, grad_A, grad_B)``; grad_x is None when ``weight`` is None.
    Leading batch dims of x / grad_out are flattened."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    xa2 = xa.reshape(-1, xa.shape[-1])
    gb = torch.matmul(g, lora_b) * scale  # (M, r): the gradient reaching x A^T
    grad_b = torch.matmul(g.t(), xa2) * scale  # (out, r)
    grad_a = torch.matmul(gb.t(), x2)  # (r, in)
    grad_x = None
    if weight is not None:
        grad_x = (torch.matmul(g, weight) + torch.matmul(gb, lora_a)).reshape(x.shape)
    return grad_x, grad_a, grad_b


def int8_vectorwise_quant(x: torch.Tensor, threshold: float = 6.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LLM.int8() quantization of one matmul operand (rows = all leading dims).

    Returns ``(q int8 shaped like x, row_absmax float32, outlier_cols int64)``: elements with
    ``|x| >= threshold`` stay out of the row absmax, whole outlier columns are zeroed in q;
    ``q = round_half_even(x * ((1 / absmax) * 127))`` saturated to int8. ``threshold=0``
    disables outlier extraction."""
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold {threshold} must be finite and >= 0")
    cols = x.shape[-1]
    xf = x.detach().reshape(-1, cols).to(torch.float32)
    a = xf.abs()
    if threshold > 0:
        is_outlier = a >= threshold
        outlier_cols = torch.nonzero(is_outlier.any(dim=0)).reshape(-1)
        a = a.masked_fill(is_outlier, 0.0)
    else:
        outlier_cols = torch.zeros(0, dtype=torch.int64, device=x.device)
    row_absmax = a.amax(dim=1) if cols else torch.zeros(xf.shape[0], device=x.device)
    factor = torch.where(row_absmax > 0, torch.reciprocal(row_absmax) * 127.0, torch.zeros_like(row_absmax))
    q = torch.round(xf * factor[:, None]).clamp_(-128, 127).to(torch.int8)
    q[:, outlier_cols] = 0
    return q.reshape(x.shape), row_absmax, outlier_cols


def int8_matmul_dequant(
    q_a: torch.Tensor,
    q_b: torch.Tensor,
    row_scale_a: torch.Tensor,
    row_scale_b: torch.Tensor,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """``(q_a @ q_b^T) * ((row_scale_a[i] * row_scale_b[j]) / 127^2) + bias[j]``.

    The int8 products are accumulated exactly (float64 holds K * 127^2 exactly); the epilogue
    runs in float32 in the kernel's order, or in float64 when ``dtype`` is float64."""
    acc = torch.matmul(q_a.reshape(-1, q_a.shape[-1]).to(torch.float64), q_b.to(torch.float64).t())
    if dtype == torch.float64:
        s = row_scale_a.reshape(-1, 1).double() * row_scale_b.reshape(1, -1).double() / (127.0 * 127.0)
        out = acc * s
        if bias is not None:
            out = out + bias.double()
    else:
        s = (row_scale_a.reshape(-1, 1).float() * row_scale_b.reshape(1, -1).float()) * _INV_127_SQ
        out = acc.to(torch.float32) * s
        if bias is not None:
            out = out + bias.to(dtype).float()
    return out.to(dtype).reshape(*q_a.shape[:-1], q_b.shape[0])


def int8_linear(
    x: torch.Tensor,
    q_w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    threshold: float = 6.0,
) -> torch.Tensor:
    """LLM.int8() linear layer: ``x @ W^T + bias`` with W stored row-wise int8 (``q_w`` (out,
    in), ``w_scale`` = row absmax, bitsandbytes' SCB). Outlier input columns of x are
    multiplied against the dequantized matching columns of W and added back; everything is
    accumulated in float32 and rounded once to x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    q_x, row_absmax, cols = int8_vectorwise_quant(x2, threshold)
    out = int8_matmul_dequant(q_x, q_w, row_absmax, w_scale, None, torch.float32)
    if cols.numel():
        out = out + torch.matmul(x2[:, cols].float(), int8_dequantize_rows(q_w[:, cols], w_scale).t())
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], q_w.shape[0])


def lora_delta(x2: torch.Tensor, lora_a, lora_b, scale, adapter_index=None, adapter_scale=None):
    """``(scale * (x A_i^T) B_i^T, x A_i^T)`` over the rows of x2 (M, K), row i with its adapter.

    One adapter (A (r, K), B (N, r), no index): two matmuls in x's dtype, as the layer
    Functions compute it. Stacked adapters (A (L, r, K), B (L, N, r)) with ``adapter_index``
    (M,): each row its adapter, a negative or out-of-range index meaning none (both results
    0 for that row), times ``adapter_scale[i]`` when given."""
    if adapter_index is None and lora_a.dim() == 2:
        xa = torch.matmul(x2, lora_a.t())
        s = scale if adapter_scale is None else scale * float(adapter_scale.reshape(-1)[0])
        return torch.matmul(xa, lora_b.t()) * s, xa
    a3 = lora_a if lora_a.dim() == 3 else lora_a[None]
    b3 = lora_b if lora_b.dim() == 3 else lora_b[None]
    idx = (torch.zeros(x2.shape[0], dtype=torch.int64, device=x2.device) if adapter_index is None
           else adapter_index.reshape(-1).to(x2.device, torch.int64))
    delta = torch.zeros((x2.shape[0], b3.shape[1]), dtype=x2.dtype, device=x2.device)
    xa = torch.zeros((x2.shape[0], a3.shape[1]), dtype=x2.dtype, device=x2.device)
    for i in range(a3.shape[0]):
        rows = torch.nonzero(idx == i).reshape(-1)
        if rows.numel() == 0:
            continue
        s = scale if adapter_scale is None else scale * float(adapter_scale.reshape(-1)[i])
        xa[rows] = torch.matmul(x2[rows], a3[i].t())
        delta[rows] = torch.matmul(xa[rows], b3[i].t()) * s
    return delta, xa


def matmul_4bit_lora(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int,
    quant_type: str,
    bias: torch.Tensor | None,
    x_lora: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    adapter_index: torch.Tensor | None = None,
    adapter_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """QLoRA forward: ``(x W^T + bias + scale * (x_lora A^T) B^T, x_lora A^T)`` for a packed W
    of ``shape = (out, in)``; ``x_lora`` None means x; stacked adapters as in
    :func:`lora_delta`. The base term is :func:`matmul_4bit` (x's dtype), the LoRA
    term in x_lora's."""
    out_features, in_features = shape
    xl = x if x_lora is None else x_lora
    base = matmul_4bit(x, packed, absmax, shape, blocksize, quant_type, bias)
    delta, xa = lora_delta(xl.reshape(-1, in_features), lora_a, lora_b, scale, adapter_index, adapter_scale)
    out = base + delta.to(base.dtype).reshape(base.shape)
    return out, xa.reshape(*xl.shape[:-1], xa.shape[-1])


def matmul_4bit_grad_input(
    grad_out: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape,
    blocksize: int,
    quant_type: str,
    grad_xa: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
) -> torch.Tensor:
    """The input gradient through a packed W (out, in): ``g W (+ grad_xa A)``, W decoded to g's
    dtype, ``grad_xa`` (M, r) the gradient reaching ``x A^T`` (the LoRA scale included)."""
    w = dequantize_4bit(packed, absmax, shape, blocksize, quant_type, grad_out.dtype)
    out = torch.matmul(grad_out, w)
    if grad_xa is not None:
        lora = torch.matmul(grad_xa.reshape(-1, grad_xa.shape[-1]).to(grad_out.dtype), lora_a.to(grad_out.dtype))
        out = out + lora.reshape(out.shape)
    return out


def int8_linear_lora(
    x: torch.Tensor,
    q_w: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    x_lora: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() linear with a LoRA term: ``(int8_linear(x) + scale * (x_lora A^T) B^T,
    x_lora A^T)``, the adapter in x_lora's dtype."""
    base = int8_linear(x, q_w, w_scale, bias, threshold)
    xl = x if x_lora is None else x_lora
    delta, xa = lora_delta(xl.reshape(-1, xl.shape[-1]), lora_a, lora_b, scale)
    return base + delta.to(base.dtype).reshape(base.shape), xa.reshape(*xl.shape[:-1], xa.shape[-1])
