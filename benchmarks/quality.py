"""Quality benchmark: mintbuild against uniform MLX quantization, mlx-lm's mixed recipes and the published greedy,
at equal bytes, with one corpus, one set of windows and one evaluator for every row.

Reference rows are made by mlx-lm itself (`mlx_lm.convert`: uniform bits x group, and the recipes mixed_2_6,
mixed_3_4, mixed_3_6, mixed_4_6). For each reference, the budget is the byte size of its weight files, and at that
budget we allocate with the published one-pass greedy (objective nrmse), and with the proven-optimal `exact` solver
and each objective (nrmse = published, mse = data-free size-aware, fisher = calibrated default), pack with
`mintbuild pack` and score every folder with mintbuild's evaluator (dequantized into the transformers
architecture; the windows of `eval` in params.yaml). Every mintbuild row is checked to be at most the reference's
bytes. References quantize the model stage's weights; mintbuild rows those of the equalize stage (the same
16-bit function, rewritten so that round-to-nearest loses less; `equalize=none` compares like for like) and are
rounded as `pack.rounding` says (gptq: the output head by GPTQ; `pack=rtn`: round-to-nearest like mlx-lm).

Peer rows are mlx-lm's own calibrated quantizers (`--peers`: AWQ 4/g64, GPTQ 4/g64, dynamic_quant at each
uniform 4-bit reference's bits/weight or at `dynamic_quant@BPW`), run by benchmarks/peers.py in a child process
(MLX on a preloaded OpenBLAS) on the importance stage's calibration windows: the same train-split tokens, as
many as mintbuild's Fisher pass sees. Each peer folder is scored like a reference and mintbuild rows are
allocated at its exact bytes; the row's seconds are the peer's calibration time. DWQ is not a peer: see peers.py.

GGUF rows (`--gguf`, benchmarks/quality_gguf.py): llama.cpp's stock mixes (Q3_K_M, Q4_K_M, Q5_K_M by default) made
by llama-quantize from llama.cpp's own bf16 conversion of the original model, with mintbuild's imatrix and without,
against mintbuild GGUFs allocated at each stock file's exact bytes; every GGUF scored by our evaluator on the same
windows and by llama-perplexity (with ours on its chunks). `--gguf none` skips them.

Writes artifacts/quality/: quality.md (tables), quality.png (bytes vs PPL, one series per method, 16-bit line),
quality.json (every row, with its `format`: mlx, gguf or safetensors for the 16-bit model; the GGUF goal figures).
Needs the model, corpus, equalize, profile and importance stages, and for GGUF rows convert and profile_gguf
(`make quality` runs them).

Usage: .venv/bin/python benchmarks/quality.py [--params params.yaml] [--refs 4/64,mixed_4_6,...]
       [--methods greedy,nrmse,mse,fisher] [--importance extra.json:label ...] [--windows N] [--out DIR]
       [--peers awq,gptq,dynamic_quant[@BPW],... | none] [--gguf Q3_K_M,Q4_K_M,Q5_K_M | none]
       [--gguf-scorer both|llama] [--no-baseline] [--no-gguf-without-imatrix]
For a 1B+ model, `--refs none --peers none --gguf Q3_K_M,Q2_K --gguf-scorer llama --no-baseline
--no-gguf-without-imatrix` gives the GGUF rows and the share of the stock loss removed in minutes per mix.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import quality_gguf  # benchmarks/ (this script's folder) is on sys.path
import torch

from mintbuild.artifacts.allocation import write_allocation
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.artifacts.pack import read_config
from mintbuild.artifacts.profile import Profile, load_profile
from mintbuild.budget import format_size
from mintbuild.calibration.windows import load_tokenizer, sequence_prefix
from mintbuild.config import PUBLISHED_PRIORS, Params, SolverConfig, TargetConfig, load_params
from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.formats import Option
from mintbuild.hf.evaluator import (
    build_model,
    choose_windows,
    corpus_tokens,
    load_baseline,
    perplexity,
    setup_torch,
)
from mintbuild.io import atomic_dir, canonical_json
from mintbuild.knapsack import build_problem, load_importance, rounding_gains
from mintbuild.mlx.folder import dequantized_state
from mintbuild.stages.allocate import allocate_target
from mintbuild.stages.pack import pack_target

log = logging.getLogger("quality")

#: Uniform bits/group of the issue (4/128 is skipped when the model's shapes do not allow it) and mlx-lm's recipes.
DEFAULT_REFS = ["3/32", "3/64", "4/32", "4/64", "4/128", "5/64", "6/64", "8/64",
                "mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"]  # fmt: skip
#: Our rows: (label, solver method, objective).
METHODS = {
    "greedy": ("published greedy (nrmse)", "greedy", "nrmse"),
    "nrmse": ("exact, nrmse (published objective)", "exact", "nrmse"),
    "mse": ("exact, mse (data-free, size-aware)", "exact", "mse"),
    "fisher": ("exact, fisher (default)", "exact", "fisher"),
}
RECIPE_GROUP = 64  # mlx-lm's default group size for its recipes
#: mlx-lm's calibrated quantizers (benchmarks/peers.py); dynamic_quant at each uniform 4-bit reference's size.
DEFAULT_PEERS = ["awq", "gptq", "dynamic_quant"]
PEER_BITS, PEER_GROUP = 4, 64  # AWQ and GPTQ: mlx-lm's command-line defaults
PEERS_SCRIPT = Path(__file__).resolve().parent / "peers.py"
REFERENCE_SERIES = ("uniform (mlx-lm)", "mlx-lm recipe")
PEER_SERIES = "mlx-lm calibrated"
#: Rows that mintbuild rows are allocated against.
MATCHED_SERIES = (*REFERENCE_SERIES, PEER_SERIES)


@dataclass
class Row:
    series: str
    label: str
    ref: str
    bytes: int
    bpw: float
    ppl_mean: float = math.nan
    ppl_median: float = math.nan
    seconds: float = 0.0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: mlx (an MLX folder), gguf (a llama.cpp file) or safetensors (the 16-bit model)
    format: str = "mlx"
    #: llama-perplexity's PPL (GGUF rows) on the split's first chunks
    llama_ppl: float = math.nan


@dataclass
class Bench:
    params: Params
    work: Path
    tokens: np.ndarray
    windows: Any
    profile: Profile
    parameters: int
    scored: dict[str, tuple[float, float]] = field(default_factory=dict)

    def score(self, folder: Path) -> tuple[float, float, bool]:
        """(mean PPL, median PPL, reused) of a folder of MLX weights; identical weights are scored once."""
        digest = weights_digest(folder)
        if digest in self.scored:
            return (*self.scored[digest], True)
        config = read_config(folder)
        model = build_model(config, dequantized_state(folder, config), torch.float32)
        s, _ = perplexity(model, self.tokens, self.windows, progress=False)
        self.scored[digest] = (s["ppl_mean"], s["ppl_median"])
        return s["ppl_mean"], s["ppl_median"], False


def weights_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("model*.safetensors"))


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in weights_files(folder))


def weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in weights_files(folder):
        with p.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- reference rows (mlx-lm)


def parse_ref(spec: str) -> tuple[str, dict[str, Any]]:
    """'4/64' -> uniform 4-bit g64; 'mixed_4_6' -> mlx-lm's recipe. Returns (label, mlx_lm.convert kwargs)."""
    if spec.startswith("mixed_"):
        return spec, {"q_bits": 4, "q_group_size": RECIPE_GROUP, "quant_predicate": spec}
    try:
        bits, group = (int(v) for v in spec.split("/"))
    except ValueError:
        raise MintError(f"reference {spec!r}: write bits/group (e.g. 4/64) or an mlx-lm recipe") from None
    return f"uniform {bits}/g{group}", {"q_bits": bits, "q_group_size": group}


