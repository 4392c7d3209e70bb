"""The importance stage's artifact: importance.json (alpha per tensor, provenance), the linear layers' input
Hessians (hessian.safetensors) and the GPTQ rounding gains; the writer and the readers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mintbuild.errors import MintError
from mintbuild.hf.safetensors_out import StreamedSafetensors
from mintbuild.io import atomic_write_json, sha256_file
from mintbuild.rounding import GPTQ_VERSION

if TYPE_CHECKING:
    import torch

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
    checked against the sha256 importance.json recorded. Each Hessian is a `HessianFile` read from the file by
    rows when used (pack holds one tensor's at a time, whatever the model's size)."""
    from mintbuild.hf.checkpoint import read_header

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
    header, data_start = read_header(path)
    stored: dict[str, HessianFile] = {}
    for t in record["tensors"].values():
        key = t["key"]
        entry = header.get(key)
        if entry is None:
            raise MintError(f"{path}: no Hessian {key!r} that importance.json names")
        k = int(t["inputs"])
        if entry.get("dtype") != "F32" or list(entry.get("shape", [])) != [k, k]:
            raise MintError(
                f"{path}: Hessian {key!r} is {entry.get('dtype')} {entry.get('shape')}, not F32 [{k}, {k}]"
            )
        if key not in stored:  # layers that share an input share one reader
            stored[key] = HessianFile(path, k, data_start + int(entry["data_offsets"][0]))
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


class HessianFile:
    """H [K, K] float32 (C order, little-endian) stored in `path` from byte `offset` on: a raw file (offset 0, its
    whole size) or a member of hessian.safetensors. `h[rows]` (a slice or an index tensor) reads those rows,
    `diagonal()` the diagonal in float64, `load()` all of it; nothing is kept in memory between reads, and the
    reads are plain file reads, so no page of the file stays mapped into the process (GPTQ's factor and clip
    search take it in place of a tensor: a wide layer's H, 28,672^2 x 4 B = 3.3 GB for a 70B's down_proj, need
    not be in memory beside the factor's buffer)."""

    def __init__(self, path: Path, k: int, offset: int = 0) -> None:
        self.path, self.k, self.offset = Path(path), k, offset
        self.shape = (k, k)
        size, end = self.path.stat().st_size, offset + k * k * 4
        if size < end or (offset == 0 and size != end):
            raise MintError(
                f"{self.path}: {size:,} B cannot hold a float32 Hessian of {k} x {k} at byte {offset:,}"
            )

    def _rows(self, i0: int, n: int) -> np.ndarray:
        at = self.offset + i0 * self.k * 4
        return np.fromfile(self.path, dtype="<f4", count=n * self.k, offset=at).reshape(n, self.k)

    def __getitem__(self, rows: Any) -> torch.Tensor:
        import torch

        if isinstance(rows, slice):
            i0, i1, step = rows.indices(self.k)
            if step != 1:
                raise IndexError("HessianFile reads contiguous or indexed rows only")
            return torch.from_numpy(self._rows(i0, max(i1 - i0, 0)))
        idx = torch.as_tensor(rows).reshape(-1).tolist()
        out = np.empty((len(idx), self.k), np.float32)
        for n, i in enumerate(idx):
            out[n] = self._rows(int(i), 1)[0]
        return torch.from_numpy(out)

    def diagonal(self) -> torch.Tensor:
        import torch

        d = np.empty(self.k, np.float64)
        for i0 in range(0, self.k, 1024):
            rows = self._rows(i0, min(1024, self.k - i0))
            d[i0 : i0 + len(rows)] = rows[np.arange(len(rows)), np.arange(i0, i0 + len(rows))]
        return torch.from_numpy(d)

    def load(self) -> torch.Tensor:
        """The whole H in memory."""
        import torch

        return torch.from_numpy(self._rows(0, self.k))

    @staticmethod
    def write(path: Path, h: torch.Tensor) -> HessianFile:
        """Store the float32 [K, K] `h` at `path` (raw, C order)."""
        h.detach().float().contiguous().numpy().astype("<f4", copy=False).tofile(path)
        return HessianFile(path, h.shape[0])
