"""Per-task times for the cluster cost model (docs/cluster.md): one profile task (a tensor of a 70B-class
model, measured by the profile stage's own code) and one GPTQ task (the packer's gptq_codes at 70B width), each
on `--threads` torch/numba threads, as a cluster task runs them. Wall and CPU seconds are both reported: on a
loaded machine the CPU time is what one dedicated core would take. Random bf16 weights with a few outliers (as
tests/synth.py makes them) and a random SPD Hessian; times only, no result is judged here.

    python benchmarks/cluster_tasks.py --threads 1 --out bench_cluster_tasks.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger("cluster_tasks")

#: Llama-3-70B shapes: attention q/o [8192, 8192], k/v [1024, 8192], MLP gate/up [28672, 8192], down [8192, 28672].
PROFILE_SHAPES = {
    "q_proj": (8192, 8192),
    "k_proj": (1024, 8192),
    "gate_proj": (28672, 8192),
    "down_proj": (8192, 28672),
}
#: GPTQ widths: the input dimension k sets the Hessian (k x k) and the cost (rows x k^2); 1024 rows is also the
#: importance stage's row sample for one option's gain.
GPTQ_SHAPES = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "expert": (1536, 3072)}


def weights(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 0.02
    x += (torch.rand(*shape, generator=g) < 1e-3) * torch.randn(*shape, generator=g) * 0.2
    return x.to(torch.bfloat16)


def profile_task(shape: tuple[int, int]) -> tuple[float, float]:
    """(wall, CPU) seconds of the profile stage's per-tensor measurement (_profile_one) on one bf16 tensor."""
    from mintbuild.artifacts.profile import new_columns
    from mintbuild.config import ProfileConfig
    from mintbuild.formats import option_set
    from mintbuild.hf.checkpoint import TensorInfo, compile_rules
    from mintbuild.mlx.measure import _profile_one

    cfg = ProfileConfig()
    opts = option_set(cfg.options)
    t = weights(shape)

    info = TensorInfo("model.layers.3.mlp.x.weight", "BF16", shape, Path("x"), 0, t.numel() * 2)
    cols = new_columns(1, len(opts))
    t0, c0 = time.perf_counter(), time.process_time()
    _profile_one(0, info, t, opts, compile_rules([]), cfg, cols)
    return time.perf_counter() - t0, time.process_time() - c0


def gptq_task(shape: tuple[int, int]) -> tuple[float, float]:
    """(wall, CPU) seconds of gptq_codes (factor, clipped grid, rounding) of one tensor at one option, 4 bits / g64."""
    from mintbuild.formats import parse_option
    from mintbuild.mlx.gptq import gptq_codes

    k = shape[1]
    w = weights(shape)
    x = torch.randn(2 * k, k, generator=torch.Generator().manual_seed(1))
    h = x.T @ x / x.shape[0]
    del x
    t0, c0 = time.perf_counter(), time.process_time()
    gptq_codes(w, h, parse_option("q4g64"), 0.1, 128)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench_cluster_tasks.json")
    ap.add_argument("--skip", default="", help="comma list of shapes to skip (e.g. down_proj,gate_proj)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    result: dict = {"threads": args.threads, "profile_seconds": {}, "gptq_seconds": {}}
    profile_task((256, 256))  # compile / load the numba kernels before timing
    for name, shape in PROFILE_SHAPES.items():
        if name not in skip:
            wall, cpu = profile_task(shape)
            result["profile_seconds"][name] = {"wall": round(wall, 3), "cpu": round(cpu, 3)}
            log.info("profile %s %s: %.2f s wall, %.2f s CPU", name, shape, wall, cpu)
    gptq_task((64, 256))
    for name, shape in GPTQ_SHAPES.items():
        if name not in skip:
            wall, cpu = gptq_task(shape)
            result["gptq_seconds"][name] = {"wall": round(wall, 3), "cpu": round(cpu, 3)}
            log.info("gptq %s %s: %.2f s wall, %.2f s CPU", name, shape, wall, cpu)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
