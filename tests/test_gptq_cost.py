"""GPTQ at matmul cost: the lane-wise clip search is the scalar loop bit for bit, each distinct Hessian is
factored once (a content-addressed cache whose factor gives the codes a fresh one gives), and the held-out gain
estimated on a sample of rows stays within its stated bound of the gain on every row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.bench_gptq import head, hessian, reference_clipped_group_params
from mintbuild.artifacts.importance import HessianFile
from mintbuild.calibration.hessians import pickable_options
from mintbuild.formats import Option
from mintbuild.mlx import gptq
from mintbuild.mlx.factor_cache import FactorCache
from mintbuild.mlx.gptq import GAIN_BOUND_SE, factor, gain_estimates, gptq_codes, rounding_gain
from mintbuild.mlx.quant.reference import quantize_dequantize
from mintbuild.reproducible import one_torch_thread, torch_threads
from tests.test_gptq import tokens, weights


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
        assert not torch.equal(got[0], reference_clipped_group_params(w, h, opt.bits, opt.group, (1.0,))[0])


def test_factor_is_the_same_whatever_the_callers_threads() -> None:
    """The factor's LAPACK calls run on FACTOR_THREADS threads whatever the caller set, so U is the same bits on
    a machine of any core count. At K = 1536 the thread count matters to MKL (measured: U on one thread differs
    from U on two), so a factor that took the caller's count would fail here."""
    h = hessian(1536, 1536, seed=5).float()
    got = []
    for threads in (1, 2, 3):
        with torch_threads(threads):
            got.append(factor(h, 0.1).ut)
    assert all(torch.equal(got[0], u) for u in got[1:])


@pytest.mark.parametrize("k", [5, 257, 777])
def test_lower_triangular_inverse_in_place(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """`_invert_lower` leaves L^-1 in the lower triangle whatever the upper one held (LAPACK's scratch there),
    for sizes that split unevenly, with chunks that do not divide the blocks."""
    monkeypatch.setattr(gptq, "_CHUNK_ROWS", 37)
    monkeypatch.setattr(gptq, "_TRI_BASE", 64)
    g = torch.Generator().manual_seed(k)
    low = torch.randn(k, k, generator=g, dtype=torch.float64).tril(-1) / k**0.5 + torch.diag(
        1 + torch.rand(k, generator=g, dtype=torch.float64)
    )
    work = (low + 1e3 * torch.randn(k, k, generator=g, dtype=torch.float64).triu(1)).mT.contiguous().mT
    gptq._invert_lower(work)
    torch.testing.assert_close(work.tril(), torch.linalg.inv(low), rtol=1e-10, atol=1e-12)


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


def test_sampled_gain_is_within_its_stated_error_of_the_full_gain() -> None:
    """The gain on a seeded sample of rows against the gain on every row, on a tensor with outliers and
    correlated inputs with loud channels (fit and held-out Hessians from different tokens): every deviation
    within the stated bound, GAIN_BOUND_SE standard errors (measured on this data over 8 seeds: rms deviation
    1.7-1.9 standard errors, largest 5.4: the rows' errors are heavy-tailed, so the delta method's error is an
    under-estimate by about half), and the standard errors small enough to matter."""
    opts = [Option(4, 64), Option(3, 32), Option(2, 64), Option(6, 128)]
    w = weights(1024, 512, 7)
    fit, held = (x.double().T @ x.double() for x in (tokens(2048, 512, 3), tokens(2048, 512, 4)))
    fac = factor(fit, 0.1)
    full = gain_estimates(w, fit, held, opts, 0.1, 128, rows=1024, fac=fac)
    assert all(e.stderr == 0 for e in full.values())
    z = []
    for seed in (0, 1, 2):
        sampled = gain_estimates(w, fit, held, opts, 0.1, 128, rows=192, seed=seed, fac=fac)
        for o in opts:
            est, want = sampled[o.name], full[o.name].gain
            assert 0 < est.stderr < 0.06, (o.name, est)
            assert abs(est.gain - want) <= GAIN_BOUND_SE * est.stderr, (o.name, seed, est, want)
            z.append(abs(est.gain - want) / est.stderr)
    # The stated error is not vastly wider than the real one (a bound 10x too loose would pass the above).
    assert float(np.mean(z)) > 0.5, z
    # The gain itself is the same whatever the bookkeeping of its error.
    assert rounding_gain(w, fit, held, opts, 0.1, 128, rows=192, seed=2, fac=fac) == {
        n: e.gain for n, e in sampled.items()
    }


def test_gain_from_held_out_inputs_is_the_gain_from_their_hessian() -> None:
    """With fewer held-out tokens than inputs the output errors are taken from the tokens' inputs X
    (||E X^T||^2) instead of their Hessian X^T X (tr(E H E^T)): the same gains as the Hessian's, and as a float64
    oracle's from the codes, to float32 rounding."""
    from mintbuild.mlx.gptq import HeldOutInputs, held_out_rule
    from mintbuild.mlx.quant.reference import dequantize_codes

    opts = [Option(4, 64), Option(3, 32), Option(2, 64)]
    w = weights(300, 512, 7)
    fit = (lambda x: x.double().T @ x.double())(tokens(2048, 512, 3))
    x = tokens(320, 512, 4).float()
    assert held_out_rule(x.shape[0], 512) and not held_out_rule(512, 512) and not held_out_rule(0, 512)
    fac = factor(fit, 0.1)
    by_h = rounding_gain(w, fit, x.double().T @ x.double(), opts, 0.1, 128, rows=200, fac=fac)
    by_x = rounding_gain(w, fit, HeldOutInputs(x), opts, 0.1, 128, rows=200, fac=fac)
    pick = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:200].sort().values
    ws = w[pick]
    for o in opts:
        q, sc, b = gptq_codes(ws, fit, o, 0.1, 128, fac)
        err = ((ws.double() - dequantize_codes(q, sc, b, o.group).double()) @ x.double().T).square().sum()
        rtn = ((ws.double() - quantize_dequantize(ws, o).double()) @ x.double().T).square().sum()
        oracle = float(err / rtn)
        assert 0.3 < oracle < 0.99, (o.name, oracle)  # GPTQ helps here: the ratio is not trivially 1
        assert abs(by_x[o.name] - oracle) <= 1e-5 * oracle, (o.name, by_x[o.name], oracle)
        assert abs(by_h[o.name] - oracle) <= 1e-5 * oracle, (o.name, by_h[o.name], oracle)


