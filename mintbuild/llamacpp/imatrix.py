"""llama.cpp's importance-matrix file (the GGUF-based format of tools/imatrix), written from mintbuild's
calibration, and read back the way llama-quantize reads it.

One job: the imatrix file. The importance stage measures, per linear layer, the per-input-channel sum over its
calibration tokens of x^2 and the token count (artifacts/importance/imatrix.safetensors, checkpoint names). Here
they become llama.cpp's file: a GGUF with `general.type = "imatrix"`, `imatrix.datasets` (strings),
`imatrix.chunk_count` and `imatrix.chunk_size` (uint32), and per GGUF weight tensor `<name>.in_sum2` (F32
[n_mat, n_in]: n_mat = 1, or the experts of a merged expert tensor) and `<name>.counts` (F32 [n_mat, 1]: tokens
per matrix) (common/imatrix-loader.cpp, tools/imatrix/imatrix.cpp). Names are the converter's (gguf_names). A
tied output head is a matmul with `token_embd.weight` in llama.cpp, so its statistics are that tensor's entry,
as llama-imatrix records them.

`quantize_weights` is what llama-quantize passes to ggml_quantize_chunk for a tensor: in_sum2 / count in float32
(count 0 -> all ones), so the profile's errors are measured with the very weights llama-quantize uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mintbuild.artifacts.importance import InputSquares
from mintbuild.errors import MintError
from mintbuild.llamacpp.names import hf_to_gguf

log = logging.getLogger(__name__)

#: The file's name beside the GGUF profile, and what llama-quantize is given (it records the string it was
#: given in the output's `quantize.imatrix.file`, so it is always this relative name).
IMATRIX_GGUF = "imatrix.gguf"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


@dataclass(frozen=True)
class Entry:
    """One imatrix entry: sums [n_mat, n_in] and counts [n_mat] (float64 until written)."""

    sums: np.ndarray
    counts: np.ndarray


def gguf_entries(
    squares: InputSquares, arch: str, n_blocks: int, shapes: dict[str, tuple[int, ...]]
) -> dict[str, Entry]:
    """The imatrix entries of a GGUF with tensors `shapes` (name -> numpy shape, e.g. [out, in] or
    [experts, out, in]) from the importance stage's sums by checkpoint name. Experts merged by the converter
    are stacked in expert order; an expert that saw no token has count 0 (llama-quantize then uses ones)."""
    mapping = hf_to_gguf(squares.sums, arch, n_blocks, shapes)
    entries: dict[str, Entry] = {}
    grouped: dict[str, dict[int, str]] = {}
    for hf, g in mapping.items():
        if g.expert is None:
            if g.name in entries:
                raise MintError(f"imatrix: checkpoint tensors {hf!r} and another map to {g.name!r}")
            entries[g.name] = Entry(
                np.asarray(squares.sums[hf], np.float64)[None], np.array([squares.counts[hf]], np.float64)
            )
        else:
            grouped.setdefault(g.name, {})[g.expert] = hf
    for name, experts in grouped.items():
        shape = shapes[name]
        n_exp = shape[0] if len(shape) == 3 else max(experts) + 1
        n_in = shape[-1]
        sums = np.zeros((n_exp, n_in))
        counts = np.zeros(n_exp)
        for e, hf in experts.items():
            sums[e] = squares.sums[hf]
            counts[e] = squares.counts[hf]
        entries[name] = Entry(sums, counts)
    for name, entry in entries.items():
        if entry.sums.shape[-1] != shapes[name][-1]:
            raise MintError(
                f"imatrix: {name} has rows of {shapes[name][-1]} values but its statistics have "
                f"{entry.sums.shape[-1]}"
            )
    unmapped = sorted(set(squares.sums) - set(mapping))
    if unmapped:
        log.warning(
            "imatrix: %d checkpoint tensors have no GGUF tensor (no entry): %s", len(unmapped), unmapped[:3]
        )
    return dict(sorted(entries.items()))


def write_imatrix(
    path: Path, entries: dict[str, Entry], chunk_count: int, chunk_size: int, datasets: list[str]
) -> None:
    """Write llama.cpp's imatrix GGUF (deterministic: sorted names, fixed keys)."""
    import gguf

    if not entries:
        raise MintError(f"{path}: no imatrix entries to write (no linear layer maps to a GGUF tensor)")
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    # GGUFWriter adds general.architecture; llama.cpp's loader ignores it. general.type is what marks the file.
    w.add_type("imatrix")
    w.add_array(KEY_DATASETS, list(datasets))
    w.add_uint32(KEY_CHUNK_COUNT, int(chunk_count))
    w.add_uint32(KEY_CHUNK_SIZE, int(chunk_size))
    for name, e in entries.items():
        w.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(e.sums, dtype=np.float32))
        w.add_tensor(f"{name}.counts", np.ascontiguousarray(e.counts.reshape(-1, 1), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@dataclass(frozen=True)
class ImatrixFile:
    """What llama-quantize reads from an imatrix file."""

    datasets: list[str]
    chunk_count: int
    chunk_size: int
    sums: dict[str, np.ndarray]  # float32 [n_mat, n_in]
    counts: dict[str, np.ndarray]  # float32 [n_mat]


def read_imatrix(path: Path) -> ImatrixFile:
    """Read an imatrix GGUF as common_imatrix_load does (only in_sum2 and counts)."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise MintError(f"{path}: not a readable imatrix GGUF ({e})") from None
    if _field(r, "general.type") != "imatrix":
        raise MintError(f"{path}: general.type is {_field(r, 'general.type')!r}, not an imatrix")
    sums, counts = {}, {}
    for t in r.tensors:
        data = np.array(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = data.reshape(-1)
    if set(sums) != set(counts):
        raise MintError(f"{path}: mismatched sums and counts for {sorted(set(sums) ^ set(counts))[:3]}")
    return ImatrixFile(
        datasets=list(_field(r, KEY_DATASETS) or []),
        chunk_count=int(_field(r, KEY_CHUNK_COUNT) or 0),
        chunk_size=int(_field(r, KEY_CHUNK_SIZE) or 0),
        sums=sums,
        counts=counts,
    )


def _field(r: Any, key: str) -> Any:
    f = r.fields.get(key)
    return f.contents() if f is not None else None


def quantize_weights(imatrix: ImatrixFile, name: str) -> np.ndarray | None:
    """The float32 weights [n_mat, n_in] llama-quantize gives ggml for tensor `name` (None: no entry):
    sums / count per matrix, in float32 as it divides; a matrix that saw no token gets ones."""
    if name not in imatrix.sums:
        return None
    sums, counts = imatrix.sums[name], imatrix.counts[name]
    out = np.ones_like(sums)
    seen = counts > 0
    out[seen] = sums[seen] / counts[seen, None]
    return out
