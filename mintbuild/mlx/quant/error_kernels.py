"""Fused CPU kernels for the profile: squared error of every (bits, group) option in one pass over a tensor.

The torch reference in quant/reference.py runs one full-tensor pass per elementwise operation (about ten per option);
here a block of rows is loaded once and every option is evaluated while it sits in cache. The arithmetic is
MLX's (float32, division by the scale, round half to even, bf16 rounding of scale, bias and of each step of
the dequantization), so the numbers equal quant/reference.py's and mx.dequantize's.

How `row_sse` is fast while staying exact:

- SIMD over rows: a block of 8 rows is transposed so that each 8-lane vector holds the same column of 8 rows.
  The groups of the 8 rows then line up in the lanes, and the per-group work (min/max, MLX's scale and bias
  derivation) is vector math too, with no horizontal reductions. Numba has no vector type, and LLVM keeps
  divisions scalar on this CPU (znver1), so a small 8 x float32 type with explicit LLVM operations is
  defined below.
- No division per value: q = rint((w - bias) / scale) is computed as rint((w - bias) * (1 / scale)). The two
  quotients differ by at most |t| * 2^-22, which only matters when the quotient is that close to a
  half-integer; every such case is detected (distance to the rounded value against twice that bound) and
  those 32 values are redone with the true division. Exact float32 ties are common (0.25-0.5% of values:
  bf16 inputs and short scales), so the check is needed; the slow branch runs for ~10% of the 32-value steps.
- bf16 rounding in three float operations (Veltkamp's split: c = 65537 * v; v16 = c - (c - v)), which rounds
  to 8 significant bits with ties to even for every normal float32 below 2^73 in magnitude (checked
  exhaustively over all float32 values). Rows holding values of magnitude 2^60 or more, and shapes the block
  layout does not cover, take the scalar path (`_row_scalar`): the same math one value at a time, with the
  true division and integer bf16 rounding.
- Four independent vectors per loop iteration, their operations interleaved: one value's chain is ~17
  dependent operations, and the out-of-order window of this CPU does not reach far enough to overlap
  iterations on its own.

Every vector instruction carries an explicit fast-math flag (`nsz`, harmless here): numba's fastmath pass only
adds its flags to instructions that have none, so a caller compiled with fastmath can never reassociate the
bf16 split or contract it into an FMA. Squared errors are accumulated in float32 per group (as MLX-based
references do), then in float64.

`range_sq` (per-unit squared group ranges, the profile's sampling auxiliary) and `sum_squares` (norm and
NaN/Inf check) are the profile's other per-value passes; all three also accept bf16 tensors as int16 bit
patterns, so the profile never needs a float32 copy of a bf16 tensor.

The vector types and the 8-row layout live in simd.py; the packer's kernel (pack_kernel.py) uses them too.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

from mintbuild.mlx.quant.simd import (
    _BIG,
    _GAMMA,
    _NPAR,
    _ZERO,
    CHUNK,
    W,
    as_f32,
    bf16,
    mlx_scale_bias,
    transpose_rows,
    vabs,
    vadd_f64,
    vany_gt,
    vbf16,
    vfma,
    vload,
    vmax,
    vmin,
    vmlx_scale_bias,
    vrint,
    vsplat,
    vsplit,
    vstore,
)

# --- the kernels ------------------------------------------------------------------------------------------


def _as_rows(a: np.ndarray, name: str) -> np.ndarray:
    """C-contiguous float32, or int16 bit patterns for bf16 input (numpy has no bf16 dtype)."""
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, K], got shape {a.shape}")
    if a.dtype in (np.int16, np.uint16):
        return np.ascontiguousarray(a).view(np.int16)
    return np.ascontiguousarray(a, dtype=np.float32)


def row_sse(x: np.ndarray, ref: np.ndarray, bits: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row of `x` (float32 [R, K], values exactly representable in bf16: what the packer quantizes), the
    sum of squared error against `ref` (the original weights, same shape; `x` itself for a bf16 checkpoint) of
    MLX affine quantization for each option (bits[j], groups[j]). Returns float64 [R, n_options].

    `x` and `ref` may also be int16/uint16 arrays of bf16 bit patterns (a bf16 tensor viewed as int16), which
    spares the caller a float32 copy of the tensor."""
    xc = _as_rows(x, "x")
    rc = _as_rows(ref, "ref")
    if xc.shape != rc.shape:
        raise ValueError(f"row_sse: x {xc.shape} and ref {rc.shape} differ in shape")
    # A bf16 checkpoint passes its values as both: the reference then needs no second transpose.
    same = xc.dtype == rc.dtype and xc.ctypes.data == rc.ctypes.data
    b = np.ascontiguousarray(bits, dtype=np.int64)
    g = np.ascontiguousarray(groups, dtype=np.int64)
    if b.shape != g.shape or b.ndim != 1:
        raise ValueError(f"row_sse: bits {b.shape} and groups {g.shape} must be matching 1-D arrays")
    if b.size and (b.min() < 1 or b.max() > 16 or g.min() < 1):
        raise ValueError(f"row_sse: bits must be in 1..16 and groups >= 1, got bits {b} groups {g}")
    return _row_sse(xc, xc if same else rc, b, g, same, get_num_threads())


