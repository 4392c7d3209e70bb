"""Error-compensated rounding (GPTQ) into MLX's affine format, for tensors with a measured input Hessian.

Round-to-nearest minimises each weight's own error. What the model feels is the layer's output error,
||(W - Q) X^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X summed over calibration tokens. GPTQ (Frantar et
al., 2023) rounds the K input columns of W one at a time and moves each column's rounding error onto the columns
not rounded yet, along the upper Cholesky factor U of H^-1, so the output error shrinks. The columns are taken
loudest input first (`act_order`: diag H descending), so the errors that cost most are rounded while the most
columns remain to absorb them; each column is rounded on its group's grid, fixed before any column (the "static
groups" of act-order GPTQ: a group's bf16 scale and bias derived as `mx.quantize` derives them from a min and a
max, quant/reference.py), so the stored format is exactly MLX's whatever the order. The min and max are the
group's own, shrunk by the factor of `CLIP_SHRINKS` whose round-to-nearest output error on the group's inputs is
least (`clipped_group_params`: clipping judged by what the layer outputs, not by the weights). With a diagonal H
nothing moves: the codes are round-to-nearest on those grids, and bit-identical to
`quant.reference.quantize_codes` without clipping (tests/test_gptq.py).

The arithmetic, per row (rows are independent: they share only the order and U, here of H with its rows and
columns in act order), in float32, with w's columns in act order and g(j) the group of the j-th column taken:

    scale, bias per group from the bf16 weights' clipped min and max (clipped_group_params), before any column
    for each block of `block` columns [b0, b1) (a multiple of g), for j = b0 .. b1 - 1:
      q = clip(rint((w_j - bias_g(j)) / scale_g(j)), 0, 2^b - 1);  deq = bf16(bf16(q * bf16(scale)) + bf16(bias))
      e_j = (w_j - deq) / U[j, j];  w_c -= fl(e_j * U[j, c]) for c in (j, b1)     (product, then difference)
    after the block: w_c -= fl(sum over j in [b0, b1) of e_j * U[j, c]) for c >= b1, the sum taken in order of j
    with one rounding per term (a chain of fused multiply-adds from 0)

which is, operation for operation, the torch column loop kept as the reference in benchmarks/bench_gptq.py (the
block product there is MKL's sgemm, which, measured, sums in exactly that order). The format tag
(`rounding.GPTQ_VERSION`, gptq-mlx-affine/5) names this arithmetic: act order on clipped grids searched in
float32, U from one Cholesky factorization and one triangular inverse on two threads.

How the kernel (`_gptq_rows`) is fast: rows are taken 128 at a time (a row block), as 8-row panels transposed
so that a column of 8 rows is one 8-lane vector and every step above is lane-wise vector math. Within a column
block each panel runs the column loop on its own (the rank-1 updates stay in L1); the block's error is then
carried to the later columns by a register-tiled product (16 rows x 4 columns of accumulators), 4 columns at a
time for every panel of the block, so that U^T is read from memory once per row block. Row blocks are shared
among numba's threads (prange). A row's result is the same
sequence of IEEE float32 operations whatever block, lane or thread computes it, and U is factored on a fixed
thread count, so the output depends neither on the thread count nor on how rows are split; the kernel calls no
BLAS.

Which tensors get it is decided by the importance stage, which measures H for every linear layer (or the output
head only) and GPTQ's held-out gain on each tensor and option (`rounding_gain`); where that gain is not below 1
(GPTQ fitted the calibration windows but does worse than rounding to nearest on the held-out ones,
`rounding.gptq_helps`), pack rounds to nearest and the allocator prices round-to-nearest. docs/method.md ("Rounding") says
why, docs/results.md what it gains and what it costs.
docs/gptq-cost.md says what each part costs and how memory stays bounded.

One job: GPTQ rounding of one tensor against one Hessian (its grids, its factor, its kernel, its held-out gain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from numba import get_num_threads, njit, prange

from mintbuild.errors import MintError
from mintbuild.formats import Option
from mintbuild.mlx.quant.reference import dequantize_codes, quantize_dequantize
from mintbuild.mlx.quant.simd import W
from mintbuild.mlx.quant.simd import bf16 as _bf16
from mintbuild.mlx.quant.simd import mlx_scale_bias as _mlx_scale_bias
from mintbuild.mlx.quant.simd import vbf16 as _vbf16
from mintbuild.mlx.quant.simd import vfma as _vfma
from mintbuild.mlx.quant.simd import vload as _vload
from mintbuild.mlx.quant.simd import vmax as _vmax
from mintbuild.mlx.quant.simd import vmin as _vmin
from mintbuild.mlx.quant.simd import vrint as _vrint
from mintbuild.mlx.quant.simd import vsplat as _vsplat
from mintbuild.mlx.quant.simd import vstore as _vstore
from mintbuild.reproducible import sum64, torch_threads

# The 8 x float32 vector type and its intrinsics are quant/simd.py's (every instruction carries `nsz` only, so no
# caller can let LLVM reassociate these operations or contract a product and a difference into an FMA).
_L = W  # lanes


# ---------------------------------------------------------------- the kernel

#: Rows per row block: a multiple of 16, the product's row tile (two 8-row panels). U^T is streamed once per row
#: block, so more rows read it less often: 128 (against 64) made a 14,336-wide layer's GPTQ 2.6x faster, with
#: every byte the same.
_ROWS = 128


@njit
def _load_rows(
    x16: np.ndarray,
    perm: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    r0: int,
    n: int,
    n_pan: int,
    wt: np.ndarray,
    st: np.ndarray,
    bt: np.ndarray,
) -> None:
    """Rows r0 .. r0 + n of the bf16 bit patterns `x16`, columns in the order `perm`, as float32 panels
    wt [n_pan][K][8], and their groups' scales and biases as st, bt [n_pan][K/g][8]; lanes past the last row
    are zero weights with scale 1 (they are computed on and never stored)."""
    k, n_grp = x16.shape[1], scales.shape[1]
    wi = wt.view(np.int32)
    for i in range(n_pan * _L):
        p, lane = i // _L, i % _L
        base, gbase = p * k * _L + lane, p * n_grp * _L + lane
        if i < n:
            for c in range(k):
                wi[base + c * _L] = np.int32(x16[r0 + i, perm[c]]) << 16  # a bf16 is a float32's upper half
            for g in range(n_grp):
                st[gbase + g * _L] = scales[r0 + i, g]
                bt[gbase + g * _L] = biases[r0 + i, g]
        else:
            for c in range(k):
                wi[base + c * _L] = 0
            for g in range(n_grp):
                st[gbase + g * _L] = 1.0
                bt[gbase + g * _L] = 0.0


@njit
def _round_columns(
    wt: np.ndarray,
    et: np.ndarray,
    st: np.ndarray,
    bt: np.ndarray,
    p: int,
    k: int,
    b0: int,
    b1: int,
    ud: np.ndarray,
    gidx: np.ndarray,
    n_grp: int,
    n_bins: np.float32,
) -> None:
    """The column loop over [b0, b1) for panel p: codes (as float32) over wt's columns, each column rounded on
    its group's grid (st, bt [.][K/g][8]; `gidx`: each column's group), each column's scaled error into
    et [.][b1 - b0][8]; the error of each column is moved onto the block's later columns at once."""
    o, oe, og = p * k * _L, p * (b1 - b0) * _L, p * n_grp * _L
    zero, top = _vsplat(0.0), _vsplat(n_bins)
    for j in range(b0, b1):
        scale = _vload(st, og + gidx[j] * _L)
        bias = _vload(bt, og + gidx[j] * _L)
        x = _vload(wt, o + j * _L)
        q = _vmin(_vmax(_vrint((x - bias) / scale), zero), top)
        deq = _vbf16(_vbf16(q * _vbf16(scale)) + _vbf16(bias))
        e = (x - deq) / _vsplat(ud[j, j - b0])
        _vstore(et, oe + (j - b0) * _L, e)
        _vstore(wt, o + j * _L, q)
        for c in range(j + 1, b1):
            _vstore(wt, o + c * _L, _vload(wt, o + c * _L) - e * _vsplat(ud[j, c - b0]))


