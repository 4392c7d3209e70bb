"""GGUF rows of the quality benchmark: llama.cpp's stock mixes against mintbuild at each mix's exact file size.

Stock rows are what a llama.cpp user makes: llama.cpp's own converter (`convert_hf_to_gguf.py`, bf16) on the
*original* model (the model stage's weights, not the equalized ones), then `llama-quantize` with a stock mix
(Q3_K_M, Q4_K_M, Q5_K_M), once with the imatrix and once without. The imatrix is mintbuild's: the importance
stage's per-input-channel sums of x^2 on its calibration windows, which the GGUF profile writes in llama.cpp's
format (artifacts/profile_gguf/imatrix.gguf). Those sums were measured on the equalized model, whose linears see
x_c / s_c where the original sees x_c (equalize multiplies input column c by a power of two s_c and folds 1/s_c
into the producer); so for the original model each channel's sum is multiplied by s_c^2, with s_c read off the
two bf16 GGUFs (every column of the equalized tensor must be exactly s_c times the original's, s_c a power of two:
checked). That is the imatrix the same calibration gives on the original model, to the last bit (power-of-two
scaling is exact in floating point).

mintbuild rows: the build's GGUF profile (the equalized model's bf16 GGUF, errors by ggml's round trip with the
imatrix), the exact solver with the fisher objective at a budget of exactly the stock file's bytes (header
included), packed by `mintbuild pack` (llama-quantize with a per-tensor type file and the imatrix); the packed
file is checked to be no larger than the stock file. Stock files with and without the imatrix differ only by a
few header bytes, so the two allocations are usually identical: an identical allocation is packed and scored
once and its row says so.

Every GGUF is scored twice: by our evaluator through gguf_source (ggml's own dequantization) on the benchmark's
windows, the numbers every other row of the benchmark has; and by llama-perplexity on the split's text in
chunks of the window length, as many as there are windows, with our evaluator on exactly its chunks beside it
(mintbuild.llamacpp.perplexity: their relative difference and its tolerance).
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mintbuild.artifacts.allocation import write_allocation
from mintbuild.artifacts.convert import GGUF_FILE, load_convert
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.artifacts.profile import Profile, load_profile
from mintbuild.budget import format_size
from mintbuild.config import ConvertConfig, Params, SolverConfig, TargetConfig
from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.io import sha256_file
from mintbuild.llamacpp.imatrix import IMATRIX_GGUF, Entry, read_imatrix, write_imatrix
from mintbuild.stages.allocate import allocate_target

log = logging.getLogger("quality.gguf")

#: llama.cpp's stock mixes of the issue, smallest first.
DEFAULT_MIXES = ["Q3_K_M", "Q4_K_M", "Q5_K_M"]
#: Known llama-quantize mix names this benchmark accepts (a typo fails before any work).
KNOWN_MIXES = frozenset({
    "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M", "IQ3_XS", "IQ3_XXS",
})  # fmt: skip
STOCK_SERIES = {True: "llama.cpp stock + imatrix", False: "llama.cpp stock, no imatrix"}
OURS_SERIES = "mintbuild GGUF (exact, fisher)"
SERIES = (*STOCK_SERIES.values(), OURS_SERIES)
#: Goal of issue 17: mintbuild's PPL below the stock mix's at its size by at least this fraction.
GOALS = {"Q3_K_M": 0.08, "Q4_K_M": 0.03}
#: Goal of issue 31: at Q3_K_M's size and below, mintbuild removes at least this share of the stock mix's
#: quantization loss (its PPL over the 16-bit model's): (stock - mintbuild) / (stock - 16-bit).
SHARE_GOAL = 0.5
SHARE_GOAL_MIXES = frozenset({"Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "IQ3_S", "IQ3_M", "IQ3_XS", "IQ3_XXS"})
#: How each GGUF is scored: "both" (our evaluator on the benchmark's windows, and llama-perplexity with ours on
#: its chunks) or "llama" (llama-perplexity alone: our float32 evaluator takes ~10 min per GGUF of a 1.5B model
#: at 16 x 512 tokens on 2 cores, llama-perplexity a few).
SCORERS = ("both", "llama")
#: llama-quantize's per-tensor warning when a row is not a multiple of the type's block (it then stores another
#: type): "ncols 576 not divisible by 256 (required for type q3_K)".
_FALLBACK = re.compile(r"ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(\w+)\)")


class BenchLike(Protocol):
    """What the GGUF rows use of quality.Bench."""

    params: Params
    work: Path
    tokens: np.ndarray
    windows: Any
    parameters: int


@dataclass
class Measured:
    """One GGUF row (quality.py turns it into its Row, format gguf)."""

    series: str
    label: str
    ref: str
    bytes: int
    ppl_mean: float = math.nan
    ppl_median: float = math.nan
    llama_ppl: float = math.nan
    seconds: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scored:
    ppl_mean: float
    ppl_median: float
    llama: dict[str, Any]
    seconds: dict[str, float]


def parse_mixes(spec: str) -> list[str]:
    """'Q3_K_M,Q4_K_M' -> the mixes; 'none' or '' -> []."""
    if spec.strip().lower() in ("", "none"):
        return []
    mixes = [m.strip().upper() for m in spec.split(",") if m.strip()]
    unknown = [m for m in mixes if m not in KNOWN_MIXES]
    if unknown:
        raise MintError(f"unknown llama.cpp mix(es) {unknown}; e.g. {', '.join(DEFAULT_MIXES)} (or none)")
    return mixes


# ---------------------------------------------------------------- sources: the original conversion and its imatrix


def check_inputs(params: Params) -> tuple[Path, Path]:
    """(the build's bf16 GGUF of the equalized model, the imatrix the GGUF profile wrote), or a clear error."""
    try:
        doc = load_convert(Path(params.convert.out))
    except MintError as e:
        raise MintError(f"GGUF rows need the convert stage's GGUF ({e}); set convert.enabled: true and run "
                        "`dvc repro convert profile_gguf`, or pass --gguf none") from None  # fmt: skip
    imatrix = Path(params.profile.gguf_out) / IMATRIX_GGUF
    if not imatrix.is_file():
        raise MintError(f"{imatrix}: no imatrix from the GGUF profile (profile.gguf_imatrix: true and "
                        "`dvc repro profile_gguf`), needed by the stock rows with an imatrix")  # fmt: skip
    return Path(params.convert.out) / doc["gguf"]["file"], imatrix


def convert_original(params: Params, out: Path) -> tuple[Path, float]:
    """llama.cpp's converter on the model stage's (unequalized) weights: what a llama.cpp user starts from."""
    from mintbuild.stages.convert import convert

    t0 = time.perf_counter()
    weights = resolve_weights_dir(Path(params.model.out))
    convert(weights, ConvertConfig(enabled=True, outtype=params.convert.outtype, out=str(out)), out)
    return out / GGUF_FILE, time.perf_counter() - t0


def _float_tensors(path: Path) -> dict[str, Any]:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _values(t: Any) -> np.ndarray:
    """A GGUF tensor's float32 values (numpy shape: rows last), by ggml's own to_float."""
    from mintbuild.llamacpp import ggml

    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    return ggml.dequantize(np.asarray(t.data), t.tensor_type.name, shape)


def channel_scales(equalized: np.ndarray, original: np.ndarray, name: str) -> np.ndarray:
    """s [n_mat, n_in] with equalized[..., c] == s_c * original[..., c] exactly per matrix, each s_c a power of
    two (1 for a column that is zero in both); anything else is refused: the models are not an exact rewrite."""
    s = _column_scales(equalized, original, name)
    if s is None:
        raise MintError(f"{name}: the equalized tensor is not the original with columns scaled by powers of two; "
                        "the imatrix cannot be carried over exactly")  # fmt: skip
    return s


def _column_scales(equalized: np.ndarray, original: np.ndarray, name: str) -> np.ndarray | None:
    n_in = original.shape[-1]
    if equalized.shape != original.shape:
        raise MintError(f"{name}: shapes differ between the equalized ({list(equalized.shape)}) and original "
                        f"({list(original.shape)}) GGUFs")  # fmt: skip
    n_mat = original.shape[0] if original.ndim == 3 else 1
    a = equalized.reshape(n_mat, -1, n_in).astype(np.float64)
    b = original.reshape(n_mat, -1, n_in).astype(np.float64)
    amax, bmax = np.abs(a).max(axis=1), np.abs(b).max(axis=1)
    if np.any((bmax == 0) != (amax == 0)):
        return None
    s = np.where(bmax > 0, amax / np.where(bmax > 0, bmax, 1), 1.0)
    mant, _ = np.frexp(s)
    if np.any(mant != 0.5) or not np.array_equal(a, b * s[:, None, :]):
        return None
    return s


def row_and_column_scales(
    equalized: np.ndarray, original: np.ndarray, columns: np.ndarray, name: str
) -> None:
    """Check equalized == diag(r) @ original @ diag(columns) exactly, r powers of two (a tensor whose output
    rows feed another equalized linear, e.g. v and up, with the input scaling its sibling has)."""
    if original.ndim != 2 or columns.shape[0] != 1:
        raise MintError(
            f"{name}: rows and columns both rescaled in a {original.ndim}-D tensor; not carried over"
        )
    channel_scales(equalized.T, (original.astype(np.float64) * columns[0]).T, f"{name} (rows)")


def original_imatrix(imatrix: Path, equalized: Path, original: Path, out: Path) -> dict[str, Any]:
    """The imatrix of `imatrix` (measured on the equalized model) in the original model's coordinates: each
    channel's sum times s_c^2, s_c the input column's power-of-two factor. A tensor whose rows are rescaled too
    (its output feeds another equalized linear) takes s from a sibling that reads the same input (identical
    statistics in the imatrix) and is checked to be exactly diag(r) W diag(s). Returns what was rescaled."""
    im = read_imatrix(imatrix)
    eq, orig = _float_tensors(equalized), _float_tensors(original)
    scales: dict[str, np.ndarray] = {}
    pending = []
    for name in sorted(im.sums):
        if name not in eq or name not in orig:
            raise MintError(f"{imatrix}: entry {name} is not a tensor of both bf16 GGUFs")
        s = _column_scales(_values(eq[name]), _values(orig[name]), name)
        if s is None:
            pending.append(name)
        else:
            scales[name] = s

    def key(n: str) -> bytes:
        return im.sums[n].tobytes() + im.counts[n].tobytes()

    by_input = {key(n): n for n in sorted(scales)}
    for name in pending:
        sibling = by_input.get(key(name))
        if sibling is None:
            raise MintError(f"{name}: the equalized tensor is not a power-of-two column scaling of the original "
                            "and no other linear reads the same input: the imatrix cannot be carried over")  # fmt: skip
        row_and_column_scales(_values(eq[name]), _values(orig[name]), scales[sibling], name)
        scales[name] = scales[sibling]
    entries, scaled, channels = {}, 0, 0
    for name, sums in sorted(im.sums.items()):
        s = scales[name]
        if s.shape != sums.shape:
            raise MintError(
                f"{imatrix}: {name} has statistics {list(sums.shape)}, the tensor {list(s.shape)}"
            )
        entries[name] = Entry(sums.astype(np.float64) * s * s, im.counts[name].astype(np.float64))
        channels += s.size
        scaled += int(np.count_nonzero(s != 1))
    write_imatrix(out, entries, im.chunk_count, im.chunk_size, im.datasets)
    log.info("imatrix for the original model: %d of %d channels rescaled by the equalization (%d tensors, %d "
             "with rows rescaled too)", scaled, channels, len(entries), len(pending))  # fmt: skip
    return {"tensors": len(entries), "channels": channels, "rescaled_channels": scaled,
            "rows_rescaled_tensors": len(pending), "chunk_count": im.chunk_count, "chunk_size": im.chunk_size,
            "datasets": im.datasets}  # fmt: skip


# ---------------------------------------------------------------- scoring a GGUF


def tensor_types(path: Path) -> dict[str, int]:
    """{ggml type: tensors} of a GGUF file."""
    import gguf

    count = Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors)
    return dict(sorted(count.items(), key=lambda kv: (-kv[1], kv[0])))


