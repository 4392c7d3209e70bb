"""The importance stage's artifact: importance.json (alpha per tensor, provenance), the linear layers' input
Hessians (hessian.safetensors) and the GPTQ rounding gains; the writer and the readers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.io import atomic_write_json, sha256_file
from mintbuild.rounding import GPTQ_VERSION
from mintbuild.hf.safetensors_out import StreamedSafetensors

SCHEMA_VERSION = 2


FILENAME = "importance.json"


#: The linear layers' input Hessians (float32 [K, K] per distinct input, under the key importance.json's
#: hessian.tensors gives each weight) for GPTQ rounding.
HESSIAN_FILE = "hessian.safetensors"


#: llama.cpp's importance matrix by checkpoint name: per linear layer's weight, the sum over the calibration
#: tokens of x^2 per input channel (float64 [in]); the token counts are in importance.json ("imatrix").
IMATRIX_FILE = "imatrix.safetensors"


@dataclass(frozen=True)
class Hessians:
    """The importance stage's input Hessians by weight name (layers that share an input share the tensor), the
    file's sha256 and importance.json."""

    full: dict[str, Any]
    sha256: str
    doc: dict[str, Any]


def load_hessians(folder: Path, model_fingerprint: str) -> Hessians:
    """The input Hessians of an importance folder, measured on the model with `model_fingerprint`; the file is
    checked against the sha256 importance.json recorded."""
    from safetensors.torch import load_file

    doc, record = _gptq_record(folder, "hessian", "input Hessians")
    path = Path(folder) / HESSIAN_FILE
    if not path.is_file() or sha256_file(path) != record["sha256"]:
        raise MintError(
            f"{path}: missing or not the file importance.json recorded (sha256 {record['sha256'][:12]})"
        )
    measured_on = doc.get("provenance", {}).get("model_fingerprint")
    if measured_on != model_fingerprint:
        raise MintError(
            f"{folder}: the Hessians were measured on another model (fingerprint {measured_on} != "
            f"{model_fingerprint}); re-run `mintbuild importance`"
        )
    stored = load_file(str(path))
    missing = sorted({t["key"] for t in record["tensors"].values()} - set(stored))
    if missing:
        raise MintError(f"{path}: no Hessian {missing[0]!r} that importance.json names ({len(missing)} missing)")
    return Hessians({n: stored[t["key"]] for n, t in record["tensors"].items()}, record["sha256"], doc)


def load_importance(path: Path) -> dict[str, Any]:
    """Read an importance artifact (folder or file)."""
    path = Path(path)
    path = path / FILENAME if path.is_dir() else path
    if not path.is_file():
        raise MintError(f"{path}: no importance artifact; run `mintbuild importance` first")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("schema_version") != SCHEMA_VERSION:
        raise MintError(f"{path}: schema_version {data.get('schema_version')} (expected {SCHEMA_VERSION})")
    return data


def write_importance(
    folder: Path,
    doc: dict[str, Any],
    record: dict[str, Any],
    hessians: Mapping[str, Any],
    gains: dict[str, dict[str, float]],
    gain_settings: dict[str, Any],
    imatrix: dict[str, Any] | None = None,
    imatrix_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write importance.json (+ hessian.safetensors when there are Hessians, imatrix.safetensors when there is an
    imatrix) into `folder`, the stage's atomic_dir temporary. The Hessian file is written one tensor at a time
    (`hessians` may read each from disk), so that writing it needs one Hessian in memory, not all; its sha256
    and the GPTQ rounding gains (with the damping and block they were measured with) are recorded in
    importance.json."""
    from safetensors.torch import save_file

    if hessians:
        # one spec per key, from the record (its input width), so that no Hessian is read to lay out the file
        specs: dict[str, tuple[str, tuple[int, ...]]] = {
            t["key"]: ("F32", (t["inputs"], t["inputs"])) for t in record["tensors"].values()
        }
        meta = {"schema_version": str(SCHEMA_VERSION)}
        with StreamedSafetensors(folder / HESSIAN_FILE, specs, meta) as f:
            for key in specs:
                f.write(key, hessians[key])
        doc["hessian"] = {**record, "sha256": sha256_file(folder / HESSIAN_FILE)}
        doc["rounding_gain"] = {**gain_settings, "tensors": gains}
    if imatrix:
        save_file(imatrix, str(folder / IMATRIX_FILE), metadata={"schema_version": str(SCHEMA_VERSION)})
        doc["imatrix"] = {**(imatrix_record or {}), "sha256": sha256_file(folder / IMATRIX_FILE)}
    atomic_write_json(folder / FILENAME, doc)
    return doc


def load_rounding_gains(folder: Path, damp: float, block: int) -> dict[str, dict[str, float]]:
    """{tensor: {option: r}} the importance stage measured for GPTQ at this damping and block size."""
    _, rec = _gptq_record(folder, "rounding_gain", "GPTQ rounding gains")
    path = Path(folder) / FILENAME
    if (rec.get("version"), rec.get("damp"), rec.get("block")) != (GPTQ_VERSION, damp, block):
        raise MintError(
            f"{path}: GPTQ gains measured with {rec.get('version', 'an older GPTQ')} at damp {rec.get('damp')} "
            f"block {rec.get('block')}, but this build rounds with {GPTQ_VERSION} at damp {damp} block {block}; "
            "rerun `mintbuild importance`"
        )
    return {str(t): {str(o): float(r) for o, r in g.items()} for t, g in rec["tensors"].items()}


def _gptq_record(folder: Path, key: str, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(importance.json, its `key` record), refusing a folder measured without a Hessian."""
    doc = load_importance(folder)
    if not doc.get(key):
        raise MintError(
            f"{Path(folder) / FILENAME}: no {what} (importance.hessian_windows is 0); set it, rerun "
            "`mintbuild importance`, or set pack.rounding: rtn"
        )
    return doc, doc[key]


@dataclass(frozen=True)
class InputSquares:
    """The importance stage's imatrix: per checkpoint weight name, the sum over calibration tokens of x^2 per
    input channel (float64 numpy), the tokens it saw, the chunk size (tokens per window) and the file's sha256."""

    sums: dict[str, Any]
    counts: dict[str, int]
    chunk_size: int
    sha256: str


def load_input_squares(folder: Path) -> InputSquares:
    """The imatrix of an importance folder, checked against the sha256 importance.json recorded."""
    from safetensors.numpy import load_file

    doc = load_importance(folder)
    rec = doc.get("imatrix")
    path = Path(folder) / IMATRIX_FILE
    if not rec:
        raise MintError(f"{Path(folder) / FILENAME}: no imatrix; rerun `mintbuild importance`")
    if not path.is_file() or sha256_file(path) != rec["sha256"]:
        raise MintError(
            f"{path}: missing or not the file importance.json recorded (sha256 {rec['sha256'][:12]})"
        )
    sums = load_file(str(path))
    missing = sorted(set(sums) - set(rec["counts"]))
    if missing:
        raise MintError(f"{path}: no token count for {missing[:3]} in importance.json")
    return InputSquares(
        sums, {k: int(v) for k, v in rec["counts"].items()}, int(rec["chunk_size"]), rec["sha256"]
    )