def test_pickable_options_skip_only_what_the_veto_removes() -> None:
    """Options are skipped only when the tensor's own round-to-nearest SQNR is below the veto (so the allocator
    cannot pick them), and every option at or above it is measured."""
    opts = [Option(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128)]
    w = weights(3000, 256, 9)
    w32 = w.float().double()

    def sqnr(o: Option) -> float:
        return 10 * np.log10(
            float((w32**2).sum()) / float(((w32 - quantize_dequantize(w, o).double()) ** 2).sum())
        )

    assert pickable_options(w, opts, None) == opts
    for veto in (9.0, 12.0, 16.0):
        kept = pickable_options(w, opts, veto)
        assert all(sqnr(o) < veto for o in opts if o not in kept), veto
        assert all(o in kept for o in opts if sqnr(o) >= veto), veto
    assert len(pickable_options(w, opts, 16.0)) < len(opts)  # not vacuous: some are skipped


def test_factor_in_place_and_from_disk_is_the_dense_factor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wide-layer path's mechanism on a 1024-wide Hessian: H read from disk 100 rows at a time into the one
    float64 buffer that the Cholesky factorization and the triangular inverse overwrite in place gives U within
    a float32 rounding of the independent route (invert H, factor the inverse: torch's out-of-place calls), and
    the codes of the in-memory H bit for bit."""
    monkeypatch.setattr(gptq, "_CHUNK_ROWS", 100)
    k, opt = 1024, Option(4, 64)
    h = hessian(768, k, seed=5).float()  # fewer tokens than inputs: damping makes it invertible
    h[7], h[:, 7] = 0, 0  # an input that never fired
    path = tmp_path / "h.f32"
    disk = HessianFile.write(path, h)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    # the oracle: H^-1 formed, then its upper Cholesky factor, out of place
    ref = h.to(torch.float64)[perm][:, perm].clone()
    diag = torch.diagonal(ref)
    diag[diag <= 0] = 1.0
    diag += 0.1 * float(diag.mean())
    with one_torch_thread():
        want_u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True).float()
    for source in (h, disk):
        fac = factor(source, 0.1)
        assert torch.equal(fac.perm, perm)
        torch.testing.assert_close(fac.u, want_u, rtol=2**-22, atol=1e-9 * float(want_u.abs().max()))
    assert torch.equal(disk.diagonal(), torch.diagonal(h).double())
    w = head(50, k, 6)
    got, want = gptq_codes(w, disk, opt, 0.1), gptq_codes(w, h, opt, 0.1)
    assert all(_same(a, b) for a, b in zip(got, want, strict=True))
    # the cache keys a file by its content: the same entry as the tensor
    cache = FactorCache()
    cache.get(h, 0.1)
    cache.get(disk, 0.1)
    assert (cache.misses, cache.hits) == (1, 1)