def quantized_types(types: dict[str, int]) -> str:
    """'IQ4_NL 150, Q3_K 30, Q6_K 1' (F32 norms left out)."""
    return ", ".join(f"{k} {v}" for k, v in types.items() if k != "F32")


def _text(bench: BenchLike) -> str:
    p = bench.params
    return (Path(p.corpus.out) / f"{p.eval.split}.txt").read_text(encoding="utf-8")


def llama_only(bench: BenchLike, path: Path) -> Scored:
    """llama-perplexity alone on the split's text, as many chunks of the window length as there are windows."""
    from mintbuild.llamacpp.perplexity import TOLERANCE, run_llama_perplexity

    w = bench.windows
    run = run_llama_perplexity(path, _text(bench), w.length, len(w.starts), bench.params.eval.threads)
    llama = {"ppl": run.ppl, "ppl_stderr": run.ppl_stderr, "chunks": run.chunks, "ctx": run.ctx,
             "scored_tokens": run.scored_tokens, "ours_same_chunks": None, "rel_diff": None,
             "tolerance": TOLERANCE}  # fmt: skip
    return Scored(math.nan, math.nan, llama, {"llama_perplexity_seconds": run.seconds})


def score_gguf(bench: BenchLike, path: Path, config: dict[str, Any], scorer: str = "both") -> Scored:
    """Our PPL on the benchmark's windows (gguf_source, layer-streamed) and llama-perplexity's on the split's
    text with ours on its chunks; with scorer "llama", llama-perplexity's alone (`llama_only`)."""
    from mintbuild.hf.evaluator import perplexity, setup_torch
    from mintbuild.hf.streaming import StreamedModel
    from mintbuild.llamacpp.perplexity import compare
    from mintbuild.llamacpp.source import GGUFSource
    from mintbuild.stages.evaluate_gguf import check_bos

    if scorer == "llama":
        return llama_only(bench, path)
    p = bench.params
    dtype = setup_torch(p.eval)
    source = GGUFSource(path, config)
    check_bos(source, Path(p.model.out))
    model = StreamedModel(source, dtype)
    scores, t = perplexity(model, bench.tokens, bench.windows, progress=False)
    w = bench.windows
    lp, lt = compare(model, path, _text(bench), bench.tokens.tolist(), list(w.prefix), w.length, len(w.starts),
                     p.eval.threads)  # fmt: skip
    return Scored(scores["ppl_mean"], scores["ppl_median"], lp, {"ours_seconds": t["seconds"], **lt})


