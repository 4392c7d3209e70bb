"""mlx-lm's own calibrated quantizers (AWQ, GPTQ, dynamic_quant), run on this build's calibration windows, for the
peer rows of benchmarks/quality.py.

Each method calls mlx-lm's library functions (`mlx_lm.quant.awq.awq_quantize`, `mlx_lm.quant.gptq.gptq_quantize`,
`mlx_lm.quant.dynamic_quant.estimate_sensitivities` / `estimate_threshold` and `mlx_lm.utils.quantize_model`)
with the settings of its command-line defaults. Only the data differs: their loaders download a calibration set
from the hub (unreachable here), so the batch is the importance stage's own windows of the corpus train split
(`importance.n_windows` x `importance.window` tokens, same seed: the very windows mintbuild's Fisher pass sees).
They compute in float32 and store in the checkpoint's dtype (see `run`). The folder is written with
`mlx_lm.utils.save` and a peer.json beside it (calibration seconds and tokens, the
BLAS the process ran on).

MLX's Linux CPU wheel (mlx_cpu) links a reference netlib BLAS: an fp32 matmul runs at a few GFLOP/s. This
script re-executes itself with an OpenBLAS in LD_PRELOAD, so that MLX's `sgemm_` calls resolve to it. The
OpenBLAS is the one the `scs` wheel bundles (scs.libs/libopenblas-*.so: unprefixed symbols, its libgfortran
beside it on an $ORIGIN rpath; scs comes with cvxpy and is pinned in the test extra). Set
MINTBUILD_PEERS_BLAS=reference to run on MLX's own BLAS.

DWQ (mlx_lm.quant.dwq) is not run. At this calibration budget (4 windows) it would take one Adam step at its
default learning rate 1e-6 from round-to-nearest 4/g64 (so: the uniform reference again), and at its own default
budget (2,048 samples of up to 1,025 tokens, forward and backward through teacher and student) it is hours of
CPU time per model here, not a benchmark row.

Usage: python benchmarks/peers.py {awq,gptq,dynamic_quant} --model DIR --corpus DIR --out DIR
           [--bits 4 --group 64] [--target-bpw X] --n-windows N --window L [--seed S]
       python benchmarks/peers.py blas   # MLX fp32 matmul GFLOP/s on its own BLAS and on the preloaded OpenBLAS
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("peers")

METHODS = ("awq", "gptq", "dynamic_quant")
#: Set in the re-executed child (to the preloaded library, or "reference") so that it does not re-execute again.
BLAS_ENV = "MINTBUILD_PEERS_BLAS"
#: mlx-lm's command-line defaults for what the methods do not calibrate: AWQ keeps the embedding (and an untied
#: head) at 4/g32 with a 20-point grid; GPTQ stores every non-Linear quantizable module (the embedding) at 6/g64;
#: dynamic_quant moves sensitive layers up one step, 4/g64 -> 5/g64.
AWQ_EMBED = (4, 32)
AWQ_GRID = 20
GPTQ_FALLBACK = (6, 64)
DYNAMIC_LOW, DYNAMIC_HIGH = (4, 64), (5, 64)


# ---------------------------------------------------------------- the BLAS


def openblas_library() -> Path | None:
    """The OpenBLAS the scs wheel bundles, or None when scs is not installed."""
    spec = importlib.util.find_spec("scs")
    if spec is None or spec.origin is None:
        return None
    # auditwheel puts a wheel's shared libraries in <package>.libs beside the package, with hashed names.
    found = sorted((Path(spec.origin).parent.parent / "scs.libs").glob("libopenblas*.so*"))
    return found[0] if found else None


def reexec_with_openblas() -> None:
    """Replace this process by itself with the OpenBLAS preloaded (a no-op in the child, or without OpenBLAS).
    LD_PRELOAD is read by the dynamic loader at exec time only, hence the re-exec."""
    if BLAS_ENV in os.environ:
        return
    lib = openblas_library()
    if lib is None:
        log.warning("no OpenBLAS found (scs is not installed): MLX runs on its reference BLAS, ~10x slower")
        os.environ[BLAS_ENV] = "reference"
        return
    env = {
        **os.environ,
        BLAS_ENV: str(lib),
        "LD_PRELOAD": " ".join(filter(None, [str(lib), os.environ.get("LD_PRELOAD")])),
    }
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def loaded_blas() -> list[str]:
    """The BLAS libraries mapped into this process (to check that the preload took)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    names = {line.split()[-1] for line in maps.read_text().splitlines() if "blas" in line.lower()}
    return sorted(n for n in names if n.startswith("/"))


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 n x n matmul throughput in MLX on the CPU."""
    import mlx.core as mx

    mx.random.seed(0)
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b, a @ b)  # warm-up: thread pools, allocation
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def blas_comparison() -> dict[str, Any]:
    """MLX matmul GFLOP/s in two child processes of this script: MLX's own BLAS, then OpenBLAS preloaded."""
    out: dict[str, Any] = {"openblas": str(openblas_library() or "")}
    for key, extra in (("reference", {BLAS_ENV: "reference"}), ("openblas", {})):
        env = {k: v for k, v in os.environ.items() if k not in (BLAS_ENV, "LD_PRELOAD")} | extra
        r = subprocess.run(
            [sys.executable, __file__, "matmul"], env=env, capture_output=True, text=True, check=True
        )
        out[f"{key}_gflops"] = json.loads(r.stdout)["gflops"]
    out["speedup"] = out["openblas_gflops"] / out["reference_gflops"]
    return out


