"""`mintbuild equalize`: the model stage's folder rewritten by activation-aware channel equalization
(mintbuild.calibration.equalize: the method, its calibration and its memory bound).

Writes `equalize.out` atomically: config, tokenizer, model.safetensors (every tensor in its stored dtype, the
rewritten ones exact), equalize.json (the chosen exponents, the calibration error ratios, provenance) and a
manifest. `equalize.method: none`, or a model with nothing to equalize exactly (one warning), writes a manifest
that points at the original weights instead; profile, importance, allocate and pack read either the same way.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mintbuild.artifacts.model import copy_small_files, write_local_manifest
from mintbuild.calibration.equalize import NothingToEqualize, compute
from mintbuild.calibration.windows import (
    calibration_args,
    calibration_parser,
)
from mintbuild.config import EqualizeConfig
from mintbuild.errors import MintError
from mintbuild.io import atomic_dir, atomic_write_json, sha256_file

RECORD = "equalize.json"
WEIGHTS_FILE = "model.safetensors"
METHODS = ("awq", "none")

log = logging.getLogger(__name__)


def run(model_dir: Path, corpus_dir: Path, cfg: EqualizeConfig, out: Path, progress: bool = True) -> dict:
    """Write the equalized model folder `out` (or, for method none, a manifest naming `model_dir`)."""
    if cfg.method not in METHODS:
        raise MintError(f"equalize.method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    model_dir, out = Path(model_dir), Path(out)
    if cfg.method == "none":
        return _passthrough(model_dir, out)
    try:
        with atomic_dir(out) as tmp:
            copy_small_files(model_dir, tmp)
            record = compute(model_dir, Path(corpus_dir), cfg, tmp / WEIGHTS_FILE, progress)
            atomic_write_json(tmp / RECORD, record)
            manifest = {"schema_version": 1, "source": "equalize", "method": cfg.method,
                        "files": {WEIGHTS_FILE: {"sha256": sha256_file(tmp / WEIGHTS_FILE)}}}  # fmt: skip
            atomic_write_json(tmp / "manifest.json", manifest)
    except NothingToEqualize as e:  # the temporary folder is gone with the exception
        reasons = sorted({r["reason"] for r in e.skipped})
        log.warning("equalize: nothing in %s can be equalized exactly (%s); building it unequalized",
                    model_dir, "; ".join(reasons))  # fmt: skip
        return _passthrough(model_dir, out)
    s = record["summary"]
    log.info("equalized %d groups: output error %.3f of plain RTN on the calibration sample (median %.3f); %s",
             s["groups"], s["error_ratio_mean"], s["error_ratio_median"], out)  # fmt: skip
    return record


def _passthrough(model_dir: Path, out: Path) -> dict:
    """method none: the model stage's own local-folder manifest naming `model_dir` (nothing is copied)."""
    manifest = write_local_manifest(model_dir, out)
    log.info("equalize.method none: %s points at %s", out, model_dir)
    return manifest


# ---------------------------------------------------------------- CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    calibration_parser(p, "model", "equalize.out")


def main(args: argparse.Namespace) -> None:
    params, model_dir, corpus_dir = calibration_args(args, "model")
    run(model_dir, corpus_dir, params.equalize, Path(args.out or params.equalize.out), not args.no_progress)