def _llama_extra(s: Scored) -> dict[str, Any]:
    keep = (
        "ppl",
        "ppl_stderr",
        "chunks",
        "ctx",
        "scored_tokens",
        "ours_same_chunks",
        "rel_diff",
        "tolerance",
    )
    return {"llama_perplexity": {k: s.llama[k] for k in keep}, "score_seconds": s.seconds}


# ---------------------------------------------------------------- the rows


def stock_row(bench: BenchLike, original: Path, mix: str, imatrix: Path | None, config: dict[str, Any],
              out: Path, scorer: str = "both") -> Measured:  # fmt: skip
    """llama-quantize `mix` (with `imatrix` or without) on the original bf16 GGUF, scored."""
    from mintbuild.llamacpp.build import run_tool

    args: list[Any] = ["--imatrix", imatrix] if imatrix else []
    args += [original, out, mix]
    if bench.params.eval.threads:
        args.append(bench.params.eval.threads)
    t0 = time.perf_counter()
    proc = run_tool("llama-quantize", args)
    seconds = time.perf_counter() - t0
    fallbacks = Counter(t.upper() for t in _FALLBACK.findall(proc.stdout + proc.stderr))
    size = out.stat().st_size
    types = tensor_types(out)
    s = score_gguf(bench, out, config, scorer)
    label = f"{mix}{' + imatrix' if imatrix else ''}"
    m = Measured(STOCK_SERIES[imatrix is not None], label, "", size, s.ppl_mean, s.ppl_median, s.llama["ppl"],
                 seconds, extra={"mix": mix, "imatrix": imatrix is not None, "tensor_types": types,
                                 "fallbacks": dict(fallbacks), "sha256": sha256_file(out), **_llama_extra(s)})  # fmt: skip
    log.info("%s: %s B (%s), PPL %.3f, llama-perplexity %s, %.0f s; fallbacks %s",
             label, f"{size:,}", quantized_types(types), s.ppl_mean, _llama_text(s.llama),
             time.perf_counter() - t0, dict(fallbacks) or "none")  # fmt: skip
    return m


