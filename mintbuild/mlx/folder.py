"""The MLX model folder: the writer's layout (stored tensors, config.json's `quantization`, tokenizer files,
the pack manifest) and the reader's side of the same facts (manifest check, dequantization exactly as MLX
does), side by side so they cannot drift apart.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mintbuild.artifacts.pack import build_manifest
from mintbuild.errors import MintError
from mintbuild.formats import Option, stored_entry_names
from mintbuild.mlx.quant.reference import QUANTIZER_VERSION, dequantize_codes, unpack_codes

WEIGHTS_FILE = "model.safetensors"


#: safetensors metadata mlx-lm's own save_model writes; fixed so the file is byte-identical on rerun.
FILE_METADATA = {"format": "mlx"}


@dataclass(frozen=True)
class Entry:
    """One tensor stored in the file."""

    name: str
    dtype: str  # safetensors dtype: U32 or BF16
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return (4 if self.dtype == "U32" else 2) * math.prod(self.shape)


@dataclass
class Item:
    """One checkpoint tensor and how it is stored."""

    source: str
    option: Option
    shape: tuple[int, ...]
    decision: str
    entries: list[Entry]


def item_entries(name: str, option: Option, shape: tuple[int, ...]) -> list[Entry]:
    if option.passthrough:
        return [Entry(name, "BF16", shape)]
    wshape, sshape = option.packed_shape(shape)
    w, s, b = stored_entry_names(name, option)
    return [Entry(w, "U32", wshape), Entry(s, "BF16", sshape), Entry(b, "BF16", sshape)]


def module_path(name: str) -> str:
    """The module path mlx-lm's nn.quantize sees for a weight (`a.b.weight` -> `a.b`)."""
    return name.removesuffix(".weight")


def quantization_section(items: list[Item]) -> dict[str, Any] | None:
    """config.json's `quantization`: the most common option (by tensor count, then bytes, then name) as the
    default, plus one entry per module path whose choice differs; None when nothing is quantized."""
    quantized = [it for it in items if not it.option.passthrough]
    if not quantized:
        return None
    count = Counter(it.option for it in quantized)
    nbytes: Counter[Option] = Counter()
    for it in quantized:
        nbytes[it.option] += it.option.nbytes(it.shape)
    default = min(count, key=lambda o: (-count[o], -nbytes[o], o.name))
    section: dict[str, Any] = {"group_size": default.group, "bits": default.bits, "mode": "affine"}
    for it in items:
        if len(it.shape) < 2:
            continue  # norms and biases: never quantizable modules, nothing to say
        path = module_path(it.source)
        if it.option.passthrough:
            section[path] = False  # mlx-lm keeps the module as is (a quantizable Linear/Embedding in 16 bits)
        elif it.option != default:
            section[path] = {"group_size": it.option.group, "bits": it.option.bits}
    return section


def packed_config(model_config: dict[str, Any], plan: Plan) -> dict[str, Any]:
    cfg = {k: v for k, v in model_config.items() if k not in ("quantization", "quantization_config")}
    if plan.quantization is not None:
        cfg["quantization"] = plan.quantization
        cfg["quantization_config"] = plan.quantization  # what mlx-lm's convert writes too (HF model tree)
    return cfg


def manifest(
    folder: Path,
    alloc: dict[str, Any],
    alloc_path: Path,
    plan: Plan,
    known: dict[str, str],
    rounding: dict[str, Any],
) -> dict[str, Any]:
    """The pack's record of an MLX folder; `known` holds sha256 digests already computed (file name -> hex)."""
    return build_manifest(
        folder, alloc, alloc_path, target=plan.target, budget=plan.budget, weights_bytes=plan.file_bytes,
        header_bytes=len(plan.header), parameters=plan.parameters, data_bytes=plan.data_bytes,
        quantizer=QUANTIZER_VERSION, rounding=rounding, known=known,
    )  # fmt: skip


def module_option(quant: dict[str, Any], path: str) -> tuple[int, int]:
    """(bits, group) of a quantized module from config.json's `quantization` (per-path entry, else default)."""
    entry = quant.get(path)
    if isinstance(entry, dict):
        return int(entry["bits"]), int(entry["group_size"])
    if entry is False:
        raise MintError(f"config.json says module {path!r} is not quantized, but the file holds its scales")
    return int(quant["bits"]), int(quant["group_size"])


