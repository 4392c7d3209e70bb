"""MLX affine round-to-nearest: quantize, dequantize, and the per-option error of a tensor.

This is the one quantizer of mintbuild. It reproduces `mx.quantize` (MLX's CPU kernel) bit for bit, so the
error the profile measures is the error of the model the packer writes:

    per group of g consecutive elements (last dimension), in float32:
      scale = max((max - min) / (2^b - 1), 1e-7), signed so that the edge with the larger magnitude
      (min if |min| > |max|, else max) maps to an integer code q0 = rint(edge / scale); when q0 != 0 the
      scale is re-derived as edge / q0 and the bias is that edge (so it is represented exactly), else bias 0;
      q = clip(rint((w - bias) / scale), 0, 2^b - 1)
    stored: q packed little-endian into uint32 words, scale and bias rounded to the 16-bit storage dtype;
    dequantized: w' = scale16 * q + bias16, each operation rounded to the storage dtype (as MLX does).
"""

from __future__ import annotations

import numpy as np
import torch

from mintbuild.formats import Option

EPS = 1e-7
#: Bumped whenever the quantizer's numbers change; recorded in every profile's provenance.
QUANTIZER_VERSION = "mlx-affine-rtn/1"
#: Values handled per slice by the whole-tensor helpers below (float32 temporaries of 64 MB).
CHUNK_ELEMENTS = 1 << 24


def _group_params(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (scale, bias) per group, as MLX's kernel derives them (before the 16-bit rounding)."""
    n_bins = float((1 << bits) - 1)
    w_min = groups.amin(dim=-1)
    w_max = groups.amax(dim=-1)
    return _params_from_minmax(w_min, w_max, n_bins)


def _params_from_minmax(
    w_min: torch.Tensor, w_max: torch.Tensor, n_bins: float
) -> tuple[torch.Tensor, torch.Tensor]:
    mask = w_min.abs() > w_max.abs()
    scale = torch.clamp_min((w_max - w_min) / n_bins, EPS)
    scale = torch.where(mask, scale, -scale)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scale)
    nz = q0 != 0
    scale = torch.where(nz, edge / q0, scale)
    bias = torch.where(nz, edge, torch.zeros_like(edge))
    return scale, bias


def quantize_codes(
    w: torch.Tensor, option: Option, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (uint8, w's shape), scales and biases ([..., K/g], `dtype`) of MLX affine quantization.

    `w` is first cast to the storage dtype `dtype`, as the packer stores it; the math runs in float32.
    """
    bits, g = option.bits, option.group
    x = w.to(dtype).float()
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // g, g)
    scale, bias = _group_params(groups, bits)
    q = torch.round((groups - bias[..., None]) / scale[..., None]).clamp_(0, (1 << bits) - 1)
    return q.to(torch.uint8).reshape(x.shape), scale.to(dtype), bias.to(dtype)


def dequantize_codes(
    q: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor,
    group: int,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    shape = q.shape
    k = shape[-1]
    q2, s2, b2 = q.reshape(-1, k), scales.reshape(-1, k // group), biases.reshape(-1, k // group)
    out = torch.empty(q2.shape, dtype=dtype)
    # Rows a slice at a time: the float32 temporaries stay ~64 MB whatever the tensor (a 128k-row embedding
    # dequantized whole took four float32 copies of itself).
    for r0, r1 in row_slices(q2.shape[0], k):
        qg = q2[r0:r1].float().reshape(r1 - r0, k // group, group)
        # MLX evaluates scale * q + bias in the storage dtype: each operation rounds to it.
        o = (qg * s2[r0:r1].float()[..., None]).to(dtype).float() + b2[r0:r1].float()[..., None]
        out[r0:r1] = o.reshape(r1 - r0, k).to(dtype)
    return out.reshape(shape)


def row_slices(rows: int, row_elements: int) -> list[tuple[int, int]]:
    """[r0, r1) slices of `rows` rows holding about CHUNK_ELEMENTS values each (at least one row)."""
    step = max(1, CHUNK_ELEMENTS // max(row_elements, 1))
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def pack_codes(q: torch.Tensor, bits: int) -> np.ndarray:
    """Pack uint8 codes [..., K] into MLX's uint32 words [..., K*bits/32] (little-endian bit stream)."""
    codes = q.cpu().numpy().astype(np.uint8, copy=False)
    lead, k = codes.shape[:-1], codes.shape[-1]
    flat = codes.reshape(-1, k)
    packed = np.empty((flat.shape[0], k * bits // 8), dtype=np.uint8)
    # A slice of rows at a time: the bit planes take 8 bytes per code.
    for r0, r1 in row_slices(flat.shape[0], 8 * k):
        # Each code contributes `bits` bits, least significant first; the stream is then cut into bytes.
        planes = np.unpackbits(flat[r0:r1, :, None], axis=-1, bitorder="little")[..., :bits]
        packed[r0:r1] = np.packbits(planes.reshape(r1 - r0, k * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed.view("<u4").reshape(*lead, k * bits // 32)).view(np.uint32)


def unpack_codes(words: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint32 words [..., K*bits/32] -> uint8 codes [..., K].

    Every 32 codes fill exactly `bits` words (K is a multiple of the group, hence of 32), so each chunk of
    `bits` words is read as 64-bit pairs (word j | word j+1 << 32) and code c is one shift and mask away.
    Blocked so that the 8-byte-per-code temporary stays small on large embeddings.
    """
    lead = words.shape[:-1]
    chunks = np.ascontiguousarray(words).reshape(-1, bits)
    offsets = np.arange(32) * bits
    word, shift = offsets // 32, (offsets % 32).astype(np.uint64)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((chunks.shape[0], 32), dtype=np.uint8)
    step = 1 << 17
    for c0 in range(0, chunks.shape[0], step):
        w = chunks[c0 : c0 + step].astype(np.uint64)
        # The last word's upper half is never read: a code that starts in it ends inside it.
        pairs = w | (np.roll(w, -1, axis=1) << np.uint64(32))
        out[c0 : c0 + step] = (pairs[:, word] >> shift) & mask
    return out.reshape(*lead, k)


def quantize_dequantize(w: torch.Tensor, option: Option, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The storage-dtype tensor the runtime will see for `w` stored with `option`."""
    if option.passthrough:
        return w.to(dtype)
    q, s, b = quantize_codes(w, option, dtype)
    return dequantize_codes(q, s, b, option.group, dtype)


def group_sse(x: torch.Tensor, bits: int, group: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Sum of squared error per row of `x` (float32 [R, K], already in the storage dtype's values).

    The fused hot loop of the profile: one min/max per group, codes, 16-bit scale/bias, dequantized value
    rounded to the storage dtype, squared error summed in float64 per row.
    """
    groups = x.reshape(x.shape[0], x.shape[1] // group, group)
    scale, bias = _group_params(groups, bits)
    q = torch.round((groups - bias[..., None]) / scale[..., None]).clamp_(0, (1 << bits) - 1)
    deq = (q * scale.to(dtype).float()[..., None]).to(dtype).float()
    deq = (deq + bias.to(dtype).float()[..., None]).to(dtype).float()
    err = deq.sub_(groups)
    return err.square_().sum(dim=(1, 2), dtype=torch.float64)
