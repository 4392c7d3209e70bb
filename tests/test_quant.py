"""The quantizer against the oracle: MLX's own mx.quantize / mx.dequantize, for every bits x group."""

from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest
import torch

from mintbuild.formats import OPTION_SETS, Option
from mintbuild.mlx.quant import reference
from mintbuild.mlx.quant.error_kernels import row_sse
from mintbuild.mlx.quant.reference import dequantize_codes, pack_codes, quantize_codes, unpack_codes

QUANT_OPTIONS = [o for o in OPTION_SETS["default"] if not o.passthrough]
DTYPES = [(torch.bfloat16, mx.bfloat16), (torch.float16, mx.float16)]


def _weights(rows: int = 48, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[1, :128] = 0.0  # all-zero groups
    w[2, :128] = 0.01  # constant groups
    w[3, :64] = 1e-9  # values below MLX's scale floor
    w[4] += rng.standard_normal(cols).astype(np.float32) * (rng.random(cols) < 0.02) * 0.5  # outliers
    w[5, ::2] *= -30  # asymmetric groups: the negative edge dominates
    return w


@pytest.mark.parametrize("tdt,mdt", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("opt", QUANT_OPTIONS, ids=str)
def test_matches_mx_quantize_bit_for_bit(opt: Option, tdt: torch.dtype, mdt) -> None:
    w = _weights()
    wm = mx.array(w).astype(mdt)
    qm, sm, bm = mx.quantize(wm, group_size=opt.group, bits=opt.bits)
    q, s, b = quantize_codes(torch.from_numpy(w).to(tdt), opt, tdt)
    words = pack_codes(q, opt.bits)
    assert words.dtype == np.uint32 and words.shape == tuple(qm.shape)
    assert np.array_equal(words, np.array(qm))
    assert np.array_equal(s.float().numpy(), np.array(sm.astype(mx.float32)))
    assert np.array_equal(b.float().numpy(), np.array(bm.astype(mx.float32)))
    assert np.array_equal(unpack_codes(words, opt.bits, w.shape[1]), q.numpy())
    deq_mx = np.array(mx.dequantize(qm, sm, bm, group_size=opt.group, bits=opt.bits).astype(mx.float32))
    assert np.array_equal(dequantize_codes(q, s, b, opt.group, tdt).float().numpy(), deq_mx)


@pytest.mark.parametrize("opt", [Option(3, 64), Option(4, 32), Option(6, 128)], ids=str)
def test_sliced_pack_and_dequantize_match_mx(opt: Option, monkeypatch) -> None:
    """Large tensors are packed and dequantized a slice of rows at a time (bounded memory); forced here onto
    many uneven slices, the result is still mx.quantize's / mx.dequantize's bit for bit."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 5 * 512 + 7)
    assert len(reference.row_slices(48, 512)) == 10
    w = _weights(seed=2)
    qm, sm, bm = mx.quantize(mx.array(w).astype(mx.bfloat16), group_size=opt.group, bits=opt.bits)
    q, s, b = quantize_codes(torch.from_numpy(w).bfloat16(), opt, torch.bfloat16)
    assert np.array_equal(pack_codes(q, opt.bits), np.array(qm))
    deq_mx = np.array(mx.dequantize(qm, sm, bm, group_size=opt.group, bits=opt.bits).astype(mx.float32))
    assert np.array_equal(dequantize_codes(q, s, b, opt.group).float().numpy(), deq_mx)


@pytest.mark.parametrize("opt", QUANT_OPTIONS, ids=str)
def test_fused_kernel_error_equals_mx_error(opt: Option) -> None:
    """The profile's error is the error of the tensor mx.dequantize gives back."""
    w = torch.from_numpy(_weights(seed=1)).bfloat16()
    wm = mx.array(w.float().numpy()).astype(mx.bfloat16)
    deq = mx.dequantize(
        *mx.quantize(wm, group_size=opt.group, bits=opt.bits), group_size=opt.group, bits=opt.bits
    )
    ref = w.float().numpy()
    want = ((np.array(deq.astype(mx.float32)).astype(np.float64) - ref) ** 2).sum(axis=1)
    got = row_sse(ref, ref, np.array([opt.bits]), np.array([opt.group]))[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_error_falls_with_bits_and_smaller_groups() -> None:
    x = torch.from_numpy(_weights(seed=2)).bfloat16().float().numpy()
    opts = QUANT_OPTIONS
    sse = row_sse(x, x, np.array([o.bits for o in opts]), np.array([o.group for o in opts])).sum(axis=0)
    by = {o: e for o, e in zip(opts, sse, strict=True)}
    for g in (32, 64, 128):
        errs = [by[Option(b, g)] for b in (2, 3, 4, 5, 6, 8)]
        assert all(a > b for a, b in itertools.pairwise(errs)), errs
    for b in (2, 3, 4):
        assert by[Option(b, 32)] < by[Option(b, 128)]
    # Uniform-noise theory for Gaussian weights: 4-bit g64 NRMSE is of order 0.1.
    nrmse = np.sqrt(by[Option(4, 64)] / (x.astype(np.float64) ** 2).sum())
    assert 0.03 < nrmse < 0.2


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_unpack_inverts_pack_across_blocks(bits: int) -> None:
    """unpack_codes works in blocks of 2^17 chunks of 32 codes: a tensor spanning several blocks (and a partial
    last one) round-trips exactly."""
    rng = np.random.default_rng(bits)
    rows, k = 9000, 576  # 162,000 chunks of 32 codes: two blocks, the second partial
    q = torch.from_numpy(rng.integers(0, 1 << bits, (rows, k), dtype=np.uint8))
    words = pack_codes(q, bits)
    assert np.array_equal(unpack_codes(words, bits, k), q.numpy())
