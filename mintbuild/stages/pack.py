"""`mintbuild pack`: write each MLX target's allocation as a model folder that mlx-lm loads as it is.

Per target, artifacts/pack/<target>/ holds:
  - model.safetensors: every quantized decision as MLX affine tensors, every other tensor in bf16
    (mintbuild.mlx.pack; names are the checkpoint's, the tied embedding stored once as `model.embed_tokens.*`).
  - config.json: the model's, plus `quantization` = {group_size, bits, mode: affine} for the most common
    option and one entry per module path whose choice differs ({group_size, bits}, or `false` for a module
    kept 16-bit), mirrored in `quantization_config` as mlx-lm's own convert does.
  - the tokenizer files, and mintbuild-pack.json (mintbuild.artifacts.pack): sizes and sha256 of every file.
The folder is held to its allocation (every decision's bytes, the file against the budget) before it is renamed
into place. GGUF targets: `mintbuild pack-gguf`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mintbuild.artifacts.allocation import ALLOCATION_FILE, load_allocation
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.artifacts.pack import MANIFEST_FILE, check_tokenizer, tokenizer_files
from mintbuild.cluster import executor
from mintbuild.config import Params, load_params, select_targets
from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import open_checkpoint
from mintbuild.io import atomic_dir, atomic_write_json, canonical_json
from mintbuild.mlx.factor_cache import FACTOR_FOLDER
from mintbuild.mlx.folder import (
    WEIGHTS_FILE,
    Plan,
    manifest,
    packed_config,
)
from mintbuild.mlx.pack import (
    check_budget,
    check_checkpoint_hash,
    check_provenance,
    check_written,
    gptq_on_cluster,
    load_rounding,
    make_plan,
    render_plan,
    write_weights,
)
from mintbuild.mlx.pack_cache import PackCache, default_cache_dir

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the plan


# ---------------------------------------------------------------- the cache


# ---------------------------------------------------------------- writing


# ---------------------------------------------------------------- the stage


@dataclass
class PackResult:
    target: str
    out: Path
    plan: Plan
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)


def pack_target(
    params: Params,
    target: str,
    out_root: Path | None = None,
    dry_run: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    alloc_root: Path | None = None,
    model_out: Path | None = None,
) -> PackResult:
    out_root = Path(out_root or params.pack_out)
    model_dir = Path(model_out or params.equalize.out)
    alloc_path = Path(alloc_root or params.allocate_out) / target / ALLOCATION_FILE
    alloc = load_allocation(Path(alloc_root or params.allocate_out), target)
    if alloc.get("format") == "gguf":
        raise MintError(
            f"{alloc_path}: a GGUF allocation; pack it with `mintbuild pack-gguf --target {target}`"
        )
    ckpt = open_checkpoint(resolve_weights_dir(model_dir))
    check_provenance(alloc, ckpt, alloc_path)
    model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    files = tokenizer_files(model_dir)
    check_tokenizer(model_dir, model_config)
    plan = make_plan(alloc, ckpt)
    check_budget(plan)
    rounding = load_rounding(params, ckpt)
    out = out_root / target
    result = PackResult(target, out, plan)
    if dry_run:
        return result
    cache = PackCache(cache_dir if cache_dir is not None else default_cache_dir(out_root))
    if cache.root is not None:  # GPTQ's factors beside the tensors, for every target
        rounding.factors.root = cache.root / FACTOR_FOLDER
    t0 = time.perf_counter()
    if executor().remote:
        gptq_on_cluster(executor(), plan, ckpt, rounding, cache, Path(params.importance.out), progress)
    with atomic_dir(out) as tmp:
        hashes: dict[str, str] = {}
        written, weights_sha = write_weights(
            plan, ckpt, tmp / WEIGHTS_FILE, cache, progress, hashes, rounding
        )
        check_checkpoint_hash(alloc, hashes)
        check_written(alloc, written, tmp / WEIGHTS_FILE, plan)
        (tmp / "config.json").write_text(canonical_json(packed_config(model_config, plan)), encoding="utf-8")
        for src in files:
            shutil.copyfile(src, tmp / src.name)
        result.manifest = manifest(
            tmp, alloc, alloc_path, plan, {WEIGHTS_FILE: weights_sha}, rounding.record()
        )
        atomic_write_json(tmp / MANIFEST_FILE, result.manifest)
    result.seconds = time.perf_counter() - t0
    result.cache_hits, result.cache_misses = cache.hits, cache.misses
    log.info(
        "%s: %s %s B of budget %s B (%.3f bits/weight), %.2f s, %.3g params/s, cache %d hits / %d misses",
        target,
        out,
        f"{plan.file_bytes:,}",
        f"{plan.budget:,}",
        8 * plan.data_bytes / max(plan.parameters, 1),
        result.seconds,
        plan.parameters / max(result.seconds, 1e-9),
        cache.hits,
        cache.misses,
    )
    return result


def run(
    params: Params,
    targets: list[str] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> list[PackResult]:
    names = select_targets(params, targets, "mlx")
    return [pack_target(params, n, dry_run=dry_run, progress=progress, **kwargs) for n in names]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--target", action="append", help="target name (repeatable); default: every MLX target")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (files, tensors, bytes vs budget) only"
    )
    p.add_argument("--out", help="output root (default: pack_out from params); one folder per target")
    p.add_argument("--cache", help="quantized-tensor cache (default: $MINTBUILD_CACHE/pack or <out>/.cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    results = run(
        params,
        args.target,
        dry_run=args.dry_run,
        progress=not args.no_progress,
        out_root=Path(args.out) if args.out else None,
        cache_dir=Path(args.cache) if args.cache else None,
    )
    if args.dry_run:
        sys.stdout.write("\n".join(_render(r) for r in results) + "\n")


def _render(r: PackResult) -> str:
    return render_plan(r.plan, r.out)