def range_sq(x: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per row of `x` (float32 or bf16 bit patterns, [R, K]) and group size, the sum over the row's groups of
    (max - min)^2, the difference taken in float32 and squared and summed in float64 (the profile's auxiliary
    variable for sampling: a group's quantization error is nearly proportional to it). float64 [R, n_groups]."""
    xc = _as_rows(x, "x")
    g = np.ascontiguousarray(groups, dtype=np.int64)
    if g.ndim != 1 or (g.size and g.min() < 1):
        raise ValueError(f"range_sq: groups must be a 1-D array of sizes >= 1, got {g}")
    return _range_sq(xc, g, get_num_threads())


def sum_squares(x: np.ndarray) -> tuple[float, int]:
    """(sum of squares in float64, flat index of the first NaN/Inf or -1) of a float32 array or of bf16 bit
    patterns (int16/uint16), in one parallel pass whose result does not depend on the thread count."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype in (np.int16, np.uint16):
        flat = flat.view(np.int16)
    elif flat.dtype != np.float32:
        # A silent float32 cast would turn large float64 values into "non-finite" ones.
        raise TypeError(f"sum_squares: float32 or bf16 bit patterns (int16/uint16) only, got {flat.dtype}")
    return _sum_squares(flat)


@njit(inline="always")
def _blocked(k: int, groups: np.ndarray) -> bool:
    """The block path needs every group to tile the row in whole CHUNKs; anything else goes row by row."""
    ok = k % CHUNK == 0
    for j in range(groups.shape[0]):
        ok &= groups[j] % CHUNK == 0 and k % groups[j] == 0
    return ok


@njit(cache=True, parallel=True)
def _row_sse(xc, rc, bits, groups, same, threads):
    n_rows, k = xc.shape
    n_opt = bits.shape[0]
    out = np.zeros((n_rows, n_opt), dtype=np.float64)
    n_full = n_rows // W if _blocked(k, groups) else 0
    n_part = max(1, min(n_full, 8 * threads))
    for part in prange(n_part):
        # Scratch once per partition, not per block: in the profile a row is one 128-value unit.
        xt = np.empty((k, W), dtype=np.float32)
        rt = xt if same else np.empty((k, W), dtype=np.float32)
        par = np.empty((k // CHUNK, _NPAR, W), dtype=np.float32)
        mm = np.empty((2, k // CHUNK, W), dtype=np.float32)
        tot = np.empty(W, dtype=np.float64)
        for blk in range(part * n_full // n_part, (part + 1) * n_full // n_part):
            r0 = blk * W
            transpose_rows(xc, r0, xt)
            if not same:
                transpose_rows(rc, r0, rt)
            # Values this large overflow the vector path's bf16 rounding: those rows go the scalar way.
            if _block_minmax(xt, mm, _BIG):
                _block_sse(xt, rt, bits, groups, par, mm, tot, out[r0 : r0 + W])
            else:
                for r in range(r0, r0 + W):
                    _row_scalar(xc[r], rc[r], bits, groups, out[r])
    for r in range(n_full * W, n_rows):
        _row_scalar(xc[r], rc[r], bits, groups, out[r])
    return out


@njit(cache=True, parallel=True)
def _range_sq(xc, groups, threads):
    n_rows, k = xc.shape
    n_opt = groups.shape[0]
    out = np.zeros((n_rows, n_opt), dtype=np.float64)
    n_full = n_rows // W if _blocked(k, groups) else 0
    n_part = max(1, min(n_full, 8 * threads))
    for part in prange(n_part):
        xt = np.empty((k, W), dtype=np.float32)
        mm = np.empty((2, k // CHUNK, W), dtype=np.float32)
        lanes = np.empty(W, dtype=np.float32)
        nc = k // CHUNK
        for blk in range(part * n_full // n_part, (part + 1) * n_full // n_part):
            r0 = blk * W
            transpose_rows(xc, r0, xt)
            _block_minmax(xt, mm, np.float32(np.inf))
            for j in range(n_opt):
                per = groups[j] // CHUNK
                for c0 in range(0, nc, per):
                    lo = vload(mm, c0 * W)
                    hi = vload(mm, (nc + c0) * W)
                    for c in range(c0 + 1, c0 + per):
                        lo = vmin(lo, vload(mm, c * W))
                        hi = vmax(hi, vload(mm, (nc + c) * W))
                    vstore(lanes, 0, hi - lo)
                    for lane in range(W):
                        r = np.float64(lanes[lane])
                        out[r0 + lane, j] += r * r
    for r in range(n_full * W, n_rows):
        for j in range(n_opt):
            g = groups[j]
            for start in range(0, k - g + 1, g):
                lo = as_f32(xc[r, start])
                hi = lo
                for i in range(start + 1, start + g):
                    v = as_f32(xc[r, i])
                    lo = min(lo, v)
                    hi = max(hi, v)
                d = np.float64(hi - lo)
                out[r, j] += d * d
    return out


#: Values per partial sum of `sum_squares`: fixed, so the result does not depend on the thread count.
_SUM_PART = 1 << 20


# Reassociation lets LLVM vectorise the float64 sum; no nnan/ninf, or the finiteness check would be dropped.
@njit(cache=True, parallel=True, fastmath={"reassoc", "nsz"})
def _sum_squares(flat):
    n = flat.shape[0]
    n_part = (n + _SUM_PART - 1) // _SUM_PART
    parts = np.zeros(n_part)
    for part in prange(n_part):
        acc = 0.0
        for i in range(part * _SUM_PART, min(n, (part + 1) * _SUM_PART)):
            v = np.float64(as_f32(flat[i]))
            acc += v * v
        parts[part] = acc
    total = 0.0
    for part in range(n_part):
        total += parts[part]
    if np.isfinite(total):
        return total, -1
    for i in range(n):
        if not np.isfinite(as_f32(flat[i])):
            return total, i
    return total, -1  # unreachable for float32 inputs (their squares cannot overflow a float64 sum)


@njit
def _block_minmax(xt, mm, limit) -> bool:
    """Min and max of every CHUNK columns of 8 transposed rows into mm [2, K/CHUNK, 8] (larger groups combine
    them); False, with mm incomplete, as soon as a magnitude exceeds `limit`."""
    nc = xt.shape[0] // CHUNK
    big = vsplat(limit)
    for c in range(nc):
        o = c * CHUNK * W
        lo = vload(xt, o)
        hi = lo
        for i in range(o + W, o + CHUNK * W, W):
            v = vload(xt, i)
            lo = vmin(lo, v)
            hi = vmax(hi, v)
        if vany_gt(vmax(vabs(lo), vabs(hi)), big):
            return False
        vstore(mm, c * W, lo)
        vstore(mm, (nc + c) * W, hi)
    return True


@njit
def _block_sse(xt, rt, bits, groups, par, mm, tot, out) -> None:
    """All options for 8 transposed rows (xt, rt [K, 8]) with their chunk min/max in mm; adds into out
    [8, n_options]."""
    nc = xt.shape[0] // CHUNK
    for j in range(bits.shape[0]):
        per = groups[j] // CHUNK
        nb = vsplat((1 << bits[j]) - 1)
        # Parameters for all groups first: independent iterations, so the divisions overlap.
        for c0 in range(0, nc, per):
            lo = vload(mm, c0 * W)
            hi = vload(mm, (nc + c0) * W)
            for c in range(c0 + 1, c0 + per):
                lo = vmin(lo, vload(mm, c * W))
                hi = vmax(hi, vload(mm, (nc + c) * W))
            _group_params(lo, hi, nb, par, c0 * _NPAR * W)
        tot[:] = 0.0
        for c0 in range(0, nc, per):
            _group_sse(xt, rt, par, c0, per, nb, tot)
        for lane in range(W):
            out[lane, j] += tot[lane]


@njit(inline="always")
def _group_params(lo, hi, nb, par, o) -> None:
    """MLX's scale and bias for 8 groups (min lo, max hi, nb = 2^bits - 1), stored at par[o:]: bias, 1/scale,
    scale, bf16 scale, 65537 * bf16 scale, bf16 bias, and the tie-check threshold."""
    one = vsplat(1.0)
    rng = hi - lo
    scale, bias = vmlx_scale_bias(lo, hi, nb)
    inv = one / scale
    s16 = vbf16(scale)
    vstore(par, o, bias)
    vstore(par, o + W, inv)
    vstore(par, o + 2 * W, scale)
    vstore(par, o + 3 * W, s16)
    vstore(par, o + 4 * W, s16 * vsplat(_GAMMA))  # exact: an 8-bit significand times 2^16 + 1
    vstore(par, o + 5 * W, vbf16(bias))
    # (w - bias) * inv is within |t| * 2^-22 of the true quotient t, |t| <= rng * |inv| (1 + 2^-23) (+ 1/2
    # when q0 == 0); a rounded value farther than twice that from a half-integer rounds like the quotient.
    vstore(par, o + 6 * W, vsplat(0.5) - (rng * vabs(inv) + one) * vsplat(2.0**-21))


@njit(inline="always")
def _group_sse(xt, rt, par, c0, per, nb, tot) -> None:
    """Add the squared error of one group of 8 rows (columns c0*CHUNK .. (c0+per)*CHUNK) to tot."""
    o = c0 * _NPAR * W
    bias = vload(par, o)
    inv = vload(par, o + W)
    s16 = vload(par, o + 3 * W)
    g16 = vload(par, o + 4 * W)
    b16 = vload(par, o + 5 * W)
    thr = vload(par, o + 6 * W)
    gamma = vsplat(_GAMMA)
    zero = vsplat(0.0)
    a0 = zero
    a1 = zero
    a2 = zero
    a3 = zero
    # Four independent vectors per iteration, their operations interleaved (see the module docstring).
    for i in range(c0 * CHUNK * W, (c0 + per) * CHUNK * W, 4 * W):
        x0 = vload(xt, i) - bias
        x1 = vload(xt, i + W) - bias
        x2 = vload(xt, i + 2 * W) - bias
        x3 = vload(xt, i + 3 * W) - bias
        y0 = x0 * inv
        y1 = x1 * inv
        y2 = x2 * inv
        y3 = x3 * inv
        q0 = vrint(y0)
        q1 = vrint(y1)
        q2 = vrint(y2)
        q3 = vrint(y3)
        near = vmax(vmax(vabs(y0 - q0), vabs(y1 - q1)), vmax(vabs(y2 - q2), vabs(y3 - q3)))
        if vany_gt(near, thr):
            # A quotient within rounding distance of a half-integer: use MLX's true division. (The lower
            # clip at 0 is only needed here: the fast quotient is never below -1/2 without being flagged.)
            scale = vload(par, o + 2 * W)
            q0 = vmax(vrint(x0 / scale), zero)
            q1 = vmax(vrint(x1 / scale), zero)
            q2 = vmax(vrint(x2 / scale), zero)
            q3 = vmax(vrint(x3 / scale), zero)
        q0 = vmin(q0, nb)
        q1 = vmin(q1, nb)
        q2 = vmin(q2, nb)
        q3 = vmin(q3, nb)
        # w' = bf16(bf16(q * scale16) + bias16); q * scale16 is exact (at most 16 significant bits).
        s0 = vsplit(q0 * g16, q0 * s16) + b16
        s1 = vsplit(q1 * g16, q1 * s16) + b16
        s2 = vsplit(q2 * g16, q2 * s16) + b16
        s3 = vsplit(q3 * g16, q3 * s16) + b16
        e0 = vsplit(s0 * gamma, s0) - vload(rt, i)
        e1 = vsplit(s1 * gamma, s1) - vload(rt, i + W)
        e2 = vsplit(s2 * gamma, s2) - vload(rt, i + 2 * W)
        e3 = vsplit(s3 * gamma, s3) - vload(rt, i + 3 * W)
        a0 = vfma(e0, e0, a0)
        a1 = vfma(e1, e1, a1)
        a2 = vfma(e2, e2, a2)
        a3 = vfma(e3, e3, a3)
    vadd_f64(tot, (a0 + a1) + (a2 + a3))


@njit
def _row_scalar(row, ref_row, bits, groups, out) -> None:
    """The same math one value at a time, with the true division and integer bf16 rounding: for shapes the
    block path does not cover and rows with huge values."""
    k = row.shape[0]
    for j in range(bits.shape[0]):
        g = groups[j]
        n_bins = np.float32((1 << bits[j]) - 1)
        acc = 0.0
        for start in range(0, k - g + 1, g):
            w_min = as_f32(row[start])
            w_max = w_min
            for i in range(start + 1, start + g):
                w_min = min(w_min, as_f32(row[i]))
                w_max = max(w_max, as_f32(row[i]))
            scale, bias = mlx_scale_bias(w_min, w_max, n_bins)
            s16 = bf16(scale)
            b16 = bf16(bias)
            part = np.float32(0.0)
            for i in range(start, start + g):
                q = min(max(np.rint((as_f32(row[i]) - bias) / scale), _ZERO), n_bins)
                d = bf16(bf16(q * s16) + b16) - as_f32(ref_row[i])
                part += d * d
            acc += np.float64(part)
        out[j] += acc