@njit
def _carry(wt: np.ndarray, et: np.ndarray, ut: np.ndarray, n_pan: int, k: int, b0: int, b1: int) -> None:
    """w[:, c] -= sum over j in [b0, b1) of e_j * U[j, c] for every column c >= b1 of the row block's panels,
    each sum a chain of FMAs in order of j from 0; tiles of 2 panels x 4 columns keep 8 sums in registers. The
    tiles go column-major: each 4 columns' U^T segments (2 KB) are read from memory once for all the block's
    panels, not once per panel pair (a wide layer's U^T does not fit any cache: 0.8 GB at 14,336 inputs)."""
    bw = b1 - b0
    c4 = b1 + (k - b1) // 4 * 4
    for c in range(b1, c4, 4):
        for p in range(0, n_pan, 2):
            o0, o1 = p * k * _L, (p + 1) * k * _L
            e0, e1 = p * bw * _L, (p + 1) * bw * _L
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = _vsplat(0.0)
            for j in range(bw):
                x0 = _vload(et, e0 + j * _L)
                x1 = _vload(et, e1 + j * _L)
                s = _vsplat(ut[c, b0 + j])
                a00 = _vfma(x0, s, a00)
                a10 = _vfma(x1, s, a10)
                s = _vsplat(ut[c + 1, b0 + j])
                a01 = _vfma(x0, s, a01)
                a11 = _vfma(x1, s, a11)
                s = _vsplat(ut[c + 2, b0 + j])
                a02 = _vfma(x0, s, a02)
                a12 = _vfma(x1, s, a12)
                s = _vsplat(ut[c + 3, b0 + j])
                a03 = _vfma(x0, s, a03)
                a13 = _vfma(x1, s, a13)
            _vstore(wt, o0 + c * _L, _vload(wt, o0 + c * _L) - a00)
            _vstore(wt, o0 + (c + 1) * _L, _vload(wt, o0 + (c + 1) * _L) - a01)
            _vstore(wt, o0 + (c + 2) * _L, _vload(wt, o0 + (c + 2) * _L) - a02)
            _vstore(wt, o0 + (c + 3) * _L, _vload(wt, o0 + (c + 3) * _L) - a03)
            _vstore(wt, o1 + c * _L, _vload(wt, o1 + c * _L) - a10)
            _vstore(wt, o1 + (c + 1) * _L, _vload(wt, o1 + (c + 1) * _L) - a11)
            _vstore(wt, o1 + (c + 2) * _L, _vload(wt, o1 + (c + 2) * _L) - a12)
            _vstore(wt, o1 + (c + 3) * _L, _vload(wt, o1 + (c + 3) * _L) - a13)
    for p in range(0, n_pan, 2):  # columns left over when K - b1 is not a multiple of 4
        o0, o1 = p * k * _L, (p + 1) * k * _L
        e0, e1 = p * bw * _L, (p + 1) * bw * _L
        for c in range(c4, k):
            for o, oe in ((o0, e0), (o1, e1)):
                acc = _vsplat(0.0)
                for j in range(bw):
                    acc = _vfma(_vload(et, oe + j * _L), _vsplat(ut[c, b0 + j]), acc)
                _vstore(wt, o + c * _L, _vload(wt, o + c * _L) - acc)