@dataclass
class Ours:
    """The mintbuild side: the GGUF profile's knapsack, allocations already packed and scored."""

    profile: Profile
    problem: Any
    cfg: SolverConfig
    scorer: str = "both"
    done: dict[tuple[str, ...], Measured] = field(default_factory=dict)


def our_setup(bench: BenchLike, cfg: SolverConfig, scorer: str = "both") -> Ours:
    from mintbuild.knapsack import build_problem, load_importance

    profile = load_profile(Path(bench.params.profile.gguf_out))
    if profile.format != "gguf":
        raise MintError(f"{bench.params.profile.gguf_out}: a {profile.format} profile, not the GGUF profile")
    alpha = load_importance(Path(cfg.importance), profile) if cfg.objective == "fisher" else None
    return Ours(profile, build_problem(profile, cfg, alpha, None), cfg, scorer)


def our_row(bench: BenchLike, ours: Ours, ref: Measured, config: dict[str, Any]) -> Measured:
    """Allocate at exactly the stock file's bytes, pack with llama-quantize, check the file is no larger, score."""
    from mintbuild.stages.pack_gguf import pack_target

    name = re.sub(r"[^\w.-]+", "_", f"gguf@{ref.label}")
    alloc_root, pack_root = bench.work / "gguf_allocate", bench.work / "gguf_pack"
    t0 = time.perf_counter()
    try:
        doc, _, _ = allocate_target(ours.problem, name, TargetConfig(size=f"{ref.bytes}B", formats=["gguf"]),
                                    ours.cfg, ours.profile)  # fmt: skip
    except InfeasibleBudget as e:
        return Measured(OURS_SERIES, name, ref.label, 0, note=f"infeasible: {e}".split(";")[0])
    key = tuple(d["option"] for d in doc["decisions"])
    if key in ours.done:
        prev = ours.done[key]
        log.info("  %s: the allocation at %s B is %s's; not packed again", name, f"{ref.bytes:,}", prev.label)
        return Measured(OURS_SERIES, name, ref.label, prev.bytes, prev.ppl_mean, prev.ppl_median, prev.llama_ppl,
                        prev.seconds, note=f"same allocation as at {prev.ref}", extra=prev.extra)  # fmt: skip
    write_allocation(alloc_root / name, doc)
    res = pack_target(bench.params, name, out_root=pack_root, alloc_root=alloc_root)
    seconds = time.perf_counter() - t0
    path = pack_root / name / res.manifest["weights_file"]
    size = path.stat().st_size
    if size > ref.bytes:
        raise MintError(f"{name}: {size:,} B on disk exceeds the stock {ref.label}'s {ref.bytes:,} B")
    s = score_gguf(bench, path, config, ours.scorer)
    t = doc["totals"]
    m = Measured(OURS_SERIES, name, ref.label, size, s.ppl_mean, s.ppl_median, s.llama["ppl"], seconds,
                 extra={"tensor_types": res.manifest["tensor_types"], "objective": t["objective"],
                        "gap": t["gap"], "budget": ref.bytes, "pack_seconds": round(res.seconds, 2),
                        **_llama_extra(s)})  # fmt: skip
    ours.done[key] = m
    shutil.rmtree(pack_root / name)
    log.info("  %s: %s B (%s), PPL %.3f, llama-perplexity %s, %.0f s", name, f"{size:,}",
             quantized_types(res.manifest["tensor_types"]), s.ppl_mean, _llama_text(s.llama),
             time.perf_counter() - t0)  # fmt: skip
    return m