# ---------------------------------------------------------------- the methods


def calibration_tokens(model_dir: Path, corpus_dir: Path, n_windows: int, window: int, seed: int) -> Any:
    """(n_windows, window) token ids: the importance stage's calibration windows of the train split."""
    import mlx.core as mx
    import numpy as np

    from mintbuild.calibration.windows import calibration_windows

    _, windows, _ = calibration_windows(model_dir, corpus_dir, n_windows, window, seed)
    return mx.array(np.array([w.ids for w in windows], dtype=np.int32))


def dynamic_bits(target_bpw: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """(low, high) (bits, group) for dynamic_quant at `target_bpw`: mlx-lm's 4/g64 -> 5/g64 reaches
    [4.5, 5.5] bits/weight; at or below 4.5 + 0.05 it would be uniform 4/g64 (plain rounding, no
    calibration), so the low step drops to 3/g64 (reach [3.5, 5.5]) and the data decides again."""
    (low_bits, low_group), high = DYNAMIC_LOW, DYNAMIC_HIGH
    if target_bpw <= low_bits + 32 / low_group + 0.05:  # 16-bit scale + bias per group
        low_bits -= 1
    return (low_bits, low_group), high


def dynamic_predicate(sens: dict[str, float], threshold: float, hb: int, hg: int) -> Any:
    """mlx_lm.dynamic_quant.main's own predicate (defined inside main, so restated): sensitive layers high."""

    def predicate(path: str, module: Any) -> bool | dict[str, int]:
        if not hasattr(module, "to_quantized"):
            return False
        return {"bits": hb, "group_size": hg} if sens[path] > threshold else True

    return predicate


def feasible_threshold(
    model: Any, sens: dict[str, float], target_bpw: float, threshold: float, bits: Any
) -> float:
    """`threshold`, raised past the next sensitivities until the model fits `target_bpw`. mlx-lm's
    estimate_threshold returns the midpoint of its last bracket, which lands on the infeasible side when one
    layer is a large step: on Gemma 3 270M the tied embedding (168M of 268M weights) goes high and the folder
    overshoots a 4.5 or 5.0 target to 5.45 bits/weight. Its bisection keeps the feasible end as max_threshold;
    this returns what that end quantizes to."""
    import copy

    import mlx.nn as nn
    from mlx_lm.utils import compute_bits_per_weight

    def bpw(t: float) -> float:
        q = copy.deepcopy(model)
        (lb, lg), (hb, hg) = bits
        nn.quantize(q, group_size=lg, bits=lb, class_predicate=dynamic_predicate(sens, t, hb, hg))
        return compute_bits_per_weight(q)

    above = sorted(v for v in sens.values() if v > threshold)
    while above and (got := bpw(threshold)) > target_bpw:
        log.info("dynamic_quant: %.4f bits/weight at threshold %.4g overshoots %.3f: next sensitivity %.4g",
                 got, threshold, target_bpw, above[0])  # fmt: skip
        threshold = above.pop(0)
    return threshold


def quantize(
    method: str, model: Any, config: dict[str, Any], tokens: Any, args: argparse.Namespace, stored: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize `model` in place with mlx-lm's `method`; returns config.json's content and a record. `stored`:
    the checkpoint's dtype, which the caller casts everything back to afterwards."""
    if method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        awq_config = AWQ_MODEL_CONFIGS.get(config["model_type"])
        if awq_config is None:
            raise SystemExit(f"peers: mlx-lm's AWQ has no recipe for model_type {config['model_type']!r}")
        awq_quantize(model, tokens, awq_config, group_size=args.group, bits=args.bits,
                     embed_bits=AWQ_EMBED[0], embed_group_size=AWQ_EMBED[1], n_grid=AWQ_GRID)  # fmt: skip
        return update_config(model, config), {"embed": list(AWQ_EMBED), "n_grid": AWQ_GRID}
    if method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        _, config["quantization"] = gptq_quantize(model, tokens, args.bits, args.group, *GPTQ_FALLBACK)
        return config, {"fallback": list(GPTQ_FALLBACK)}
    if method == "dynamic_quant":
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities, estimate_threshold
        from mlx_lm.utils import quantize_model

        (lb, lg), (hb, hg) = dynamic_bits(args.target_bpw)
        sens = dict(estimate_sensitivities(model, tokens, lb, lg, hb, hg))
        # The threshold search counts bits/weight from the arrays' bytes: back to the stored dtype first (in
        # float32 every scale and norm counts double and no upgrade would fit), then quantize as mlx-lm does.
        model.set_dtype(stored)
        threshold = estimate_threshold(model, sens, args.target_bpw, lb, lg, hb, hg)
        threshold = feasible_threshold(model, sens, args.target_bpw, threshold, ((lb, lg), (hb, hg)))

        predicate = dynamic_predicate(sens, threshold, hb, hg)
        _, config = quantize_model(model, config, group_size=lg, bits=lb, quant_predicate=predicate)
        high = sum(1 for p in sens if sens[p] > threshold)
        return config, {"low": [lb, lg], "high": [hb, hg], "target_bpw": args.target_bpw, "high_layers": high,
                        "layers": len(sens)}  # fmt: skip
    raise SystemExit(f"peers: unknown method {method!r}; choose from {', '.join(METHODS)}")


def stored_dtype(model: Any) -> Any:
    """The checkpoint's floating dtype (the most common one among the model's floating arrays)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    counts: dict[Any, int] = {}
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            counts[v.dtype] = counts.get(v.dtype, 0) + v.size
    return max(counts, key=counts.__getitem__)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.utils import compute_bits_per_weight, load, save

    from mintbuild.artifacts.model import resolve_weights_dir

    mx.random.seed(args.seed)
    weights = resolve_weights_dir(args.model)
    tokens = calibration_tokens(weights, args.corpus, args.n_windows, args.window, args.seed)
    model, tokenizer, config = load(str(weights), return_config=True)
    stored = stored_dtype(model)
    # MLX's CPU matmul goes to BLAS (sgemm_) in float32 only; bfloat16 runs its own ~2 GFLOP/s loop, preloaded
    # OpenBLAS or not. So the methods compute in float32, and every floating array (scales, biases, norms,
    # unquantized tensors) is cast back to the checkpoint's dtype before saving: the stored layout and bytes
    # are what mlx-lm writes from bfloat16 weights, only the arithmetic is wider.
    compute = getattr(mx, args.compute_dtype) if args.compute_dtype != "model" else stored
    model.set_dtype(compute)
    t0 = time.perf_counter()
    config, record = quantize(args.method, model, config, tokens, args, stored)
    model.set_dtype(stored)
    mx.eval(model.parameters())
    seconds = time.perf_counter() - t0
    bpw = compute_bits_per_weight(model)
    save(str(args.out), str(weights), model, tokenizer, config)
    doc = {
        "method": args.method, "bits": args.bits, "group": args.group, "calibration_seconds": round(seconds, 2),
        "calibration_tokens": int(tokens.size), "windows": list(tokens.shape), "mlx_bpw": round(bpw, 4),
        "blas": os.environ.get(BLAS_ENV), "compute_dtype": str(compute), "stored_dtype": str(stored), "blas_mapped": loaded_blas(), **record,
    }  # fmt: skip
    (args.out / "peer.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    log.info(
        "%s: %.1f s of calibration on %d tokens, %.3f bits/weight", args.method, seconds, tokens.size, bpw
    )
    return doc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=[*METHODS, "blas", "matmul"])
    ap.add_argument("--model", type=Path, help="the model stage's folder (artifacts/model)")
    ap.add_argument("--corpus", type=Path, help="the corpus stage's folder (artifacts/corpus)")
    ap.add_argument("--out", type=Path, help="the MLX folder to write")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--target-bpw", type=float, default=5.0, help="dynamic_quant's target bits/weight")
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "model"],
                    help="arithmetic of the calibration (model: the checkpoint's dtype, as mlx-lm's CLIs)")  # fmt: skip
    ap.add_argument("--n-windows", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.method == "blas":
        sys.stdout.write(json.dumps(blas_comparison()) + "\n")
        return
    reexec_with_openblas()
    if args.method == "matmul":
        sys.stdout.write(json.dumps({"gflops": matmul_gflops(), "blas": loaded_blas()}) + "\n")
        return
    run(args)


if __name__ == "__main__":
    main()
