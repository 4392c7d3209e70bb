"""The packer's fused quantize + pack kernel: MLX affine round-to-nearest of a bf16 tensor straight into MLX's
uint32 words and bf16 scales and biases.

Same arithmetic as reference.quantize_codes (float32, division by the scale, round half to even, bf16 rounding
of scale and bias), which tests/test_quant.py proves equal to mx.quantize; tests/test_pack.py checks this kernel
against both.

The fast path is the profile kernel's layout (simd.py): a block of 8 rows is transposed so that each 8-lane
vector holds one column of 8 rows. Every step is then vertical vector math with no branches on the data:
min/max, MLX's scale and bias (including its divisions), the codes (a true float32 division, as MLX), and the
packing itself, because all lanes put their code at the same bit position. For 3-, 5- and 6-bit codes the bit
stream crosses word boundaries at positions that are the same in every lane, so the spill is two shifts, not a
branch per value. Rows left over (R not a multiple of 8) take the scalar row path.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import get_num_threads, njit, prange

from mintbuild.errors import MintError
from mintbuild.formats import Option
from mintbuild.mlx.quant.simd import (
    W,
    mlx_scale_bias,
    transpose_rows,
    ubf16,
    ucodes,
    uor,
    ushl,
    ushr,
    ustore,
    uzero,
    vload,
    vmax,
    vmin,
    vmlx_scale_bias,
    vrint,
    vsplat,
)

_FLAGS = {"reassoc", "nnan", "ninf", "nsz"}


_ZERO = np.float32(0.0)


@njit(inline="always")
def _bf16_bits(fbuf: np.ndarray, ubuf: np.ndarray, v: np.float32) -> np.uint16:
    """bf16 bit pattern of v, round to nearest even (what torch's .to(bfloat16) does for finite values)."""
    fbuf[0] = v
    u = ubuf[0]
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, parallel=True)
def _quantize_pack(x16, bits, group, words, scales, biases, bad, threads) -> None:
    """x16 bf16 bit patterns (uint16) [R, K] -> words uint32 [R, K*bits/32], scales/biases bf16 bits [R, K/g].

    Nothing is written when a value is NaN or Inf: `bad` then counts them per row."""
    n_rows, k = x16.shape
    for r in prange(n_rows):
        n_bad = 0
        for i in range(k):
            n_bad += (x16[r, i] & np.uint16(0x7F80)) == np.uint16(0x7F80)  # exponent all ones: NaN or Inf
        bad[r] = n_bad
    if bad.any():
        return
    n_full = n_rows // W
    n_part = max(1, min(n_full, 8 * threads))
    kw = words.shape[1]
    for part in prange(n_part):
        # Scratch once per partition: the transposed values, words and per-group scale/bias bits.
        xt = np.empty((k, W), dtype=np.float32)
        wt = np.empty((kw, W), dtype=np.uint32)
        sb = np.empty((2, W), dtype=np.uint32)
        for blk in range(part * n_full // n_part, (part + 1) * n_full // n_part):
            r0 = blk * W
            transpose_rows(x16, r0, xt)
            for gi in range(k // group):
                _pack_group(xt, gi * group, group, bits, wt, sb)
                for lane in range(W):
                    scales[r0 + lane, gi] = np.uint16(sb[0, lane])
                    biases[r0 + lane, gi] = np.uint16(sb[1, lane])
            for w in range(kw):
                for lane in range(W):
                    words[r0 + lane, w] = wt[w, lane]
    _pack_rows(x16, bits, group, words, scales, biases, n_full * W)


@njit(inline="always")
def _pack_group(xt, c0, group, bits, wt, sb) -> None:
    """One group (columns c0 .. c0+group) of 8 transposed rows: scale and bias bf16 bits into sb [2, 8], the
    packed words into wt [K*bits/32, 8]."""
    zero = vsplat(0.0)
    nb = vsplat((1 << bits) - 1)
    lo = vload(xt, c0 * W)
    hi = lo
    for i in range(c0 + 1, c0 + group):
        v = vload(xt, i * W)
        lo = vmin(lo, v)
        hi = vmax(hi, v)
    scale, bias = vmlx_scale_bias(lo, hi, nb)
    ustore(sb, 0, ubf16(scale))
    ustore(sb, W, ubf16(bias))
    # Codes into a little-endian bit stream; every group starts on a word boundary (group * bits % 32 == 0).
    w = c0 * bits // 32
    acc = uzero()
    n_acc = 0
    for i in range(c0, c0 + group):
        u = ucodes(vmin(vmax(vrint((vload(xt, i * W) - bias) / scale), zero), nb))
        acc = uor(acc, ushl(u, n_acc))
        n_acc += bits
        if n_acc >= 32:
            ustore(wt, w * W, acc)
            w += 1
            n_acc -= 32
            acc = ushr(u, bits - n_acc) if n_acc else uzero()


@njit(cache=True, fastmath=_FLAGS)
def _pack_rows(x16, bits, group, words, scales, biases, first) -> None:
    """Rows first.. one at a time: widen to float32, per group the parameters and the codes (a branch-free
    loop the compiler vectorises), then the codes are packed (MLX's layout, as in `_pack_group`). Only
    reassociation of min/max and no-NaN/Inf assumptions (inputs are checked finite first); never
    arcp/contract, which would change the division and break bit-exactness."""
    n_rows, k = x16.shape
    n_bins = np.float32((1 << bits) - 1)
    per = 32 // bits if 32 % bits == 0 else 0
    ubuf = np.empty(k, dtype=np.uint32)
    row = ubuf.view(np.float32)
    codes = np.empty(k, dtype=np.uint32)
    fbuf = np.empty(1, dtype=np.float32)
    fbits = fbuf.view(np.uint32)
    for r in range(first, n_rows):
        for i in range(k):
            ubuf[i] = np.uint32(x16[r, i]) << np.uint32(16)
        for gi in range(k // group):
            start = gi * group
            w_min = row[start]
            w_max = row[start]
            for i in range(start + 1, start + group):
                w_min = min(w_min, row[i])
                w_max = max(w_max, row[i])
            scale, bias = mlx_scale_bias(w_min, w_max, n_bins)
            scales[r, gi] = _bf16_bits(fbuf, fbits, scale)
            biases[r, gi] = _bf16_bits(fbuf, fbits, bias)
            # fl32(x * fl64(1/s)) == fl32(x / s) for float32 x and s: a quotient of two 24-bit significands is
            # never a float32 rounding midpoint and lies at least 2^-48 (relative) from one, while the float64
            # product is within 2^-52 of it. Unlike the division this vectorises.
            inv = np.float64(1.0) / np.float64(scale)
            for i in range(start, start + group):
                q = np.float32(np.float64(row[i] - bias) * inv)
                codes[i] = np.int32(min(max(np.rint(q), _ZERO), n_bins))
        _pack_row(codes, bits, per, words[r])


@njit(inline="always")
def _pack_row(codes: np.ndarray, bits: int, per: int, out: np.ndarray) -> None:
    k = codes.shape[0]
    if per:
        for w in range(k // per):
            acc = np.uint32(0)
            for j in range(per):
                acc |= codes[w * per + j] << np.uint32(j * bits)
            out[w] = acc
        return
    for c in range(k // 32):
        acc64 = np.uint64(0)
        n_acc = 0
        w = c * bits
        for j in range(32):
            acc64 |= np.uint64(codes[c * 32 + j]) << np.uint64(n_acc)
            n_acc += bits
            if n_acc >= 32:
                out[w] = np.uint32(acc64 & np.uint64(0xFFFFFFFF))
                w += 1
                acc64 >>= np.uint64(32)
                n_acc -= 32


def packed_shapes(option: Option, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(words shape, scales/biases shape) of `shape` stored with `option`, refusing a shape it cannot store."""
    reason = option.unavailable_reason(shape)
    if reason:
        raise MintError(f"option {option.name} cannot store shape {list(shape)}: {reason}")
    return option.packed_shape(shape)


def quantize_pack(w: torch.Tensor, option: Option) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX affine tensors of `w` (rounded to bf16 first, as stored): (uint32 words, bf16 scales, bf16 biases),
    the scales and biases as uint16 bit patterns, all in MLX's shapes (`Option.packed_shape`)."""
    shape = tuple(w.shape)
    wshape, sshape = packed_shapes(option, shape)
    x16 = w.to(torch.bfloat16).contiguous().reshape(-1, shape[-1]).view(torch.int16).numpy().view(np.uint16)
    rows = x16.shape[0]
    words = np.empty((rows, wshape[-1]), dtype=np.uint32)
    scales = np.empty((rows, sshape[-1]), dtype=np.uint16)
    biases = np.empty((rows, sshape[-1]), dtype=np.uint16)
    bad = np.zeros(rows, dtype=np.int64)
    _quantize_pack(x16, option.bits, option.group, words, scales, biases, bad, get_num_threads())
    if bad.any():
        raise MintError(f"{int(bad.sum())} NaN or Inf value(s) in row(s) {np.flatnonzero(bad)[:3].tolist()}")
    return words.reshape(wshape), scales.reshape(sshape), biases.reshape(sshape)
