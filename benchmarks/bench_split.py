"""The split-budget solver at MoE scale: MiniMax-M2's shapes (229B parameters) on a 24 GB GPU + 128 GB RAM.

    .venv/bin/python benchmarks/bench_split.py                       # GGUF grain, both placements
    .venv/bin/python benchmarks/bench_split.py --grain expert        # one decision per expert (~47,600 rows)

The problem is profile-shaped: one decision per GGUF tensor (stacked experts: `blk.L.ffn_{gate,up,down}_exps`,
one per layer and projection, as llama.cpp stores and places them), or per expert with `--grain expert`. Shapes
from MiniMax-M2's public config.json: hidden 3072, 62 layers, 48 query heads and 8 KV heads of 128, 256 experts
of intermediate 1536 (top-8, no shared expert), vocabulary 200,064, untied head, q/k norms. Options: the GGUF
k-quants Q2_K..Q6_K, Q8_0 and BF16 with their exact row bytes (ggml's block sizes). The error of each type is
measured here with libggml's own quantizer on a Gaussian sample (NRMSE; bf16 is the source: 0), and a tensor's
cost is alpha x elements x NRMSE^2 (the fisher objective's form): alpha 1 for dense tensors, 8/256 for experts
(each token reaches 8 of 256), x8 for routers, x10 for the embedding and the head; options under the 9 dB veto are
removed. KV cache: 16,384 tokens at f16 on the GPU. Prints the placement by role, both sides' bytes, the solve time
and the gap.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict

import numpy as np

from mintbuild.budget import format_size
from mintbuild.solve.split import CPU, EITHER, GPU, solve_split

log = logging.getLogger("bench_split")

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 3072, 62, 48, 8, 128
EXPERTS, TOP_K, EXPERT_FF, VOCAB = 256, 8, 1536, 200_064
TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "BF16")
#: Bytes per block and elements per block (ggml).
BLOCK = {"Q2_K": (84, 256), "Q3_K": (110, 256), "Q4_K": (144, 256), "Q5_K": (176, 256), "Q6_K": (210, 256),
         "Q8_0": (34, 32), "BF16": (2, 1)}  # fmt: skip
KV_CONTEXT = 16_384


def measured_nrmse() -> dict[str, float]:
    """NRMSE of each type on a Gaussian sample, through libggml's quantizer (llama.cpp as built here)."""
    from mintbuild.llamacpp import ggml

    x = np.random.default_rng(0).standard_normal((64, 3072)).astype(np.float32)
    out = {"BF16": 0.0}
    for t in TYPES[:-1]:
        y = ggml.roundtrip(x, t)
        out[t] = float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))
    return out


def tensors(grain: str) -> list[tuple[str, str, int, int]]:
    """(name, role, rows, row length) per decision."""
    out = [("token_embd.weight", "embedding", VOCAB, HIDDEN), ("output.weight", "lm_head", VOCAB, HIDDEN)]
    for layer in range(LAYERS):
        b = f"blk.{layer}."
        out += [
            (b + "attn_q.weight", "attn", HEADS * HEAD_DIM, HIDDEN),
            (b + "attn_k.weight", "attn", KV_HEADS * HEAD_DIM, HIDDEN),
            (b + "attn_v.weight", "attn", KV_HEADS * HEAD_DIM, HIDDEN),
            (b + "attn_output.weight", "attn", HIDDEN, HEADS * HEAD_DIM),
            (b + "ffn_gate_inp.weight", "moe_router", EXPERTS, HIDDEN),
            (b + "attn_norm.weight", "norm", 1, HIDDEN),
            (b + "ffn_norm.weight", "norm", 1, HIDDEN),
            (b + "attn_q_norm.weight", "norm", 1, HEADS * HEAD_DIM),
            (b + "attn_k_norm.weight", "norm", 1, KV_HEADS * HEAD_DIM),
        ]
        for proj, (rows, k) in {
            "gate": (EXPERT_FF, HIDDEN),
            "up": (EXPERT_FF, HIDDEN),
            "down": (HIDDEN, EXPERT_FF),
        }.items():
            if grain == "gguf":
                out.append((b + f"ffn_{proj}_exps.weight", "moe_experts", EXPERTS * rows, k))
            else:
                out += [(b + f"ffn_{proj}_exps.{e}", "moe_experts", rows, k) for e in range(EXPERTS)]
    out.append(("output_norm.weight", "norm", 1, HIDDEN))
    return out