@njit
def _store_rows(wt: np.ndarray, perm: np.ndarray, r0: int, n: int, k: int, codes: np.ndarray) -> None:
    """The codes (held as float32 in wt, columns in the order `perm`) of the block's n rows back in row and
    column order."""
    for i in range(n):
        p, lane = i // _L, i % _L
        for c in range(k):
            codes[r0 + i, perm[c]] = np.uint8(wt[(p * k + c) * _L + lane])


@njit(cache=True, parallel=True)
def _gptq_rows(
    x16: np.ndarray,
    perm: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray,
    ud: np.ndarray,
    ut: np.ndarray,
    bits: int,
    group: int,
    block: int,
    codes: np.ndarray,
    n_part: int,
) -> None:
    """GPTQ of every row of the bf16 bit patterns x16 [R, K] into codes [R, K], on the groups' fp32 scales and
    biases [R, K/g], columns taken in the order `perm` (U is the permuted H's): row blocks of _ROWS rows, split
    into n_part contiguous runs of blocks for the threads."""
    n_rows, k = x16.shape
    n_blk = (n_rows + _ROWS - 1) // _ROWS
    n_grp = k // group
    n_bins = np.float32((1 << bits) - 1)
    gidx = perm // group
    for part in prange(n_part):
        wt = np.empty(_ROWS * k, dtype=np.float32)
        et = np.empty(_ROWS * block, dtype=np.float32)
        st = np.empty(_ROWS * n_grp, dtype=np.float32)
        bt = np.empty(_ROWS * n_grp, dtype=np.float32)
        for blk in range(part * n_blk // n_part, (part + 1) * n_blk // n_part):
            r0 = blk * _ROWS
            n = min(_ROWS, n_rows - r0)
            n_pan = (n + 2 * _L - 1) // (2 * _L) * 2  # whole tiles of two panels
            _load_rows(x16, perm, scales, biases, r0, n, n_pan, wt, st, bt)
            for b0 in range(0, k, block):
                b1 = min(b0 + block, k)
                for p in range(n_pan):
                    _round_columns(wt, et, st, bt, p, k, b0, b1, ud, gidx, n_grp, n_bins)
                if b1 < k:
                    _carry(wt, et, ut, n_pan, k, b0, b1)
            _store_rows(wt, perm, r0, n, k, codes)


# ---------------------------------------------------------------- the public functions

#: How far `clipped_group_params` may shrink a group's range (1 = round-to-nearest's grid).
CLIP_SHRINKS = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79)


