"""`mintbuild importance`: what the calibration text says about each tensor, as one artifact.

On the train split only (never the test split `mintbuild evaluate` scores): alpha per tensor, the diagonal
empirical Fisher, and llama.cpp's importance-matrix sums (mintbuild.calibration.fisher); every linear layer's input
Hessian and GPTQ's held-out gain per tensor and option, for `mintbuild pack`'s GPTQ rounding
(mintbuild.calibration.hessians). Writes importance.json, imatrix.safetensors and hessian.safetensors
(mintbuild.artifacts.importance) atomically: the folder is replaced whole, and the Hessians wait on disk inside
its temporary, so memory is one decoder block's, not every Hessian of the model.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

from mintbuild.artifacts.importance import write_importance
from mintbuild.calibration.fisher import SquareSums, compute_importance, imatrix_arrays
from mintbuild.calibration.hessians import compute_hessians
from mintbuild.calibration.windows import (
    calibration_args,
    calibration_parser,
)
from mintbuild.config import ImportanceConfig, PackConfig
from mintbuild.io import atomic_dir
from mintbuild.rounding import GPTQ_VERSION

log = logging.getLogger(__name__)


def run(
    model_dir: Path,
    corpus_dir: Path,
    cfg: ImportanceConfig,
    out: Path,
    progress: bool = True,
    pack: PackConfig | None = None,
) -> dict[str, Any]:
    """Compute the importance (and the linear layers' input Hessians and GPTQ gains unless `hessian_windows` is
    0, and the imatrix) and write `out`/importance.json (+ hessian.safetensors, imatrix.safetensors) atomically: the
    folder is replaced whole."""
    squares = SquareSums()
    result = compute_importance(model_dir, corpus_dir, cfg, progress, squares)
    names = list(result["alpha"])
    imatrix, imatrix_record = imatrix_arrays(squares, names, cfg.sig_digits, cfg.window)
    pack = pack or PackConfig()
    settings = {"version": GPTQ_VERSION, "damp": pack.damp, "block": pack.block}
    with atomic_dir(out) as tmp:
        # the Hessians wait on disk inside the artifact's temporary (removed with it on any failure)
        spill = tmp / ".hessians"
        record, hessians, gains = (
            compute_hessians(model_dir, corpus_dir, cfg, pack, progress, spill)
            if cfg.hessian_windows
            else ({}, {}, {})
        )
        doc = write_importance(tmp, result, record, hessians, gains, settings, imatrix, imatrix_record)
        shutil.rmtree(spill, ignore_errors=True)
    return doc


# ---------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    calibration_parser(p, "equalize", "importance.out")


def main(args: argparse.Namespace) -> None:
    params, model_dir, corpus_dir = calibration_args(args, "equalize")
    out = Path(args.out or params.importance.out)
    run(model_dir, corpus_dir, params.importance, out, not args.no_progress, params.pack)
