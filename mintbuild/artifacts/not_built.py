"""The record of a target the build could not make for this model (its format's source does not exist: llama.cpp's
converter refused the model), written in place of every artifact the target's stages declare, so that `dvc repro`
finishes, every out exists, and the report, `dvc metrics show` and `mintbuild diff` say why in one line.

- allocate: allocation.json and metrics.json hold `{"built": false, "note": ...}` (`not_built_allocation`);
- pack: the target's folder holds not-built.json instead of a model (`write_note` / `read_note`);
- evaluate: metrics.json and settings.json hold the same note (`write_not_built_metrics`).
`is_built` tells a real allocation or metrics document from such a record. The profile_gguf stage's note in
place of a profile (disabled.json) says why there is no GGUF: `write_profile_note`, `profile_refused`.
Reading needs no torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mintbuild.artifacts.allocation import METRICS_FILE
from mintbuild.artifacts.profile import DISABLED_FILE
from mintbuild.io import atomic_dir, canonical_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
NOTE_FILE = "not-built.json"


def is_built(doc: dict[str, Any] | None) -> bool:
    """Whether an allocation or metrics document describes a built target (None: not there yet)."""
    return doc is not None and doc.get("built", True) is not False


def note_of(doc: dict[str, Any] | None) -> str | None:
    """The one-line reason of a not-built record, None for a built (or missing) document."""
    return None if doc is None or is_built(doc) else str(doc.get("note", "not built"))


def record(target: str, fmt: str, note: str) -> dict[str, Any]:
    """The not-built record of `target` (format `fmt`) with its one-line reason."""
    return {"schema_version": SCHEMA_VERSION, "target": target, "format": fmt, "built": False, "note": note}


def not_built_allocation(target: str, fmt: str, note: str, target_config: dict[str, Any]) -> dict[str, Any]:
    """allocation.json of a target that is not built: the record and the target it would have been."""
    return {**record(target, fmt, note), "target_config": target_config}


def write_note(folder: Path, target: str, fmt: str, note: str) -> dict[str, Any]:
    """Replace `folder` with one file, not-built.json (a stage's folder out for a target that is not built)."""
    doc = record(target, fmt, note)
    with atomic_dir(Path(folder)) as tmp:
        (tmp / NOTE_FILE).write_text(canonical_json(doc), encoding="utf-8")
    return doc


def read_note(folder: Path) -> dict[str, Any] | None:
    """The not-built record in `folder`, None when the folder holds a built artifact (or does not exist)."""
    path = Path(folder) / NOTE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_not_built_metrics(root: Path, target: str, note: dict[str, Any]) -> None:
    """`root`/`target`/metrics.json and settings.json of a target that is not built: its not-built record, so
    that every evaluate out exists and `dvc metrics show` says why."""
    with atomic_dir(Path(root) / target) as tmp:
        (tmp / METRICS_FILE).write_text(canonical_json(note), encoding="utf-8")
        (tmp / "settings.json").write_text(canonical_json(note), encoding="utf-8")
    log.warning("%s: not built: %s", target, note.get("note"))


def write_profile_note(folder: Path, doc: dict[str, Any]) -> None:
    """The profile_gguf stage's out when there is no GGUF to profile: disabled.json holding `doc` ({"enabled":
    false, ...} for convert.enabled false; {"converted": false, "note": the converter's reason} for a model the
    converter refused)."""
    (Path(folder) / DISABLED_FILE).write_text(canonical_json(doc), encoding="utf-8")


def profile_refused(folder: Path) -> str | None:
    """The converter's reason when `folder` holds no GGUF profile because the model could not be converted
    (its GGUF targets are then not built), else None (a profile; or convert.enabled false, a config error that
    loading the profile reports)."""
    path = Path(folder) / DISABLED_FILE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    return str(doc.get("note")) if doc.get("converted") is False else None
