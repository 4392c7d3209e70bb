"""`mintbuild pack`: write each target's allocation as an MLX model folder that mlx-lm loads as it is.

Per target, artifacts/pack/<target>/ holds:
  - model.safetensors: every quantized decision as MLX affine tensors (`<module>.weight` uint32 words in MLX's
    bit layout, `<module>.scales` and `<module>.biases` in bf16), every other tensor in bf16. Tensor names are
    the checkpoint's (mlx-lm's `sanitize` maps them, e.g. drops a tied lm_head); the tied embedding is stored
    once, as `model.embed_tokens.*`, and mlx-lm uses it as the output layer (`embed_tokens.as_linear`).
  - config.json: the model's, plus `quantization` = {group_size, bits, mode: affine} for the most common
    option and one entry per module path whose choice differs ({group_size, bits}, or `false` for a module
    kept 16-bit: mlx-lm's class_predicate returns config["quantization"][path] as is), mirrored in
    `quantization_config` as mlx-lm's own convert does.
  - the tokenizer files, and mintbuild-pack.json: sizes and sha256 of every file, which `evaluate` checks.

The bytes of every decision are checked against the allocation's planned bytes (`formats.Option.nbytes`), and
the weight file (header included) against the target's budget, before the folder is renamed into place.
Rounding (`pack.rounding`): round-to-nearest, bit-identical to mx.quantize, or GPTQ (gptq.py) for the tensors
the importance stage measured an input Hessian for (every linear layer), except at the options where GPTQ's
held-out gain is not below 1 (`gptq_helps`: rounded to nearest there); same format and bytes either way.
Quantized tensors are cached by (content hash, option, quantizer version, rounding), so targets that share
choices cost little more than one. The output is byte-identical for identical inputs (sorted header names,
data in source name order, fixed metadata; GPTQ's float32 matrix products on one machine and thread count);
the file is written front to back and its sha256 taken as it is written.

A GGUF target's allocation (format gguf) is packed by gguf_pack instead: llama-quantize writes
artifacts/pack/<target>/model.gguf from the convert stage's bf16 GGUF with every tensor's planned type (and the
profile's imatrix), the output is read back and held to the plan's types and bytes, and the folder gets the same
config.json, tokenizer files and mintbuild-pack.json (with "format": "gguf").

One job: each target's packed folder, held to its allocation.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from mintbuild.artifacts.allocation import ALLOCATION_FILE, load_allocation
from mintbuild.artifacts.importance import load_hessians, load_rounding_gains
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.config import Params, load_params, select_targets
from mintbuild.errors import MintError
from mintbuild.formats import Option, parse_option
from mintbuild.hf.checkpoint import Checkpoint, content_hash, fingerprint, open_checkpoint
from mintbuild.io import atomic_dir, atomic_write_json, canonical_json
from mintbuild.mlx.factor_cache import FACTOR_FOLDER, FactorCache
from mintbuild.mlx.folder import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Item,
    Plan,
    check_tokenizer,
    item_entries,
    layout,
    manifest,
    packed_config,
    quantization_section,
    tokenizer_files,
)
from mintbuild.mlx.gptq import gptq_codes
from mintbuild.mlx.pack_cache import PackCache, default_cache_dir
from mintbuild.mlx.quant.pack_kernel import packed_shapes, quantize_pack
from mintbuild.mlx.quant.reference import pack_codes
from mintbuild.mlx.rounding import GPTQ_VERSION, overfit_options

HELP = "write each target's MLX model folder"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rounding:
    """How quantized tensors are rounded: GPTQ for those with a Hessian, except at the options where its held-out
    gain says it does worse (`overfit`: tensor -> option names), round-to-nearest for the rest."""

    method: str = "rtn"
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_sha256: str = ""
    damp: float = 0.1
    block: int = 128
    overfit: dict[str, frozenset[str]] = field(default_factory=dict)
    factors: FactorCache = field(default_factory=FactorCache, compare=False)

    def hessian(self, name: str, option: Option) -> torch.Tensor | None:
        """The Hessian to round `name` at `option` against by GPTQ, or None: round to nearest."""
        if option.name in self.overfit.get(name, ()):
            return None
        return self.hessians.get(name)

    def cache_key(self, name: str, option: Option) -> str:
        """What, besides the tensor's content and option, its stored bytes depend on."""
        if self.hessian(name, option) is None:
            return ""
        return f"|{GPTQ_VERSION}|{self.hessian_sha256}|{self.damp}|{self.block}"

    def record(self) -> dict[str, Any]:
        if self.method == "rtn":
            return {"method": "rtn"}
        return {
            "method": self.method,
            "version": GPTQ_VERSION,
            "gptq_tensors": sorted(self.hessians),
            "hessian_sha256": self.hessian_sha256,
            "damp": self.damp,
            "block": self.block,
            "rtn_where_gptq_overfits": {t: sorted(o) for t, o in sorted(self.overfit.items())},
        }


