"""float64 numpy references for block-wise quantization (tests compare the core against these)."""

from __future__ import annotations

import numpy as np

NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
FP4 = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=np.float64) / 12.0
FP4 = np.concatenate([FP4, -FP4]).astype(np.float32)


def blocks(x: np.ndarray, blocksize: int) -> list[np.ndarray]:
    flat = x.reshape(-1)
    return [flat[i : i + blocksize] for i in range(0, flat.size, blocksize)]


def nearest_codes(scaled: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest code by exhaustive float64 search; also how far each value is from a tie."""
    t = table.astype(np.float64)
    d = np.abs(scaled[:, None] - t[None, :])
    order = np.argsort(d, axis=1, kind="stable")
    best = order[:, 0]
    margin = d[np.arange(len(d)), order[:, 1]] - d[np.arange(len(d)), best]
    # Equal values (FP4's +0 / -0) are not ties in any meaningful sense.
    same = t[order[:, 1]] == t[best]
    margin[same] = np.inf
    return best, margin


def quantize_4bit_ref(x: np.ndarray, blocksize: int, table: np.ndarray):
    """Returns (codes per element, absmax per block, tie margin per element)."""
    codes, absmax, margins = [], [], []
    for b in blocks(x.astype(np.float64), blocksize):
        m = np.abs(b).max()
        absmax.append(m)
        s = b / m if m > 0 else np.zeros_like(b)
        c, mg = nearest_codes(s, table)
        codes.append(c)
        margins.append(mg)
    return np.concatenate(codes), np.array(absmax), np.concatenate(margins)


def unpack(packed: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(packed).reshape(-1)
    return np.stack([p >> 4, p & 0x0F], axis=1).reshape(-1)[:n]


def dequantize_ref(codes: np.ndarray, absmax: np.ndarray, blocksize: int, table: np.ndarray) -> np.ndarray:
    scale = np.repeat(absmax.astype(np.float64), blocksize)[: codes.size]
    return table.astype(np.float64)[codes] * scale
