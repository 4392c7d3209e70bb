"""A GGUF target's file, made by llama.cpp's own llama-quantize from the bf16 GGUF of `mintbuild convert`.

One job: turn an allocation into the GGUF llama.cpp runs, and prove it is the one planned. The allocation becomes
llama-quantize's `--tensor-type-file` (one `^<name>$=<type>` line per quantizable tensor: the name is a regex
that llama-quantize searches, anchored and escaped so it matches that tensor only), with `--imatrix` when the
profile measured with one; llama-quantize does all rounding. Then the output is read back (GGUFReader, memory
mapped): every tensor must have exactly the planned type (llama-quantize falls back to another type on its own
for shapes it cannot store: refused with the tensor named), and the file's size must equal the plan's bytes,
which fit the budget.

The fixed part of the file is predictable before any tensor is chosen: llama-quantize copies the bf16 GGUF's
header and metadata, sets `general.quantization_version` and `general.file_type` (already present), and, with an
imatrix, adds four `quantize.imatrix.*` keys; a tensor's type is a fixed-size field of its info. So
`header_bytes` (the data offset, padded to the alignment) is known at profile time, and the file's size is
header_bytes + the sum of every tensor's bytes padded to the alignment (formats.gguf_padded).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MintError
from .formats import GGUF_ALIGNMENT, GGUF_OPTIONS, gguf_padded
from .imatrix import IMATRIX_GGUF, ImatrixFile
from .io import sha256_file

log = logging.getLogger(__name__)

#: What mintbuild calls llama-quantize with: the base type of tensors no line names (every quantizable tensor
#: is named, so it only sets general.file_type), and the type-file name.
BASE_TYPE = "Q8_0"
TYPE_FILE = "tensor-types.txt"
OUT_FILE = "model.gguf"
#: llama.cpp's `quantize.imatrix.*` keys (tools/quantize/quantize.cpp) and their GGUF value types.
_IMATRIX_KEYS_STR = ("quantize.imatrix.file", "quantize.imatrix.dataset")
_IMATRIX_KEYS_U32 = ("quantize.imatrix.entries_count", "quantize.imatrix.chunks_count")
#: GGUF metadata value types: uint32 = 4, string = 8.
_GGUF_U32, _GGUF_STRING = 4, 8
#: llama.cpp truncates the override strings to this many bytes (llama_model_kv_override.val_str[128]).
_KV_STR_MAX = 127


def meta_bytes(reader: Any) -> int:
    """Bytes of a GGUF's header, metadata and tensor infos (the data offset before alignment padding)."""
    end = 0
    for f in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        end = max(end, int(f.offset) + sum(int(p.nbytes) for p in f.parts))
    return end


def _kv_bytes(key: str, value_bytes: int) -> int:
    return 8 + len(key.encode()) + 4 + value_bytes


def quantized_header_bytes(reader: Any, imatrix: ImatrixFile | None) -> int:
    """The data offset of llama-quantize's output of the GGUF `reader` (with `imatrix` given as IMATRIX_GGUF):
    the source's metadata, plus the keys llama-quantize adds that the source lacks, padded to the alignment."""
    added = 0
    for key in ("general.quantization_version", "general.file_type"):
        f = reader.fields.get(key)
        if f is None:
            added += _kv_bytes(key, 4)
        elif [int(t) for t in f.types] != [_GGUF_U32]:
            raise MintError(
                f"{key} of the source GGUF is not a uint32: cannot predict llama-quantize's header"
            )
    if imatrix is not None:
        strings = {
            "quantize.imatrix.file": IMATRIX_GGUF,
            "quantize.imatrix.dataset": imatrix.datasets[0] if imatrix.datasets else None,
        }
        for key, value in strings.items():
            if value is not None:
                added += _kv_bytes(key, 8 + len(value.encode()[:_KV_STR_MAX]))
        added += _kv_bytes("quantize.imatrix.entries_count", 4)
        if imatrix.chunk_count > 0:
            added += _kv_bytes("quantize.imatrix.chunks_count", 4)
    for key in (*_IMATRIX_KEYS_STR, *_IMATRIX_KEYS_U32):
        if key in reader.fields:
            raise MintError(f"the source GGUF already has {key}: it was quantized before; convert it again")
    return gguf_padded(meta_bytes(reader) + added, _alignment(reader))


def _alignment(reader: Any) -> int:
    f = reader.fields.get("general.alignment")
    return int(f.contents()) if f is not None else GGUF_ALIGNMENT


# ---------------------------------------------------------------- the plan


@dataclass
class GGUFPlan:
    """What the file will hold: per GGUF tensor its type and padded bytes; the header; the budget."""

    target: str
    budget: int
    header_bytes: int
    types: dict[str, str]  # GGUF tensor name -> ggml type name, every tensor of the file
    tensor_bytes: dict[str, int]  # padded bytes per tensor
    quantized: list[str]  # the tensors llama-quantize is told a type for
    parameters: int
    imatrix: bool
    notes: list[str] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(self.tensor_bytes.values())

    @property
    def file_bytes(self) -> int:
        return self.header_bytes + self.data_bytes


