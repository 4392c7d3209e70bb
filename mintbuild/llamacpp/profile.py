"""tmp"""

from __future__ import annotations

import logging
import math
import re
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from mintbuild import __version__
from mintbuild.artifacts.profile import (
    CONFIG_KEYS,
    Profile,
    fill_option,
    new_columns,
)
from mintbuild.config import ProfileConfig, as_dict
from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import (
    PASSTHROUGH_ROLES,
    Checkpoint,
    compile_rules,
    fingerprint,
    layer_index,
    tensor_role,
)
from mintbuild.io import canonical_json, sha256_file
from mintbuild.sampling import NRMSE_REL_BOUND, TAKE_ALL, estimate_total

log = logging.getLogger(__name__)


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
    are within NRMSE_REL_BOUND; ratio estimator on the auxiliary (`estimate_total`)."""
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
            est, rel = estimate_total(
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

    from mintbuild.formats import GGUF_PASSTHROUGH, gguf_option_set, gguf_padded
    from mintbuild.llamacpp.imatrix import quantize_weights
    from mintbuild.llamacpp.layout import quantized_header_bytes
    from mintbuild.llamacpp.names import gguf_to_hf, hf_to_gguf
    from mintbuild.progress import progress as reporter

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
    cols = new_columns(len(tensors), len(opts))
    metas: list[dict[str, Any]] = []
    total = sum(int(t.n_elements) for t in tensors)
    n_layers = max((layer_index(n) for n in ckpt.names), default=-1) + 1
    t0 = time.perf_counter()
    bar = reporter(total, "profile gguf", "param", progress, unit_scale=True)
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
        fill_option(
            cols, i, k16, gguf_padded(int(t.n_bytes)), np.array([0.0]), np.array([0.0]), None, norm_sq
        )
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
                fill_option(cols, i, k, nb, sse[j : j + 1], rse[j : j + 1], None, norm_sq)
        else:
            for k in usable:
                err_sq, per = gguf_sse(x, opts[k].name, weights, threads)
                worst = _worst_matrix(x, per) if len(shape) == 3 and shape[0] > 1 else None
                nb = gguf_padded(opts[k].nbytes(shape))
                fill_option(cols, i, k, nb, np.array([err_sq]), np.array([0.0]), worst, norm_sq)
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
        bar.set_postfix_str(f"{i + 1}/{len(tensors)} tensors")
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
        "model_config": {k: ckpt.config.get(k) for k in CONFIG_KEYS if k in ckpt.config},
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