def load_rounding(params: Params, ckpt: Checkpoint) -> Rounding:
    """The rounding `params.pack` asks for, with the importance stage's Hessians of this very model."""
    cfg = params.pack
    if cfg.rounding == "rtn":
        return Rounding()
    if cfg.rounding != "gptq":
        raise MintError(f"pack.rounding {cfg.rounding!r}: choose gptq or rtn")
    if not (cfg.damp > 0 and cfg.block > 0):
        raise MintError(f"pack.damp {cfg.damp} and pack.block {cfg.block} must be positive")
    folder = Path(params.importance.out)
    hs = load_hessians(folder, fingerprint(ckpt))
    gains = load_rounding_gains(folder, cfg.damp, cfg.block)
    overfit = {t: o for t, o in overfit_options(gains).items() if t in hs.full}
    return Rounding("gptq", hs.full, hs.sha256, cfg.damp, cfg.block, overfit)


def gptq_pack(
    w: torch.Tensor, option: Option, hessian: torch.Tensor, rounding: Rounding
) -> tuple[np.ndarray, ...]:
    """`quantize_pack`'s arrays, rounded by GPTQ against `hessian`."""
    wshape, sshape = packed_shapes(option, tuple(w.shape))
    if not torch.isfinite(w).all():
        raise MintError(f"{int((~torch.isfinite(w)).sum())} NaN or Inf value(s)")
    fac = rounding.factors.get(hessian, rounding.damp)  # one factor per distinct Hessian, for every target
    q, scales, biases = gptq_codes(w, hessian, option, rounding.damp, rounding.block, fac)
    as_u16 = [
        t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(sshape) for t in (scales, biases)
    ]
    return pack_codes(q, option.bits).reshape(wshape), *as_u16


# ---------------------------------------------------------------- the plan


def make_plan(alloc: dict[str, Any], ckpt: Checkpoint) -> Plan:
    """Every stored tensor with its option, checked against the checkpoint and the allocation's byte counts."""
    items: list[Item] = []
    tied = {t for d in alloc["decisions"] for t in d.get("tied_to", [])}
    for d in alloc["decisions"]:
        option = parse_option(d["option"])
        planned = 0
        for member in d["members"]:
            if member not in ckpt.tensors:
                raise MintError(
                    f"allocation {alloc['target']!r} names tensor {member!r}, which the model does not have"
                )
            shape = tuple(ckpt.tensors[member].shape)
            items.append(Item(member, option, shape, d["name"], item_entries(member, option, shape)))
            planned += option.nbytes(shape)
        if planned != d["bytes"]:
            raise MintError(
                f"decision {d['name']!r}: {option.name} of its tensors takes {planned:,} B but the allocation "
                f"planned {d['bytes']:,} B (allocation from another format table?)"
            )
    covered = {it.source for it in items} | tied
    missing = sorted(set(ckpt.tensors) - covered)
    if missing:
        raise MintError(
            f"allocation {alloc['target']!r} does not cover {len(missing)} tensor(s) of the model, "
            f"e.g. {missing[0]!r}: it was made from another model"
        )
    items.sort(key=lambda it: it.source)
    totals = alloc["totals"]
    budget = int(totals.get("effective_budget", totals["budget"]))  # min_safe: the floor the allocation chose
    plan = Plan(alloc["target"], budget, int(totals["header_allowance"]), items, None)
    plan.quantization = quantization_section(items)
    layout(plan)
    return plan


