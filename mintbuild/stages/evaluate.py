"""`mintbuild evaluate`: perplexity of each packed model, and of the 16-bit baseline, on the corpus test split.

The packed folder itself is evaluated (not the allocation): its manifest is checked (every file's size and
sha256, so a folder edited by hand is refused), each MLX affine module is unpacked and dequantized with
mintbuild.mlx.quant.reference (the same values mlx-lm computes) into the model's transformers architecture, and the model
runs on the CPU layer-streamed (mintbuild.hf.streaming): every window passes decoder block l before block l+1 is
dequantized, so peak memory is one block in `eval.dtype` plus the windows' hidden states plus the embedding and
head, whatever the model's size. A block that cannot fit the memory available is refused before work. Windows are fixed: the tokenized split is cut into candidate windows of `window` tokens every
`stride` tokens, `n_windows` of them are drawn with `seed` and scored in corpus order; each window's first
token has no context and is not scored. Reported: mean PPL = exp(mean token NLL over all scored tokens) and
the median of per-window PPL (as the published method reports), tokens scored and tokens/s.

A GGUF target (manifest format "gguf": model.gguf by llama-quantize) is scored twice. Our streamed evaluator reads
the GGUF through mintbuild.llamacpp.source (ggml's own dequantization, one tensor at a time) on the same windows with
the same BOS rule as every target, so its ppl_mean is comparable with the MLX targets' and the baseline's. And the
real client, llama-perplexity, scores the split's text with chunks of `window` tokens, `n_windows` of them, on
`threads` threads; our evaluator scores exactly its chunks at its positions (mintbuild.llamacpp.perplexity), and
metrics.json carries both numbers and their relative difference under `llama_perplexity`.

One job: perplexity of a model folder on fixed windows (in process, or its windows as tasks on a cluster,
mintbuild.cluster); the metrics files' format lives in artifacts/metrics.py.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mintbuild.artifacts.metrics import BASELINE, SCHEMA_VERSION, read_baseline, write_metrics
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.calibration.windows import load_tokenizer, sequence_prefix
from mintbuild.cluster import Executor, Resources, batches, executor
from mintbuild.config import EvalConfig, Params, as_dict, load_params
from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import expert_parts, open_checkpoint, stack_experts, tied_lm_head
from mintbuild.hf.streaming import CheckpointSource, StreamedModel, block_bytes, check_fits, forward_hidden
from mintbuild.io import sha256_text
from mintbuild.llamacpp.perplexity import compare as llama_compare
from mintbuild.llamacpp.source import GGUFSource
from mintbuild.mlx.folder import (
    PackedTensors,
    dequantize_module,
    dequantized_state,
    read_config,
    verify_manifest,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- loading a packed folder


def build_model(
    config: dict[str, Any], state: dict[str, torch.Tensor], dtype: torch.dtype
) -> torch.nn.Module:
    """The transformers architecture of `config` holding `state` (tied lm_head from the embedding): the whole
    model in memory, for small models and as the streamed evaluator's oracle (the stage itself streams)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise MintError("config.json has no model_type")
    hf_config = AutoConfig.for_model(model_type, **cfg)
    # Every weight is overwritten below (a missing one is an error), so the random init is skipped: it cost
    # ~3 s per model, as much as scoring a window.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    state = dict(state)
    for name, _ in model.named_parameters():  # MoE experts stored one tensor per expert: stacked, as on load
        groups = None if name in state else expert_parts(name, state.__contains__)
        if groups:
            state[name] = stack_experts(groups, state.pop)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise MintError(f"weights do not match the {model_type} architecture: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")  # fmt: skip
    if tied:
        model.tie_weights()
    return model.eval()