def make_plan(alloc: dict[str, Any]) -> GGUFPlan:
    """The GGUF plan of a gguf allocation: every decision's tensor, type and bytes (from the profile)."""
    if alloc.get("format") != "gguf":
        raise MintError(f"target {alloc.get('target')!r}: the allocation is not of a GGUF profile")
    totals = alloc["totals"]
    types, nbytes, quantized, params = {}, {}, [], 0
    for d in alloc["decisions"]:
        if len(d["members"]) != 1:
            raise MintError(f"{d['name']}: a GGUF decision holds one tensor, not {d['members']}")
        name = d["members"][0]
        if d["option"] not in GGUF_OPTIONS:
            raise MintError(f"{name}: option {d['option']!r} is not a ggml type")
        source = d.get("gguf_type", "BF16")
        # A tensor kept at the passthrough option stays as the converter wrote it (BF16, or F32 for 1-D).
        types[name] = source if GGUF_OPTIONS[d["option"]].passthrough else d["option"]
        nbytes[name] = int(d["bytes"])
        params += int(d["elements"])
        if d["quantizable"]:
            quantized.append(name)
    budget = int(totals.get("effective_budget", totals["budget"]))
    header = int(totals["header_allowance"])
    return GGUFPlan(
        alloc["target"], budget, header, types, nbytes, sorted(quantized), params, bool(alloc.get("imatrix"))
    )


def check_budget(plan: GGUFPlan) -> None:
    if plan.file_bytes > plan.budget:
        raise MintError(
            f"target {plan.target!r}: {OUT_FILE} would take {plan.file_bytes:,} B (header {plan.header_bytes:,} B) "
            f"but the budget is {plan.budget:,} B"
        )


def type_file_text(plan: GGUFPlan) -> str:
    """llama-quantize's --tensor-type-file: `^<escaped name>$=<type>` per quantizable tensor (sorted)."""
    lines = []
    for name in plan.quantized:
        if re.search(r"\s", name) or "=" in name:
            raise MintError(f"tensor name {name!r} cannot be written to a llama-quantize type file")
        lines.append(f"^{re.escape(name)}$={plan.types[name].lower()}")
    return "\n".join(lines) + "\n"


def render_plan(plan: GGUFPlan, out: Path) -> str:
    count: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for name, t in plan.types.items():
        count[t] += 1
        nbytes[t] += plan.tensor_bytes[name]
    lines = [
        f"target {plan.target} (gguf): {out}",
        f"  {OUT_FILE}: {len(plan.types)} tensors ({len(plan.quantized)} typed by llama-quantize), "
        f"{plan.parameters:,} parameters, imatrix: {'yes' if plan.imatrix else 'no'}",
        f"  bytes: {plan.file_bytes:,} (data {plan.data_bytes:,} + header {plan.header_bytes:,}) vs budget "
        f"{plan.budget:,}: slack {plan.budget - plan.file_bytes:,} B, "
        f"{8 * plan.data_bytes / max(plan.parameters, 1):.3f} bits/weight",
    ]
    for t in sorted(count, key=lambda k: -nbytes[k]):
        lines.append(f"    {t:>8}: {count[t]:4d} tensors {nbytes[t]:>14,} B")
    lines.append(f"  files: {OUT_FILE}, config.json, tokenizer files, mintbuild-pack.json")
    return "\n".join(lines)


# ---------------------------------------------------------------- running llama-quantize and checking its output


def quantize(plan: GGUFPlan, source: Path, imatrix: Path | None, out_file: Path, work: Path) -> float:
    """Run llama-quantize on `source` into `out_file` as planned (type file and imatrix copied into `work`, which
    is its working folder, so the output records the relative name IMATRIX_GGUF); returns its seconds."""
    from .llamacpp import run_tool

    (work / TYPE_FILE).write_text(type_file_text(plan), encoding="utf-8")
    args: list[str] = ["--tensor-type-file", TYPE_FILE]
    if plan.imatrix:
        if imatrix is None or not imatrix.is_file():
            raise MintError(f"target {plan.target!r}: planned with an imatrix, but {imatrix} is missing")
        shutil.copyfile(imatrix, work / IMATRIX_GGUF)
        args += ["--imatrix", IMATRIX_GGUF]
    args += [str(Path(source).resolve()), str(Path(out_file).resolve()), BASE_TYPE]
    t0 = time.perf_counter()
    run_tool("llama-quantize", args, cwd=work)
    return time.perf_counter() - t0


def verify(plan: GGUFPlan, path: Path) -> dict[str, Any]:
    """Read the written GGUF back: every tensor of the plan with exactly its planned type and no other tensor,
    and the file's size equal to the plan's bytes. Returns facts for the manifest."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    got = {t.name: t.tensor_type.name for t in reader.tensors}
    missing = sorted(set(plan.types) - set(got))
    extra = sorted(set(got) - set(plan.types))
    if missing or extra:
        raise MintError(
            f"{path}: tensors differ from the plan (missing {missing[:3]}, unplanned {extra[:3]})"
        )
    wrong = [(n, plan.types[n], got[n]) for n in sorted(got) if got[n] != plan.types[n]]
    if wrong:
        n, want, have = wrong[0]
        raise MintError(
            f"{path}: llama-quantize stored {n} as {have}, not the planned {want} "
            f"({len(wrong)} tensor(s) differ); refusing the file"
        )
    size = path.stat().st_size
    if reader.data_offset != plan.header_bytes:
        raise MintError(
            f"{path}: header takes {reader.data_offset:,} B, the profile predicted {plan.header_bytes:,} B"
        )
    if size != plan.file_bytes:
        raise MintError(f"{path}: {size:,} B, but the plan is {plan.file_bytes:,} B")
    check_budget(plan)
    return {"file_bytes": size, "header_bytes": int(reader.data_offset), "sha256": sha256_file(path)}