def check_budget(plan: Plan) -> None:
    if plan.file_bytes > plan.budget:
        raise MintError(
            f"target {plan.target!r}: {WEIGHTS_FILE} would take {plan.file_bytes:,} B (header "
            f"{len(plan.header):,} B) but the budget is {plan.budget:,} B"
        )
    if len(plan.header) > plan.header_allowance:
        raise MintError(
            f"target {plan.target!r}: the safetensors header takes {len(plan.header):,} B, more than the "
            f"{plan.header_allowance:,} B the allocation allowed for it"
        )


def render_plan(plan: Plan, out: Path) -> str:
    opts = Counter()
    nbytes = Counter()
    for it in plan.items:
        opts[it.option.name] += 1
        nbytes[it.option.name] += sum(e.nbytes for e in it.entries)
    lines = [
        f"target {plan.target}: {out}",
        f"  {WEIGHTS_FILE}: {sum(len(it.entries) for it in plan.items)} stored tensors from {len(plan.items)} "
        f"checkpoint tensors, {plan.parameters:,} parameters",
        f"  bytes: {plan.file_bytes:,} (data {plan.data_bytes:,} + header {len(plan.header):,}) vs budget "
        f"{plan.budget:,}: slack {plan.budget - plan.file_bytes:,} B, "
        f"{8 * plan.data_bytes / max(plan.parameters, 1):.3f} bits/weight",
    ]
    for name in sorted(opts, key=lambda n: -nbytes[n]):
        lines.append(f"    {name:>8}: {opts[name]:4d} tensors {nbytes[name]:>14,} B")
    q = plan.quantization
    default = f"q{q['bits']}g{q['group_size']}" if q else "none"
    lines.append(
        f"  config.json quantization: default {default}, {len(q or {}) - 3 if q else 0} per-path entries"
    )
    lines.append(f"  files: config.json, {WEIGHTS_FILE}, tokenizer files, {MANIFEST_FILE}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the cache


def tensor_payload(
    ckpt: Checkpoint, item: Item, cache: PackCache, hashes: dict[str, str], rounding: Rounding
) -> list[memoryview]:
    """The bytes of each of the item's entries, in entry order; records the tensor's content hash."""
    info = ckpt.tensors[item.source]
    t = ckpt.read(item.source)
    # The profile's hash (name, dtype, shape, raw bytes): checks the allocation's provenance and keys the cache.
    hashes[item.source] = digest = content_hash(info, t)
    if item.option.passthrough:
        return [memoryview(_bf16_bytes(t))]
    sizes = [e.nbytes for e in item.entries]
    key = digest + rounding.cache_key(item.source, item.option)
    payload = cache.get(key, item.option)
    if payload is not None and len(payload) == sum(sizes):
        cache.hits += 1
        # Zero-copy views of the cached entry, one per stored tensor.
        bounds = itertools.accumulate(sizes, initial=0)
        return [payload[a:b] for a, b in itertools.pairwise(bounds)]
    cache.misses += 1
    try:
        hessian = rounding.hessian(item.source, item.option)
        arrays = (
            quantize_pack(t, item.option) if hessian is None else gptq_pack(t, item.option, hessian, rounding)
        )
    except MintError as e:
        raise MintError(f"{info.file}: tensor {item.source!r}: {e}") from None
    parts = [memoryview(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))).cast("B") for a in arrays]
    cache.put(key, item.option, parts)
    return parts


