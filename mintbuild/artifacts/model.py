"""The model stage's folder: its manifest, where the weights are, the small files that travel with them, and
the validation of a local Hugging Face folder (single file or sharded)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.hf.fingerprint import file_digests
from mintbuild.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)


MANIFEST = "manifest.json"


MANIFEST_SCHEMA = 1


#: Small files copied from a local model folder (tokenizer files are matched by the `tokenizer` prefix).
SMALL_FILES = ("config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
#: A model folder has a tokenizer when it has one of these (the files that travel with the weights are the
#: `tokenizer*` ones, so a vocab.json-only tokenizer would not survive a copy).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def resolve_weights_dir(model_out: Path) -> Path:
    """The folder holding the safetensors: `model_out` itself, or the local folder its manifest names."""
    model_out = Path(model_out)
    manifest_path = model_out / MANIFEST
    if not manifest_path.is_file():
        raise MintError(f"{manifest_path}: no model manifest; run `mintbuild model` first")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    if manifest.get("source") != "local":
        return model_out
    path = Path(manifest["path"])
    if not path.is_dir():
        raise MintError(f"{path}: the local model folder named in {manifest_path} is gone")
    return path


def copy_small_files(folder: Path, dst: Path) -> None:
    """config.json, generation/chat files and the tokenizer files of an HF folder (never the weights)."""
    for src in sorted(Path(folder).iterdir()):
        if src.is_file() and (src.name in SMALL_FILES or src.name.startswith("tokenizer")):
            shutil.copy2(src, dst / src.name)


INDEX_FILE = "model.safetensors.index.json"


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.safetensors$")


def write_local_manifest(path: str | Path, out: Path) -> dict[str, Any]:
    """Validate the Hugging Face folder at `path` and write `out`: its small files and a manifest naming it
    (the weights stay where they are). Used by the model stage (model.source local) and by equalize
    (method none)."""
    folder = Path(path).expanduser().resolve()
    weights = local_weight_files(folder)
    with atomic_dir(out) as dst:
        copy_small_files(folder, dst)
        manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "source": "local",
            "path": str(folder),
            # Size and sha256 (memoised by stat identity: a many-GB folder is hashed once) so that a changed
            # checkpoint, and only a changed one, changes this file.
            "files": file_digests(weights),
        }
        atomic_write_json(dst / MANIFEST, manifest)
    log.info("model folder %s: %d weight file(s); manifest in %s", folder, len(weights), out)
    return manifest


def check_architecture(config_file: Path) -> None:
    """Refuse, before any work, a model whose model_type transformers has no causal LM class for: every stage
    runs the model through transformers' own classes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as known

    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except ValueError as e:
        raise MintError(f"{config_file}: not valid JSON ({e})") from None
    if model_type not in known:
        sample = ", ".join(t for t in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3",
                                       "qwen2_moe", "qwen3_moe", "mixtral") if t in known)  # fmt: skip
        raise MintError(
            f"{config_file}: model_type {model_type!r} is not a causal LM this transformers supports "
            f"({len(known)} are, e.g. {sample})"
        )


def local_weight_files(folder: Path) -> list[Path]:
    """Validate an HF folder; return its weight files (index first, if any, then the safetensors)."""
    if not folder.is_dir():
        raise MintError(f"{folder}: model folder does not exist")
    if not (folder / "config.json").is_file():
        raise MintError(f"{folder / 'config.json'}: missing; not a Hugging Face model folder")
    check_architecture(folder / "config.json")
    index = folder / INDEX_FILE
    if index.is_file():
        shards = _index_shards(index)
    elif (folder / "model.safetensors").is_file():
        shards = [folder / "model.safetensors"]
    else:
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise MintError(f"{folder}: no *.safetensors files")
        _check_shard_set(folder, shards)
    for shard in shards:
        _check_safetensors_header(shard)
    return ([index] if index.is_file() else []) + shards


def _index_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MintError(f"{index}: not a valid safetensors index ({e})") from None
    if not names:
        raise MintError(f"{index}: weight_map is empty")
    shards = [index.parent / n for n in names]
    for shard in shards:
        if not shard.is_file():
            raise MintError(f"{shard}: shard named in {index.name} does not exist")
    return shards


def _check_shard_set(folder: Path, shards: list[Path]) -> None:
    """Without an index, files named x-0000i-of-0000n must all be present."""
    for shard in shards:
        m = _SHARD.match(shard.name)
        if not m:
            continue
        width, n = len(m.group("i")), int(m.group("n"))
        for i in range(1, n + 1):
            want = folder / f"{m.group('stem')}-{i:0{width}d}-of-{m.group('n')}.safetensors"
            if not want.is_file():
                raise MintError(f"{want}: shard missing (and no {INDEX_FILE})")


def _check_safetensors_header(path: Path) -> None:
    """Cheap early check that the file is safetensors; the profile stage validates every tensor."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if size < 8 or n > size - 8:
                raise ValueError(f"header length {n} exceeds file size {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (struct.error, ValueError) as e:
        raise MintError(f"{path}: not a safetensors file ({e})") from None