def diagonal_blocks(hessian: HessianRows, g: int) -> torch.Tensor:
    """H's diagonal blocks of g x g as float64 [K/g, g, g] (read `_CHUNK_ROWS` rows at a time)."""
    k = hessian.shape[0]
    out = torch.empty((k // g, g, g), dtype=torch.float64)
    step = max(_CHUNK_ROWS // g, 1) * g
    for r0 in range(0, k, step):
        rows = torch.as_tensor(hessian[r0 : r0 + step])
        for j in range(r0 // g, min(r0 + step, k) // g):
            out[j] = rows[j * g - r0 : (j + 1) * g - r0, j * g : (j + 1) * g]
    return out


def clipped_group_params(
    w16: torch.Tensor, hessian: HessianRows, bits: int, g: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (scales, biases) [R, K/g] of the bf16 weights `w16` [R, K]: per group, MLX's scale and bias from its
    min and max shrunk by the `CLIP_SHRINKS` factor whose round-to-nearest output error on the group's own
    inputs, e^T H_gg e with H_gg the group's diagonal block of H, is least (the least shrunk on a tie).

    Clipping a group's outliers coarsens them but refines the grid every other weight sits on; which wins
    depends on how loud each input is, so it is judged by output error, not weight error (measured worse).
    The error counts the bf16 scale and bias as stored. It is float32 arithmetic in a fixed order per row, every
    product and sum rounded on its own, so a grid can win over one whose exact error is lower only when the two
    differ by less than that rounding (|e|^T |H_gg| |e| times (g + 2) float32 epsilons; tests/test_gptq.py)."""
    rows, k = w16.shape
    n = k // g
    if not 1 <= len(CLIP_SHRINKS) <= _L:
        raise MintError(f"CLIP_SHRINKS has {len(CLIP_SHRINKS)} factors; the clip search takes 1 to {_L}")
    h_blocks = diagonal_blocks(hessian, g).float().numpy()
    scales, biases = np.empty((rows, n), np.float32), np.empty((rows, n), np.float32)
    x = w16.to(torch.bfloat16).float().contiguous().numpy()
    _clip_rows(
        x, h_blocks, np.array(CLIP_SHRINKS, np.float32), np.float32((1 << bits) - 1), g, scales, biases
    )
    return torch.from_numpy(scales), torch.from_numpy(biases)


#: Rows a `_clip_rows` task searches together: its lanes are (row, shrink) pairs, 8 rows x 8 shrink slots.
_CLIP_ROWS = 8


@njit(inline="always")
def _lane_err(err: np.ndarray, e: np.ndarray, p: int, i: int, hcc: Any, off: Any) -> None:
    """err[8i : 8i + 8] += e_c (H_cc e_c + 2 off_c) for the 8 lanes from 8i of the column at `p` of `e`."""
    v = _vload(e, p + i * _L)
    _vstore(err, i * _L, _vload(err, i * _L) + v * (hcc * v + _vsplat(2.0) * off))


@njit(inline="always")
def _quad_column(h_blocks: np.ndarray, j: int, c: int, g: int, e: np.ndarray, err: np.ndarray) -> None:
    """Column c's part of e^T H_jj e for the 64 lanes of the flat (g x 64) float32 `e`: off_c = sum over d in
    (c, g) of H_cd e_d in order of d (each lane a chain of products and sums from 0, eight vectors in
    registers), then err += e_c (H_cc e_c + 2 off_c)."""
    n = _CLIP_ROWS * _L
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = _vsplat(0.0)
    for d in range(c + 1, g):
        h = _vsplat(h_blocks[j, c, d])
        p = d * n
        a0 = a0 + h * _vload(e, p)
        a1 = a1 + h * _vload(e, p + 8)
        a2 = a2 + h * _vload(e, p + 16)
        a3 = a3 + h * _vload(e, p + 24)
        a4 = a4 + h * _vload(e, p + 32)
        a5 = a5 + h * _vload(e, p + 40)
        a6 = a6 + h * _vload(e, p + 48)
        a7 = a7 + h * _vload(e, p + 56)
    hcc, p = _vsplat(h_blocks[j, c, c]), c * n
    _lane_err(err, e, p, 0, hcc, a0)
    _lane_err(err, e, p, 1, hcc, a1)
    _lane_err(err, e, p, 2, hcc, a2)
    _lane_err(err, e, p, 3, hcc, a3)
    _lane_err(err, e, p, 4, hcc, a4)
    _lane_err(err, e, p, 5, hcc, a5)
    _lane_err(err, e, p, 6, hcc, a6)
    _lane_err(err, e, p, 7, hcc, a7)


@njit(parallel=True, cache=True)
def _clip_rows(
    x: np.ndarray,
    h_blocks: np.ndarray,
    shrinks: np.ndarray,
    n_bins: np.float32,
    g: int,
    scales: np.ndarray,
    biases: np.ndarray,
) -> None:
    """`clipped_group_params` for blocks of `_CLIP_ROWS` rows (grids as MLX derives them, errors in float32).
    Per group, the errors of every (row, shrink) pair of the block are computed side by side, one lane each, so
    that the quadratic form's inner loop is lane-wise vector arithmetic; each lane's error is the same sequence
    of float32 operations as a scalar loop over the group (off_c = sum over d > c of H_cd e_d in order of d;
    err = sum over c of e_c (H_cc e_c + 2 off_c) in order of c, every product and sum rounded on its own),
    whatever the block or thread."""
    rows, k = x.shape
    n_s = shrinks.size
    n_blk = (rows + _CLIP_ROWS - 1) // _CLIP_ROWS
    lanes = _CLIP_ROWS * _L  # lane r * 8 + i: row r, shrink i (shrinks past n_s repeat the first, unused)
    zero, top = _vsplat(0.0), _vsplat(n_bins)
    for blk in prange(n_blk):
        r0 = blk * _CLIP_ROWS
        n = min(_CLIP_ROWS, rows - r0)
        e = np.zeros(g * lanes, np.float32)
        err = np.empty(lanes, np.float32)
        s32 = np.ones(lanes, np.float32)
        b32 = np.zeros(lanes, np.float32)
        s16 = np.ones(lanes, np.float32)
        b16 = np.zeros(lanes, np.float32)
        for j in range(k // g):
            c0 = j * g
            for r in range(n):
                lo = x[r0 + r, c0]
                hi = lo
                for c in range(1, g):
                    lo = min(lo, x[r0 + r, c0 + c])
                    hi = max(hi, x[r0 + r, c0 + c])
                for i in range(_L):
                    a = shrinks[i] if i < n_s else shrinks[0]
                    s, b = _mlx_scale_bias(lo * a, hi * a, n_bins)
                    s32[r * _L + i], b32[r * _L + i] = s, b
                    s16[r * _L + i], b16[r * _L + i] = _bf16(s), _bf16(b)
                # the 8 shrinks' grids side by side: every weight of the row rounded on each, one lane each
                sv, bv = _vload(s32, r * _L), _vload(b32, r * _L)
                sv16, bv16 = _vload(s16, r * _L), _vload(b16, r * _L)
                for c in range(g):
                    xv = _vsplat(x[r0 + r, c0 + c])
                    q = _vmin(_vmax(_vrint((xv - bv) / sv), zero), top)
                    _vstore(e, c * lanes + r * _L, xv - _vbf16(_vbf16(q * sv16) + bv16))
            err[:] = 0.0
            for c in range(g):
                _quad_column(h_blocks, j, c, g, e, err)
            for r in range(n):
                best = np.inf
                for i in range(n_s):
                    lane = r * _L + i
                    if err[lane] < best or i == 0:  # the unshrunk grid stands even if an error is not finite
                        best = err[lane]
                        scales[r0 + r, j] = s32[lane]
                        biases[r0 + r, j] = b32[lane]


class HessianRows(Protocol):
    """A square Hessian read by rows: a tensor, or a file read a few rows at a time (artifacts/importance.HessianFile)."""

    shape: Any

    def __getitem__(self, rows: Any) -> Any: ...


def _diagonal(hessian: HessianRows) -> torch.Tensor:
    if isinstance(hessian, torch.Tensor):
        return torch.diagonal(hessian).to(torch.float64)
    return hessian.diagonal()  # type: ignore[attr-defined]


#: Threads of the factor's LAPACK calls, on every machine: MKL computes the same bits for the same thread count
#: (reproducible.torch_threads), so U, and every code, does not depend on the machine's cores; two run the
#: factor 1.6x faster than one (K = 4096-8192), and a one-core machine only waits longer.
FACTOR_THREADS = 2

#: Rows of H converted at a time when it is copied into the factor's float64 buffer (bounds the transient).
_CHUNK_ROWS = 1024


def inverse_cholesky_t(hessian: HessianRows, damp: float, perm: torch.Tensor | None = None) -> torch.Tensor:
    """U^T (float32 [K, K], contiguous, zero above the diagonal) for U the upper Cholesky factor of
    (H + damp * mean(diag H) * I)^-1 with H's rows and columns in the order `perm` (default: stored order),
    computed in float64.

    The damping keeps H invertible when calibration tokens are fewer than inputs or an input is always zero;
    larger values move the result toward round-to-nearest. U comes from one Cholesky factorization and one
    triangular inverse (2/3 K^3 flops, half the 4/3 K^3 of inverting H and factoring the inverse): with J the
    order reversal, J H J = L L^T gives H = (J L J)(J L J)^T, so H^-1 = U^T U with U = J L^-1 J upper
    triangular with a positive diagonal, which is the unique Cholesky factor of H^-1. Computed on
    FACTOR_THREADS threads whatever the caller's thread count, so that U, and with it every code, is the same on
    every machine. Memory: one float64 [K, K] buffer that the Cholesky factorization and the triangular inverse
    overwrite in place, plus the float32 result and transients of `_CHUNK_ROWS` rows; H itself is only read by
    rows (it may wait on disk). tests/test_gptq_cost.py checks U against inverting H and factoring the inverse.
    """
    k = hessian.shape[0]
    if len(hessian.shape) != 2 or hessian.shape[1] != k:
        raise MintError(f"Hessian of shape {list(hessian.shape)} is not square")
    rev = (torch.arange(k) if perm is None else perm).flip(0)
    buf = torch.empty((k, k), dtype=torch.float64)
    for i0 in range(0, k, _CHUNK_ROWS):
        rows = hessian[rev[i0 : i0 + _CHUNK_ROWS]]
        buf[i0 : i0 + _CHUNK_ROWS] = torch.as_tensor(rows)[:, rev].to(torch.float64)
        del rows
    diag = torch.diagonal(buf)
    dead = diag <= 0
    diag[dead] = 1.0  # an input that never fired: nothing to compensate through it
    diag += damp * float(diag.mean())
    t = buf.mT  # J H J is symmetric: its column-major view is itself, and LAPACK works on it in place
    try:
        with torch_threads(FACTOR_THREADS):
            torch.linalg.cholesky(t, out=t)
            _invert_lower(t)
    except RuntimeError as e:  # torch raises _LinAlgError (a RuntimeError) for a non-positive-definite H
        raise MintError(f"Hessian is not positive definite even with damp {damp}: {e}") from None
    # t's lower triangle is L^-1, so buf[a, b] = L^-1[b, a] for b >= a, and U^T[i, c] = buf[K-1-i, K-1-c]
    ut = torch.empty((k, k), dtype=torch.float32)
    for i0 in range(0, k, _CHUNK_ROWS):
        i1 = min(i0 + _CHUNK_ROWS, k)
        ut[i0:i1] = torch.tril(buf[k - i1 : k - i0].flip(0, 1), diagonal=i0)
    return ut


#: Below this size `_invert_lower` inverts a diagonal block by one triangular solve against the identity.
_TRI_BASE = 256


def _invert_lower(t: torch.Tensor) -> None:
    """Overwrite the lower triangle of the square float64 view `t` (a lower triangular L; the upper triangle is
    not read and may be overwritten) with L^-1: recursively, [A 0; B C]^-1 = [A^-1 0; -C^-1 B A^-1 C^-1], the
    off-diagonal block by two triangular solves before A and C are inverted (1/6 K^3 multiply-adds in all),
    `_CHUNK_ROWS` rows or columns of it at a time."""
    n = t.shape[0]
    if n <= _TRI_BASE:
        t.copy_(torch.linalg.solve_triangular(t, torch.eye(n, dtype=t.dtype), upper=False))
        return
    h = n // 2
    a, b, c = t[:h, :h], t[h:, :h], t[h:, h:]
    for r0 in range(0, n - h, _CHUNK_ROWS):  # B A^-1, row by row
        b[r0 : r0 + _CHUNK_ROWS] = torch.linalg.solve_triangular(
            a, b[r0 : r0 + _CHUNK_ROWS], upper=False, left=False
        )
    for c0 in range(0, h, _CHUNK_ROWS):  # -C^-1 (B A^-1), column by column
        b[:, c0 : c0 + _CHUNK_ROWS] = torch.linalg.solve_triangular(
            c, b[:, c0 : c0 + _CHUNK_ROWS], upper=False
        ).neg_()
    _invert_lower(a)
    _invert_lower(c)


def act_order(hessian: HessianRows) -> torch.Tensor:
    """The order GPTQ rounds the input columns in: loudest input first (diag H descending, ties by index), so
    that the columns whose error costs most are rounded while the most columns remain to take it up."""
    return torch.argsort(_diagonal(hessian), descending=True, stable=True)


@dataclass(frozen=True)
class Factor:
    """What GPTQ needs of one Hessian, whatever the weight: the column order and U^T (contiguous) for U the
    upper Cholesky factor of the reordered, damped H^-1."""

    perm: torch.Tensor
    ut: torch.Tensor

    @property
    def u(self) -> torch.Tensor:
        return self.ut.T


def factor(hessian: HessianRows, damp: float) -> Factor:
    """`act_order(hessian)` and `inverse_cholesky_t` of H with its rows and columns in that order."""
    perm = act_order(hessian)
    return Factor(perm, inverse_cholesky_t(hessian, damp, perm))


def _diagonal_u(ut: np.ndarray, block: int) -> np.ndarray:
    """ud [K, block] with ud[j, c - b0] = U[j, c] for the columns c of j's column block [b0, b1): the part of U
    the column loop reads (the rest is read as U^T by the block product)."""
    k = ut.shape[0]
    ud = np.zeros((k, block), np.float32)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        ud[b0:b1, : b1 - b0] = ut[b0:b1, b0:b1].T
    return ud


def gptq_codes(
    w: torch.Tensor,
    hessian: HessianRows,
    option: Option,
    damp: float,
    block: int = 128,
    fac: Factor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes [R, K], bf16 scales [R, K/g], bf16 biases [R, K/g]) of a 2-D `w` rounded by GPTQ.

    `w` is first rounded to bf16, as the packer stores it; every group's scale and bias are round-to-nearest's
    (quant/reference.py, from the group's own values), and the codes on that grid are chosen column by column in
    `act_order`. `block` columns are updated at a time (rounded to a multiple of g). `fac`: `factor(hessian,
    damp)` when the caller has it. The arithmetic is the module docstring's; the result does not depend on the
    thread count.
    """
    bits, g = option.bits, option.group
    if w.ndim != 2:
        raise MintError(f"GPTQ rounds 2-D weights; got shape {list(w.shape)}")
    rows, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise MintError(f"Hessian of shape {list(hessian.shape)} does not match {k} input columns")
    if k % g or not 1 <= bits <= 8:
        raise MintError(f"GPTQ needs whole groups of {g} in {k} columns and 1-8 bits, got {option.name}")
    fac = factor(hessian, damp) if fac is None else fac
    w16 = w.detach().to(torch.bfloat16).contiguous()
    scales, biases = clipped_group_params(w16, hessian, bits, g)
    codes = np.empty((rows, k), dtype=np.uint8)
    block = max(block // g, 1) * g
    n_part = max(1, min(-(-rows // _ROWS), 8 * get_num_threads()))
    ut = fac.ut.numpy()
    _gptq_rows(
        w16.view(torch.int16).numpy(), fac.perm.numpy(), scales.contiguous().numpy(), biases.contiguous().numpy(),
        _diagonal_u(ut, block), ut, bits, g, block, codes, n_part,
    )  # fmt: skip
    return torch.from_numpy(codes), scales.to(torch.bfloat16), biases.to(torch.bfloat16)


def output_error(w: torch.Tensor, deq: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the squared output error over the tokens H was summed from (the product in
    float32, thread-count independent here; the sum in float64)."""
    e = w.float() - deq.float()
    return sum64((e @ hessian.float()) * e)


#: The stated bound of a row-sampled gain: within this many of its standard errors of the gain over every row.
#: The delta method's standard error under-estimates when the rows' errors are heavy-tailed (outlier rows):
#: measured rms deviation 1.7-1.9 standard errors, largest 5.4 (tests/test_gptq_cost.py's data, 64 draws).
GAIN_BOUND_SE = 6.0


@dataclass(frozen=True)
class GainEstimate:
    """GPTQ's held-out gain of one tensor at one option, estimated on a row sample, with its standard error."""

    gain: float
    #: Standard error of `gain` as an estimate of the gain over every row of the tensor (the ratio estimator's,
    #: by the delta method, with the finite-population correction; 0 when every row was used).
    stderr: float


@dataclass(frozen=True)
class HeldOutInputs:
    """The held-out tokens' inputs themselves (tokens x K, float32), standing for their Hessian H = X^T X where
    there are fewer tokens than inputs: an output error is then ||(W - Q) X^T||^2, rows x K x tokens
    multiply-adds instead of rows x K x K, and X is smaller than H (`held_out_rule`)."""

    x: torch.Tensor


def held_out_rule(tokens: int, k: int) -> bool:
    """Whether a K-wide input's held-out error is measured on its `tokens` inputs (`HeldOutInputs`) rather
    than on their Hessian: exactly when there are some, and fewer than inputs (the cheaper product, the smaller
    array; both give tr((W - Q) H (W - Q)^T) up to float32 rounding)."""
    return 0 < tokens < k


def _row_errors(
    w: torch.Tensor, deq: torch.Tensor, held: torch.Tensor | HeldOutInputs
) -> tuple[float, torch.Tensor]:
    """(`output_error`, the same product's float64 sum per row), from the held-out Hessian or the held-out
    inputs (the product in float32, its squares or its products with e summed in float64)."""
    e = w.float() - deq.float()
    if isinstance(held, HeldOutInputs):
        y = e @ held.x.T
        p = y * y
    else:
        p = (e @ held.float()) * e
    return sum64(p), sum64(p, axis=1)


def _held_out_operand(held_out: Any) -> torch.Tensor | HeldOutInputs:
    """What `_row_errors` multiplies by: the held-out inputs as given, or the held-out Hessian in float32 (read
    now when it is a lazy one with a `load`)."""
    if isinstance(held_out, HeldOutInputs):
        return held_out
    if hasattr(held_out, "load"):
        return held_out.load()
    return held_out.float()


def _ratio_stderr(a: torch.Tensor, b: torch.Tensor, population: int) -> float:
    """Standard error of sum(a) / sum(b) for n rows drawn without replacement from `population` rows."""
    n = a.numel()
    if n >= population or n < 2 or float(b.sum()) <= 0:
        return 0.0
    r = float(a.sum() / b.sum())
    d = a - r * b
    var = float((d * d).sum()) / (n - 1) * (1 - n / population) / n
    return var**0.5 / float(b.mean())


def gain_estimates(
    w: torch.Tensor,
    fit: HessianRows,
    held_out: Any,
    options: list[Option],
    damp: float,
    block: int,
    rows: int = 1024,
    seed: int = 0,
    fac: Factor | None = None,
) -> dict[str, GainEstimate]:
    """Per option, the output error of GPTQ fitted on the Hessian `fit`, over round-to-nearest's, both measured
    on `held_out` (the Hessian of other tokens, or those tokens' inputs as `HeldOutInputs`): below 1 when GPTQ
    helps on text it did not see.

    GPTQ rounds each row against the same H independently of the other rows, so the ratio is estimated on a
    seeded sample of `rows` rows (all of them when there are no more), with its standard error: the sampled gain
    is within GAIN_BOUND_SE standard errors of the gain over every row (tests/test_gptq_cost.py measures it). `fac`:
    `factor(fit, damp)` when the caller has it (made once per Hessian, shared by every option and every tensor
    reading the same input).
    """
    population = w.shape[0]
    if population > rows:
        pick = torch.randperm(population, generator=torch.Generator().manual_seed(seed))[:rows]
        w = w[pick.sort().values]
    # factored before the held-out H is read, so that the two need not be in memory together
    fac = factor(fit, damp) if fac is None else fac
    h = _held_out_operand(held_out)
    out = {}
    for opt in options:
        q, s, b = gptq_codes(w, fit, opt, damp, block, fac)
        rtn, rtn_rows = _row_errors(w, quantize_dequantize(w, opt), h)
        err, err_rows = _row_errors(w, dequantize_codes(q, s, b, opt.group), h)
        if rtn > 0:
            out[opt.name] = GainEstimate(err / rtn, _ratio_stderr(err_rows, rtn_rows, population))
        else:
            out[opt.name] = GainEstimate(1.0, 0.0)
    return out


def rounding_gain(
    w: torch.Tensor,
    fit: HessianRows,
    held_out: Any,
    options: list[Option],
    damp: float,
    block: int,
    rows: int = 1024,
    seed: int = 0,
    fac: Factor | None = None,
) -> dict[str, float]:
    """`gain_estimates`' gains: what the allocator multiplies the tensor's fisher cost by, so that it prices the
    tensor as the packer will store it."""
    est = gain_estimates(w, fit, held_out, options, damp, block, rows, seed, fac)
    return {name: e.gain for name, e in est.items()}
