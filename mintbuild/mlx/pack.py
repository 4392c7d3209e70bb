"""The MLX packer: a target's allocation written as MLX affine tensors, held to the allocation's bytes.

Every quantized decision becomes `<module>.weight` (uint32 words in MLX's bit layout), `<module>.scales` and
`<module>.biases` (bf16); every other tensor is stored in bf16, the tied embedding once. The bytes of every
decision are checked against the allocation's planned bytes (`formats.Option.nbytes`), and the weight file
(header included) against the target's budget. Rounding (`pack.rounding`): round-to-nearest, bit-identical to
mx.quantize, or GPTQ (mintbuild.mlx.gptq) for the tensors the importance stage measured an input Hessian for,
except at the options where GPTQ's held-out gain is not below 1 (`mintbuild.rounding`); same format and bytes
either way. Quantized tensors are cached by (content hash, option, quantizer version, rounding) in the pack
cache. The file is byte-identical for identical inputs (sorted header names, data in source name order, fixed
metadata), written front to back, and its sha256 taken as it is written.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from mintbuild.artifacts.importance import HESSIAN_FILE, load_hessians, load_importance, load_rounding_gains
from mintbuild.artifacts.pack import MANIFEST_FILE
from mintbuild.cluster import Executor, Resources
from mintbuild.config import Params
from mintbuild.errors import MintError
from mintbuild.formats import Option, parse_option
from mintbuild.hf.checkpoint import Checkpoint, content_hash, fingerprint, open_checkpoint
from mintbuild.mlx.factor_cache import FactorCache
from mintbuild.mlx.folder import (
    WEIGHTS_FILE,
    Item,
    Plan,
    item_entries,
    layout,
    quantization_section,
)
from mintbuild.mlx.gptq import HessianRows, gptq_codes
from mintbuild.mlx.pack_cache import PackCache
from mintbuild.mlx.quant.pack_kernel import packed_shapes, quantize_pack
from mintbuild.mlx.quant.reference import pack_codes
from mintbuild.rounding import GPTQ_VERSION, overfit_options

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rounding:
    """How quantized tensors are rounded: GPTQ for those with a Hessian, except at the options where its held-out
    gain says it does worse (`overfit`: tensor -> option names), round-to-nearest for the rest."""

    method: str = "rtn"
    hessians: dict[str, HessianRows] = field(default_factory=dict)
    hessian_sha256: str = ""
    damp: float = 0.1
    block: int = 128
    overfit: dict[str, frozenset[str]] = field(default_factory=dict)
    factors: FactorCache = field(default_factory=FactorCache, compare=False)

    def hessian(self, name: str, option: Option) -> HessianRows | None:
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
    w: torch.Tensor, option: Option, hessian: HessianRows, rounding: Rounding
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
    opts: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
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
    # ignore: numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only; it is a buffer on 3.11 too
    parts = [memoryview(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))).cast("B") for a in arrays]  # type: ignore[arg-type]
    cache.put(key, item.option, parts)
    return parts


def gptq_on_cluster(
    ex: Executor, plan: Plan, ckpt: Checkpoint, rounding: Rounding, cache: PackCache, importance: Path,
    progress: bool,
) -> None:  # fmt: skip
    """The GPTQ codes of every tensor the plan rounds by GPTQ, one task per tensor, stored in the pack cache (a
    folder every node sees) by tensor_payload itself: the writer then reads them as cache hits, and writes the
    bytes it would have computed."""
    items = [
        i for i in plan.items if not i.option.passthrough and rounding.hessian(i.source, i.option) is not None
    ]
    if not items or cache.root is None:
        return
    keys = {n: t["key"] for n, t in load_importance(importance)["hessian"]["tensors"].items()}
    file, root = (importance / HESSIAN_FILE).resolve(), Path(cache.root).resolve()
    light = replace(rounding, hessians={})  # the Hessians travel as a file and a key, not in the task
    tasks = [(Path(ckpt.folder).resolve(), i, file, keys[i.source], light, root) for i in items]
    # the Hessian, its factor and a transposed copy (float32), the weight and its codes, plus the process
    memory = max(12 * i.shape[-1] ** 2 + 8 * math.prod(i.shape) for i in items) + (1 << 30)
    ex.map(_gptq_to_cache, tasks, Resources(memory=memory), f"pack {plan.target}", progress)


def _gptq_to_cache(task: tuple) -> None:
    """One cluster task: one tensor's GPTQ codes into the pack cache (nothing when the entry is there)."""
    from safetensors import safe_open

    folder, item, file, key, light, root = task
    with safe_open(str(file), framework="pt") as f:
        hessian = f.get_tensor(key)
    rounding = replace(light, hessians={item.source: hessian})
    tensor_payload(open_checkpoint(folder), item, PackCache(root), {}, rounding)


def _bf16_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.bfloat16).contiguous().reshape(-1).view(torch.int16).numpy().astype("<i2").tobytes()


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
    from mintbuild.progress import progress as reporter

    written: Counter[str] = Counter()
    sha = hashlib.sha256(plan.header)
    # a bar on a terminal, else a log line every 10 s (DVC): GPTQ makes a large model's pack minutes long
    bar = reporter(plan.parameters, f"pack {plan.target}", "param", progress, unit_scale=True)
    with open(path, "wb") as f:
        f.write(plan.header)
        pos = 0
        for i, item in enumerate(plan.items):
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
            bar.set_postfix_str(f"{i + 1}/{len(plan.items)} tensors")
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
