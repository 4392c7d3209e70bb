"""GPTQ of a large-vocabulary output head: the numba kernel of mintbuild/mlx/gptq.py against the torch column loop it
replaced (kept below as the reference) and against one dense float32 matmul W @ H of the same shape, all timed
in one process, with the outputs compared.

The head is random bf16 weights [rows, cols] with a few outliers; H = X^T X of `tokens` correlated inputs with a
few loud channels, as a transformer's last hidden states have. Times are wall-clock seconds, best of `--repeat`
(the reference runs once); nothing is asserted on them.

Three shapes by default: the 262,144 x 640 head and an 8B's 4096 x 14336 and 14336 x 4096 layers; for each, one
dense float32 W @ H, the factor of H (made once per Hessian and cached, so timed apart) and gptq_codes given the
factor (the clip search included), and the ratio gptq_codes / matmul. `--wide`: one 8,192 x 28,672 tensor with
its 28,672^2 Hessians on disk, GPTQ and the held-out gain, with the peak RSS.

Usage: .venv/bin/python benchmarks/bench_gptq.py [--shapes 262144x640,...] [--option 4,64] [--threads N] [--wide]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from numba import njit, prange

from mintbuild.artifacts.importance import HessianFile
from mintbuild.calibration.hessians import GAIN_ROWS
from mintbuild.formats import Option
from mintbuild.mlx.factor_cache import FactorCache
from mintbuild.mlx.gptq import Factor, clipped_group_params, factor, gptq_codes, output_error, rounding_gain
from mintbuild.mlx.quant.reference import dequantize_codes, quantize_dequantize
from mintbuild.mlx.quant.simd import bf16 as _bf16
from mintbuild.mlx.quant.simd import mlx_scale_bias as _mlx_scale_bias


def reference_clipped_group_params(
    w16: torch.Tensor, hessian: torch.Tensor, bits: int, g: int, shrinks: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gptq.clipped_group_params` as a scalar loop (one row, group and shrink at a time, the quadratic form a
    chain of float32 products and sums, each rounded on its own): the oracle of the lane-wise kernel."""
    rows, k = w16.shape
    n = k // g
    idx = torch.arange(k).reshape(n, g)
    h_blocks = hessian.to(torch.float32)[idx[:, :, None], idx[:, None, :]].contiguous().numpy()
    scales, biases = np.empty((rows, n), np.float32), np.empty((rows, n), np.float32)
    x = w16.to(torch.bfloat16).float().contiguous().numpy()
    _scalar_clip_rows(
        x, h_blocks, np.array(shrinks, np.float32), np.float32((1 << bits) - 1), g, scales, biases
    )
    return torch.from_numpy(scales), torch.from_numpy(biases)