def _bf16_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.bfloat16).contiguous().reshape(-1).view(torch.int16).numpy().astype("<i2").tobytes()


# ---------------------------------------------------------------- writing


def write_weights(
    plan: Plan,
    ckpt: Checkpoint,
    path: Path,
    cache: PackCache,
    progress: bool,
    hashes: dict[str, str],
    rounding: Rounding,
) -> tuple[dict[str, int], str]:
    """Write the safetensors file front to back; return the bytes written per decision (checked against the
    plan) and the file's sha256, computed as it is written (a second pass over the file cost ~10% of a pack)."""
    from tqdm import tqdm

    written: Counter[str] = Counter()
    sha = hashlib.sha256(plan.header)
    bar = tqdm(total=plan.parameters, unit="param", unit_scale=True, disable=not progress, desc=plan.target)
    with open(path, "wb") as f:
        f.write(plan.header)
        pos = 0
        for item in plan.items:
            for entry, data in zip(
                item.entries, tensor_payload(ckpt, item, cache, hashes, rounding), strict=True
            ):
                start, end = plan.offsets[entry.name]
                if start != pos or len(data) != end - start:
                    raise MintError(
                        f"tensor {entry.name!r}: {len(data):,} B at offset {pos:,}, but the layout planned "
                        f"{end - start:,} B at {start:,}"
                    )
                f.write(data)
                sha.update(data)
                pos = end
                written[item.decision] += len(data)
            bar.update(math.prod(item.shape))
    bar.close()
    return dict(written), sha.hexdigest()


def check_written(alloc: dict[str, Any], written: dict[str, int], path: Path, plan: Plan) -> None:
    for d in alloc["decisions"]:
        got = written.get(d["name"], 0)
        if got != d["bytes"]:
            raise MintError(
                f"decision {d['name']!r} ({d['option']}): wrote {got:,} B but the allocation planned "
                f"{d['bytes']:,} B"
            )
    size = path.stat().st_size
    if size != plan.file_bytes or size > plan.budget:
        raise MintError(
            f"{path.name}: {size:,} B on disk (planned {plan.file_bytes:,}, budget {plan.budget:,})"
        )


def check_provenance(alloc: dict[str, Any], ckpt: Checkpoint, path: Path) -> None:
    want = alloc.get("provenance", {}).get("model_fingerprint")
    got = fingerprint(ckpt)
    if want != got:
        raise MintError(
            f"{path}: made from another model (fingerprint {want} != {got} of {ckpt.folder}); "
            "re-run `mintbuild profile` and `mintbuild allocate`"
        )


def check_checkpoint_hash(alloc: dict[str, Any], hashes: dict[str, str]) -> None:
    """The allocation's checkpoint_hash is the profile's content hash of every tensor (recomputed during the
    write pass), so a model with the same headers but other weights is refused too, before anything is renamed
    into place."""
    want = alloc.get("provenance", {}).get("checkpoint_hash")
    got = xxhash.xxh3_128("\n".join(hashes[n] for n in sorted(hashes)).encode()).hexdigest()
    if want and got != want:
        raise MintError(
            f"allocation {alloc['target']!r} was made from a checkpoint with other weights "
            f"(content hash {want} != {got}); re-run `mintbuild profile` and `mintbuild allocate`"
        )


# ---------------------------------------------------------------- the stage


@dataclass
class PackResult:
    target: str
    out: Path
    plan: Plan
    seconds: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    manifest: dict[str, Any] = field(default_factory=dict)