def gguf_rows(
    bench: BenchLike, mixes: list[str], cfg: SolverConfig, scorer: str = "both", without_imatrix: bool = True
) -> tuple[list[Measured], dict[str, Any]]:
    """Every GGUF row (per mix: stock + imatrix, stock without unless not `without_imatrix`, mintbuild at each
    one's bytes) and the settings, with llama-perplexity of the original bf16 GGUF (the 16-bit reference of the
    share of loss removed)."""
    from mintbuild.artifacts.pack import read_config
    from mintbuild.llamacpp.build import build_name

    if not mixes:
        return [], {}
    if scorer not in SCORERS:
        raise MintError(f"GGUF scorer {scorer!r} is not one of {', '.join(SCORERS)}")
    p = bench.params
    equalized, imatrix = check_inputs(p)
    config = read_config(Path(p.model.out))
    work = bench.work / "gguf"
    work.mkdir(parents=True, exist_ok=True)
    original, convert_seconds = convert_original(p, work / "original")
    log.info("original model converted by llama.cpp's converter in %.1f s (%s)", convert_seconds,
             format_size(original.stat().st_size))  # fmt: skip
    im_original = work / "imatrix-original.gguf"
    im_record = original_imatrix(imatrix, equalized, original, im_original)
    bf16 = llama_only(bench, original).llama
    log.info("original bf16 GGUF: llama-perplexity %.4f", bf16["ppl"])
    ours = our_setup(bench, cfg, scorer)
    rows: list[Measured] = []
    for mix in mixes:
        for with_im in (True, False) if without_imatrix else (True,):
            out = work / f"{mix}{'-imatrix' if with_im else ''}.gguf"
            stock = stock_row(bench, original, mix, im_original if with_im else None, config, out, scorer)
            rows.append(stock)
            out.unlink()
            rows.append(our_row(bench, ours, stock, config))
    settings = {
        "llama_cpp": build_name(),
        "stock_source": "llama.cpp's converter on the model stage's (original, unequalized) weights, "
        f"{p.convert.outtype}",
        "ours_source": "the convert stage's GGUF (the equalized model)",
        "imatrix": {"file": str(imatrix), "sha256": sha256_file(imatrix), "original": im_record},
        "llama_perplexity_chunks": len(bench.windows.starts),
        "llama_perplexity_ctx": bench.windows.length,
        "llama_perplexity_16bit": {k: bf16[k] for k in ("ppl", "ppl_stderr", "chunks", "ctx")},
        "scorer": scorer,
        "threads": p.eval.threads,
        "solver": {"method": cfg.method, "objective": cfg.objective},
        "option_set": [o.name for o in ours.profile.options],
    }
    return rows, settings