@njit(parallel=True, cache=True)
def _scalar_clip_rows(x, h_blocks, shrinks, n_bins, g, scales, biases):
    rows, k = x.shape
    zero, two = np.float32(0.0), np.float32(2.0)
    for r in prange(rows):
        e = np.empty(g, np.float32)
        for j in range(k // g):
            c0 = j * g
            lo = x[r, c0]
            hi = lo
            for c in range(1, g):
                lo = min(lo, x[r, c0 + c])
                hi = max(hi, x[r, c0 + c])
            best = np.inf
            for i in range(shrinks.size):
                s, b = _mlx_scale_bias(lo * shrinks[i], hi * shrinks[i], n_bins)
                s16, b16 = _bf16(s), _bf16(b)
                for c in range(g):
                    q = min(max(np.rint((x[r, c0 + c] - b) / s), zero), n_bins)
                    e[c] = x[r, c0 + c] - _bf16(_bf16(q * s16) + b16)
                err = zero
                for c in range(g):
                    off = zero
                    for d in range(c + 1, g):
                        off = off + h_blocks[j, c, d] * e[d]
                    err = err + e[c] * (h_blocks[j, c, c] * e[c] + two * off)
                if err < best or i == 0:
                    best = err
                    scales[r, j] = s
                    biases[r, j] = b


def reference_gptq_codes(
    w: torch.Tensor,
    hessian: torch.Tensor,
    option: Option,
    damp: float,
    block: int = 128,
    fac: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`gptq.gptq_codes` as a torch column loop over all rows at once (the loop of commit 5cd3f65, before the
    numba kernel, with the columns in act order on round-to-nearest's group grids since gptq-mlx-affine/2, on
    the grids `clipped_group_params` picks since gptq-mlx-affine/3): the block's error carried to the later
    columns by one float32 matmul (MKL's sgemm). The order and U are `gptq.factor`'s (tested against its own
    oracle in tests/test_gptq_cost.py), so that the two loops round against the same numbers."""
    bits, g = option.bits, option.group
    rows, k = w.shape
    fac = factor(hessian, damp) if fac is None else fac
    perm, u = fac.perm, fac.u
    w16 = w.to(torch.bfloat16).float()
    scales, biases = clipped_group_params(w.to(torch.bfloat16), hessian, bits, g)
    s16, b16 = scales.to(torch.bfloat16).float(), biases.to(torch.bfloat16).float()
    work = w16[:, perm].clone()
    max_q = (1 << bits) - 1
    codes = torch.empty((rows, k), dtype=torch.uint8)
    block = max(block // g, 1) * g
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, ub = work[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.empty_like(wb)
        for j in range(b1 - b0):
            col = int(perm[b0 + j])
            gi = col // g
            q = torch.round((wb[:, j] - biases[:, gi]) / scales[:, gi]).clamp_(0, max_q)
            deq = ((q * s16[:, gi]).to(torch.bfloat16).float() + b16[:, gi]).to(torch.bfloat16).float()
            codes[:, col] = q.to(torch.uint8)
            err[:, j] = (wb[:, j] - deq) / ub[j, j]
            wb[:, j + 1 :] -= err[:, j : j + 1] * ub[j, j + 1 :]
        work[:, b1:] -= err @ u[b0:b1, b1:]
    return codes, scales.to(torch.bfloat16), biases.to(torch.bfloat16)


def head(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random bf16 weights with 0.2% outliers ten times larger."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w += (torch.rand(rows, cols, generator=g) < 2e-3) * torch.randn(rows, cols, generator=g) * 0.2
    return w.to(torch.bfloat16)


def hessian(tokens: int, cols: int, seed: int = 1) -> torch.Tensor:
    """X^T X (float64) of correlated inputs with four loud channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g) @ mix
    x[:, :4] *= 20
    return x.double().T @ x.double()


def best_of(n: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(fastest wall-clock seconds of n calls, the last call's result)."""
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def wide_hessian(tokens: int, cols: int, seed: int = 1) -> torch.Tensor:
    """X^T X (float32) of inputs correlated through 64 shared factors, with four loud channels: cheap to make at
    14,336 or 28,672 inputs (`hessian`'s full mixing matrix is not)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g)
    x += torch.randn(tokens, 64, generator=g) @ (torch.randn(64, cols, generator=g) * 0.3)
    x[:, :4] *= 20
    return x.T @ x


def peak_rss_gb() -> float:
    """This process's peak resident set so far (ru_maxrss, KiB on Linux), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def synthetic_factor(cols: int, seed: int = 3) -> Factor:
    """A valid factor of some positive-definite H' (a random lower-triangular U^T with a positive diagonal): for
    timing gptq_codes only, whose work does not depend on U's values, where the real factor (~1.3 K^3 float64
    flops on one thread) would take longer than the benchmark can wait. Made in place: its one K x K float32
    buffer is all the memory it takes (the peak RSS then measures GPTQ, not this)."""
    g = torch.Generator().manual_seed(seed)
    ut = torch.randn(cols, cols, generator=g).mul_(0.01).tril_(-1)
    ut.diagonal().copy_(torch.rand(cols, generator=g) + 0.5)
    return Factor(torch.randperm(cols, generator=g), ut)


def one_shape(rows: int, cols: int, opt: Option, args: argparse.Namespace) -> float:
    """Time the dense matmul, the factor and gptq_codes (clip search included, factor given) of one shape;
    print them; return gptq_codes / matmul."""
    w = head(rows, cols)
    h = hessian(args.tokens, cols) if cols <= 1024 else wide_hessian(args.wide_tokens, cols)
    w32, h32 = w.float(), h.float()
    t_mm, _ = best_of(args.repeat, lambda: w32 @ h32)
    if cols > args.synthetic_factor_above:
        t_fac, fac = float("nan"), synthetic_factor(cols)
    else:
        t_fac, fac = best_of(1, lambda: factor(h, args.damp))
    t_new, new = best_of(args.repeat, lambda: gptq_codes(w, h, opt, args.damp, args.block, fac))
    print(
        f"{rows:>7} x {cols:<6}: matmul W @ H {t_mm:8.3f} s | factor (once per Hessian) {t_fac:8.3f} s | "
        f"gptq_codes {t_new:8.3f} s = {t_new / t_mm:.2f} x the matmul ({(t_new + t_fac) / t_mm:.2f} x with "
        f"the factor)",
        flush=True,
    )
    if cols <= 1024:
        deq = dequantize_codes(*new, opt.group)
        rtn = output_error(w, quantize_dequantize(w, opt), h)
        print(f"  output error on H: GPTQ / round-to-nearest = {output_error(w, deq, h) / rtn:.4f}")
    if not args.no_reference and (rows, cols) == SHAPES[0]:
        t_ref, ref = best_of(1, lambda: reference_gptq_codes(w, h, opt, args.damp, args.block))
        print(f"  reference column loop: {t_ref:8.3f} s = {t_ref / t_mm:.2f} x the matmul")
        same = [torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(new, ref, strict=True)]
        print(f"  outputs identical to the reference (codes, scales, biases): {same}")
    return t_new / t_mm


def wide(opt: Option, args: argparse.Namespace) -> None:
    """GPTQ and the gain of one 8,192 x 28,672 tensor (`--wide-shape`) with its 28,672^2 Hessian, both Hessians on disk (as the
    importance stage spills them): time and peak RSS."""
    import tempfile

    rows, cols = (int(v) for v in args.wide_shape.split("x"))
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        t0 = time.perf_counter()
        fit = HessianFile.write(Path(tmp) / "fit.f32", wide_hessian(args.wide_tokens, cols, seed=1))
        held = HessianFile.write(Path(tmp) / "held.f32", wide_hessian(args.wide_tokens, cols, seed=2))
        w = head(rows, cols)
        print(
            f"inputs made in {time.perf_counter() - t0:.1f} s; peak RSS so far {peak_rss_gb():.2f} GB",
            flush=True,
        )
        t0 = time.perf_counter()
        if (
            cols > args.synthetic_factor_above
        ):  # GPTQ's and the gain's time and memory do not depend on U's values
            t_fac, fac = float("nan"), synthetic_factor(cols)
        else:
            fac = FactorCache().get(fit, args.damp)
            t_fac = time.perf_counter() - t0
        print(f"factor {t_fac:.1f} s; peak RSS {peak_rss_gb():.2f} GB", flush=True)
        t0 = time.perf_counter()
        gptq_codes(w, fit, opt, args.damp, args.block, fac)
        t_gptq = time.perf_counter() - t0
        print(f"gptq_codes {t_gptq:.1f} s; peak RSS {peak_rss_gb():.2f} GB", flush=True)
        t0 = time.perf_counter()
        # the factor above, as the importance stage hands one factor to every tensor and option of an input (a
        # FactorCache keeps at most 1 GiB of factors in memory: this one is 4 K^2 = 3.3 GB)
        gains = rounding_gain(w, fit, held, [opt], args.damp, args.block, GAIN_ROWS, fac=fac)
        t_gain = time.perf_counter() - t0
        print(
            f"wide {rows} x {cols} {opt.name}: factor {t_fac:.1f} s, GPTQ {t_gptq:.1f} s, gain ({GAIN_ROWS} rows, "
            f"the factor reused) {t_gain:.1f} s = {gains}; peak RSS {peak_rss_gb():.2f} GB"
        )


#: The head benchmark and an 8B's two MLP shapes: rows x input columns.
SHAPES = ((262_144, 640), (4096, 14_336), (14_336, 4096))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES), help="rows x cols, ...")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of H for the head (<= 1024 columns)")
    ap.add_argument("--wide-tokens", type=int, default=2048, help="tokens of H for the wide shapes")
    ap.add_argument("--option", default="4,64", help="bits,group")
    ap.add_argument("--damp", type=float, default=0.1)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="numba and torch threads (default: all)")
    ap.add_argument("--no-reference", action="store_true", help="skip the (slow) torch column loop")
    ap.add_argument(
        "--synthetic-factor-above",
        type=int,
        default=1 << 30,
        help="time gptq_codes of wider H with a synthetic factor (the factor is then not timed: nan)",
    )
    ap.add_argument("--wide", action="store_true", help="only the 8,192 x 28,672 tensor: time and peak RSS")
    ap.add_argument("--wide-shape", default="8192x28672", help="rows x cols of the --wide tensor")
    ap.add_argument("--scratch", default=None, help="folder for the wide Hessians' files (default: $TMPDIR)")
    args = ap.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    bits, group = (int(v) for v in args.option.split(","))
    opt = Option(bits, group)
    print(
        f"{opt.name}, damp {args.damp}, block {args.block}; numba threads {numba.get_num_threads()}, torch "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )
    gptq_codes(
        head(64, 640), hessian(256, 640), opt, args.damp, args.block
    )  # JIT (or load from numba's cache)
    if args.wide:
        wide(opt, args)
        return
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ratios = {s: one_shape(*s, opt, args) for s in shapes}
    print(
        "gptq_codes / dense fp32 W @ H: " + ", ".join(f"{r} x {c}: {v:.2f}" for (r, c), v in ratios.items())
    )


if __name__ == "__main__":
    main()