def problem(grain: str, nrmse: dict[str, float], veto_db: float = 9.0):
    ts = tensors(grain)
    n = len(ts)
    sizes = np.zeros((n, len(TYPES)), dtype=np.int64)
    costs = np.full((n, len(TYPES)), np.inf)
    rng = np.random.default_rng(1)
    weight = {
        "embedding": 10.0,
        "lm_head": 10.0,
        "moe_router": 8.0,
        "attn": 1.0,
        "moe_experts": TOP_K / EXPERTS,
    }
    for i, (_, role, rows, k) in enumerate(ts):
        tail = rng.lognormal(0.0, 0.15)  # heavier-tailed tensors quantize worse
        for j, t in enumerate(TYPES):
            nb, ne = BLOCK[t]
            sizes[i, j] = rows * (k // ne) * nb
            if role == "norm":  # 1-D: kept as written (f32 in a GGUF)
                if t == "BF16":
                    sizes[i, j], costs[i, j] = rows * k * 4, 0.0
                continue
            e = nrmse[t] * (tail if t != "BF16" else 0)
            if t == "BF16" or -20 * np.log10(e) >= veto_db:
                costs[i, j] = weight[role] * rows * k * e**2
    return ts, sizes, costs


def run(
    grain: str, placement: str, gpu: int, cpu: int, price_per_gib: float, nrmse: dict[str, float]
) -> None:
    ts, sizes, costs = problem(grain, nrmse)
    roles = [r for _, r, _, _ in ts]
    where = np.full(len(ts), EITHER)
    where[[i for i, r in enumerate(roles) if r == "embedding"]] = (
        CPU  # llama.cpp keeps the input lookup on the cpu
    )
    if placement == "experts_on_cpu":
        where[[i for i, r in enumerate(roles) if r == "moe_experts"]] = CPU
    kv = 2 * LAYERS * KV_HEADS * HEAD_DIM * KV_CONTEXT * 2
    params = sum(r * k for _, _, r, k in ts)
    t0 = time.perf_counter()
    res = solve_split(sizes, costs, where, gpu - kv, cpu, cpu_price=price_per_gib / 2**30)
    seconds = time.perf_counter() - t0
    print(f"\n## {grain} grain, placement {placement}: {len(ts):,} decisions, {params / 1e9:.1f}B parameters")
    print(
        f"gpu {format_size(res.gpu_bytes)} of {format_size(gpu - kv)} (+ KV cache {format_size(kv)}), "
        f"cpu {format_size(res.cpu_bytes)} of {format_size(cpu)}; "
        f"{8 * (res.gpu_bytes + res.cpu_bytes) / params:.3f} bits/weight"
    )
    print(
        f"solve {seconds:.2f} s; objective {res.objective:.6g} (loss {res.loss:.6g} + cpu price {res.price:.3g}); "
        f"bound {res.bound:.6g}; gap {res.gap:.3g} (relative {res.rel_gap:.2e}); "
        f"{'proven optimal' if res.optimal else 'not proven optimal'}"
    )
    table: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    by_side_bytes: dict[tuple[str, str], int] = defaultdict(int)
    for i, role in enumerate(roles):
        side = "gpu" if res.side[i] == GPU else "cpu"
        table[(role, side)][TYPES[res.option[i]]] += 1
        by_side_bytes[(role, side)] += int(sizes[i, res.option[i]])
    print("| role | side | tensors by type | bytes |")
    print("|---|---|---|---:|")
    for (role, side), counts in sorted(table.items()):
        kinds = ", ".join(f"{t} x{c}" for t, c in sorted(counts.items(), key=lambda kv: TYPES.index(kv[0])))
        print(f"| {role} | {side} | {kinds} | {format_size(by_side_bytes[(role, side)])} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grain", choices=["gguf", "expert"], default="gguf")
    p.add_argument("--placement", nargs="+", default=["experts_on_cpu", "any"])
    p.add_argument("--gpu", type=float, default=24e9, help="GPU bytes (default 24 GB)")
    p.add_argument("--cpu", type=float, default=128e9, help="RAM bytes (default 128 GB)")
    p.add_argument("--price", type=float, default=1e-6, help="objective units per GiB in RAM")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    nrmse = measured_nrmse()
    print("NRMSE by type (libggml, Gaussian sample): " + ", ".join(f"{t} {v:.4f}" for t, v in nrmse.items()))
    for placement in args.placement:
        run(args.grain, placement, int(args.gpu), int(args.cpu), args.price, nrmse)


if __name__ == "__main__":
    main()
