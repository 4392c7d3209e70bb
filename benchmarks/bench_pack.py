"""Pack throughput (fresh vs fully cached target), the quantize kernel vs the torch reference quantizer, and
evaluator tokens/s vs plain transformers, all in one run.

Usage: .venv/bin/python benchmarks/bench_pack.py [--target smollm2-4bpw] [--tokens 256]
Needs the built artifacts (model, corpus, allocate/<target>): `dvc repro allocate` or `make build`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mintbuild.config import load_params
from mintbuild.hf.evaluator import window_logits
from mintbuild.mlx.source import load_packed
from mintbuild.stages.pack import pack_target


def bench_pack(target: str) -> None:
    params = load_params()
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = Path(tmp) / "pack", Path(tmp) / "cache"
        pack_target(params, target, out_root=out, cache_dir=Path(tmp) / "warm", progress=False)  # numba JIT
        for label in ("fresh", "cached"):
            res = pack_target(params, target, out_root=out, cache_dir=cache, progress=False)
            rate = res.plan.parameters / res.seconds
            print(
                f"pack {label:6s}: {res.plan.parameters / 1e6:.1f} M params in {res.seconds:.2f} s = "
                f"{rate / 1e6:.1f} M params/s (cache {res.cache_hits} hits / {res.cache_misses} misses)"
            )


def bench_kernel(target: str) -> None:
    """The fused kernel against quant.py's eager torch quantizer + packer on the embedding (the largest
    tensor), same option, same values; the outputs are checked equal."""
    from mintbuild.artifacts.model import resolve_weights_dir
    from mintbuild.formats import Option
    from mintbuild.hf.checkpoint import open_checkpoint
    from mintbuild.mlx.quant.pack_kernel import quantize_pack
    from mintbuild.mlx.quant.reference import pack_codes, quantize_codes

    params = load_params()
    ckpt = open_checkpoint(resolve_weights_dir(Path(params.model.out)))
    name = max(ckpt.tensors, key=lambda n: ckpt.tensors[n].numel)
    w = ckpt.read(name)
    for opt in (Option(4, 64), Option(3, 32)):
        quantize_pack(w[:8], opt)  # JIT
        fast, words = _best_of(3, lambda o=opt: quantize_pack(w, o)[0])
        ref, ref_words = _best_of(1, lambda o=opt: pack_codes(quantize_codes(w, o)[0], o.bits))
        assert np.array_equal(words, ref_words), "the kernel and the reference disagree"
        print(
            f"quantize {opt.name} {name} ({w.numel() / 1e6:.1f} M): fused kernel {w.numel() / fast / 1e6:.0f} "
            f"M params/s, torch reference {w.numel() / ref / 1e6:.0f} M params/s ({ref / fast:.1f}x)"
        )


def _best_of(n: int, fn: Callable[[], np.ndarray]) -> tuple[float, np.ndarray]:
    best, out = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_eval(target: str, n_tokens: int) -> None:
    from transformers import AutoModelForCausalLM

    params = load_params()
    ids = np.random.default_rng(0).integers(0, 49152, n_tokens)
    ours, _ = load_packed(Path(params.pack_out) / target)
    plain = AutoModelForCausalLM.from_pretrained(params.model.out, dtype=torch.float32).eval()
    for label, model in (("mintbuild evaluator (packed)", ours), ("plain transformers (16-bit)", plain)):
        window_logits(model, ids[:16])  # warm-up
        t0 = time.perf_counter()
        window_logits(model, ids)
        print(f"{label}: {n_tokens / (time.perf_counter() - t0):.1f} tokens/s ({n_tokens}-token window)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="bpw4")
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    bench_pack(a.target)
    bench_kernel(a.target)
    bench_eval(a.target, a.tokens)