class PackedSource:
    """A packed MLX folder: quantized modules dequantized to bf16 as MLX does (mlx_folder.dequantize_module),
    16-bit tensors as stored."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self.quant = self.config.get("quantization") or {}
        files = sorted(self.folder.glob("model*.safetensors"))
        if not files:
            raise MintError(f"{self.folder}: no model*.safetensors")
        self._tensors = PackedTensors(files)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def _raw(self, name: str) -> torch.Tensor:
        return self._tensors.read(name)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            stem = name.removesuffix(".weight")
            if f"{stem}.scales" in self._tensors:
                raw = {f"{stem}.{k}": self._raw(f"{stem}.{k}") for k in ("weight", "scales", "biases")}
                out[name] = dequantize_module(stem, raw, self.quant)
            else:
                out[name] = self._raw(name).to(torch.bfloat16)
        return out


def load_packed(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, manifest) of a packed folder, after verifying it against its manifest."""
    manifest = verify_manifest(folder)
    config = read_config(folder)
    return build_model(config, dequantized_state(folder, config), dtype), manifest


def load_baseline(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The unquantized model (the model stage's folder or the local checkpoint it names), weights in bf16."""
    ckpt = open_checkpoint(folder)
    skip = tied_lm_head(ckpt)
    state = {n: ckpt.read(n).to(torch.bfloat16) for n in ckpt.names if n != skip}
    return build_model(ckpt.config, state, dtype)


# ---------------------------------------------------------------- tokens and windows


def corpus_tokens(corpus_dir: Path, split: str, tokenizer: Any) -> tuple[np.ndarray, str]:
    path = corpus_dir / f"{split}.txt"
    if not path.is_file():
        raise MintError(f"{path}: no corpus split {split!r}; run `mintbuild corpus` first")
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64), sha256_text(text)


@dataclass(frozen=True)
class Windows:
    """Token windows of the split: each is `prefix` (the tokenizer's BOS, when it adds one) followed by the text
    tokens from `start`, `length` tokens in all."""

    starts: list[int]
    length: int
    prefix: tuple[int, ...] = ()

    @property
    def text_length(self) -> int:
        return self.length - len(self.prefix)

    def ids(self, tokens: np.ndarray, start: int) -> np.ndarray:
        return np.concatenate(
            [np.asarray(self.prefix, dtype=np.int64), tokens[start : start + self.text_length]]
        )

    @property
    def first_scored(self) -> int:
        """Position of the first scored token: after the prefix; with no prefix the first token is context."""
        return max(len(self.prefix), 1)


def choose_windows(
    n_tokens: int, cfg: EvalConfig, max_positions: int | None, prefix: tuple[int, ...] = ()
) -> Windows:
    length = min(cfg.window, max_positions) if max_positions else cfg.window
    text_length = length - len(prefix)
    if text_length < 2:
        raise MintError(f"eval.window {cfg.window} is too short (need at least {len(prefix) + 2} tokens)")
    if n_tokens < text_length:
        raise MintError(
            f"the corpus {cfg.split} split has {n_tokens:,} tokens, fewer than one window of {text_length}"
        )
    stride = cfg.stride or text_length
    candidates = list(range(0, n_tokens - text_length + 1, stride))
    n = cfg.n_windows
    if n < 1:
        raise MintError(f"eval.n_windows {n} must be at least 1")
    if n > len(candidates):
        log.warning(
            "only %d windows of %d tokens fit the corpus; scoring all of them", len(candidates), length
        )
        n = len(candidates)
    rng = np.random.default_rng(cfg.seed)
    picked = sorted(int(candidates[i]) for i in rng.choice(len(candidates), size=n, replace=False))
    return Windows(picked, length, tuple(prefix))


# ---------------------------------------------------------------- scoring


def window_logits(model: torch.nn.Module, ids: np.ndarray | list[int]) -> torch.Tensor:
    """float32 logits [T, vocab] of one sequence."""
    x = torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]
    with torch.inference_mode():
        return model(input_ids=x, use_cache=False).logits[0].float()


def window_nll(model: torch.nn.Module, ids: np.ndarray, first: int = 1) -> tuple[float, int]:
    """(sum of token NLL, tokens scored) of one window, scoring positions `first`.. (each from the ones before:
    the prefix, or the first token when there is none, is context only)."""
    return logits_nll(window_logits(model, ids), np.asarray(ids), first)


