"""The pack stages' artifact per target: a runtime's model folder (MLX safetensors or one GGUF file), the
tokenizer and generation files beside it, and mintbuild-pack.json, the manifest that lists every file's size
and sha256 with the allocation it was packed from. Both backends write the same manifest through
`build_manifest`; `verify_manifest` is how evaluate, report and diff read a folder, so a file edited by hand is
refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mintbuild.artifacts.model import TOKENIZER_FILES
from mintbuild.errors import MintError
from mintbuild.io import read_json, sha256_file

MANIFEST_FILE = "mintbuild-pack.json"
MANIFEST_SCHEMA = 1
#: Small files of the model folder copied next to the weights (tokenizer* files are matched by prefix).
COPIED_FILES = ("generation_config.json", "special_tokens_map.json", "chat_template.jinja")


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The model folder's tokenizer and generation files; refuses a folder without a tokenizer."""
    if not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise MintError(
            f"{model_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); the packed model needs one"
        )
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.startswith("tokenizer"))
    files += [model_dir / n for n in COPIED_FILES if (model_dir / n).is_file()]
    return sorted(set(files))


def check_tokenizer(model_dir: Path, model_config: dict[str, Any]) -> None:
    """A tokenizer whose ids do not fit the model's embedding is the wrong tokenizer."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        vocab = tok["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [a["id"] for a in tok.get("added_tokens", [])]
    except (ValueError, KeyError, TypeError) as e:
        raise MintError(f"{path}: not a valid tokenizer.json ({e})") from None
    n = model_config.get("vocab_size")
    if n and ids and max(ids) >= int(n):
        raise MintError(
            f"{path}: token id {max(ids)} does not fit the model's vocab_size {n}: wrong tokenizer for this model"
        )


def build_manifest(
    folder: Path,
    alloc: dict[str, Any],
    alloc_path: Path,
    *,
    target: str,
    budget: int,
    weights_bytes: int,
    header_bytes: int,
    parameters: int,
    data_bytes: int,
    quantizer: str,
    rounding: dict[str, Any],
    known: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The pack's record of `folder` (every file but the manifest, with its size and sha256; `known` holds
    digests already computed, file name -> hex), the allocation it came from and the packed totals."""
    totals = alloc["totals"]
    return {
        "schema_version": MANIFEST_SCHEMA,
        "target": target,
        "allocation_sha256": sha256_file(alloc_path),
        "provenance": alloc.get("provenance", {}),
        "budget": budget,
        "requested_budget": totals["budget"],
        "notes": alloc.get("notes", []),
        "weights_bytes": weights_bytes,
        "header_bytes": header_bytes,
        "parameters": parameters,
        "avg_bits_per_weight": 8 * data_bytes / max(parameters, 1),
        "objective": totals.get("objective"),
        "objective_kind": totals.get("objective_kind"),
        "quantizer": quantizer,
        "rounding": rounding,
        **(extra or {}),
        "files": {
            p.name: {"bytes": p.stat().st_size, "sha256": known.get(p.name) or sha256_file(p)}
            for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST_FILE
        },
    }


def verify_manifest(folder: Path) -> dict[str, Any]:
    """The pack manifest, after checking every file it lists (size, sha256) and that no weight file was added."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise MintError(f"{folder}: no {MANIFEST_FILE}; not a folder written by `mintbuild pack`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError) as e:
        raise MintError(f"{path}: invalid pack manifest ({e})") from None
    for name, want in sorted(files.items()):
        p = folder / name
        if not p.is_file():
            raise MintError(f"{p}: listed in {MANIFEST_FILE} but missing")
        size = p.stat().st_size
        if size != want["bytes"]:
            raise MintError(f"{p}: {size:,} B but the pack wrote {want['bytes']:,} B (edited by hand?)")
        if sha256_file(p) != want["sha256"]:
            raise MintError(
                f"{p}: content differs from what the pack wrote (sha256 mismatch; edited by hand?)"
            )
    extra = sorted(p.name for p in folder.glob("*.safetensors*") if p.name not in files)
    if extra:
        raise MintError(f"{folder}: weight file(s) {extra} not written by the pack")
    return manifest


def read_config(folder: Path) -> dict[str, Any]:
    return read_json(folder / "config.json", "no config.json")
