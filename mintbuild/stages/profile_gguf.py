"""`mintbuild profile-gguf`: the profile of the convert stage's bf16 GGUF, for the GGUF targets.

Per GGUF tensor and ggml type of the "gguf" option set: the bytes the tensor occupies in the file (padded to the
GGUF alignment) and the error of ggml's own quantize/dequantize (mintbuild.llamacpp.profile: the code
llama-quantize runs) with llama-quantize's imatrix weights for the tensor, so that the profiled error is the
packed file's error; the fixed header the allocation adds is the one llama-quantize will write. It also writes
the imatrix file (llama.cpp's format, from the importance stage's input squares) that pack-gguf hands to
llama-quantize. With `convert.enabled: false`, or a model the converter did not take, it writes a note instead
of a profile (disabled.json; for the latter with the converter's reason, which the GGUF targets report).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.artifacts.not_built import write_profile_note
from mintbuild.artifacts.profile import DISABLED_FILE, Profile
from mintbuild.config import ProfileConfig, load_params
from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import (
    fingerprint,
    open_checkpoint,
)
from mintbuild.io import atomic_dir, sha256_file
from mintbuild.llamacpp.profile import profile_gguf

log = logging.getLogger(__name__)


def run(
    convert_dir: Path,
    model_dir: Path,
    importance_dir: Path | None,
    cfg: ProfileConfig,
    out: Path,
    progress: bool = True,
) -> Profile | None:
    """Profile the convert stage's GGUF (with the importance stage's imatrix when `cfg.gguf_imatrix`) into
    `out`: profile.safetensors, summary.md, and imatrix.gguf (llama.cpp's file, which pack hands to
    llama-quantize)."""
    import os

    from mintbuild.artifacts.convert import DISABLED, GGUF_FILE, failure_note, is_disabled, load_convert
    from mintbuild.artifacts.importance import load_importance, load_input_squares
    from mintbuild.llamacpp.imatrix import IMATRIX_GGUF, gguf_entries, read_imatrix, write_imatrix

    if is_disabled(convert_dir):  # no GGUF target: a note for DVC, no profile
        with atomic_dir(out) as tmp:
            write_profile_note(tmp, {"enabled": False, "note": DISABLED})
        log.info("convert.enabled is false: no GGUF profile (%s)", out / DISABLED_FILE)
        return None
    refused = failure_note(convert_dir)
    if refused is not None:  # the converter did not take the model: its GGUF targets will say why
        with atomic_dir(out) as tmp:
            write_profile_note(tmp, {"converted": False, "note": refused})
        log.warning("no GGUF profile (the model was not converted): %s", refused)
        return None
    doc = load_convert(convert_dir)
    ckpt = open_checkpoint(model_dir)
    fp = fingerprint(ckpt)
    if doc["provenance"]["model_fingerprint"] != fp:
        raise MintError(
            f"{convert_dir}: converted from another model than {model_dir} (fingerprint "
            f"{doc['provenance']['model_fingerprint']} != {fp}); re-run `mintbuild convert`"
        )
    gguf_path = Path(convert_dir) / GGUF_FILE
    threads = max(1, min(4, os.cpu_count() or 1))
    with atomic_dir(out) as tmp:
        imatrix = None
        if cfg.gguf_imatrix:
            if importance_dir is None:
                raise MintError("profile.gguf_imatrix is true but no importance folder was given")
            imp = load_importance(importance_dir)
            if imp.get("provenance", {}).get("model_fingerprint") != fp:
                raise MintError(f"{importance_dir}: measured on another model than {model_dir}; re-run it")
            squares = load_input_squares(importance_dir)
            import gguf

            reader = gguf.GGUFReader(str(gguf_path))
            shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
            arch = doc["gguf"]["architecture"]
            entries = gguf_entries(squares, arch, int(doc["gguf"]["block_count"]), shapes)
            prov = imp.get("provenance", {})
            dataset = (
                f"mintbuild importance: train split sha256 {str(prov.get('corpus_train_sha256', ''))[:16]}"
            )
            chunks = max(1, round(max(squares.counts.values()) / max(squares.chunk_size, 1)))
            write_imatrix(tmp / IMATRIX_GGUF, entries, chunks, squares.chunk_size, [dataset])
            del reader
            imatrix = read_imatrix(tmp / IMATRIX_GGUF)
            log.info("wrote %s: %d entries from the importance stage's %d tokens", IMATRIX_GGUF, len(entries),
                     max(squares.counts.values()))  # fmt: skip
        prof = profile_gguf(gguf_path, ckpt, cfg, imatrix, progress, threads)
        if imatrix is not None:
            prof.provenance["imatrix_sha256"] = sha256_file(tmp / IMATRIX_GGUF)
        prof.save(tmp)
    return prof


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--model", help="checkpoint folder (default: the equalize stage's output)")
    p.add_argument("--out", help="output folder (default: profile.gguf_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    model_dir = Path(args.model) if args.model else resolve_weights_dir(Path(params.equalize.out))
    run(
        Path(params.convert.out),
        model_dir,
        Path(params.importance.out),
        params.profile,
        Path(args.out or params.profile.gguf_out),
        progress=not args.no_progress,
    )