def logits_nll(logits: torch.Tensor, ids: np.ndarray, first: int) -> tuple[float, int]:
    """(sum of token NLL, tokens scored) from one window's logits [T, vocab], scoring positions `first`.."""
    target = torch.as_tensor(ids[first:], dtype=torch.long)
    nll = torch.nn.functional.cross_entropy(logits[first - 1 : -1].float(), target, reduction="sum")
    return float(nll), len(target)


def streamed_nll(
    model: StreamedModel, tokens: np.ndarray, windows: Windows, progress: bool
) -> list[tuple[float, int]]:
    """(NLL sum, tokens scored) per window, every window through block l before block l+1 is read."""
    ids = [windows.ids(tokens, s) for s in windows.starts]
    size = torch.empty((), dtype=model.dtype).element_size()
    # the windows' hidden states in and out of a block, and one window's logits in float32
    acts = 2 * len(ids) * windows.length * model.config.hidden_size * size
    check_fits(model, acts + windows.length * model.config.vocab_size * 4, "evaluate")
    hidden, _ = forward_hidden(model, ids, progress, desc="evaluate: blocks")
    out = []
    with torch.inference_mode():
        for i, h in zip(ids, hidden, strict=True):
            logits = model.head(torch.as_tensor(i)[None], h).logits[0]
            out.append(logits_nll(logits, i, windows.first_scored))
    return out


