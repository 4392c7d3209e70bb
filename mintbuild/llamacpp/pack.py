"""A GGUF target's file, made by llama.cpp's own llama-quantize from the bf16 GGUF of `mintbuild convert`.

One job: turn an allocation into the GGUF llama.cpp runs, and prove it is the one planned. The allocation becomes
llama-quantize's `--tensor-type-file` (one `^<name>$=<type>` line per quantizable tensor: the name is a regex
that llama-quantize searches, anchored and escaped so it matches that tensor only), with `--imatrix` when the
profile measured with one; llama-quantize does all rounding. Then the output is read back (GGUFReader, memory
mapped): every tensor must have exactly the planned type (llama-quantize falls back to another type on its own
for shapes it cannot store: refused with the tensor named), and the file's size must equal the plan's bytes,
which fit the budget.

The fixed part of the file (gguf_layout.quantized_header_bytes) is known at profile time, so the file's size is
the allocation's header_bytes + the sum of every tensor's bytes padded to the alignment (formats.gguf_padded).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.formats import GGUF_OPTIONS
from mintbuild.io import atomic_dir, atomic_write_json, sha256_file
from mintbuild.llamacpp.imatrix import IMATRIX_GGUF
from mintbuild.llamacpp.placement import write_placement

log = logging.getLogger(__name__)

#: What mintbuild calls llama-quantize with: the base type of tensors no line names (every quantizable tensor
#: is named, so it only sets general.file_type), and the type-file name.
BASE_TYPE = "Q8_0"
TYPE_FILE = "tensor-types.txt"
OUT_FILE = "model.gguf"
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
    from mintbuild.llamacpp.build import run_tool
    from mintbuild.progress import progress as reporter

    (work / TYPE_FILE).write_text(type_file_text(plan), encoding="utf-8")
    args: list[str] = ["--tensor-type-file", TYPE_FILE]
    if plan.imatrix:
        if imatrix is None or not imatrix.is_file():
            raise MintError(f"target {plan.target!r}: planned with an imatrix, but {imatrix} is missing")
        shutil.copyfile(imatrix, work / IMATRIX_GGUF)
        args += ["--imatrix", IMATRIX_GGUF]
    args += [str(Path(source).resolve()), str(Path(out_file).resolve()), BASE_TYPE]
    t0 = time.perf_counter()
    with reporter(len(plan.types), f"pack {plan.target}: llama-quantize", "tensor") as bar:

        def on_line(line: str) -> None:
            if _QUANTIZE_LINE.match(line):  # one line per tensor written
                bar.update(1)

        run_tool("llama-quantize", args, cwd=work, on_stderr_line=on_line)
    return time.perf_counter() - t0


#: llama-quantize's line for each tensor it writes: `[  12/ 339]  blk.0.attn_q.weight - [...], type = ...`.
_QUANTIZE_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]")


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


# ---------------------------------------------------------------- the pack folder


@dataclass
class GGUFPackResult:
    target: str
    out: Path
    plan: GGUFPlan
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict)


def check_sources(alloc: dict[str, Any], convert_dir: Path, profile_dir: Path) -> tuple[Path, Path | None]:
    """(the bf16 GGUF, the imatrix file or None) the allocation was planned on, checked by hash before any work:
    the GGUF's sha256 (convert.json) is the profile's checkpoint hash, the profile is the allocation's, and the
    imatrix file is the one the profile measured with."""
    from mintbuild.artifacts.convert import GGUF_FILE, load_convert
    from mintbuild.artifacts.profile import load_profile

    doc = load_convert(convert_dir)
    prov = alloc.get("provenance", {})
    if prov.get("checkpoint_hash") != doc["gguf"]["sha256"]:
        raise MintError(
            f"allocation {alloc['target']!r} was planned on another GGUF than {Path(convert_dir) / GGUF_FILE} "
            "(sha256 differs); re-run `mintbuild profile --format gguf` and `mintbuild allocate`"
        )
    profile = load_profile(profile_dir)
    if profile.hash != prov.get("profile_hash"):
        raise MintError(
            f"allocation {alloc['target']!r} was planned on another profile than {profile_dir}; re-run "
            "`mintbuild allocate`"
        )
    imatrix = None
    if alloc.get("imatrix"):
        imatrix = Path(profile_dir) / IMATRIX_GGUF
        want = profile.provenance.get("imatrix_sha256")
        if not imatrix.is_file() or sha256_file(imatrix) != want:
            raise MintError(f"{imatrix}: missing or not the imatrix the profile measured with")
    return Path(convert_dir) / GGUF_FILE, imatrix


def pack_gguf(
    alloc: dict[str, Any],
    alloc_path: Path,
    convert_dir: Path,
    profile_dir: Path,
    model_dir: Path,
    out: Path,
    dry_run: bool = False,
) -> GGUFPackResult:
    """Write `out`/ (model.gguf by llama-quantize, tensor-types.txt, config.json and the tokenizer files of
    `model_dir`, mintbuild-pack.json) for a gguf allocation, or only plan it (`dry_run`). Atomic: on any error
    (a failed llama-quantize, a type it changed, a byte count off the plan) nothing is left behind."""
    from mintbuild.artifacts.pack import MANIFEST_FILE, build_manifest, check_tokenizer, tokenizer_files
    from mintbuild.llamacpp.build import build_name

    plan = make_plan(alloc)
    check_budget(plan)
    source, imatrix = check_sources(alloc, convert_dir, profile_dir)
    config_path = Path(model_dir) / "config.json"
    model_config = json.loads(config_path.read_text(encoding="utf-8"))
    files = tokenizer_files(Path(model_dir))
    check_tokenizer(Path(model_dir), model_config)
    result = GGUFPackResult(plan.target, Path(out), plan)
    if dry_run:
        return result
    log.info("plan:\n%s", render_plan(plan, Path(out)))
    with atomic_dir(out) as tmp:
        seconds = quantize(plan, source, imatrix, tmp / OUT_FILE, tmp)
        (tmp / IMATRIX_GGUF).unlink(
            missing_ok=True
        )  # given to llama-quantize; the profile keeps the original
        facts = verify(plan, tmp / OUT_FILE)
        shutil.copyfile(config_path, tmp / "config.json")
        for src in files:
            if src.name != "config.json":
                shutil.copyfile(src, tmp / src.name)
        write_placement(alloc, tmp, OUT_FILE, list(plan.types))  # a split target: -ot rules, launch scripts
        result.manifest = build_manifest(
            tmp, alloc, alloc_path, target=plan.target, budget=plan.budget, weights_bytes=facts["file_bytes"],
            header_bytes=facts["header_bytes"], parameters=plan.parameters, data_bytes=plan.data_bytes,
            quantizer=f"llama-quantize (llama.cpp {build_name()})",
            rounding={"method": "llama-quantize", "imatrix": plan.imatrix, "base_type": BASE_TYPE},
            known={OUT_FILE: facts["sha256"]},
            extra={"format": "gguf", "weights_file": OUT_FILE,
                   "tensor_types": dict(sorted(Counter(plan.types.values()).items()))},
        )  # fmt: skip
        atomic_write_json(tmp / MANIFEST_FILE, result.manifest)
    result.seconds = seconds
    log.info(
        "%s: %s %s B of budget %s B (%.3f bits/weight), llama-quantize %.2f s",
        plan.target,
        Path(out) / OUT_FILE,
        f"{plan.file_bytes:,}",
        f"{plan.budget:,}",
        8 * plan.data_bytes / max(plan.parameters, 1),
        seconds,
    )
    return result
