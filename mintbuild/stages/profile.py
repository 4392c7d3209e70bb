"""`mintbuild profile`: one streaming CPU pass over a checkpoint, no data.

For every tensor: its role, whether it may be quantized, and for every storage option of the option set the
exact packed bytes (formats.py) and the error of MLX affine round-to-nearest (sum of squared error, NRMSE,
SQNR), measured with the same quantizer the packer uses. Large tensors are measured on a sample (the units
with the widest ranges whole, a uniform random sample of the rest) whose standard error is recorded; sizes
are always exact. The artifact is a safetensors file (arrays [tensors, options] + JSON metadata) that loads in
milliseconds, plus summary.md.

`--format gguf` (DVC stage profile_gguf) measures the convert stage's bf16 GGUF instead: per GGUF tensor and
ggml type of the "gguf" option set, the bytes the tensor occupies in the file (padded to the GGUF alignment) and
the error of ggml's own quantize/dequantize (mintbuild.llamacpp.ggml, the code llama-quantize runs) with llama-quantize's
imatrix weights for the tensor, so that the profiled error is the packed file's error; the fixed header the
allocation adds is the one llama-quantize will write (gguf_pack.quantized_header_bytes). It also writes the
imatrix file (llama.cpp's format) that pack hands to llama-quantize.

One job: the profile measurement (per-tensor statistics, the sampling estimator, the streaming pass); the
artifact's format lives in artifacts/profile.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from mintbuild import __version__
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.artifacts.profile import DISABLED_FILE, Profile
from mintbuild.cluster import Executor, Resources, batches, executor
from mintbuild.config import ProfileConfig, as_dict, load_params
from mintbuild.errors import MintError
from mintbuild.formats import PASSTHROUGH, Option, option_set
from mintbuild.hf.checkpoint import (
    PASSTHROUGH_ROLES,
    Checkpoint,
    TensorInfo,
    compile_rules,
    content_hash,
    fingerprint,
    layer_index,
    open_checkpoint,
    tensor_role,
    tied_lm_head,
)
from mintbuild.io import atomic_dir, canonical_json, sha256_file
from mintbuild.mlx.quant.reference import QUANTIZER_VERSION

HELP = "measure bytes and quantization error of every tensor x storage option (one CPU pass, no data)"
#: Rows of a large tensor converted to float32 at a time (bounds peak memory to ~64 MB per chunk).
CHUNK_ELEMENTS = 1 << 24
#: Sampling stops growing once three standard errors of every option's NRMSE are below this relative bound.
NRMSE_REL_BOUND = 0.005

log = logging.getLogger(__name__)


# --- measurement ------------------------------------------------------------------------------------------


@dataclass
class TensorStats:
    sse: np.ndarray  # [K] float64, per option; nan where unavailable
    worst_nrmse: np.ndarray  # [K] per-expert worst case (== nrmse for ordinary tensors)
    rse: np.ndarray  # [K] relative standard error of the NRMSE estimate (0 when exact)
    norm_sq: float
    sampled: int  # elements measured by the quantized option whose sample grew largest


def _storage_values(x: torch.Tensor) -> torch.Tensor:
    """The values the packer quantizes: the weight rounded to bf16 (exact for a bf16 checkpoint)."""
    return x.to(torch.bfloat16).float() if x.dtype != torch.bfloat16 else x.float()


def norms(info: TensorInfo, x: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """(sum of squares, squared error of the 16-bit storage rounding) of float32 `x`; refuses NaN/Inf.

    Summed in float32 per chunk (torch's cascade summation keeps that accurate) and across chunks in float64."""
    flat = x.reshape(-1)
    norm_sq = 0.0
    err16 = 0.0
    for start in range(0, flat.numel(), CHUNK_ELEMENTS):
        chunk = flat[start : start + CHUNK_ELEMENTS]
        s = float(torch.sum(chunk * chunk))
        if not math.isfinite(s):
            bad = int((~torch.isfinite(chunk)).nonzero()[0, 0]) + start
            raise MintError(
                f"{info.file}: tensor {info.name!r} has a non-finite value ({float(flat[bad])}) at index "
                f"{bad}; fix the checkpoint"
            )
        norm_sq += s
        if dtype != torch.bfloat16:
            err16 += float(torch.sum((_storage_values(chunk) - chunk) ** 2, dtype=torch.float64))
    return norm_sq, err16


def bf16_norms(info: TensorInfo, t: torch.Tensor) -> float:
    """Sum of squares (float64) of a bf16 tensor, read as bits in one parallel pass; refuses NaN/Inf."""
    from mintbuild.mlx.quant.error_kernels import sum_squares

    flat = t.reshape(-1)
    norm_sq, bad = sum_squares(flat.view(torch.int16).numpy()) if flat.numel() else (0.0, -1)
    if bad >= 0:
        raise MintError(
            f"{info.file}: tensor {info.name!r} has a non-finite value ({float(flat[bad])}) at index "
            f"{bad}; fix the checkpoint"
        )
    return norm_sq


def measure_quantized(
    info: TensorInfo,
    x: torch.Tensor,
    dtype: torch.dtype,
    opts: list[Option],
    norm_sq: float,
    cfg: ProfileConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sse, worst per-expert nrmse, relative standard error of the NRMSE, elements measured), per option.

    A unit is one block of `max group` consecutive elements of a row (every option's groups tile it). Small
    tensors are measured exactly. A large one is split in two strata by the auxiliary variable (squared
    group ranges, one cheap pass): the TAKE_ALL share of units with the widest ranges (outliers: they carry
    most of the variance of the error) is measured whole, the rest on a uniform sample (a prefix of a fixed
    random order). Each option's sample grows until three standard errors of its NRMSE are within
    NRMSE_REL_BOUND (or it is the whole stratum), and only the options still short of the bound measure the
    added units. A growth jumps to the size the standard error predicts (se ~ 1/sqrt(n)) for the option
    closest to its bound; past 80% of the stratum the rest is measured outright.
    """
    block = max(o.group for o in opts)
    n_units = info.numel // block
    units = x.reshape(n_units, block)
    want = n_units if info.numel <= cfg.sample_above else max(2, min(n_units, cfg.sample_elements // block))
    if want >= n_units:
        unit_sse = _unit_sse(units, None, opts)
        sse = unit_sse.sum(axis=0)
        worst = _per_expert_worst(info, units, list(unit_sse.T), np.arange(n_units), 0, n_units, sse, norm_sq)
        return sse, worst, np.zeros(len(opts)), np.full(len(opts), info.numel)
    # The auxiliary depends only on the group size: one column per size, each option points at its own.
    sizes = sorted({o.group for o in opts})
    aux = range_aux(units, sizes)
    aux_col = np.array([sizes.index(o.group) for o in opts])
    order, n_top = _strata_order(info, aux[:, -1], cfg.seed)
    n_rest = n_units - n_top
    aux_rest = aux.sum(axis=0) - aux[order[:n_top]].sum(axis=0)
    # Round r measures order[done:want] (sorted in place for memory locality; a prefix of the rest stays a
    # simple random sample as a set) for the active options: option j's units are order[:taken[j]].
    cols: list[list[np.ndarray]] = [[] for _ in opts]
    taken = np.zeros(len(opts), dtype=np.int64)
    sse, rse = np.zeros(len(opts)), np.zeros(len(opts))
    active, done, want = np.arange(len(opts)), 0, n_top + min(want, n_rest)
    while active.size:
        order[max(done, n_top) : want] = np.sort(order[max(done, n_top) : want])  # the top is sorted
        measured = _unit_sse(units, order[done:want], [opts[j] for j in active])
        for c, j in enumerate(active):
            cols[j].append(measured[:, c])
        taken[active], done = want, want
        col = np.stack([np.concatenate(cols[j]) for j in active], axis=1)
        top = col[:n_top].sum(axis=0)
        if want >= n_units:
            sse[active], rse[active] = col.sum(axis=0), 0.0
            break
        cj = aux_col[active]
        est, rel = _estimate_total(col[n_top:], aux[order[n_top:want]][:, cj], aux_rest[cj], n_rest)
        sse[active] = top + est
        # rel is the NRMSE's relative error for the rest's total alone; scale it to the whole tensor's.
        rse[active] = rel * np.divide(est, sse[active], out=np.zeros_like(est), where=sse[active] > 0)
        log.debug(
            "%s: %d + %d units, 3 x rse %s", info.name, n_top, want - n_top, np.round(3 * rse[active], 4)
        )
        active = active[3 * rse[active] > NRMSE_REL_BOUND]
        if active.size:
            grow = min(16.0, max(2.0, 1.25 * float(((3 * rse[active] / NRMSE_REL_BOUND) ** 2).min())))
            m = int((want - n_top) * grow)
            want = n_units if m >= 0.8 * n_rest else n_top + m
    columns = [np.concatenate(c) for c in cols]
    worst = _per_expert_worst(info, units, columns, order, n_top, n_rest, sse, norm_sq)
    return sse, worst, rse, taken * block


#: Share of a sampled tensor's units, those with the widest group ranges, that are measured whole.
TAKE_ALL = 0.01


def _strata_order(info: TensorInfo, key: np.ndarray, seed: int) -> tuple[np.ndarray, int]:
    """(order, n_top): the TAKE_ALL share of units with the largest `key` first (ascending index), then the
    other units in a random order fixed by the seed and the tensor's name (every prefix of that part is a
    simple random sample of it, so a growing sample only measures the units it adds)."""
    n_units = key.shape[0]
    n_top = int(n_units * TAKE_ALL)
    # introselect: linear time and deterministic (which of equal keys at the cut it keeps depends only on
    # the input, and equal ranges are interchangeable for the estimate).
    top = (
        np.sort(np.argpartition(key, n_units - n_top)[n_units - n_top :]) if n_top else np.zeros(0, np.int64)
    )
    in_top = np.zeros(n_units, dtype=bool)
    in_top[top] = True
    rng = np.random.default_rng([seed, zlib.crc32(info.name.encode())])
    rest = rng.permutation(n_units)
    return np.concatenate([top, rest[~in_top[rest]]]), n_top


def _kernel_input(rows: torch.Tensor) -> np.ndarray:
    """What the kernels read: bf16 as its int16 bit patterns (no conversion), anything else as float32."""
    rows = rows.contiguous()
    return (rows.view(torch.int16) if rows.dtype == torch.bfloat16 else rows.float()).numpy()


def range_aux(units: torch.Tensor, group_sizes: list[int]) -> np.ndarray:
    """Per unit and group size, the sum over the unit's groups of (max - min)^2: the quantization step is
    range / (2^b - 1), so a group's error is nearly proportional to its squared range. float64
    [n_units, n_sizes], one parallel pass (kernels.range_sq)."""
    from mintbuild.mlx.quant.error_kernels import range_sq

    return range_sq(_kernel_input(units), np.array(group_sizes, dtype=np.int64))


def _unit_sse(units: torch.Tensor, idx: np.ndarray | None, opts: list[Option]) -> np.ndarray:
    """Per unit (all, or the rows `idx`) and option, the squared error of MLX quantization of the values the
    packer stores (the weight rounded to bf16) against the weight itself."""
    from mintbuild.mlx.quant.error_kernels import row_sse

    rows = units if idx is None else units[torch.from_numpy(idx)]
    bits = np.array([o.bits for o in opts], dtype=np.int64)
    groups = np.array([o.group for o in opts], dtype=np.int64)
    if rows.dtype == torch.bfloat16:
        b = _kernel_input(rows)
        return row_sse(b, b, bits, groups)
    ref = rows.float().contiguous()
    return row_sse(_storage_values(ref).numpy(), ref.numpy(), bits, groups)


def _estimate_total(
    unit_sse: np.ndarray, unit_aux: np.ndarray, aux_total: np.ndarray, n_units: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ratio estimator of each option's total SSE from a simple random sample of units, and the relative
    standard error of the resulting NRMSE (half that of the SSE, since NRMSE is its square root).

    The auxiliary variable (per option, known for every unit) is the sum of squared group ranges: error scales
    with it, so the per-unit ratio varies far less than the SSE itself across rows of different scale and
    groups holding outliers, and a small sample pins the total down."""
    u = unit_sse.shape[0]
    aux_s = unit_aux.sum(axis=0)
    safe = np.where(aux_s > 0, aux_s, 1.0)
    ratio = np.where(aux_s > 0, unit_sse.sum(axis=0) / safe, 0.0)
    resid = unit_sse - unit_aux * ratio[None, :]
    fpc = math.sqrt(max(0.0, 1.0 - u / n_units))
    se_ratio = resid.std(axis=0, ddof=1) / math.sqrt(u) * fpc / np.maximum(unit_aux.mean(axis=0), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(ratio > 0, se_ratio / ratio, 0.0)
    return ratio * aux_total, 0.5 * rel


def _per_expert_worst(
    info: TensorInfo,
    units: torch.Tensor,
    columns: list[np.ndarray],
    order: np.ndarray,
    n_top: int,
    n_rest: int,
    sse: np.ndarray,
    norm_sq: float,
) -> np.ndarray:
    """Worst NRMSE over the experts of a stacked [E, out, in] tensor; the tensor's own NRMSE otherwise.

    Option j was measured on order[:len(columns[j])]: the n_top take-all units count once, each sampled unit
    for n_rest / (sampled units) of its stratum, in both the expert's error and its norm (a ratio estimate)."""
    if len(info.shape) < 3 or info.shape[0] < 2:
        return _nrmse(sse, norm_sq)
    n_exp = info.shape[0]
    per_exp = units.shape[0] // n_exp
    seen = np.sort(order[: max(len(c) for c in columns)])
    unit_norm = units[torch.from_numpy(seen)].double().square().sum(dim=1).numpy()
    worst = np.zeros(len(columns))
    for j, col in enumerate(columns):
        idx = order[: len(col)]
        weight = np.ones(len(col))
        weight[n_top:] = n_rest / max(len(col) - n_top, 1)
        expert = idx // per_exp
        e_sse = np.bincount(expert, weights=col * weight, minlength=n_exp)
        e_norm = np.bincount(expert, weights=unit_norm[np.searchsorted(seen, idx)] * weight, minlength=n_exp)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios = np.where(e_norm > 0, e_sse / e_norm, 0.0)
        worst[j] = math.sqrt(ratios[np.bincount(expert, minlength=n_exp) > 0].max())
    return worst


def _nrmse(sse: np.ndarray, norm_sq: float) -> np.ndarray:
    if norm_sq > 0:
        return np.sqrt(sse / norm_sq)
    return np.where(sse > 0, np.inf, 0.0)  # an all-zero tensor quantizes exactly: defined error 0


def _sqnr(sse: np.ndarray, norm_sq: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(
            sse > 0, 10.0 * np.log10(np.maximum(norm_sq, 1e-300) / np.where(sse > 0, sse, 1.0)), np.inf
        )


# --- the pass ---------------------------------------------------------------------------------------------


def tensor_meta(info: TensorInfo, role: str, opts: tuple[Option, ...]) -> tuple[dict[str, Any], list[Option]]:
    quantizable = role not in PASSTHROUGH_ROLES and len(info.shape) >= 2
    usable = [o for o in opts if not o.passthrough and quantizable and o.available(info.shape)]
    meta = {
        "name": info.name,
        "shape": list(info.shape),
        "dtype": info.dtype,
        "role": role,
        "layer": layer_index(info.name),
        "elements": info.numel,
        "quantizable": quantizable,
        "file": info.file.name,
    }
    return meta, usable


def profile_checkpoint(ckpt: Checkpoint, cfg: ProfileConfig, progress: bool = True) -> Profile:
    from tqdm import tqdm

    opts = option_set(list(cfg.option_list) if cfg.option_list else cfg.options)
    rules = compile_rules([(r.role, r.pattern) for r in cfg.role_rules])
    skip = tied_lm_head(ckpt)
    tied = bool(ckpt.config.get("tie_word_embeddings", False))
    names = [n for n in ckpt.names if n != skip]
    if not names:
        raise MintError(f"{ckpt.folder}: the checkpoint holds no tensors")
    n_layers = max((layer_index(n) for n in names), default=-1) + 1
    cols = _new_columns(len(names), len(opts))
    metas: list[dict[str, Any]] = []
    hashes: list[str] = []
    total = sum(ckpt.tensors[n].numel for n in names)
    t0 = time.perf_counter()
    ex = executor()
    if ex.remote:
        metas, hashes = _profile_on(ex, ckpt, names, opts, rules, cfg, cols, progress)
        for meta in metas:
            meta["tied_to"] = ["lm_head.weight"] if tied and meta["role"] == "embedding" else []
            meta["last_layer"] = meta["layer"] == n_layers - 1 and meta["layer"] >= 0
        return _assemble(ckpt, cfg, opts, metas, hashes, cols, total, time.perf_counter() - t0)
    bar = tqdm(total=total, unit="param", unit_scale=True, disable=not progress, desc="profile")
    # One helper thread hashes tensor i+1 while tensor i is measured: hashing is the first read of the
    # memory map, so it also takes the page faults (or the disk reads) off the measuring path.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="profile-hash") as pool:
        ahead = pool.submit(_read_and_hash, ckpt, names[0])
        for i, name in enumerate(names):
            info = ckpt.tensors[name]
            t, digest = ahead.result()
            if i + 1 < len(names):
                ahead = pool.submit(_read_and_hash, ckpt, names[i + 1])
            meta = _profile_one(i, info, t, opts, rules, cfg, cols)
            meta["tied_to"] = ["lm_head.weight"] if tied and meta["role"] == "embedding" else []
            meta["last_layer"] = meta["layer"] == n_layers - 1 and meta["layer"] >= 0
            metas.append(meta)
            hashes.append(digest)
            bar.update(info.numel)
            bar.set_postfix_str(f"{i + 1}/{len(names)} tensors")
    bar.close()
    seconds = time.perf_counter() - t0
    return _assemble(ckpt, cfg, opts, metas, hashes, cols, total, seconds)


#: Elements of one profile task on a cluster at most (about a second of measuring and 0.5 GB of bf16 to read);
#: smaller tasks when that gives fewer than 4 per cluster core.
TASK_ELEMENTS = 1 << 28


def _profile_on(
    ex: Executor,
    ckpt: Checkpoint,
    names: list[str],
    opts: tuple[Option, ...],
    rules: list,
    cfg: ProfileConfig,
    cols: dict[str, np.ndarray],
    progress: bool,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The tensors profiled by `ex` in contiguous batches (each task reads its tensors from the checkpoint's
    path), reassembled into `cols` in name order: the same rows the in-process loop fills."""
    sizes = [ckpt.tensors[n].numel for n in names]
    files = {ckpt.tensors[n].file for n in names}
    source = str(next(iter(files)).resolve() if len(files) == 1 else Path(ckpt.folder).resolve())
    parts = batches(sizes, max(-(-sum(sizes) // TASK_ELEMENTS), 4 * ex.slots))
    # the widest tensor's pages (bf16 mapped, or a float32 copy) and a sample's buffers, plus the process
    memory = 4 * max(sizes) + (1 << 30)
    tasks = [(source, names[r.start : r.stop], opts, rules, cfg) for r in parts]
    metas, hashes = [], []
    for r, (m, h, c) in zip(
        parts, ex.map(_profile_batch, tasks, Resources(memory=memory), "profile", progress), strict=True
    ):
        metas += m
        hashes += h
        for key, col in c.items():
            cols[key][r.start : r.stop] = col
    return metas, hashes


def _profile_batch(task: tuple) -> tuple[list[dict[str, Any]], list[str], dict[str, np.ndarray]]:
    """One cluster task: the named tensors of the checkpoint at `source`, measured as the in-process loop
    measures them: (metas, content hashes, their rows of the columns)."""
    source, names, opts, rules, cfg = task
    ckpt = open_checkpoint(source)
    cols = _new_columns(len(names), len(opts))
    metas, hashes = [], []
    for i, name in enumerate(names):
        t, digest = _read_and_hash(ckpt, name)
        metas.append(_profile_one(i, ckpt.tensors[name], t, opts, rules, cfg, cols))
        hashes.append(digest)
    return metas, hashes, cols


def _new_columns(n: int, k: int) -> dict[str, np.ndarray]:
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


def _profile_one(
    i: int,
    info: TensorInfo,
    t: torch.Tensor,
    opts: tuple[Option, ...],
    rules: list,
    cfg: ProfileConfig,
    cols: dict[str, np.ndarray],
) -> dict[str, Any]:
    role = tensor_role(info.name, len(info.shape), rules)
    meta, usable = tensor_meta(info, role, opts)
    if t.dtype == torch.bfloat16:
        # Every measurement reads the stored bf16 bits (an int16 view of the memory map): no float32 copy.
        x = t
        norm_sq, err16 = bf16_norms(info, t), 0.0
    else:
        x = t.float()  # one conversion (a view for float32 sources), reused by every measurement below
        norm_sq, err16 = norms(info, x, t.dtype)
    cols["elements"][i] = info.numel
    cols["norm_sq"][i] = norm_sq
    k16 = opts.index(PASSTHROUGH)
    _fill(cols, i, k16, PASSTHROUGH.nbytes(info.shape), np.array([err16]), np.array([0.0]), None, norm_sq)
    if usable:
        sse, worst, rse, sampled = measure_quantized(info, x, t.dtype, usable, norm_sq, cfg)
        cols["sampled_elements"][i] = sampled.max()  # the largest of the options' samples
        for j, o in enumerate(usable):
            k = opts.index(o)
            _fill(cols, i, k, o.nbytes(info.shape), sse[j : j + 1], rse[j : j + 1], worst[j : j + 1], norm_sq)
    reasons = {
        o.name: o.unavailable_reason(info.shape) for o in opts if not o.passthrough and o not in usable
    }
    if not meta["quantizable"]:
        reasons = {k: f"role {role} / {len(info.shape)}-D stays 16-bit" for k in reasons}
    meta["unavailable"] = {k: v for k, v in reasons.items() if v}
    return meta


def _read_and_hash(ckpt: Checkpoint, name: str) -> tuple[torch.Tensor, str]:
    t = ckpt.read(name)
    return t, content_hash(ckpt.tensors[name], t)


def _fill(cols, i, k, nbytes, sse, rse, worst, norm_sq) -> None:
    cols["bytes"][i, k] = nbytes
    cols["available"][i, k] = 1
    cols["sse"][i, k] = sse[0]
    cols["nrmse"][i, k] = _nrmse(sse, norm_sq)[0]
    cols["sqnr"][i, k] = _sqnr(sse, norm_sq)[0]
    cols["worst_nrmse"][i, k] = (worst if worst is not None else _nrmse(sse, norm_sq))[0]
    cols["nrmse_rse"][i, k] = rse[0]


def _assemble(ckpt, cfg, opts, metas, hashes, cols, total, seconds) -> Profile:
    ckpt_hash = xxhash.xxh3_128("\n".join(hashes).encode()).hexdigest()
    provenance = {
        "checkpoint_hash": ckpt_hash,
        "model_fingerprint": fingerprint(ckpt),
        "model_folder": ckpt.folder.name,
        "options": [o.name for o in opts],
        "quantizer": QUANTIZER_VERSION,
        "mintbuild_version": __version__,
        "profile_config": {k: v for k, v in as_dict(cfg).items() if k != "out"},
        "tensor_hashes": dict(zip([m["name"] for m in metas], hashes, strict=True)),
        "model_config": {k: ckpt.config.get(k) for k in _CONFIG_KEYS if k in ckpt.config},
    }
    provenance["profile_hash"] = xxhash.xxh3_128(canonical_json(provenance).encode()).hexdigest()
    sampled = int((cols["sampled_elements"] < cols["elements"]).sum() - (cols["sampled_elements"] == 0).sum())
    rse = cols["nrmse_rse"]
    summary = {
        "tensors": len(metas),
        "parameters": int(total),
        "bytes_16bit": int(cols["bytes"][:, opts.index(PASSTHROUGH)].sum()),
        "sampled_tensors": max(sampled, 0),
        "max_nrmse_rse": float(rse.max()) if rse.size else 0.0,
        # Wall time is kept out of the artifact so reruns are byte-identical; it is logged instead.
    }
    log.info(
        "profiled %d tensors, %.3g params in %.1f s (%.3g params/s)",
        len(metas),
        total,
        seconds,
        total / max(seconds, 1e-9),
    )
    return Profile(metas, list(opts), cols, provenance, summary)


#: config.json keys later stages need (KV-cache headroom, the evaluator's window).
_CONFIG_KEYS = (
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


# --- GGUF: the bf16 GGUF of `mintbuild convert`, ggml's own quantizers -----------------------------------------

#: Substrings of GGUF tensor names llama-quantize never quantizes (src/llama-quant.cpp,
#: tensor_allows_quantization); such tensors keep the converter's type. The pack's read-back catches the rest.
GGUF_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "position_embd.weight",
    "token_types.weight",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.",
)
#: Elements quantized and dequantized at a time (bounds memory: a float32 chunk and its round trip).
GGUF_CHUNK_ELEMENTS = 1 << 22
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.")


def gguf_values(t: Any) -> np.ndarray:
    """A GGUF tensor's values as float32 numpy [..., row] (exact for F32, F16, BF16), from the memory map."""
    shape = tuple(int(s) for s in reversed(t.shape))
    kind = t.tensor_type.name
    if kind == "F32":
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    if kind == "F16":
        return np.asarray(t.data).view(np.float16).astype(np.float32).reshape(shape)
    if kind == "BF16":
        bits = np.asarray(t.data).view(np.uint16).reshape(shape)
        return (bits.astype(np.uint32) << 16).view(np.float32)
    raise MintError(
        f"GGUF tensor {t.name} is {kind}: profile a 16-bit GGUF (mintbuild convert), not a quantized one"
    )


def gguf_sse(
    x: np.ndarray, type_name: str, weights: np.ndarray | None, threads: int = 1
) -> tuple[float, np.ndarray]:
    """(sum of squared error, per-matrix SSE) of ggml's round trip of `x` ([rows, k] or [n_mat, rows, k]) in
    `type_name`, each matrix with its row of importance `weights` ([n_mat, k]) as llama-quantize passes it;
    a chunk of rows at a time, float64 sums."""
    from mintbuild.llamacpp.ggml import roundtrip

    mats = x.reshape(-1, *x.shape[-2:]) if x.ndim >= 2 else x.reshape(1, 1, -1)
    per = np.zeros(mats.shape[0])
    k = mats.shape[-1]
    rows = max(1, GGUF_CHUNK_ELEMENTS // k)
    for m in range(mats.shape[0]):
        w = None if weights is None else weights[m if weights.shape[0] > 1 else 0]
        for r0 in range(0, mats.shape[1], rows):
            chunk = np.ascontiguousarray(mats[m, r0 : r0 + rows])
            d = roundtrip(chunk, type_name, w, threads=threads) - chunk
            per[m] += float(np.sum(np.square(d, dtype=np.float64)))
    return float(per.sum()), per


def gguf_row_sse(
    x: np.ndarray, rows: np.ndarray, type_name: str, weights: np.ndarray | None, threads: int
) -> np.ndarray:
    """Per selected row of the 2-D `x`, the SSE of ggml's round trip (rows quantize independently in ggml, so a
    row's error does not depend on which other rows are quantized with it)."""
    from mintbuild.llamacpp.ggml import roundtrip

    out = np.empty(len(rows))
    step = max(1, GGUF_CHUNK_ELEMENTS // x.shape[1])
    for r0 in range(0, len(rows), step):
        chunk = np.ascontiguousarray(x[rows[r0 : r0 + step]])
        d = roundtrip(chunk, type_name, weights, threads=threads) - chunk
        out[r0 : r0 + step] = np.sum(np.square(d, dtype=np.float64), axis=1)
    return out


def gguf_sampled_sse(
    name: str,
    x: np.ndarray,
    types: list[str],
    weights: np.ndarray | None,
    cfg: ProfileConfig,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(SSE per type, relative standard error of its NRMSE, rows measured) of a large 2-D tensor, from a sample
    of its rows, as the MLX profile samples: the TAKE_ALL share of rows with the widest 32-value blocks (sum of
    squared block ranges, the auxiliary: a block's error scales with its squared range) whole, a simple random
    sample (a prefix of a seeded order) of the rest, grown per type until three standard errors of its NRMSE
    are within NRMSE_REL_BOUND; ratio estimator on the auxiliary (`_estimate_total`)."""
    n, k = x.shape
    blocks = x.reshape(n, k // 32, 32) if k % 32 == 0 else x.reshape(n, 1, k)
    aux_row = np.sum(np.square(np.ptp(blocks, axis=2).astype(np.float64)), axis=1)
    n_top = int(n * TAKE_ALL)
    top = np.sort(np.argpartition(aux_row, n - n_top)[n - n_top :]) if n_top else np.zeros(0, np.int64)
    in_top = np.zeros(n, dtype=bool)
    in_top[top] = True
    rest = np.random.default_rng([cfg.seed, zlib.crc32(name.encode())]).permutation(n)
    order = np.concatenate([top, rest[~in_top[rest]]])
    n_rest = n - n_top
    aux_rest = float(aux_row.sum() - aux_row[top].sum())
    sse, rse, taken = np.zeros(len(types)), np.zeros(len(types)), 0
    for j, t in enumerate(types):
        measured = order[:n_top].copy()  # rows measured, in the order of `got`
        got = gguf_row_sse(x, measured, t, weights, threads) if n_top else np.zeros(0)
        done, want = n_top, n_top + min(n_rest, max(2, cfg.sample_elements // k))
        while True:
            batch = np.sort(order[done:want])  # a prefix of the random order is a random sample as a set
            got = np.concatenate([got, gguf_row_sse(x, batch, t, weights, threads)])
            measured = np.concatenate([measured, batch])
            done = want
            if done >= n:
                sse[j], rse[j] = float(got.sum()), 0.0
                break
            est, rel = _estimate_total(
                got[n_top:, None], aux_row[measured[n_top:]][:, None], np.array([aux_rest]), n_rest
            )
            sse[j] = float(got[:n_top].sum()) + float(est[0])
            # rel is the NRMSE's relative error for the sampled stratum's total alone; scale it to the tensor's
            rse[j] = float(rel[0]) * (float(est[0]) / sse[j] if sse[j] > 0 else 0.0)
            if 3 * rse[j] <= NRMSE_REL_BOUND:
                break
            grow = min(16.0, max(2.0, 1.25 * (3 * rse[j] / NRMSE_REL_BOUND) ** 2))
            m = int((done - n_top) * grow)
            want = n if m >= 0.8 * n_rest else n_top + m
        taken = max(taken, done)
    return sse, rse, taken


def _worst_matrix(x: np.ndarray, per: np.ndarray) -> np.ndarray:
    """[worst NRMSE over the matrices (experts) of a 3-D tensor], from their SSEs `per`."""
    norm = np.sum(np.square(x, dtype=np.float64), axis=(1, 2))
    ratio = np.where(norm > 0, per / np.where(norm > 0, norm, 1.0), 0.0)
    return np.array([math.sqrt(float(ratio.max()))])


def _gguf_role(name: str, hf: list[str], ndim: int, rules: list) -> tuple[str, int]:
    if hf:
        return tensor_role(hf[0], ndim, rules), layer_index(hf[0])
    m = _GGUF_LAYER.match(name)
    return tensor_role(name, ndim, rules), int(m.group(1)) if m else -1


def profile_gguf(
    gguf_path: Path,
    ckpt: Checkpoint,
    cfg: ProfileConfig,
    imatrix: Any = None,
    progress: bool = True,
    threads: int = 1,
) -> Profile:
    """The GGUF profile of `gguf_path` (a bf16 GGUF of `ckpt`): per tensor, per GGUF option, the bytes the
    tensor occupies in the file (padded to the alignment) and the error of ggml's quantize/dequantize with the
    tensor's imatrix weights (`imatrix`: an imatrix.ImatrixFile, or None), one tensor at a time."""
    import gguf
    from tqdm import tqdm

    from mintbuild.formats import GGUF_PASSTHROUGH, gguf_option_set, gguf_padded
    from mintbuild.llamacpp.imatrix import quantize_weights
    from mintbuild.llamacpp.layout import quantized_header_bytes
    from mintbuild.llamacpp.names import gguf_to_hf, hf_to_gguf

    opts = gguf_option_set(list(cfg.gguf_option_list) if cfg.gguf_option_list else cfg.gguf_options)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields["general.architecture"].contents()
    n_blocks_field = reader.fields.get(f"{arch}.block_count")
    n_blocks = int(n_blocks_field.contents()) if n_blocks_field is not None else 0
    tensors = list(reader.tensors)
    if not tensors:
        raise MintError(f"{gguf_path}: the GGUF holds no tensors")
    hf_of = gguf_to_hf(hf_to_gguf(ckpt.names, arch, n_blocks, [t.name for t in tensors]))
    rules = compile_rules([(r.role, r.pattern) for r in cfg.role_rules])
    tied = bool(ckpt.config.get("tie_word_embeddings", False)) and "output.weight" not in hf_of
    k16 = len(opts) - 1
    cols = _new_columns(len(tensors), len(opts))
    metas: list[dict[str, Any]] = []
    total = sum(int(t.n_elements) for t in tensors)
    n_layers = max((layer_index(n) for n in ckpt.names), default=-1) + 1
    t0 = time.perf_counter()
    bar = tqdm(total=total, unit="param", unit_scale=True, disable=not progress, desc="profile gguf")
    for i, t in enumerate(tensors):
        shape = tuple(int(s) for s in reversed(t.shape))
        source = t.tensor_type.name
        hf = hf_of.get(t.name, [])
        role, layer = _gguf_role(t.name, hf, len(shape), rules)
        quantizable = (
            len(shape) >= 2
            and source == GGUF_PASSTHROUGH.name
            and t.name.endswith("weight")
            and role not in PASSTHROUGH_ROLES
            and not any(s in t.name for s in GGUF_NEVER_QUANTIZED)
        )
        x = gguf_values(t)
        norm_sq = float(np.sum(np.square(x, dtype=np.float64)))
        if not math.isfinite(norm_sq):
            raise MintError(f"{gguf_path}: tensor {t.name!r} has a non-finite value; fix the checkpoint")
        cols["elements"][i] = int(t.n_elements)
        cols["norm_sq"][i] = norm_sq
        cols["sampled_elements"][i] = int(t.n_elements)
        _fill(cols, i, k16, gguf_padded(int(t.n_bytes)), np.array([0.0]), np.array([0.0]), None, norm_sq)
        reasons: dict[str, str] = {}
        weights = quantize_weights(imatrix, t.name) if imatrix is not None and quantizable else None
        usable: list[int] = []
        for k, o in enumerate(opts[:-1]):
            why = o.unavailable_reason(shape)
            if not quantizable:
                why = f"{source} {len(shape)}-D tensor, role {role}: llama-quantize keeps it as the converter wrote it"
            if why:
                reasons[o.name] = why
            else:
                usable.append(k)
        if usable and len(shape) == 2 and int(t.n_elements) > cfg.sample_above:
            w = None if weights is None else weights[0]
            sse, rse, taken = gguf_sampled_sse(t.name, x, [opts[k].name for k in usable], w, cfg, threads)
            cols["sampled_elements"][i] = taken * shape[-1]
            for j, k in enumerate(usable):
                nb = gguf_padded(opts[k].nbytes(shape))
                _fill(cols, i, k, nb, sse[j : j + 1], rse[j : j + 1], None, norm_sq)
        else:
            for k in usable:
                sse, per = gguf_sse(x, opts[k].name, weights, threads)
                worst = _worst_matrix(x, per) if len(shape) == 3 and shape[0] > 1 else None
                nb = gguf_padded(opts[k].nbytes(shape))
                _fill(cols, i, k, nb, np.array([sse]), np.array([0.0]), worst, norm_sq)
        metas.append({
            "name": t.name,
            "shape": list(shape),
            "dtype": source,
            "gguf_type": source,
            "role": role,
            "layer": layer,
            "elements": int(t.n_elements),
            "quantizable": quantizable,
            "file": gguf_path.name,
            "hf_name": hf[0] if hf else None,
            "hf_names": hf,
            "imatrix": weights is not None,
            "tied_to": ["output.weight"] if tied and role == "embedding" else [],
            "last_layer": layer == n_layers - 1 and layer >= 0,
            "unavailable": reasons,
        })  # fmt: skip
        del x
        bar.update(int(t.n_elements))
    bar.close()
    seconds = time.perf_counter() - t0
    header = quantized_header_bytes(reader, imatrix)
    data = int(cols["bytes"][:, k16].sum())
    file_bytes = Path(gguf_path).stat().st_size
    if gguf_padded(int(reader.data_offset)) + data != file_bytes:
        raise MintError(
            f"{gguf_path}: {file_bytes:,} B, but its header {reader.data_offset:,} B + padded tensors {data:,} B "
            "differ: the profile's bytes would not add up to the file"
        )
    provenance = {
        "checkpoint_hash": sha256_file(gguf_path),
        "model_fingerprint": fingerprint(ckpt),
        "model_folder": ckpt.folder.name,
        "gguf_file": Path(gguf_path).name,
        "gguf_architecture": arch,
        "options": [o.name for o in opts],
        "quantizer": f"ggml {_ggml_version()}",
        "mintbuild_version": __version__,
        "profile_config": {
            k: v for k, v in as_dict(cfg).items() if k in ("gguf_options", "gguf_option_list", "gguf_imatrix")
        },
        "imatrix": bool(imatrix is not None),
        "model_config": {k: ckpt.config.get(k) for k in _CONFIG_KEYS if k in ckpt.config},
    }
    provenance["profile_hash"] = xxhash.xxh3_128(canonical_json(provenance).encode()).hexdigest()
    summary = {
        "tensors": len(metas),
        "parameters": int(total),
        "bytes_16bit": data,
        "sampled_tensors": int((cols["sampled_elements"] < cols["elements"]).sum()),
        "max_nrmse_rse": float(cols["nrmse_rse"].max()) if cols["nrmse_rse"].size else 0.0,
        "header_bytes": header,
        "source_header_bytes": int(reader.data_offset),
    }
    log.info(
        "profiled %d GGUF tensors x %d types, %.3g params in %.1f s (%.3g params/s); header %s B",
        len(metas), len(opts), total, seconds, total / max(seconds, 1e-9), f"{header:,}",
    )  # fmt: skip
    return Profile(metas, list(opts), cols, provenance, summary, format="gguf")


def _ggml_version() -> str:
    from mintbuild.llamacpp.build import build_name

    return build_name()


def run_gguf(
    convert_dir: Path,
    model_dir: Path,
    importance_dir: Path | None,
    cfg: ProfileConfig,
    out: Path,
    progress: bool = True,
) -> Profile | None:
    """Profile the convert stage's GGUF (with the importance stage's imatrix when `cfg.gguf_imatrix`) into
    `out`: profile.safetensors, summary.md, and imatrix.gguf (llama.cpp's file, which pack hands to
    llama-quantize)."""
    import os

    from mintbuild.artifacts.convert import DISABLED, GGUF_FILE, is_disabled, load_convert
    from mintbuild.artifacts.importance import load_importance, load_input_squares
    from mintbuild.llamacpp.imatrix import IMATRIX_GGUF, gguf_entries, read_imatrix, write_imatrix

    if is_disabled(convert_dir):  # no GGUF target: a note for DVC, no profile
        with atomic_dir(out) as tmp:
            (tmp / DISABLED_FILE).write_text(canonical_json({"enabled": False, "note": DISABLED}))
        log.info("convert.enabled is false: no GGUF profile (%s)", out / DISABLED_FILE)
        return None
    doc = load_convert(convert_dir)
    ckpt = open_checkpoint(model_dir)
    fp = fingerprint(ckpt)
    if doc["provenance"]["model_fingerprint"] != fp:
        raise MintError(
            f"{convert_dir}: converted from another model than {model_dir} (fingerprint "
            f"{doc['provenance']['model_fingerprint']} != {fp}); re-run `mintbuild convert`"
        )
    gguf_path = Path(convert_dir) / GGUF_FILE
    threads = max(1, min(4, os.cpu_count() or 1))
    with atomic_dir(out) as tmp:
        imatrix = None
        if cfg.gguf_imatrix:
            if importance_dir is None:
                raise MintError("profile.gguf_imatrix is true but no importance folder was given")
            imp = load_importance(importance_dir)
            if imp.get("provenance", {}).get("model_fingerprint") != fp:
                raise MintError(f"{importance_dir}: measured on another model than {model_dir}; re-run it")
            squares = load_input_squares(importance_dir)
            import gguf

            reader = gguf.GGUFReader(str(gguf_path))
            shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in reader.tensors}
            arch = doc["gguf"]["architecture"]
            entries = gguf_entries(squares, arch, int(doc["gguf"]["block_count"]), shapes)
            prov = imp.get("provenance", {})
            dataset = (
                f"mintbuild importance: train split sha256 {str(prov.get('corpus_train_sha256', ''))[:16]}"
            )
            chunks = max(1, round(max(squares.counts.values()) / max(squares.chunk_size, 1)))
            write_imatrix(tmp / IMATRIX_GGUF, entries, chunks, squares.chunk_size, [dataset])
            del reader
            imatrix = read_imatrix(tmp / IMATRIX_GGUF)
            log.info("wrote %s: %d entries from the importance stage's %d tokens", IMATRIX_GGUF, len(entries),
                     max(squares.counts.values()))  # fmt: skip
        prof = profile_gguf(gguf_path, ckpt, cfg, imatrix, progress, threads)
        if imatrix is not None:
            prof.provenance["imatrix_sha256"] = sha256_file(tmp / IMATRIX_GGUF)
        prof.save(tmp)
    return prof


# --- stage ------------------------------------------------------------------------------------------------


def run(model_dir: Path, cfg: ProfileConfig, out: Path, progress: bool = True) -> Profile:
    ckpt = open_checkpoint(model_dir)
    if ckpt.config.get("quantization_config"):
        raise MintError(f"{model_dir}/config.json has a quantization_config: the checkpoint is pre-quantized")
    prof = profile_checkpoint(ckpt, cfg, progress)
    with atomic_dir(out) as tmp:
        prof.save(tmp)
    return prof


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument(
        "--format",
        choices=("mlx", "gguf"),
        default="mlx",
        help="mlx: MLX options of the checkpoint (default); gguf: ggml types of the convert stage's GGUF",
    )
    p.add_argument(
        "--model", help="checkpoint folder or .safetensors file (default: the equalize stage's output)"
    )
    p.add_argument(
        "--out", help="output folder (default: profile.out, or profile.gguf_out with --format gguf)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    model_dir = Path(args.model) if args.model else resolve_weights_dir(Path(params.equalize.out))
    if args.format == "gguf":
        run_gguf(
            Path(params.convert.out),
            model_dir,
            Path(params.importance.out),
            params.profile,
            Path(args.out or params.profile.gguf_out),
            progress=not args.no_progress,
        )
        return
    run(model_dir, params.profile, Path(args.out or params.profile.out), progress=not args.no_progress)
