"""`mintbuild evaluate`: perplexity of each packed MLX model, and of the 16-bit baseline, on the corpus test split.

The packed folder itself is evaluated (not the allocation): its manifest is checked (every file's size and
sha256, so a folder edited by hand is refused), each MLX affine module is unpacked and dequantized as mlx-lm does
(mintbuild.mlx.source) into the model's transformers architecture, and scored by our layer-streamed evaluator
(mintbuild.hf.evaluator: fixed windows, memory one decoder block). `--baseline` scores the unquantized model
once; every target is compared with it on the same windows. GGUF targets: `mintbuild evaluate-gguf`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mintbuild.artifacts.metrics import BASELINE, SCHEMA_VERSION, write_metrics
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.config import Params, load_params, select_targets
from mintbuild.hf.evaluator import evaluate_folder, score_target, setup_torch
from mintbuild.hf.streaming import CheckpointSource, StreamedModel
from mintbuild.mlx.source import PackedSource

log = logging.getLogger(__name__)


def run_baseline(
    params: Params, out_root: Path | None = None, progress: bool = True, **kw: Any
) -> dict[str, Any]:
    dtype = setup_torch(params.eval)
    model_dir = Path(kw.get("model_out") or params.model.out)
    weights = resolve_weights_dir(model_dir)
    model = StreamedModel(CheckpointSource(weights), dtype)
    corpus_dir = Path(kw.get("corpus_out") or params.corpus.out)
    scores, settings, timings = evaluate_folder(model, model_dir, params, corpus_dir, progress)
    bytes_16 = sum(p.stat().st_size for p in sorted(weights.glob("*.safetensors")))
    metrics = {"schema_version": SCHEMA_VERSION, "target": BASELINE, "bytes_on_disk": bytes_16, **scores}
    return write_metrics(Path(out_root or params.eval_out) / BASELINE, metrics, settings, timings)


def run_target(
    params: Params, target: str, out_root: Path | None = None, progress: bool = True, **kw: Any
) -> dict[str, Any]:
    """Score the packed MLX folder of `target` against the baseline; write its metrics."""
    return score_target(
        params, target, lambda folder, _manifest: PackedSource(folder), out_root, progress, **kw
    )


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--target", action="append", help="target name (repeatable); default: every MLX target")
    who.add_argument("--baseline", action="store_true", help="score the unquantized 16-bit model once")
    p.add_argument("--out", help="output root (default: eval_out from params)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    out = Path(args.out) if args.out else None
    if args.baseline:
        run_baseline(params, out, progress=not args.no_progress)
        return
    for name in select_targets(params, args.target, "mlx"):
        run_target(params, name, out, progress=not args.no_progress)
