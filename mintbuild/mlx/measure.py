"""The MLX profile's measurement: one streaming CPU pass over a checkpoint, no data.

For every tensor: its role, whether it may be quantized, and for every storage option of the option set the
exact packed bytes (formats.py) and the error of MLX affine round-to-nearest (sum of squared error, NRMSE, SQNR),
measured with the fused kernels of mintbuild.mlx.quant, bit-exact with the quantizer the packer uses. Tensors
above `sample_above` elements are measured on a sample (mintbuild.sampling) whose relative standard error is
recorded; sizes are always exact. A helper thread reads and hashes tensor i + 1 while tensor i is measured;
memory is the two tensors in flight and their float32 chunks (CHUNK_ELEMENTS).

One job: the MLX measurement of every tensor (statistics, the sampled estimate, the streaming pass).
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from mintbuild import __version__
from mintbuild.artifacts.profile import (
    CONFIG_KEYS,
    Profile,
    fill_option,
    new_columns,
    nrmse_of,
)
from mintbuild.cluster import Executor, Resources, batches, executor
from mintbuild.config import ProfileConfig, as_dict
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
from mintbuild.io import canonical_json
from mintbuild.mlx.quant.reference import QUANTIZER_VERSION
from mintbuild.sampling import NRMSE_REL_BOUND, TAKE_ALL, estimate_total

log = logging.getLogger(__name__)


#: Rows of a large tensor converted to float32 at a time (bounds peak memory to ~64 MB per chunk).
CHUNK_ELEMENTS = 1 << 24


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
        est, rel = estimate_total(col[n_top:], aux[order[n_top:want]][:, cj], aux_rest[cj], n_rest)
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
        return nrmse_of(sse, norm_sq)
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
    from mintbuild.progress import progress as reporter

    opts = option_set(list(cfg.option_list) if cfg.option_list else cfg.options)
    rules = compile_rules([(r.role, r.pattern) for r in cfg.role_rules])
    skip = tied_lm_head(ckpt)
    tied = bool(ckpt.config.get("tie_word_embeddings", False))
    names = [n for n in ckpt.names if n != skip]
    if not names:
        raise MintError(f"{ckpt.folder}: the checkpoint holds no tensors")
    n_layers = max((layer_index(n) for n in names), default=-1) + 1
    cols = new_columns(len(names), len(opts))
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
    bar = reporter(total, "profile", "param", progress, unit_scale=True)
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
            bar.set_postfix_str(f"{i + 1}/{len(names)} tensors")
            bar.update(info.numel)
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
    metas: list[dict[str, Any]] = []
    hashes: list[str] = []
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
    cols = new_columns(len(names), len(opts))
    metas, hashes = [], []
    for i, name in enumerate(names):
        t, digest = _read_and_hash(ckpt, name)
        metas.append(_profile_one(i, ckpt.tensors[name], t, opts, rules, cfg, cols))
        hashes.append(digest)
    return metas, hashes, cols


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
    fill_option(
        cols, i, k16, PASSTHROUGH.nbytes(info.shape), np.array([err16]), np.array([0.0]), None, norm_sq
    )
    if usable:
        sse, worst, rse, sampled = measure_quantized(info, x, t.dtype, usable, norm_sq, cfg)
        cols["sampled_elements"][i] = sampled.max()  # the largest of the options' samples
        for j, o in enumerate(usable):
            k = opts.index(o)
            fill_option(
                cols, i, k, o.nbytes(info.shape), sse[j : j + 1], rse[j : j + 1], worst[j : j + 1], norm_sq
            )
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
        "model_config": {k: ckpt.config.get(k) for k in CONFIG_KEYS if k in ckpt.config},
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
