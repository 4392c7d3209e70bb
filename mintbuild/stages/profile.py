"""`mintbuild profile`: one streaming CPU pass over a checkpoint, no data: for every tensor and every MLX
storage option, the exact packed bytes and the error of MLX affine round-to-nearest (mintbuild.mlx.measure;
large tensors on a sample with a stated bound, mintbuild.sampling). The artifact (mintbuild.artifacts.profile)
is a safetensors file of [tensors, options] arrays plus JSON metadata that loads in milliseconds, and
summary.md. GGUF targets: `mintbuild profile-gguf`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.artifacts.profile import (
    Profile,
)
from mintbuild.config import ProfileConfig, load_params
from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import (
    open_checkpoint,
)
from mintbuild.io import atomic_dir
from mintbuild.mlx.measure import profile_checkpoint

log = logging.getLogger(__name__)


# --- measurement ------------------------------------------------------------------------------------------


# --- the pass ---------------------------------------------------------------------------------------------


# --- GGUF: the bf16 GGUF of `mintbuild convert`, ggml's own quantizers -----------------------------------------


# --- stage ------------------------------------------------------------------------------------------------


def run(model_dir: Path, cfg: ProfileConfig, out: Path, progress: bool = True) -> Profile:
    ckpt = open_checkpoint(model_dir)
    if ckpt.config.get("quantization_config"):
        raise MintError(f"{model_dir}/config.json has a quantization_config: the checkpoint is pre-quantized")
    prof = profile_checkpoint(ckpt, cfg, progress)
    with atomic_dir(out) as tmp:
        prof.save(tmp)
    return prof


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument(
        "--model", help="checkpoint folder or .safetensors file (default: the equalize stage's output)"
    )
    p.add_argument("--out", help="output folder (default: profile.out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    model_dir = Path(args.model) if args.model else resolve_weights_dir(Path(params.equalize.out))
    run(model_dir, params.profile, Path(args.out or params.profile.out), progress=not args.no_progress)
