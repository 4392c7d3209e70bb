"""Fused CPU kernel for the profile: squared error of every (bits, group) option in one pass over a tensor.

The torch reference in quant.py runs one full-tensor pass per elementwise operation (about ten per option);
here each group is loaded once and every bit width is evaluated while it sits in cache. The arithmetic is
MLX's (float32, division by the scale, round half to even, bf16 rounding of scale, bias and of each step of
the dequantization), so the numbers equal quant.py's and mx.dequantize's.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Only reassociation (vectorised sums and min/max) and no-NaN/Inf/signed-zero assumptions (the profile rejects
# non-finite weights before calling us). Never `arcp`/`afn`/`contract`: division and each rounding step must
# stay exact to match MLX bit for bit.
_FLAGS = {"reassoc", "nnan", "ninf", "nsz"}
_EPS = np.float32(1e-7)
_ZERO = np.float32(0.0)


_RND = np.uint32(0x7FFF)
_ONE = np.uint32(1)
_SH = np.uint32(16)
_HI = np.uint32(0xFFFF0000)


@njit(inline="always", fastmath=_FLAGS)
def _round_bf16(fbuf: np.ndarray, ubuf: np.ndarray, n: int) -> None:
    """Round fbuf[:n] (float32) to bf16 in place, ties to even; `ubuf` is the same memory as uint32."""
    for i in range(n):
        u = ubuf[i]
        ubuf[i] = (u + _RND + ((u >> _SH) & _ONE)) & _HI


@njit(cache=True, parallel=True, fastmath=_FLAGS)
def row_sse(x: np.ndarray, ref: np.ndarray, bits: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row of `x` (float32 [R, K], values exactly representable in bf16: what the packer quantizes), the
    sum of squared error against `ref` (the original weights, same shape; `x` itself for a bf16 checkpoint) of
    MLX affine quantization for each option (bits[j], groups[j]). Returns float64 [R, n_options]."""
    n_rows, k = x.shape
    n_opt = bits.shape[0]
    out = np.zeros((n_rows, n_opt), dtype=np.float64)
    for r in prange(n_rows):
        row = x[r]
        ref_row = ref[r]
        # Scratch for bf16 rounding: numba has no scalar bitcast, an array view is the cheap way.
        fbuf = np.empty(max(groups.max(), 2), dtype=np.float32)
        ubuf = fbuf.view(np.uint32)
        for j in range(n_opt):
            g = groups[j]
            n_bins = np.float32((1 << bits[j]) - 1)
            acc = 0.0
            for start in range(0, k, g):
                acc += _group_sse(row, ref_row, start, g, n_bins, fbuf, ubuf)
            out[r, j] = acc
    return out


@njit(inline="always", fastmath=_FLAGS)
def _group_sse(
    row: np.ndarray,
    ref_row: np.ndarray,
    start: int,
    g: int,
    n_bins: np.float32,
    fbuf: np.ndarray,
    ubuf: np.ndarray,
) -> float:
    w_min = row[start]
    w_max = row[start]
    for i in range(start + 1, start + g):
        v = row[i]
        w_min = min(w_min, v)
        w_max = max(w_max, v)
    mask = abs(w_min) > abs(w_max)
    scale = max((w_max - w_min) / n_bins, _EPS)
    if not mask:
        scale = -scale
    edge = w_min if mask else w_max
    q0 = np.rint(edge / scale)
    bias = _ZERO
    if q0 != 0:
        scale = edge / q0
        bias = edge
    fbuf[0] = scale
    fbuf[1] = bias
    _round_bf16(fbuf, ubuf, 2)
    s16 = fbuf[0]
    b16 = fbuf[1]
    for i in range(g):
        q = min(max(np.rint((row[start + i] - bias) / scale), _ZERO), n_bins)
        fbuf[i] = q * s16
    _round_bf16(fbuf, ubuf, g)
    for i in range(g):
        fbuf[i] += b16
    _round_bf16(fbuf, ubuf, g)
    acc = np.float32(0.0)
    for i in range(g):
        d = fbuf[i] - ref_row[start + i]
        acc += d * d
    return np.float64(acc)