def uniform_unavailable(profile: Profile, spec: str) -> str | None:
    """Why uniform bits/group cannot be stored for this model (a tensor whose inner dimension it does not
    divide), or None."""
    if spec.startswith("mixed_"):
        return None
    bits, group = (int(v) for v in spec.split("/"))
    for t in profile.tensors:
        why = Option(bits, group).unavailable_reason(tuple(t["shape"])) if t["quantizable"] else None
        if why:
            return f"{t['name']} {list(t['shape'])}: {why}"
    return None


def convert_reference(model_dir: Path, out: Path, kwargs: dict[str, Any]) -> float:
    from mlx_lm import convert

    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints its progress
        convert(str(model_dir), str(out), quantize=True, **kwargs)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- peer rows (mlx-lm's calibrated quantizers)


def parse_peers(spec: str, refs: list[Row]) -> list[tuple[str, float | None]]:
    """'awq,gptq,dynamic_quant,dynamic_quant@5' -> [(method, target bits/weight or None)]. A bare dynamic_quant
    runs at the bits/weight (as mlx-lm counts them: bytes of every array over parameters) of each uniform 4-bit
    reference (4/g64: ~4.5, 4/g32: ~5): the sizes its 4-bit base layer and one-step upgrades are made for, and
    not one run per reference of the default list."""
    if spec.strip().lower() in ("", "none"):
        return []
    out: list[tuple[str, float | None]] = []
    for item in spec.split(","):
        method, _, bpw = item.strip().partition("@")
        if method not in ("awq", "gptq", "dynamic_quant"):
            raise MintError(f"unknown peer {method!r}; choose from awq, gptq, dynamic_quant[@bits/weight]")
        if method != "dynamic_quant":
            out.append((method, None))
        elif bpw:
            out.append((method, float(bpw)))
        else:
            out += [(method, r.extra["mlx_bpw"]) for r in refs if r.label.startswith("uniform 4/")]
    return out


def peer_label(method: str, doc: dict[str, Any]) -> str:
    if method == "dynamic_quant":
        (lb, lg), (hb, hg) = doc["low"], doc["high"]
        return f"dynamic_quant {doc['target_bpw']:.2f} bpw ({lb}/g{lg} + {hb}/g{hg})"
    return f"{method.upper()} {doc['bits']}/g{doc['group']}"


def peer_cache_dir(bench: Bench, model_dir: Path, cmd: list[str]) -> Path:
    """Where a peer folder made by `cmd` is kept between runs (an AWQ row is ~10-25 min here): keyed by the
    model's weights, the train split, the command's arguments after the output path, peers.py and mlx-lm's
    versions. Under $MINTBUILD_CACHE/peers, else .cache/peers."""
    import mlx.core as mx
    import mlx_lm

    env = os.environ.get("MINTBUILD_CACHE")
    root = Path(env) / "peers" if env else Path(".cache") / "peers"
    train = Path(bench.params.corpus.out) / "train.txt"
    parts = [
        weights_digest(resolve_weights_dir(model_dir)),
        hashlib.sha256(train.read_bytes()).hexdigest(),
        hashlib.sha256(PEERS_SCRIPT.read_bytes()).hexdigest(),
        mlx_lm.__version__,
        mx.__version__,
        *cmd[cmd.index("--out") + 2 :],
        cmd[2],
    ]
    return root / hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def make_peer(bench: Bench, model_dir: Path, method: str, bpw: float | None) -> tuple[Path, bool]:
    """(folder of the peer `method` at `bpw`, whether it came from the cache): made by benchmarks/peers.py in
    a child process (it re-executes itself with OpenBLAS preloaded, which this process, scoring with torch,
    should not carry) unless an identical run is cached; a new folder enters the cache whole or not at all."""
    cal = bench.params.importance
    cmd = [sys.executable, str(PEERS_SCRIPT), method, "--model", str(model_dir),
           "--corpus", str(bench.params.corpus.out), "--out", "", "--bits", str(PEER_BITS),
           "--group", str(PEER_GROUP), "--n-windows", str(cal.n_windows), "--window", str(cal.window),
           "--seed", str(cal.seed)]  # fmt: skip
    if bpw is not None:
        cmd += ["--target-bpw", f"{bpw:.6f}"]
    cached = peer_cache_dir(bench, model_dir, cmd)
    if (cached / "peer.json").is_file():
        return cached, True
    with atomic_dir(cached) as tmp:
        cmd[cmd.index("--out") + 1] = str(tmp)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise MintError(f"peer {method} failed:\n{r.stderr[-3000:]}")
    return cached, False


def peer_rows(bench: Bench, model_dir: Path, peers: list[tuple[str, float | None]]) -> list[Row]:
    """Each peer (made or taken from the cache by `make_peer`), scored like the references."""
    rows = []
    for method, bpw in peers:
        t0 = time.perf_counter()
        out, reused = make_peer(bench, model_dir, method, bpw)
        doc = json.loads((out / "peer.json").read_text(encoding="utf-8"))
        size = weights_bytes(out)
        mean, median, _ = bench.score(out)
        label = peer_label(method, doc)
        row = Row(PEER_SERIES, label, label, size, 8 * size / bench.parameters, mean, median,
                  doc["calibration_seconds"], note="peer folder from the cache" if reused else "",
                  extra={**doc, "wall_seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        log.info("%s: %s, PPL %.3f, %d calibration tokens in %.1f s%s", label, format_size(size), mean,
                 doc["calibration_tokens"], doc["calibration_seconds"], " (cached)" if reused else "")  # fmt: skip
        rows.append(row)
    return rows


def blas_speed() -> dict[str, Any]:
    """MLX matmul GFLOP/s on its own BLAS and on the OpenBLAS the peers preload (benchmarks/peers.py blas)."""
    r = subprocess.run([sys.executable, str(PEERS_SCRIPT), "blas"], capture_output=True, text=True)
    if r.returncode != 0:
        log.warning("BLAS measurement failed: %s", r.stderr[-500:])
        return {}
    doc = json.loads(r.stdout)
    log.info("MLX fp32 matmul: %.1f GFLOP/s on its own BLAS, %.1f with OpenBLAS preloaded (x%.1f)",
             doc["reference_gflops"], doc["openblas_gflops"], doc["speedup"])  # fmt: skip
    return doc


def mlx_bits_per_weight(folder: Path) -> float:
    """Bits/weight as mlx-lm counts them (mlx_lm.utils.compute_bits_per_weight: bytes of every array over the
    parameters): the unit of dynamic_quant's --target-bpw, so that its peer matches this reference's size."""
    from mlx_lm.utils import compute_bits_per_weight, load_model

    model, _ = load_model(folder, lazy=True)
    return round(float(compute_bits_per_weight(model)), 6)


# ---------------------------------------------------------------- mintbuild rows


def solver_config(base: SolverConfig, method: str, objective: str) -> SolverConfig:
    """The build's solver settings with this row's method and objective; the error-only objectives (the
    published method) get the published role priors, fisher keeps the build's (conf/solver/priors/)."""
    priors = base.priors if objective == "fisher" else dict(PUBLISHED_PRIORS)
    return replace(base, method=method, objective=objective, priors=priors)


def mintbuild_row(bench: Bench, problem, cfg: SolverConfig, series: str, ref: Row) -> Row:
    """Allocate at the reference's bytes, pack, check bytes <= reference, score."""
    # A folder name: "exact, fisher (default)@uniform 4/g64" -> "exact_fisher_default@uniform_4-g64".
    name = re.sub(r"[^\w@.-]+", "_", f"{series}@{ref.label}".replace("/", "-")).strip("_").replace("_@", "@")
    alloc_root, pack_root = bench.work / "allocate", bench.work / "pack"
    target = TargetConfig(size=f"{ref.bytes}B")
    t0 = time.perf_counter()
    try:
        doc, _, _ = allocate_target(problem, name, target, cfg, bench.profile)
    except InfeasibleBudget as e:
        return Row(series, name, ref.label, 0, math.nan, note=f"infeasible: {e}".split(";")[0])
    write_allocation(alloc_root / name, doc)
    res = pack_target(
        bench.params, name, out_root=pack_root, alloc_root=alloc_root, cache_dir=bench.work / "cache",
        progress=False,
    )  # fmt: skip
    folder = pack_root / name
    size = weights_bytes(folder)
    if size > ref.bytes:
        raise MintError(f"{name}: {size:,} B on disk exceeds the reference {ref.label}'s {ref.bytes:,} B")
    mean, median, reused = bench.score(folder)
    shutil.rmtree(folder)  # the allocation stays; the packed copy is not needed once scored
    t = doc["totals"]
    return Row(
        series, name, ref.label, size, 8 * size / bench.parameters, mean, median, time.perf_counter() - t0,
        note="same weights as another row" if reused else "",
        extra={"objective": t["objective"], "gap": t["gap"], "pack_seconds": round(res.seconds, 2)},
    )  # fmt: skip


# ---------------------------------------------------------------- the run


def setup(params: Params, work: Path, n_windows: int | None) -> tuple[Bench, Path]:
    model_dir = Path(params.model.out)
    if n_windows:
        params.eval.n_windows = n_windows
    setup_torch(params.eval)
    tokenizer = load_tokenizer(model_dir)
    tokens, _ = corpus_tokens(Path(params.corpus.out), params.eval.split, tokenizer)
    config = read_config(model_dir)
    prefix = tuple(sequence_prefix(tokenizer))  # the BOS, for tokenizers that add one
    windows = choose_windows(len(tokens), params.eval, config.get("max_position_embeddings"), prefix)
    profile = load_profile(Path(params.profile.out))
    parameters = int(sum(t["elements"] for t in profile.tensors))
    return Bench(params, work, tokens, windows, profile, parameters), model_dir


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    params = load_params(args.params)
    with tempfile.TemporaryDirectory(prefix="mintbuild-quality-") as tmp:
        bench, model_dir = setup(params, Path(tmp), args.windows)
        rows = [baseline_row(bench, model_dir, args.baseline)]
        refs = reference_rows(bench, model_dir, args.refs.split(","), rows)
        rows += refs
        peers = parse_peers(args.peers, refs)
        blas = blas_speed() if peers else {}
        matched = refs + peer_rows(bench, model_dir, peers)
        rows += matched[len(refs) :]
        series = method_series(bench, args)
        for ref in matched:
            for label, (problem, cfg) in series.items():
                row = mintbuild_row(bench, problem, cfg, label, ref)
                rows.append(row)
                log.info("  %-40s %s  PPL %.3f  %s", label, format_size(row.bytes), row.ppl_mean, row.note)
        measured, gguf_settings = quality_gguf.gguf_rows(
            bench,
            quality_gguf.parse_mixes(args.gguf),
            solver_config(params.solver, "exact", "fisher"),
            args.gguf_scorer,
            args.gguf_without_imatrix,
        )
        rows += [gguf_row(bench, m) for m in measured]
    seconds = time.perf_counter() - t_start
    st = {**settings(bench, args), "blas": blas, **({"gguf": gguf_settings} if gguf_settings else {})}
    l16 = gguf_settings.get("llama_perplexity_16bit", {}).get("ppl", math.nan)
    return {"rows": rows, "seconds": seconds, "settings": st, "gguf_goals": quality_gguf.goals(rows, l16)}


def gguf_row(bench: Bench, m: quality_gguf.Measured) -> Row:
    return Row(m.series, m.label, m.ref, m.bytes, 8 * m.bytes / bench.parameters if m.bytes else math.nan,
               m.ppl_mean, m.ppl_median, m.seconds, m.note, m.extra, format="gguf", llama_ppl=m.llama_ppl)  # fmt: skip


def baseline_row(bench: Bench, model_dir: Path, score: bool = True) -> Row:
    """The 16-bit model's row (its PPL NaN when not `score`d: `--no-baseline`)."""
    t0 = time.perf_counter()
    weights = resolve_weights_dir(model_dir)
    mean = median = math.nan
    if score:
        model = load_baseline(weights, torch.float32)
        s, _ = perplexity(model, bench.tokens, bench.windows, progress=False)
        mean, median = s["ppl_mean"], s["ppl_median"]
        del model
    row = Row("16-bit", "16-bit", "", weights_bytes(weights), 16.0, mean, median, format="safetensors")
    row.seconds = time.perf_counter() - t0
    log.info("16-bit: %s, PPL %.3f", format_size(row.bytes), row.ppl_mean)
    return row


def reference_rows(bench: Bench, model_dir: Path, specs: list[str], rows: list[Row]) -> list[Row]:
    refs = []
    for spec in (s for s in specs if s.strip().lower() not in ("", "none")):
        label, kwargs = parse_ref(spec)
        why = uniform_unavailable(bench.profile, spec)
        if why:
            rows.append(Row("uniform (mlx-lm)", label, label, 0, math.nan, note=f"not storable: {why}"))
            log.info("%s: skipped (%s)", label, why)
            continue
        out = bench.work / "ref" / spec.replace("/", "g")
        t0 = time.perf_counter()
        convert_reference(resolve_weights_dir(model_dir), out, kwargs)  # a local model: its own folder
        size = weights_bytes(out)
        mean, median, _ = bench.score(out)
        series = "mlx-lm recipe" if spec.startswith("mixed_") else "uniform (mlx-lm)"
        row = Row(series, label, label, size, 8 * size / bench.parameters, mean, median,
                  time.perf_counter() - t0, extra={"mlx_bpw": mlx_bits_per_weight(out)})  # fmt: skip
        log.info("%s: %s, PPL %.3f", label, format_size(size), mean)
        refs.append(row)
        shutil.rmtree(out)
    return refs


def method_series(bench: Bench, args: argparse.Namespace) -> dict[str, tuple[Any, SolverConfig]]:
    """{series label: (knapsack problem, solver config)}; the knapsack is built once per objective."""
    base = bench.params.solver
    # fisher rows price the GPTQ-rounded head as `mintbuild allocate` does (the packer rounds it so).
    gains = rounding_gains(bench.params, bench.profile)
    out = {}
    for key in args.methods.split(","):
        if key not in METHODS:
            raise MintError(f"unknown method {key!r}; choose from {sorted(METHODS)}")
        label, method, objective = METHODS[key]
        cfg = solver_config(base, method, objective)
        alpha = load_importance(Path(base.importance), bench.profile) if objective == "fisher" else None
        out[label] = (build_problem(bench.profile, cfg, alpha, gains if alpha else None), cfg)
    for spec in args.importance or []:
        path, _, tag = spec.partition(":")
        cfg = solver_config(base, "exact", "fisher")
        alpha = load_importance(Path(path), bench.profile)
        out[f"exact, fisher ({tag or Path(path).parent.name})"] = (
            build_problem(bench.profile, cfg, alpha, gains),
            cfg,
        )
    return out


def settings(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    import mlx_lm

    return {
        "model": bench.params.model.name,
        "windows": len(bench.windows.starts),
        "window": bench.windows.length,
        "tokens_scored": len(bench.windows.starts) * (bench.windows.length - 1),
        "split": bench.params.eval.split,
        "parameters": bench.parameters,
        "mlx_lm_version": mlx_lm.__version__,
        "torch_threads": torch.get_num_threads(),
        # mintbuild rows quantize the equalize stage's weights (method none: the model's own); references, mlx-lm's.
        "equalize": bench.params.equalize.method,
        # mintbuild rows round by pack.rounding (gptq: the output head against its importance-stage Hessian).
        "pack_rounding": bench.params.pack.rounding,
    }


# ---------------------------------------------------------------- output


def comparison_table(rows: list[Row]) -> list[str]:
    """One line per reference or peer: its PPL, its calibration (peers: tokens and seconds) and each mintbuild
    series' PPL at <= its bytes (MLX rows; the GGUF rows have their own table)."""
    rows = [r for r in rows if r.format != "gguf"]
    refs = [r for r in rows if r.series in MATCHED_SERIES and r.bytes]
    if not refs:
        return []
    ours = sorted({r.series for r in rows if r.ref and r.series not in MATCHED_SERIES},
                  key=list(rows_series_order(rows)).index)  # fmt: skip
    head = ("| reference | bytes | calibration (tokens, seconds) | reference PPL | " + " | ".join(ours)
            + " | best of ours vs reference |")  # fmt: skip
    lines = [head, "|" + "---|" * (5 + len(ours))]
    for ref in sorted(refs, key=lambda r: r.bytes):
        cells, best = [], math.inf
        for s in ours:
            match = [r for r in rows if r.series == s and r.ref == ref.label]
            if not match or not match[0].bytes:
                cells.append("-")
                continue
            best = min(best, match[0].ppl_mean)
            cells.append(f"{match[0].ppl_mean:.2f} ({100 * (match[0].ppl_mean / ref.ppl_mean - 1):+.1f}%)")
        delta = f"{100 * (best / ref.ppl_mean - 1):+.1f}%" if math.isfinite(best) else "-"
        cal = (f"{ref.extra['calibration_tokens']:,}, {ref.seconds:.1f} s" if ref.series == PEER_SERIES
               else "none (round-to-nearest)")  # fmt: skip
        lines.append(f"| {ref.label} | {format_size(ref.bytes)} | {cal} | {ref.ppl_mean:.2f} | "
                     + " | ".join(cells) + f" | {delta} |")  # fmt: skip
    return lines


def mlx_section(rows: list[Row]) -> list[str]:
    table = comparison_table(rows)
    if not table:
        return []
    return ["Mean PPL; in brackets, the change against the reference row at the same bytes.", "", *table, ""]


def rows_series_order(rows: list[Row]) -> dict[str, None]:
    return dict.fromkeys(r.series for r in rows)


def markdown(result: dict[str, Any]) -> str:
    rows, st = result["rows"], result["settings"]
    base = rows[0]
    lines = [
        "# Quality at equal bytes",
        "",
        f"Model {st['model']} ({st['parameters']:,} parameters); perplexity on the corpus {st['split']} split, "
        f"{st['windows']} windows x {st['window']} tokens ({st['tokens_scored']:,} tokens scored), the same "
        "windows and evaluator for every row. Reference rows are made by mlx-lm "
        f"{st['mlx_lm_version']} (`mlx_lm.convert`) from the model's own weights; mintbuild rows quantize the "
        f"equalize stage's weights (equalize: {st.get('equalize', 'none')}; the same 16-bit function), are "
        "allocated at the reference's bytes, packed by `mintbuild pack` (rounding: "
        f"{st.get('pack_rounding', 'rtn')}) and never larger on disk (checked).",
        "",
        f"16-bit: {format_size(base.bytes)}, mean PPL {_f(base.ppl_mean)}.",
        "",
        *peer_note(rows, st),
        *mlx_section(rows),
        *quality_gguf.markdown(rows, st.get("gguf", {}), result.get("gguf_goals", [])),
        "## Every row",
        "",
        "| series | format | row | matched to | bytes on disk | bits/weight (disk) | mean PPL | median PPL | "
        "llama-perplexity PPL | seconds | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        size = format_size(r.bytes) if r.bytes else "-"
        lines.append(
            f"| {r.series} | {r.format} | {r.label} | {r.ref or '-'} | {size} | {_f(r.bpw, 3)} | {_f(r.ppl_mean)} | "
            f"{_f(r.ppl_median)} | {_f(r.llama_ppl)} | {r.seconds:.1f} | {r.note} |"
        )
    lines += ["", f"Whole benchmark: {result['seconds']:.0f} s ({result['seconds'] / 60:.1f} min).", ""]
    return "\n".join(lines)


def peer_note(rows: list[Row], st: dict[str, Any]) -> list[str]:
    """The peers' calibration budget and the BLAS they ran on, when there are peer rows."""
    peers = [r for r in rows if r.series == PEER_SERIES]
    if not peers:
        return []
    e = peers[0].extra
    text = (
        f"Peer rows ({PEER_SERIES}) are mlx-lm's own quantizers (`mlx_lm.quant`: awq_quantize, gptq_quantize, "
        "dynamic_quant's estimate_sensitivities/estimate_threshold + quantize_model) with their command-line "
        f"defaults, calibrated on {e['windows'][0]} x {e['windows'][1]} = {e['calibration_tokens']:,} tokens of "
        "the corpus train split: the importance stage's windows, as many tokens as mintbuild's Fisher pass. "
        "They compute in float32 (MLX's CPU matmul uses BLAS in float32 only) and store in the checkpoint's "
        "dtype, as mlx-lm writes them. Their seconds are calibration time (quantization, without load and save)."
    )
    blas = st.get("blas") or {}
    if blas:
        text += (
            f" MLX ran on OpenBLAS preloaded ({Path(blas['openblas']).name}): fp32 matmul "
            f"{blas['openblas_gflops']:.1f} GFLOP/s against {blas['reference_gflops']:.1f} on MLX's own BLAS "
            f"(x{blas['speedup']:.1f})."
        )
    return [text, ""]


def _f(v: float, digits: int = 3) -> str:
    return "-" if not math.isfinite(v) else f"{v:.{digits}f}"


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    styles = ["s", "D", "v", "^", "o", "P", "X", "*"]
    for i, s in enumerate(rows_series_order(rows)):
        if s == "16-bit":
            continue
        pts = sorted((r.bytes / 1e6, r.ppl_mean) for r in rows if r.series == s and r.bytes)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=styles[i % len(styles)], ls="-", alpha=0.8, label=s)
    if math.isfinite(rows[0].ppl_mean):
        ax.axhline(rows[0].ppl_mean, color="gray", ls="--", label="16-bit")
    ax.set_xlabel("weights on disk (MB)")
    ax.set_ylabel("perplexity (mean over tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def write(result: dict[str, Any], out: Path) -> None:
    rows = result["rows"]
    with atomic_dir(out) as tmp:
        (tmp / "quality.md").write_text(markdown(result), encoding="utf-8")
        plot(rows, tmp / "quality.png")
        doc = {"settings": result["settings"], "seconds": round(result["seconds"], 1),
               "gguf_goals": result.get("gguf_goals", []),
               "rows": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                         for k, v in vars(r).items()} for r in rows]}  # fmt: skip
        (tmp / "quality.json").write_text(canonical_json(doc), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--params", default="params.yaml", help="composed parameters (model, corpus, eval, solver)"
    )
    ap.add_argument("--refs", default=",".join(DEFAULT_REFS), help="reference rows: bits/group or mixed_*")
    ap.add_argument("--methods", default=",".join(METHODS), help="mintbuild series: greedy,nrmse,mse,fisher")
    ap.add_argument("--importance", action="append", help="extra fisher series from another importance "
                    "artifact: PATH[:label] (repeatable)")  # fmt: skip
    ap.add_argument("--windows", type=int, help="evaluation windows (default: eval.n_windows)")
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS), help="mlx-lm's calibrated quantizers as rows: "
                    "awq,gptq,dynamic_quant[@bits/weight] (bare: at each reference's), or none")  # fmt: skip
    ap.add_argument("--gguf", default=",".join(quality_gguf.DEFAULT_MIXES), help="llama.cpp stock mixes as "
                    "GGUF rows (each with the imatrix and without, mintbuild at each file's bytes), or none")  # fmt: skip
    ap.add_argument(
        "--baseline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score the 16-bit "
        "model with our evaluator (--no-baseline: skip it, e.g. for GGUF rows scored by llama alone)",
    )
    ap.add_argument("--gguf-without-imatrix", action=argparse.BooleanOptionalAction, default=True,
                    help="also the stock mixes made without the imatrix (--no-gguf-without-imatrix: only with it)")  # fmt: skip
    ap.add_argument("--gguf-scorer", choices=quality_gguf.SCORERS, default="both", help="both: every GGUF by our "
                    "evaluator and by llama-perplexity; llama: llama-perplexity alone (minutes per GGUF of a 1B+ "
                    "model instead of ~10 min)")  # fmt: skip
    ap.add_argument("--out", default="artifacts/quality", help="output folder (default: artifacts/quality)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mintbuild").setLevel(logging.WARNING)
    try:
        result = run(args)
    except MintError as e:
        sys.exit(f"quality: {e}")
    write(result, Path(args.out))
    sys.stdout.write(markdown(result))


if __name__ == "__main__":
    main()
