"""Reading Hugging Face safetensors checkpoints: validated headers, one tensor at a time, memory-mapped.

The header of every file is parsed and checked here (not trusted to a library) so that a truncated file, lying
offsets or a shard the index names but the folder lacks is reported as one line naming the file and tensor,
before any work. Tensors are then read one by one through a memory map, so peak memory stays near the largest
tensor however large the checkpoint is.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import re
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mintbuild.errors import MintError

if TYPE_CHECKING:  # torch is imported where tensors are read: header-only users (allocate) stay light
    import torch

#: safetensors dtype -> (bytes per element, numpy dtype to read the raw bytes, torch dtype to view them as).
FLOAT_DTYPES: dict[str, tuple[int, str, str]] = {
    "BF16": (2, "<u2", "bfloat16"),
    "F16": (2, "<f2", "float16"),
    "F32": (4, "<f4", "float32"),
    "F64": (8, "<f8", "float64"),
}
#: Everything else safetensors knows; refused with a clear message (integers mean a pre-quantized checkpoint).
OTHER_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "I32": 4,
    "U32": 4,
    "I64": 8,
    "U64": 8,
}
MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    #: Absolute byte range of the tensor's data in `file`.
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    folder: Path
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, backed by a read-only memory map of the file."""
        return read_tensor(self.tensors[name])

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        for name in names or self.names:
            info = self.tensors[name]
            yield info, read_tensor(info)


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and validate a safetensors header; returns (header dict, offset of the data section)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MintError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise MintError(
                    f"{path}: not a safetensors file (header length {n} exceeds file size {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise MintError(f"{path}: cannot read: {e.strerror}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise MintError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from None
    return header, 8 + n


def scan_file(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of one safetensors file, with dtype, shape and offsets checked against the file size."""
    header, data_start = read_header(path)
    data_len = path.stat().st_size - data_start
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = _tensor_info(path, name, entry, data_start, data_len)
    _check_overlaps(path, out)
    return out


def _tensor_info(path: Path, name: str, entry: dict, data_start: int, data_len: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = (
            entry["dtype"],
            tuple(int(d) for d in entry["shape"]),
            entry["data_offsets"],
        )
    except (KeyError, TypeError, ValueError):
        raise MintError(f"{path}: tensor {name!r}: malformed header entry {entry!r}") from None
    if dtype in OTHER_DTYPES:
        raise MintError(
            f"{path}: tensor {name!r} has dtype {dtype}: integer or 8-bit tensors mean a pre-quantized "
            "checkpoint; mintbuild quantizes from a 16- or 32-bit float original"
        )
    if dtype not in FLOAT_DTYPES:
        raise MintError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    want = math.prod(shape) * FLOAT_DTYPES[dtype][0]
    if not (0 <= begin <= end) or end - begin != want:
        raise MintError(
            f"{path}: tensor {name!r}: header offsets [{begin}, {end}) do not match its shape {list(shape)} "
            f"{dtype} ({want} bytes)"
        )
    if end > data_len:
        raise MintError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
            f"{data_start + data_len} bytes (truncated file?)"
        )
    return TensorInfo(name, dtype, shape, path, data_start + begin, data_start + end)


def _check_overlaps(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, e0, n0), (s1, _, n1) in itertools.pairwise(spans):
        if s1 < e0:
            raise MintError(f"{path}: header offsets of tensors {n0!r} and {n1!r} overlap")


def read_tensor(info: TensorInfo) -> torch.Tensor:
    import torch

    _, np_dtype, dtype_name = FLOAT_DTYPES[info.dtype]
    torch_dtype = getattr(torch, dtype_name)
    if info.numel == 0:
        return torch.zeros(info.shape, dtype=torch_dtype)
    size = info.numel * np.dtype(np_dtype).itemsize
    # A map of just this tensor's pages (page-aligned start), released with the tensor, so a pass over a large
    # checkpoint never keeps more than the tensors in use mapped. mmap + frombuffer, not np.memmap, whose
    # Python-level set-up costs ~0.25 ms a tensor.
    aligned = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(info.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), info.start + size - aligned, offset=aligned, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise MintError(f"{info.file}: cannot map tensor {info.name!r}: {e}") from None
    arr = np.frombuffer(mm, dtype=np_dtype, count=info.numel, offset=info.start - aligned)
    with warnings.catch_warnings():
        # The map is read-only and nothing writes through it; torch warns about that by default.
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t.view(torch_dtype).reshape(info.shape)


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Index a checkpoint folder (single file, or sharded with model.safetensors.index.json), validating
    every header; also accepts the path of a single .safetensors file."""
    folder = Path(folder)
    if not folder.exists():
        raise MintError(f"{folder}: no such file or folder")
    if folder.is_file():
        return Checkpoint(folder.parent, scan_file(folder), _read_config(folder.parent))
    index = folder / "model.safetensors.index.json"
    tensors = _scan_index(index) if index.exists() else _scan_all(folder)
    return Checkpoint(folder, tensors, _read_config(folder))


def _scan_all(folder: Path) -> dict[str, TensorInfo]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MintError(f"{folder}: no *.safetensors files (and no model.safetensors.index.json)")
    out: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in scan_file(f).items():
            if name in out:
                raise MintError(
                    f"{folder}: tensor {name!r} appears in both {out[name].file.name} and {f.name}"
                )
            out[name] = info
    return out


def _scan_index(index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise MintError(f"{index}: not a valid safetensors index ({e})") from None
    shards: dict[str, dict[str, TensorInfo]] = {}
    out: dict[str, TensorInfo] = {}
    for name, shard in sorted(weight_map.items()):
        path = index.parent / shard
        if shard not in shards:
            if not path.exists():
                raise MintError(
                    f"{index}: names shard {shard!r} for tensor {name!r}, but {path} does not exist"
                )
            shards[shard] = scan_file(path)
        if name not in shards[shard]:
            raise MintError(f"{index}: tensor {name!r} is mapped to {shard}, which does not contain it")
        out[name] = shards[shard][name]
    return out


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise MintError(f"{path}: invalid JSON ({e})") from None


# --- tensor roles -----------------------------------------------------------------------------------------

#: Built-in role rules, tried in order after the user's (first match wins). Patterns are re.search'ed.
DEFAULT_ROLE_RULES: list[tuple[str, str]] = [
    ("norm", r"(^|[._])(norm|ln_f|ln_\d|layernorm|layer_norm|rmsnorm)([._]|$)|_norm\.|norm\.weight$"),
    ("bias", r"\.bias$"),
    (
        "vision",
        r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|image_encoder|mm_projector|vision)\.",
    ),
    ("embedding", r"(embed_tokens|word_embeddings|wte|tok_embeddings|embeddings?)\.weight$"),
    ("lm_head", r"(^|\.)(lm_head|output|embed_out)\.weight$"),
    ("moe_router", r"(\.router\.|\.gate\.weight$|block_sparse_moe\.gate\.|\.mlp\.gate\.weight$)"),
    ("moe_experts", r"\.experts\."),
    ("attn_qkv", r"(qkv_proj|query_key_value|c_attn|Wqkv)\."),
    ("attn_q", r"(q_proj|\.wq|\.query)\."),
    ("attn_k", r"(k_proj|\.wk|\.key)\."),
    ("attn_v", r"(v_proj|\.wv|\.value)\."),
    ("attn_o", r"(o_proj|out_proj|\.wo|dense|c_proj)\.(?!.*mlp)"),
    ("mlp_gate", r"(gate_proj|\.w1|gate_up_proj)\."),
    ("mlp_up", r"(up_proj|\.w3|fc1|c_fc|dense_h_to_4h)\."),
    ("mlp_down", r"(down_proj|\.w2|fc2|dense_4h_to_h)\."),
]
#: Roles that always stay 16-bit (the runtime keeps them in the activation dtype).
PASSTHROUGH_ROLES = {"norm", "bias"}
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")


def compile_rules(extra: list[tuple[str, str]] | None = None) -> list[tuple[str, re.Pattern]]:
    rules = []
    for role, pattern in [*(extra or []), *DEFAULT_ROLE_RULES]:
        try:
            rules.append((role, re.compile(pattern)))
        except re.error as e:
            raise MintError(f"role rule {role!r}: invalid regular expression {pattern!r} ({e})") from None
    return rules


def tensor_role(name: str, ndim: int, rules: list[tuple[str, re.Pattern]]) -> str:
    for role, rx in rules:
        if rx.search(name):
            if role == "moe_experts" and ndim < 3:
                return "moe_expert"  # experts stored one tensor per expert
            return role
    return "other"


def layer_index(name: str) -> int:
    """Transformer block index parsed from the name, or -1 for tensors outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def fingerprint(ckpt: Checkpoint) -> str:
    """A cheap identity of a checkpoint, from its headers and file sizes (no tensor data read): what the
    allocate stage compares against the profile's record to refuse a profile of another model."""
    import xxhash

    h = xxhash.xxh3_128()
    for name in ckpt.names:
        t = ckpt.tensors[name]
        h.update(
            f"{name}|{t.dtype}|{list(t.shape)}|{t.file.name}|{t.start}|{t.file.stat().st_size}\n".encode()
        )
    return h.hexdigest()


def content_hash(info: TensorInfo, t: torch.Tensor) -> str:
    """xxh3-128 of the tensor's name, dtype, shape and raw stored bytes."""
    import torch
    import xxhash

    h = xxhash.xxh3_128()
    h.update(f"{info.name}|{info.dtype}|{list(info.shape)}|".encode())
    if t.numel():
        # ignore: numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only; it is a buffer on 3.11 too
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
    return h.hexdigest()


def tied_lm_head(ckpt: Checkpoint) -> str | None:
    """The lm_head name that the runtime ties to the embedding (and that we therefore never store)."""
    tie = ckpt.config.get("tie_word_embeddings", False)
    return "lm_head.weight" if tie and "lm_head.weight" in ckpt.tensors else None


#: A stacked MoE expert parameter of transformers' model classes; checkpoints store it one tensor per expert
#: (`...experts.<e>.gate_proj.weight`, `up_proj`, `down_proj`), which transformers and mlx-lm stack on load.
STACKED_EXPERTS = re.compile(r"^(?P<stem>.+\.experts)\.(?P<what>gate_up_proj|down_proj)$")


def expert_parts(name: str, has: Callable[[str], bool]) -> list[list[str]] | None:
    """For a stacked expert parameter (`...experts.gate_up_proj` [E, 2I, H], `...experts.down_proj` [E, H, I])
    that the checkpoint stores per expert: per expert, the checkpoint tensors concatenated along dim 0 to make
    its slice (gate then up, as the model chunks them; down alone). None when `name` is not one."""
    m = STACKED_EXPERTS.match(name)
    if not m:
        return None
    parts = ("gate_proj", "up_proj") if m["what"] == "gate_up_proj" else ("down_proj",)
    groups: list[list[str]] = []
    while has(f"{m['stem']}.{len(groups)}.{parts[0]}.weight"):
        groups.append([f"{m['stem']}.{len(groups)}.{p}.weight" for p in parts])
    return groups or None


def stack_experts(groups: list[list[str]], read: Callable[[str], Any]) -> Any:
    """The stacked parameter from its per-expert checkpoint tensors (`expert_parts`)."""
    import torch

    return torch.stack([torch.cat([read(n) for n in group], dim=0) for group in groups])
