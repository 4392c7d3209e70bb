"""The profile artifact: profile.safetensors (arrays [tensors, options] + one JSON metadata entry) and
summary.md; the writer (`Profile.save`) and the reader (`load_profile`). Reading needs numpy only.

A profile is of one format: "mlx" (MLX affine options of the HF checkpoint, artifacts/profile) or "gguf" (ggml
types of the bf16 GGUF, artifacts/profile_gguf, whose summary also carries `header_bytes`: the GGUF's fixed
overhead, which does not depend on the chosen types)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mintbuild.errors import MintError
from mintbuild.formats import GGUFOption, Option, any_option
from mintbuild.io import canonical_json

SCHEMA_VERSION = 1


PROFILE_FILE = "profile.safetensors"


SUMMARY_FILE = "summary.md"


#: What the profile_gguf stage writes instead of a profile when no GGUF was converted (convert.enabled false).
DISABLED_FILE = "disabled.json"


@dataclass
class Profile:
    """The profile artifact: per-tensor metadata and per-(tensor, option) arrays."""

    tensors: list[dict[str, Any]]
    options: list[Option | GGUFOption]
    arrays: dict[str, np.ndarray]
    provenance: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    #: "mlx" or "gguf": which runtime's options the profile measured.
    format: str = "mlx"

    def __getitem__(self, key: str) -> np.ndarray:
        return self.arrays[key]

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.tensors]

    @property
    def hash(self) -> str:
        return self.provenance["profile_hash"]

    def save(self, folder: Path) -> None:
        doc = {
            "schema_version": SCHEMA_VERSION,
            "format": self.format,
            "options": [o.name for o in self.options],
            "tensors": self.tensors,
            "provenance": self.provenance,
            "summary": self.summary,
        }
        # One metadata key: safetensors stores metadata in a hash map whose order varies between runs.
        meta = {"mintbuild_profile": canonical_json(doc)}
        from safetensors.numpy import save

        data = save({k: np.ascontiguousarray(v) for k, v in sorted(self.arrays.items())}, metadata=meta)
        (folder / PROFILE_FILE).write_bytes(data)
        (folder / SUMMARY_FILE).write_text(render_summary(self))


def load_profile(path: str | Path) -> Profile:
    """Load a profile artifact (the folder or its profile.safetensors); refuses other schema versions."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = Path(path)
    file = path / PROFILE_FILE if path.is_dir() else path
    if path.is_dir() and (path / DISABLED_FILE).is_file():
        raise MintError(
            f"{path}: no GGUF profile: convert.enabled is false; set it to true to build GGUF targets"
        )
    if not file.exists():
        raise MintError(f"{file}: no profile here (run `mintbuild profile` / `dvc repro profile` first)")
    try:
        with safe_open(str(file), framework="numpy") as f:
            meta = f.metadata() or {}
        arrays = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MintError(f"{file}: not a readable profile ({e})") from None
    doc = json.loads(meta.get("mintbuild_profile", "{}"))
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise MintError(
            f"{file}: profile schema version {doc.get('schema_version')!r}, this mintbuild reads "
            f"{SCHEMA_VERSION}; re-run `mintbuild profile`"
        )
    return Profile(
        tensors=doc["tensors"],
        options=[any_option(n) for n in doc["options"]],
        arrays=arrays,
        provenance=doc["provenance"],
        summary=doc["summary"],
        format=doc.get("format", "mlx"),
    )


def render_summary(p: Profile) -> str:
    roles: dict[str, list[int]] = {}
    for m in p.tensors:
        r = roles.setdefault(m["role"], [0, 0])
        r[0] += 1
        r[1] += m["elements"]
    s = p.summary
    lines = [
        "# Profile summary",
        "",
        f"- checkpoint hash: `{p.provenance['checkpoint_hash']}`",
        f"- tensors: {s['tensors']}, parameters: {s['parameters']:,}, 16-bit bytes: {s['bytes_16bit']:,}",
        f"- options ({len(p.options)}): {', '.join(o.name for o in p.options)}",
        f"- tensors measured on a sample: {s['sampled_tensors']} (largest relative standard error of NRMSE: "
        f"{s['max_nrmse_rse']:.2e})",
        "",
        "| role | tensors | parameters |",
        "|---|---:|---:|",
        *[f"| {r} | {c} | {n:,} |" for r, (c, n) in sorted(roles.items())],
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- columns, as the profiles fill them




def nrmse_of(sse: np.ndarray, norm_sq: float) -> np.ndarray:
    if norm_sq > 0:
        return np.sqrt(sse / norm_sq)
    return np.where(sse > 0, np.inf, 0.0)  # an all-zero tensor quantizes exactly: defined error 0


def sqnr_of(sse: np.ndarray, norm_sq: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(
            sse > 0, 10.0 * np.log10(np.maximum(norm_sq, 1e-300) / np.where(sse > 0, sse, 1.0)), np.inf
        )


def new_columns(n: int, k: int) -> dict[str, np.ndarray]:
    return {
        "bytes": np.zeros((n, k), np.int64),
        "available": np.zeros((n, k), np.uint8),
        "sse": np.full((n, k), np.nan),
        "nrmse": np.full((n, k), np.nan),
        "sqnr": np.full((n, k), np.nan),
        "worst_nrmse": np.full((n, k), np.nan),
        "nrmse_rse": np.zeros((n, k)),
        "elements": np.zeros(n, np.int64),
        "norm_sq": np.zeros(n),
        "sampled_elements": np.zeros(n, np.int64),
    }


def fill_option(cols, i, k, nbytes, sse, rse, worst, norm_sq) -> None:
    cols["bytes"][i, k] = nbytes
    cols["available"][i, k] = 1
    cols["sse"][i, k] = sse[0]
    cols["nrmse"][i, k] = nrmse_of(sse, norm_sq)[0]
    cols["sqnr"][i, k] = sqnr_of(sse, norm_sq)[0]
    cols["worst_nrmse"][i, k] = (worst if worst is not None else nrmse_of(sse, norm_sq))[0]
    cols["nrmse_rse"][i, k] = rse[0]


#: config.json keys later stages need (KV-cache headroom, the evaluator's window).
CONFIG_KEYS = (
    "model_type",
    "num_hidden_layers",
    "num_key_value_heads",
    "num_attention_heads",
    "hidden_size",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "vocab_size",
    "torch_dtype",
)