def dequantized_state(folder: Path, config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the packed weights as bf16, quantized modules dequantized exactly as MLX does."""
    from safetensors import safe_open

    quant = config.get("quantization") or {}
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise MintError(f"{folder}: no model*.safetensors")
    raw: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                raw[name] = sf.get_tensor(name)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(raw):
        if name.endswith((".scales", ".biases")):
            continue
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" not in raw:
            state[name] = raw[name].to(torch.bfloat16)
            continue
        state[name] = dequantize_module(stem, raw, quant)
    return state


#: safetensors dtype of a packed file's tensors -> (numpy dtype of the raw bytes, torch dtype to view them as).
_RAW_DTYPES = {
    "U32": ("<u4", torch.uint32),
    "BF16": ("<u2", torch.bfloat16),
    "F16": ("<f2", torch.float16),
    "F32": ("<f4", torch.float32),
}


class PackedTensors:
    """The tensors of a packed folder's safetensors files, each read into memory of its own when asked for.

    Not memory-mapped: every page of a mapped file that a pass touches stays counted in the process's resident
    memory until the map goes, so a streamed evaluation that reads a 0.7 GB file front to back through one map
    grows by 0.7 GB; read with file I/O, a tensor's memory goes when the tensor does."""

    def __init__(self, files: list[Path]) -> None:
        from mintbuild.hf.checkpoint import read_header

        self._where: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for f in files:
            header, start = read_header(f)
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if e.get("dtype") not in _RAW_DTYPES:
                    raise MintError(f"{f}: tensor {name!r} has dtype {e.get('dtype')!r}, not a packed one")
                a, b = (start + int(x) for x in e["data_offsets"])
                self._where[name] = (f, e["dtype"], tuple(int(d) for d in e["shape"]), a, b)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def read(self, name: str) -> torch.Tensor:
        path, dtype, shape, a, b = self._where[name]
        np_dtype, torch_dtype = _RAW_DTYPES[dtype]
        buf = np.empty((b - a) // np.dtype(np_dtype).itemsize, dtype=np_dtype)
        with open(path, "rb") as f:
            f.seek(a)
            # ignore: numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only; it is a buffer on 3.11 too
            got = f.readinto(memoryview(buf).cast("B"))  # type: ignore[arg-type]
        if got != b - a or buf.size != math.prod(shape):
            raise MintError(f"{path}: tensor {name!r}: read {got:,} of {b - a:,} B (truncated file?)")
        return torch.from_numpy(buf).view(torch_dtype).reshape(shape)


def dequantize_module(stem: str, raw: dict[str, torch.Tensor], quant: dict[str, Any]) -> torch.Tensor:
    bits, group = module_option(quant, stem)
    words, scales, biases = raw[f"{stem}.weight"], raw[f"{stem}.scales"], raw[f"{stem}.biases"]
    k = scales.shape[-1] * group
    if words.dtype != torch.uint32 or words.shape[-1] * 32 != k * bits or biases.shape != scales.shape:
        raise MintError(
            f"module {stem!r}: packed shapes {list(words.shape)} / {list(scales.shape)} do not match "
            f"{bits}-bit groups of {group} from config.json"
        )
    codes = torch.from_numpy(unpack_codes(words.numpy(), bits, k))
    return dequantize_codes(codes, scales, biases, group, torch.bfloat16)


@dataclass
class Plan:
    target: str
    budget: int
    header_allowance: int
    items: list[Item]
    quantization: dict[str, Any] | None
    header: bytes = b""
    offsets: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(e.nbytes for it in self.items for e in it.entries)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes

    @property
    def parameters(self) -> int:
        return sum(math.prod(it.shape) for it in self.items)


def layout(plan: Plan) -> None:
    """safetensors header (sorted names, fixed metadata, padded to 8 bytes); the data in plan order (items by
    source name, each item's entries together), so the file is written front to back and hashed as written."""
    offset = 0
    for e in (e for it in plan.items for e in it.entries):
        if e.name in plan.offsets:
            raise MintError(f"two stored tensors would both be named {e.name!r}")
        plan.offsets[e.name] = (offset, offset + e.nbytes)
        offset += e.nbytes
    header: dict[str, Any] = {"__metadata__": FILE_METADATA}
    for e in sorted((e for it in plan.items for e in it.entries), key=lambda e: e.name):
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": list(plan.offsets[e.name]),
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    plan.header = struct.pack("<Q", len(raw)) + raw