def _windows_on(
    ex: Executor, model: StreamedModel, tokens: np.ndarray, windows: Windows, progress: bool
) -> list[tuple[float, int]]:
    """(NLL sum, tokens scored) per window: the windows split into one task per core, or, with fewer windows
    than cores, one task per window on a share of the cores. Each task streams the model from its source's
    path (a filesystem every node sees) once for its windows. A window's score does not depend on the others
    (streamed_nll runs each window through a block on its own), so the results are the in-process ones,
    reassembled in window order."""
    src = model.source
    path = Path(getattr(src, "folder", None) or src.path).resolve()
    parts = batches([1] * len(windows.starts), ex.slots)
    tasks = [(type(src), path, model.dtype, tokens, replace(windows, starts=windows.starts[r.start : r.stop]))
             for r in parts]  # fmt: skip
    cfg = model.config
    size = torch.empty((), dtype=model.dtype).element_size()
    outer = 2 * cfg.vocab_size * cfg.hidden_size * size
    acts = max(len(r) for r in parts) * 2 * windows.length * cfg.hidden_size * size
    logits = windows.length * cfg.vocab_size * 4
    memory = 3 * max(block_bytes(model, i) for i in range(model.n_blocks)) + outer + acts + logits + (1 << 30)
    # fewer windows than cores: each task takes a share of the cores as threads (at most one node's)
    cpus = max(1, min(ex.node_cpus, ex.slots // len(parts)))
    scored = ex.map(_score_windows, tasks, Resources(cpus, memory), f"evaluate {path.name}", progress)
    return [s for part in scored for s in part]


def _score_windows(task: tuple) -> list[tuple[float, int]]:
    """One cluster task: (NLL sum, tokens scored) of its windows, the model streamed from its source's path."""
    source_type, path, dtype, tokens, windows = task
    torch.use_deterministic_algorithms(True, warn_only=True)
    return streamed_nll(StreamedModel(source_type(path), dtype), tokens, windows, False)


def perplexity(
    model: torch.nn.Module | StreamedModel, tokens: np.ndarray, windows: Windows, progress: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scores, timings) of the windows: layer-streamed for a StreamedModel, window by window for a whole
    model. The scores depend only on the model and the windows; the wall clock goes to the timings."""
    from tqdm import tqdm

    total_nll, total_tokens, per_window = 0.0, 0, []
    t0 = time.perf_counter()
    if isinstance(model, StreamedModel) and executor().remote:
        scored = _windows_on(executor(), model, tokens, windows, progress)
    elif isinstance(model, StreamedModel):
        scored = streamed_nll(model, tokens, windows, progress)
    else:
        bar = tqdm(total=len(windows.starts), unit="window", disable=not progress)
        scored = []
        for s in windows.starts:
            scored.append(window_nll(model, windows.ids(tokens, s), windows.first_scored))
            bar.update(1)
        bar.close()
    for nll, n in scored:
        total_nll += nll
        total_tokens += n
        per_window.append(math.exp(nll / n))
    seconds = time.perf_counter() - t0
    scores = {
        "ppl_mean": math.exp(total_nll / total_tokens),
        "ppl_median": statistics.median(per_window),
        "ppl_windows": per_window,
        "nll_mean": total_nll / total_tokens,
        "tokens": total_tokens,
        "windows": len(windows.starts),
        "window": windows.length,
    }
    tokens_per_s = len(windows.starts) * windows.length / max(seconds, 1e-9)
    return scores, {"seconds": round(seconds, 3), "tokens_per_s": round(tokens_per_s, 1)}


def setup_torch(cfg: EvalConfig) -> torch.dtype:
    if cfg.dtype not in _DTYPES:
        raise MintError(f"eval.dtype {cfg.dtype!r}: choose one of {sorted(_DTYPES)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return _DTYPES[cfg.dtype]


def eval_settings(cfg: EvalConfig, corpus_sha: str, windows: Windows) -> dict[str, Any]:
    """What must match between a target's run and the baseline's for the delta to mean anything."""
    settings = {
        **as_dict(cfg),
        "corpus_sha256": corpus_sha,
        "window": windows.length,
        "starts": windows.starts,
    }
    if windows.prefix:  # absent for tokenizers without a BOS, so their settings files are as before
        settings["prefix"] = list(windows.prefix)
    return settings


# ---------------------------------------------------------------- the stage


def evaluate_folder(
    model: torch.nn.Module | StreamedModel, tok_folder: Path, params: Params, corpus_dir: Path, progress: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    tokenizer = load_tokenizer(tok_folder)
    tokens, corpus_sha = corpus_tokens(corpus_dir, params.eval.split, tokenizer)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    windows = choose_windows(len(tokens), params.eval, max_pos, tuple(sequence_prefix(tokenizer)))
    scores, timings = perplexity(model, tokens, windows, progress)
    return scores, eval_settings(params.eval, corpus_sha, windows), timings


def run_baseline(
    params: Params, out_root: Path | None = None, progress: bool = True, **kw: Any
) -> dict[str, Any]:
    dtype = setup_torch(params.eval)
    model_dir = Path(kw.get("model_out") or params.model.out)
    weights = resolve_weights_dir(model_dir)
    model = StreamedModel(CheckpointSource(weights), dtype)
    corpus_dir = Path(kw.get("corpus_out") or params.corpus.out)
    scores, settings, timings = evaluate_folder(model, model_dir, params, corpus_dir, progress)
    bytes_16 = sum(p.stat().st_size for p in sorted(weights.glob("*.safetensors")))
    metrics = {"schema_version": SCHEMA_VERSION, "target": BASELINE, "bytes_on_disk": bytes_16, **scores}
    return write_metrics(Path(out_root or params.eval_out) / BASELINE, metrics, settings, timings)


def gguf_file(folder: Path, manifest: dict[str, Any]) -> Path | None:
    """The GGUF of a packed GGUF target (manifest format "gguf", or no format and a model.gguf among its files),
    None for an MLX folder."""
    fmt = manifest.get("format") or ("gguf" if "model.gguf" in manifest.get("files", {}) else "mlx")
    if fmt != "gguf":
        return None
    path = folder / manifest.get("weights_file", "model.gguf")
    if not path.is_file():
        raise MintError(f"{path}: the pack manifest says format gguf but the GGUF file is missing")
    return path


def check_bos(source: GGUFSource, tok_folder: Path) -> None:
    """Refuse a GGUF whose tokenizer.ggml.add_bos_token disagrees with the folder's tokenizer: llama-perplexity
    (which follows the GGUF) and our windows (which follow the tokenizer) would start their sequences differently."""
    from mintbuild.llamacpp.perplexity import gguf_adds_bos

    bos = gguf_adds_bos(source.reader)
    prefix = sequence_prefix(load_tokenizer(tok_folder))
    if bos is not None and bos != bool(prefix):
        raise MintError(
            f"{source.path}: tokenizer.ggml.add_bos_token is {bos} but the tokenizer in {tok_folder} "
            f"{'adds' if prefix else 'does not add'} a BOS: llama-perplexity and our windows would start differently"
        )


def score_llama_perplexity(
    model: StreamedModel, gguf: Path, tok_folder: Path, params: Params, corpus_dir: Path, window: int,
    progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """llama-perplexity on the split's text (chunks of `window`, `eval.n_windows` of them) and our evaluator on
    the same chunks: (metrics, timings)."""
    tokenizer = load_tokenizer(tok_folder)
    path = corpus_dir / f"{params.eval.split}.txt"
    text = path.read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = sequence_prefix(tokenizer)
    return llama_compare(model, gguf, text, ids, prefix, window, params.eval.n_windows, params.eval.threads,
                         progress)  # fmt: skip


def run_target(
    params: Params, target: str, out_root: Path | None = None, progress: bool = True, **kw: Any
) -> dict[str, Any]:
    dtype = setup_torch(params.eval)
    out_root = Path(out_root or params.eval_out)
    folder = Path(kw.get("pack_out") or params.pack_out) / target
    if not folder.is_dir():
        raise MintError(f"{folder}: no packed model; run `mintbuild pack --target {target}` first")
    baseline_dir = Path(kw.get("baseline_dir") or out_root / BASELINE)
    baseline = read_baseline(baseline_dir)
    manifest = verify_manifest(folder)
    gguf = gguf_file(folder, manifest)
    source = GGUFSource(gguf) if gguf else PackedSource(folder)
    if isinstance(source, GGUFSource):
        check_bos(source, folder)
    model = StreamedModel(source, dtype)
    corpus_dir = Path(kw.get("corpus_out") or params.corpus.out)
    scores, settings, timings = evaluate_folder(model, folder, params, corpus_dir, progress)
    if baseline["settings"] != settings:
        raise MintError(
            f"{baseline_dir}: the baseline was scored with other eval settings or corpus; "
            "re-run `mintbuild evaluate --baseline`"
        )
    extra: dict[str, Any] = {}
    if gguf:
        lp, lp_timings = score_llama_perplexity(
            model, gguf, folder, params, corpus_dir, scores["window"], progress
        )
        extra = {"format": "gguf", "llama_perplexity": lp}
        timings = {**timings, **lp_timings}
    base = baseline["metrics"]
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "target": target,
        "budget": manifest["budget"],
        "requested_budget": manifest.get("requested_budget", manifest["budget"]),
        "notes": manifest.get("notes", []),
        "bytes_on_disk": manifest["weights_bytes"],
        "avg_bits_per_weight": manifest["avg_bits_per_weight"],
        "objective": manifest["objective"],
        **scores,
        "baseline_ppl_mean": base["ppl_mean"],
        "baseline_ppl_median": base["ppl_median"],
        "delta_ppl_mean": scores["ppl_mean"] - base["ppl_mean"],
        "delta_ppl_median": scores["ppl_median"] - base["ppl_median"],
        "delta_ppl_mean_pct": 100 * (scores["ppl_mean"] / base["ppl_mean"] - 1),
        **extra,
    }
    return write_metrics(out_root / target, metrics, settings, timings)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--target", action="append", help="target name (repeatable); default: every target")
    who.add_argument("--baseline", action="store_true", help="score the unquantized 16-bit model once")
    p.add_argument("--out", help="output root (default: eval_out from params)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    out = Path(args.out) if args.out else None
    if args.baseline:
        run_baseline(params, out, progress=not args.no_progress)
        return
    names = args.target or sorted(params.targets)
    unknown = [n for n in names if n not in params.targets]
    if unknown:
        raise MintError(f"unknown target(s) {unknown}; configured: {sorted(params.targets)}")
    for name in names:
        run_target(params, name, out, progress=not args.no_progress)
