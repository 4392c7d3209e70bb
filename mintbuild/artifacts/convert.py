"""The convert stage's artifact: model.gguf (the equalized model as llama.cpp's converter writes it, bf16) and
convert.json (what it was made from, with which converter, and the file's facts); the file names and the
reader. Reading needs no torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.io import read_json

SCHEMA_VERSION = 1
GGUF_FILE = "model.gguf"
CONVERT_FILE = "convert.json"
#: What a disabled convert stage records (convert.enabled false), and what a GGUF stage says when it meets it.
DISABLED = "no GGUF was converted (convert.enabled is false); set convert.enabled: true to build GGUF targets"


def is_disabled(folder: Path) -> bool:
    """Whether the convert stage at `folder` ran with convert.enabled false (a note, no GGUF)."""
    path = Path(folder) / CONVERT_FILE
    return path.is_file() and read_json(path, "").get("enabled") is False


def failure_record(note: str) -> dict[str, Any]:
    """convert.json of a model llama.cpp's converter refused: no GGUF, and the converter's own one-line reason,
    which every GGUF target of the build then reports as why it is not built."""
    return {"schema_version": SCHEMA_VERSION, "converted": False, "note": note}


def failure_note(folder: Path) -> str | None:
    """The converter's reason when the convert stage at `folder` could not convert the model, else None."""
    path = Path(folder) / CONVERT_FILE
    doc = read_json(path, "") if path.is_file() else {}
    return str(doc.get("note")) if doc.get("converted") is False else None


def load_convert(folder: Path) -> dict[str, Any]:
    """`folder`/convert.json, after checking that model.gguf is there with the size it records."""
    folder = Path(folder)
    doc = read_json(folder / CONVERT_FILE, "no converted model; run `mintbuild convert` first")
    if doc.get("enabled") is False:
        raise MintError(f"{folder / CONVERT_FILE}: {DISABLED}")
    if doc.get("converted") is False:
        raise MintError(f"{folder / CONVERT_FILE}: no GGUF: {doc.get('note')}")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise MintError(
            f"{folder / CONVERT_FILE}: schema_version {doc.get('schema_version')!r} (expected "
            f"{SCHEMA_VERSION}); re-run `mintbuild convert`"
        )
    gguf = folder / GGUF_FILE
    if not gguf.is_file() or gguf.stat().st_size != doc["gguf"]["bytes"]:
        raise MintError(f"{gguf}: missing or not the {doc['gguf']['bytes']:,} B file convert.json records")
    return doc
