"""`mintbuild pack-gguf`: write each GGUF target's allocation as a llama.cpp GGUF file.

llama.cpp's own llama-quantize writes artifacts/pack/<target>/model.gguf from the convert stage's bf16 GGUF with
every tensor's planned type and the profile's imatrix (mintbuild.llamacpp.pack); the output is read back and
held to the plan's types and bytes, and the folder gets the model's config.json, the tokenizer files and
mintbuild-pack.json (mintbuild.artifacts.pack, with "format": "gguf"), the same contract as an MLX folder.
Atomic: on any error nothing is left behind. A target recorded as not built (its allocation says why: no GGUF of
this model) gets not-built.json as its folder. MLX targets: `mintbuild pack`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from mintbuild.artifacts.allocation import ALLOCATION_FILE, load_allocation
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.artifacts.not_built import note_of, write_note
from mintbuild.config import Params, load_params, select_targets
from mintbuild.errors import MintError
from mintbuild.llamacpp.pack import GGUFPackResult, pack_gguf, render_plan

log = logging.getLogger(__name__)


def pack_target(
    params: Params,
    target: str,
    out_root: Path | None = None,
    dry_run: bool = False,
    alloc_root: Path | None = None,
    model_out: Path | None = None,
) -> GGUFPackResult:
    """Pack (or, `dry_run`, only plan) the GGUF of `target` from its allocation."""
    out_root = Path(out_root or params.pack_out)
    alloc_dir = Path(alloc_root or params.allocate_out)
    alloc = load_allocation(alloc_dir, target)
    if alloc.get("format") != "gguf":
        raise MintError(
            f"{alloc_dir / target / ALLOCATION_FILE}: an MLX allocation; pack it with `mintbuild pack`"
        )
    return pack_gguf(
        alloc,
        alloc_dir / target / ALLOCATION_FILE,
        Path(params.convert.out),
        Path(params.profile.gguf_out),
        resolve_weights_dir(Path(model_out or params.equalize.out)),
        out_root / target,
        dry_run=dry_run,
    )


def run(
    params: Params, targets: list[str] | None = None, dry_run: bool = False, **kwargs: Any
) -> list[GGUFPackResult]:
    """Pack every (requested) GGUF target; a target whose allocation is a not-built record gets the same record
    as its pack folder (not-built.json) and no result."""
    results = []
    for name in select_targets(params, targets, "gguf"):
        note = note_of(load_allocation(Path(kwargs.get("alloc_root") or params.allocate_out), name))
        if note is None:
            results.append(pack_target(params, name, dry_run=dry_run, **kwargs))
        elif not dry_run:
            write_note(Path(kwargs.get("out_root") or params.pack_out) / name, name, "gguf", note)
            log.warning("%s: not built: %s", name, note)
    return results


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--target", action="append", help="target name (repeatable); default: every GGUF target")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (tensor types, bytes vs budget) only"
    )
    p.add_argument("--out", help="output root (default: pack_out from params); one folder per target")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    results = run(params, args.target, dry_run=args.dry_run, out_root=Path(args.out) if args.out else None)
    if args.dry_run:
        sys.stdout.write("\n".join(render_plan(r.plan, r.out) for r in results) + "\n")