# ---------------------------------------------------------------- goals and the markdown section


def goals(rows: list[Any], llama_16bit: float = math.nan) -> list[dict[str, Any]]:
    """Per stock row: mintbuild's PPL change against it (ours and llama-perplexity's; a goal for the mixes in
    GOALS) and the share of the stock mix's quantization loss that mintbuild removes at its bytes (the 16-bit
    PPL: the "16-bit" row for ours, `llama_16bit` for llama-perplexity; a goal for SHARE_GOAL_MIXES)."""
    ppl_16 = next((r.ppl_mean for r in rows if r.series == "16-bit"), math.nan)
    out = []
    for r in rows:
        mix = r.extra.get("mix") if r.series in STOCK_SERIES.values() else None
        if mix is None:
            continue
        g: dict[str, Any] = {"stock": r.label, "mix": mix}
        if mix in GOALS:
            g["goal_pct"] = -100 * GOALS[mix]
        if mix in SHARE_GOAL_MIXES:
            g["share_goal"] = SHARE_GOAL
        match = [o for o in rows if o.series == OURS_SERIES and o.ref == r.label and o.bytes]
        if not match:
            out.append({**g, "note": "no mintbuild row"})
            continue
        o = match[0]
        ours_pct, llama_pct = _change(o.ppl_mean, r.ppl_mean), _change(o.llama_ppl, r.llama_ppl)
        g.update({
            "stock_bytes": r.bytes, "ours_bytes": o.bytes,
            "ppl_change_pct": ours_pct, "llama_ppl_change_pct": llama_pct,
            "share_removed": _share(r.ppl_mean, o.ppl_mean, ppl_16),
            "share_removed_llama": _share(r.llama_ppl, o.llama_ppl, llama_16bit),
        })  # fmt: skip
        if "goal_pct" in g:
            g["met"] = None if ours_pct is None else ours_pct <= g["goal_pct"]
            g["met_llama"] = None if llama_pct is None else llama_pct <= g["goal_pct"]
        if "share_goal" in g:
            g["share_met"] = _at_least(g["share_removed"], SHARE_GOAL)
            g["share_met_llama"] = _at_least(g["share_removed_llama"], SHARE_GOAL)
        out.append(g)
    return out


