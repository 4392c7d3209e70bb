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
the importance stage measured an input Hessian for (the output head); same format and bytes either way.
Quantized tensors are cached by (content hash, option, quantizer version, rounding), so targets that share
choices cost little more than one. The output is byte-identical for identical inputs (sorted header names,
data in source name order, fixed metadata; GPTQ's float32 matrix products on one machine and thread count);
the file is written front to back and its sha256 taken as it is written.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from numba import get_num_threads, njit, prange

from .checkpoint import Checkpoint, fingerprint, open_checkpoint
from .config import Params, load_params, select_targets
from .errors import MintError
from .formats import Option, parse_option, stored_entry_names
from .gptq import GPTQ_VERSION, gptq_codes
from .io import atomic_dir, atomic_write_json, canonical_json, read_json, sha256_file
from .kernels import (
    W,
    mlx_scale_bias,
    transpose_rows,
    ubf16,
    ucodes,
    uor,
    ushl,
    ushr,
    ustore,
    uzero,
    vload,
    vmax,
    vmin,
    vmlx_scale_bias,
    vrint,
    vsplat,
)
from .quant import QUANTIZER_VERSION, pack_codes

HELP = "write each target's MLX model folder"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "mintbuild-pack.json"
MANIFEST_SCHEMA = 1
#: safetensors metadata mlx-lm's own save_model writes; fixed so the file is byte-identical on rerun.
FILE_METADATA = {"format": "mlx"}
#: Small files of the model folder copied next to the weights (tokenizer* files are matched by prefix).
COPIED_FILES = ("generation_config.json", "special_tokens_map.json", "chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
CACHE_TAG = f"{QUANTIZER_VERSION}|bf16|pack/1"

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the fused quantize + pack kernel

# Same arithmetic as quant.quantize_codes (float32, division by the scale, round half to even, bf16 rounding of
# scale and bias), which tests/test_quant.py proves equal to mx.quantize; tests/test_pack.py checks this kernel
# against both.
#
# The fast path is the profile kernel's layout (kernels.py): a block of 8 rows is transposed so that each
# 8-lane vector holds one column of 8 rows. Every step is then vertical vector math with no branches on the
# data: min/max, MLX's scale and bias (including its divisions), the codes (a true float32 division, as MLX),
# and the packing itself, because all lanes put their code at the same bit position. For 3-, 5- and 6-bit
# codes the bit stream crosses word boundaries at positions that are the same in every lane, so the spill is
# two shifts, not a branch per value. Rows left over (R not a multiple of 8) take the scalar row path.
_FLAGS = {"reassoc", "nnan", "ninf", "nsz"}
_ZERO = np.float32(0.0)


@njit(inline="always")
def _bf16_bits(fbuf: np.ndarray, ubuf: np.ndarray, v: np.float32) -> np.uint16:
    """bf16 bit pattern of v, round to nearest even (what torch's .to(bfloat16) does for finite values)."""
    fbuf[0] = v
    u = ubuf[0]
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=True, parallel=True)
def _quantize_pack(x16, bits, group, words, scales, biases, bad, threads) -> None:
    """x16 bf16 bit patterns (uint16) [R, K] -> words uint32 [R, K*bits/32], scales/biases bf16 bits [R, K/g].

    Nothing is written when a value is NaN or Inf: `bad` then counts them per row."""
    n_rows, k = x16.shape
    for r in prange(n_rows):
        n_bad = 0
        for i in range(k):
            n_bad += (x16[r, i] & np.uint16(0x7F80)) == np.uint16(0x7F80)  # exponent all ones: NaN or Inf
        bad[r] = n_bad
    if bad.any():
        return
    n_full = n_rows // W
    n_part = max(1, min(n_full, 8 * threads))
    kw = words.shape[1]
    for part in prange(n_part):
        # Scratch once per partition: the transposed values, words and per-group scale/bias bits.
        xt = np.empty((k, W), dtype=np.float32)
        wt = np.empty((kw, W), dtype=np.uint32)
        sb = np.empty((2, W), dtype=np.uint32)
        for blk in range(part * n_full // n_part, (part + 1) * n_full // n_part):
            r0 = blk * W
            transpose_rows(x16, r0, xt)
            for gi in range(k // group):
                _pack_group(xt, gi * group, group, bits, wt, sb)
                for lane in range(W):
                    scales[r0 + lane, gi] = np.uint16(sb[0, lane])
                    biases[r0 + lane, gi] = np.uint16(sb[1, lane])
            for w in range(kw):
                for lane in range(W):
                    words[r0 + lane, w] = wt[w, lane]
    _pack_rows(x16, bits, group, words, scales, biases, n_full * W)


@njit(inline="always")
def _pack_group(xt, c0, group, bits, wt, sb) -> None:
    """One group (columns c0 .. c0+group) of 8 transposed rows: scale and bias bf16 bits into sb [2, 8], the
    packed words into wt [K*bits/32, 8]."""
    zero = vsplat(0.0)
    nb = vsplat((1 << bits) - 1)
    lo = vload(xt, c0 * W)
    hi = lo
    for i in range(c0 + 1, c0 + group):
        v = vload(xt, i * W)
        lo = vmin(lo, v)
        hi = vmax(hi, v)
    scale, bias = vmlx_scale_bias(lo, hi, nb)
    ustore(sb, 0, ubf16(scale))
    ustore(sb, W, ubf16(bias))
    # Codes into a little-endian bit stream; every group starts on a word boundary (group * bits % 32 == 0).
    w = c0 * bits // 32
    acc = uzero()
    n_acc = 0
    for i in range(c0, c0 + group):
        u = ucodes(vmin(vmax(vrint((vload(xt, i * W) - bias) / scale), zero), nb))
        acc = uor(acc, ushl(u, n_acc))
        n_acc += bits
        if n_acc >= 32:
            ustore(wt, w * W, acc)
            w += 1
            n_acc -= 32
            acc = ushr(u, bits - n_acc) if n_acc else uzero()


@njit(cache=True, fastmath=_FLAGS)
def _pack_rows(x16, bits, group, words, scales, biases, first) -> None:
    """Rows first.. one at a time: widen to float32, per group the parameters and the codes (a branch-free
    loop the compiler vectorises), then the codes are packed (MLX's layout, as in `_pack_group`). Only
    reassociation of min/max and no-NaN/Inf assumptions (inputs are checked finite first); never
    arcp/contract, which would change the division and break bit-exactness."""
    n_rows, k = x16.shape
    n_bins = np.float32((1 << bits) - 1)
    per = 32 // bits if 32 % bits == 0 else 0
    ubuf = np.empty(k, dtype=np.uint32)
    row = ubuf.view(np.float32)
    codes = np.empty(k, dtype=np.uint32)
    fbuf = np.empty(1, dtype=np.float32)
    fbits = fbuf.view(np.uint32)
    for r in range(first, n_rows):
        for i in range(k):
            ubuf[i] = np.uint32(x16[r, i]) << np.uint32(16)
        for gi in range(k // group):
            start = gi * group
            w_min = row[start]
            w_max = row[start]
            for i in range(start + 1, start + group):
                w_min = min(w_min, row[i])
                w_max = max(w_max, row[i])
            scale, bias = mlx_scale_bias(w_min, w_max, n_bins)
            scales[r, gi] = _bf16_bits(fbuf, fbits, scale)
            biases[r, gi] = _bf16_bits(fbuf, fbits, bias)
            # fl32(x * fl64(1/s)) == fl32(x / s) for float32 x and s: a quotient of two 24-bit significands is
            # never a float32 rounding midpoint and lies at least 2^-48 (relative) from one, while the float64
            # product is within 2^-52 of it. Unlike the division this vectorises.
            inv = np.float64(1.0) / np.float64(scale)
            for i in range(start, start + group):
                q = np.float32(np.float64(row[i] - bias) * inv)
                codes[i] = np.int32(min(max(np.rint(q), _ZERO), n_bins))
        _pack_row(codes, bits, per, words[r])


@njit(inline="always")
def _pack_row(codes: np.ndarray, bits: int, per: int, out: np.ndarray) -> None:
    k = codes.shape[0]
    if per:
        for w in range(k // per):
            acc = np.uint32(0)
            for j in range(per):
                acc |= codes[w * per + j] << np.uint32(j * bits)
            out[w] = acc
        return
    for c in range(k // 32):
        acc = np.uint64(0)
        n_acc = 0
        w = c * bits
        for j in range(32):
            acc |= np.uint64(codes[c * 32 + j]) << np.uint64(n_acc)
            n_acc += bits
            if n_acc >= 32:
                out[w] = np.uint32(acc & np.uint64(0xFFFFFFFF))
                w += 1
                acc >>= np.uint64(32)
                n_acc -= 32


def packed_shapes(option: Option, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(words shape, scales/biases shape) of `shape` stored with `option`, refusing a shape it cannot store."""
    reason = option.unavailable_reason(shape)
    if reason:
        raise MintError(f"option {option.name} cannot store shape {list(shape)}: {reason}")
    return option.packed_shape(shape)


def quantize_pack(w: torch.Tensor, option: Option) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MLX affine tensors of `w` (rounded to bf16 first, as stored): (uint32 words, bf16 scales, bf16 biases),
    the scales and biases as uint16 bit patterns, all in MLX's shapes (`Option.packed_shape`)."""
    shape = tuple(w.shape)
    wshape, sshape = packed_shapes(option, shape)
    x16 = w.to(torch.bfloat16).contiguous().reshape(-1, shape[-1]).view(torch.int16).numpy().view(np.uint16)
    rows = x16.shape[0]
    words = np.empty((rows, wshape[-1]), dtype=np.uint32)
    scales = np.empty((rows, sshape[-1]), dtype=np.uint16)
    biases = np.empty((rows, sshape[-1]), dtype=np.uint16)
    bad = np.zeros(rows, dtype=np.int64)
    _quantize_pack(x16, option.bits, option.group, words, scales, biases, bad, get_num_threads())
    if bad.any():
        raise MintError(f"{int(bad.sum())} NaN or Inf value(s) in row(s) {np.flatnonzero(bad)[:3].tolist()}")
    return words.reshape(wshape), scales.reshape(sshape), biases.reshape(sshape)


@dataclass(frozen=True)
class Rounding:
    """How quantized tensors are rounded: GPTQ for those with a Hessian, round-to-nearest for the rest."""

    method: str = "rtn"
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_sha256: str = ""
    damp: float = 0.1
    block: int = 128

    def cache_key(self, name: str) -> str:
        """What, besides the tensor's content and option, its stored bytes depend on."""
        if name not in self.hessians:
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
        }


def load_rounding(params: Params, ckpt: Checkpoint) -> Rounding:
    """The rounding `params.pack` asks for, with the importance stage's Hessians of this very model."""
    from .importance import load_hessians

    cfg = params.pack
    if cfg.rounding == "rtn":
        return Rounding()
    if cfg.rounding != "gptq":
        raise MintError(f"pack.rounding {cfg.rounding!r}: choose gptq or rtn")
    if not (cfg.damp > 0 and cfg.block > 0):
        raise MintError(f"pack.damp {cfg.damp} and pack.block {cfg.block} must be positive")
    hs = load_hessians(Path(params.importance.out), fingerprint(ckpt))
    return Rounding("gptq", hs.full, hs.sha256, cfg.damp, cfg.block)


def gptq_pack(
    w: torch.Tensor, option: Option, hessian: torch.Tensor, rounding: Rounding
) -> tuple[np.ndarray, ...]:
    """`quantize_pack`'s arrays, rounded by GPTQ against `hessian`."""
    wshape, sshape = packed_shapes(option, tuple(w.shape))
    if not torch.isfinite(w).all():
        raise MintError(f"{int((~torch.isfinite(w)).sum())} NaN or Inf value(s)")
    q, scales, biases = gptq_codes(w, hessian, option, rounding.damp, rounding.block)
    as_u16 = [
        t.contiguous().view(torch.int16).numpy().view(np.uint16).reshape(sshape) for t in (scales, biases)
    ]
    return pack_codes(q, option.bits).reshape(wshape), *as_u16


# ---------------------------------------------------------------- the plan


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


def item_entries(name: str, option: Option, shape: tuple[int, ...]) -> list[Entry]:
    if option.passthrough:
        return [Entry(name, "BF16", shape)]
    wshape, sshape = option.packed_shape(shape)
    w, s, b = stored_entry_names(name, option)
    return [Entry(w, "U32", wshape), Entry(s, "BF16", sshape), Entry(b, "BF16", sshape)]


def module_path(name: str) -> str:
    """The module path mlx-lm's nn.quantize sees for a weight (`a.b.weight` -> `a.b`)."""
    return name.removesuffix(".weight")


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
    plan = Plan(alloc["target"], int(totals["budget"]), int(totals["header_allowance"]), items, None)
    plan.quantization = quantization_section(items)
    _layout(plan)
    return plan


def quantization_section(items: list[Item]) -> dict[str, Any] | None:
    """config.json's `quantization`: the most common option (by tensor count, then bytes, then name) as the
    default, plus one entry per module path whose choice differs; None when nothing is quantized."""
    quantized = [it for it in items if not it.option.passthrough]
    if not quantized:
        return None
    count = Counter(it.option for it in quantized)
    nbytes = Counter()
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


def _layout(plan: Plan) -> None:
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


class PackCache:
    """Quantized tensors on disk, keyed by (content hash of the source tensor, option, quantizer version).

    One file per entry: 16-byte xxh3-128 digest of the payload, then the words, scales and biases bytes. The
    digest is checked on every read, so a torn or corrupted entry is recomputed, never used.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.hits = 0
        self.misses = 0
        self._made: set[Path] = set()  # fan-out folders known to exist (a mkdir per entry costs ~0.1 ms)

    def path(self, digest: str, option: Option) -> Path:
        assert self.root is not None
        key = xxhash.xxh3_128(f"{CACHE_TAG}|{digest}|{option.name}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}-{option.name}.bin"

    def get(self, digest: str, option: Option) -> memoryview | None:
        if self.root is None:
            return None
        p = self.path(digest, option)
        try:
            raw = p.read_bytes()
        except OSError:
            return None
        if len(raw) < 16 or xxhash.xxh3_128(memoryview(raw)[16:]).digest() != raw[:16]:
            log.warning("pack cache entry %s is corrupt; recomputing it", p)
            return None
        return memoryview(raw)[16:]

    def put(self, digest: str, option: Option, parts: list[memoryview]) -> None:
        """Store the payload given as its parts (written one after the other, never joined in memory)."""
        if self.root is None:
            return
        p = self.path(digest, option)
        if p.parent not in self._made:
            p.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(p.parent)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        h = xxhash.xxh3_128()
        for part in parts:
            h.update(part)
        # No fsync: a torn entry after a crash fails its digest and is recomputed.
        with open(tmp, "wb") as f:
            f.write(h.digest())
            for part in parts:
                f.write(part)
        os.replace(tmp, p)


def default_cache_dir(pack_out: Path) -> Path:
    env = os.environ.get("MINTBUILD_CACHE")
    return Path(env) / "pack" if env else Path(pack_out) / ".cache"


def tensor_payload(
    ckpt: Checkpoint, item: Item, cache: PackCache, hashes: dict[str, str], rounding: Rounding
) -> list[memoryview]:
    """The bytes of each of the item's entries, in entry order; records the tensor's content hash."""
    from .profile import content_hash

    info = ckpt.tensors[item.source]
    t = ckpt.read(item.source)
    # The profile's hash (name, dtype, shape, raw bytes): checks the allocation's provenance and keys the cache.
    hashes[item.source] = digest = content_hash(info, t)
    if item.option.passthrough:
        return [memoryview(_bf16_bytes(t))]
    sizes = [e.nbytes for e in item.entries]
    key = digest + rounding.cache_key(item.source)
    payload = cache.get(key, item.option)
    if payload is not None and len(payload) == sum(sizes):
        cache.hits += 1
        # Zero-copy views of the cached entry, one per stored tensor.
        bounds = itertools.accumulate(sizes, initial=0)
        return [payload[a:b] for a, b in itertools.pairwise(bounds)]
    cache.misses += 1
    try:
        hessian = rounding.hessians.get(item.source)
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


def packed_config(model_config: dict[str, Any], plan: Plan) -> dict[str, Any]:
    cfg = {k: v for k, v in model_config.items() if k not in ("quantization", "quantization_config")}
    if plan.quantization is not None:
        cfg["quantization"] = plan.quantization
        cfg["quantization_config"] = plan.quantization  # what mlx-lm's convert writes too (HF model tree)
    return cfg


def tokenizer_files(model_dir: Path) -> list[Path]:
    """The model folder's tokenizer and generation files; refuses a folder without a tokenizer."""
    if not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise MintError(
            f"{model_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)}); the packed model needs one"
        )
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name.startswith("tokenizer"))
    files += [model_dir / n for n in COPIED_FILES if (model_dir / n).is_file()]
    return sorted(set(files))


def check_tokenizer(model_dir: Path, model_config: dict[str, Any]) -> None:
    """A tokenizer whose ids do not fit the model's embedding is the wrong tokenizer."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
        vocab = tok["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        ids += [a["id"] for a in tok.get("added_tokens", [])]
    except (ValueError, KeyError, TypeError) as e:
        raise MintError(f"{path}: not a valid tokenizer.json ({e})") from None
    n = model_config.get("vocab_size")
    if n and ids and max(ids) >= int(n):
        raise MintError(
            f"{path}: token id {max(ids)} does not fit the model's vocab_size {n}: wrong tokenizer for this model"
        )


def load_allocation(root: Path, target: str) -> dict[str, Any]:
    return read_json(
        root / target / "allocation.json", f"no allocation; run `mintbuild allocate --target {target}` first"
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
    from .model import resolve_weights_dir

    out_root = Path(out_root or params.pack_out)
    model_dir = Path(model_out or params.equalize.out)
    alloc_path = Path(alloc_root or params.allocate_out) / target / "allocation.json"
    alloc = load_allocation(Path(alloc_root or params.allocate_out), target)
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
        result.manifest = manifest(tmp, alloc, alloc_path, plan, {WEIGHTS_FILE: weights_sha}, rounding)
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


def manifest(
    folder: Path,
    alloc: dict[str, Any],
    alloc_path: Path,
    plan: Plan,
    known: dict[str, str],
    rounding: Rounding,
) -> dict[str, Any]:
    """The pack's record; `known` holds sha256 digests already computed (file name -> hex)."""
    totals = alloc["totals"]
    return {
        "schema_version": MANIFEST_SCHEMA,
        "target": plan.target,
        "allocation_sha256": sha256_file(alloc_path),
        "provenance": alloc.get("provenance", {}),
        "budget": plan.budget,
        "weights_bytes": plan.file_bytes,
        "header_bytes": len(plan.header),
        "parameters": plan.parameters,
        "avg_bits_per_weight": 8 * plan.data_bytes / max(plan.parameters, 1),
        "objective": totals.get("objective"),
        "objective_kind": totals.get("objective_kind"),
        "quantizer": QUANTIZER_VERSION,
        "rounding": rounding.record(),
        "files": {
            p.name: {"bytes": p.stat().st_size, "sha256": known.get(p.name) or sha256_file(p)}
            for p in sorted(folder.iterdir())
            if p.is_file() and p.name != MANIFEST_FILE
        },
    }


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
        sys.stdout.write("\n".join(render_plan(r.plan, r.out) for r in results) + "\n")
