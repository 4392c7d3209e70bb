"""Pack throughput (fresh vs fully cached target) and evaluator tokens/s vs plain transformers, in one run.

Usage: .venv/bin/python benchmarks/bench_pack.py [--target smollm2-4bpw] [--tokens 256]
Needs the built artifacts (model, corpus, allocate/<target>): `dvc repro allocate` or `make build`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mintbuild.config import load_params
from mintbuild.evaluate import load_packed, window_logits
from mintbuild.pack import pack_target


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
    ap.add_argument("--target", default="smollm2-4bpw")
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    bench_pack(a.target)
    bench_eval(a.target, a.tokens)