def _change(ours: float, stock: float) -> float | None:
    """Ours over the stock file's PPL, in percent (None when either was not measured)."""
    return round(100 * (ours / stock - 1), 2) if math.isfinite(ours) and math.isfinite(stock) else None


def _share(stock: float, ours: float, base: float) -> float | None:
    """(stock - ours) / (stock - base): the share of the stock file's loss over `base` that ours removes (None
    when a figure is missing or the stock file loses nothing)."""
    if not all(math.isfinite(v) for v in (stock, ours, base)) or stock <= base:
        return None
    return round((stock - ours) / (stock - base), 4)


def _at_least(v: float | None, goal: float) -> bool | None:
    return None if v is None else v >= goal


def _pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.1f}%" if math.isfinite(a) and math.isfinite(b) else "-"


def markdown(rows: list[Any], settings: dict[str, Any], goal_list: list[dict[str, Any]]) -> list[str]:
    """The GGUF section of quality.md."""
    stock = [r for r in rows if r.series in STOCK_SERIES.values()]
    if not stock:
        return []
    im = settings["imatrix"]["original"]
    lines = [
        "## GGUF (llama.cpp): stock mixes against mintbuild at each mix's bytes",
        "",
        f"llama.cpp {settings['llama_cpp']}. Stock rows: `llama-quantize <mix>` on llama.cpp's own bf16 conversion "
        "of the **original** model (what a llama.cpp user starts from), with mintbuild's imatrix (the importance "
        f"stage's calibration, {im['chunk_count']} x {im['chunk_size']} tokens of the train split, in llama.cpp's "
        "format; carried to the original model's coordinates exactly: "
        f"{im['rescaled_channels']:,} of {im['channels']:,} channels rescaled by the equalization's powers of "
        "two) and without one. mintbuild rows: the equalized model's bf16 GGUF, allocated by the exact solver "
        "(fisher objective) at a budget of exactly the stock file's bytes, packed by llama-quantize with the "
        "same imatrix, never larger (checked). Bytes are whole files (header included); bits/weight = 8 x "
        "bytes / parameters. PPL (ours): our evaluator on the dequantized GGUF, the benchmark's windows (the "
        f"other rows' numbers); llama-perplexity: the tool on the split's first {settings['llama_perplexity_chunks']}"
        f" chunks of {settings['llama_perplexity_ctx']} tokens (second half of each scored); in brackets, our "
        "evaluator on those same chunks against it.",
        "",
        "| stock mix | bytes | bits/weight | tensor types (stock) | PPL (ours) | llama-perplexity | "
        "mintbuild bytes | tensor types (mintbuild) | mintbuild PPL (ours) | mintbuild llama-perplexity | "
        "change (ours) | change (llama-perplexity) |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in stock:
        o = next((x for x in rows if x.series == OURS_SERIES and x.ref == r.label), None)
        ob = o is not None and o.bytes > 0
        lines.append(
            f"| {r.label} | {r.bytes:,} | {r.bpw:.3f} | {quantized_types(r.extra['tensor_types'])} | "
            f"{r.ppl_mean:.3f} | {_llama_cell(r)} | {f'{o.bytes:,}' if ob else '-'} | "
            f"{quantized_types(o.extra['tensor_types']) if ob else (o.note if o else '-')} | "
            f"{f'{o.ppl_mean:.3f}' if ob else '-'} | {_llama_cell(o) if ob else '-'} | "
            f"{_pct(o.ppl_mean, r.ppl_mean) if ob else '-'} | {_pct(o.llama_ppl, r.llama_ppl) if ob else '-'} |"
        )
    if any(r.extra.get("fallbacks") for r in stock):
        lines += ["", "llama-quantize's fallbacks (a tensor whose rows are not a multiple of the type's block, 256 for "
                  "k-quants, gets another type; the types above are what the files hold): "
                  + "; ".join(f"{r.label}: " + ", ".join(f"{n} wanted {t}" for t, n in r.extra["fallbacks"].items())
                              for r in stock if r.extra.get("fallbacks")) + "."]  # fmt: skip
    lines += ["", *goal_lines(goal_list), ""]
    return lines


def _llama_cell(r: Any) -> str:
    lp = r.extra.get("llama_perplexity", {})
    return _llama_text({"ppl": r.llama_ppl, **lp}) if lp else "-"


def _llama_text(lp: dict[str, Any]) -> str:
    """'12.345 (+0.12%)': llama-perplexity's PPL and ours on its chunks against it (when ours ran)."""
    rel = lp.get("rel_diff")
    return f"{lp['ppl']:.3f}" + ("" if rel is None else f" ({100 * rel:+.2f}%)")


def goal_lines(goal_list: list[dict[str, Any]]) -> list[str]:
    lines = []
    for g in goal_list:
        if "note" in g:
            lines.append(f"- At {g['stock']}'s size: {g['note']}.")
            continue
        head = (
            f"- At {g['stock']}'s size ({g['stock_bytes']:,} B; mintbuild {g['ours_bytes']:,} B): PPL change "
        )
        head += f"{_fmt_pct(g['ppl_change_pct'])} (ours), {_fmt_pct(g['llama_ppl_change_pct'])} (llama-perplexity)"
        if "goal_pct" in g:
            head += f", goal {g['goal_pct']:+.0f}%: {_met(g['met'])} / {_met(g['met_llama'])}"
        head += (f"; share of the stock loss removed {_fmt_share(g['share_removed'])} (ours), "
                 f"{_fmt_share(g['share_removed_llama'])} (llama-perplexity)")  # fmt: skip
        if "share_goal" in g:
            head += (
                f", goal {100 * g['share_goal']:.0f}%: {_met(g['share_met'])} / {_met(g['share_met_llama'])}"
            )
        lines.append(head + ".")
    return lines


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}%"


def _fmt_share(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _met(v: bool | None) -> str:
    return "not measured" if v is None else ("met" if v else "not met")