def pack_target(
    params: Params,
    target: str,
    out_root: Path | None = None,
    dry_run: bool = False,
    progress: bool = True,
    cache_dir: Path | None = None,
    alloc_root: Path | None = None,
    model_out: Path | None = None,
) -> PackResult:
    out_root = Path(out_root or params.pack_out)
    model_dir = Path(model_out or params.equalize.out)
    alloc_path = Path(alloc_root or params.allocate_out) / target / ALLOCATION_FILE
    alloc = load_allocation(Path(alloc_root or params.allocate_out), target)
    if alloc.get("format") == "gguf":  # llama-quantize writes the file (gguf_pack); same folder contract
        from mintbuild.llamacpp.pack import pack_gguf

        g = pack_gguf(
            alloc,
            alloc_path,
            Path(params.convert.out),
            Path(params.profile.gguf_out),
            resolve_weights_dir(model_dir),
            out_root / target,
            dry_run=dry_run,
        )
        return PackResult(target, g.out, g.plan, g.seconds, manifest=g.manifest)  # type: ignore[arg-type]
    ckpt = open_checkpoint(resolve_weights_dir(model_dir))
    check_provenance(alloc, ckpt, alloc_path)
    model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    files = tokenizer_files(model_dir)
    check_tokenizer(model_dir, model_config)
    plan = make_plan(alloc, ckpt)
    check_budget(plan)
    rounding = load_rounding(params, ckpt)
    out = out_root / target
    result = PackResult(target, out, plan)
    if dry_run:
        return result
    cache = PackCache(cache_dir if cache_dir is not None else default_cache_dir(out_root))
    if cache.root is not None:  # GPTQ's factors beside the tensors, for every target
        rounding.factors.root = cache.root / FACTOR_FOLDER
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:
        hashes: dict[str, str] = {}
        written, weights_sha = write_weights(
            plan, ckpt, tmp / WEIGHTS_FILE, cache, progress, hashes, rounding
        )
        check_checkpoint_hash(alloc, hashes)
        check_written(alloc, written, tmp / WEIGHTS_FILE, plan)
        (tmp / "config.json").write_text(canonical_json(packed_config(model_config, plan)), encoding="utf-8")
        for src in files:
            shutil.copyfile(src, tmp / src.name)
        result.manifest = manifest(
            tmp, alloc, alloc_path, plan, {WEIGHTS_FILE: weights_sha}, rounding.record()
        )
        atomic_write_json(tmp / MANIFEST_FILE, result.manifest)
    result.seconds = time.perf_counter() - t0
    result.cache_hits, result.cache_misses = cache.hits, cache.misses
    log.info(
        "%s: %s %s B of budget %s B (%.3f bits/weight), %.2f s, %.3g params/s, cache %d hits / %d misses",
        target,
        out,
        f"{plan.file_bytes:,}",
        f"{plan.budget:,}",
        8 * plan.data_bytes / max(plan.parameters, 1),
        result.seconds,
        plan.parameters / max(result.seconds, 1e-9),
        cache.hits,
        cache.misses,
    )
    return result


def run(
    params: Params,
    targets: list[str] | None = None,
    dry_run: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> list[PackResult]:
    names = select_targets(params, targets)
    return [pack_target(params, n, dry_run=dry_run, progress=progress, **kwargs) for n in names]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--target", action="append", help="target name (repeatable); default: every target")
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan (files, tensors, bytes vs budget) only"
    )
    p.add_argument("--out", help="output root (default: pack_out from params); one folder per target")
    p.add_argument("--cache", help="quantized-tensor cache (default: $MINTBUILD_CACHE/pack or <out>/.cache)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    results = run(
        params,
        args.target,
        dry_run=args.dry_run,
        progress=not args.no_progress,
        out_root=Path(args.out) if args.out else None,
        cache_dir=Path(args.cache) if args.cache else None,
    )
    if args.dry_run:
        sys.stdout.write("\n".join(_render(r) for r in results) + "\n")


def _render(r: PackResult) -> str:
    from mintbuild.llamacpp.pack import GGUFPlan
    from mintbuild.llamacpp.pack import render_plan as render_gguf_plan

    return render_gguf_plan(r.plan, r.out) if isinstance(r.plan, GGUFPlan) else render_plan(r.plan, r.out)
