"""Our perplexity evaluator: a transformers model streamed from any weight source, scored on fixed windows.

The model runs on the CPU layer-streamed (mintbuild.hf.streaming): every window passes decoder block l before
block l + 1 is read from its source (a checkpoint, a packed MLX folder dequantized as mlx-lm does, or a GGUF
through ggml's own dequantization), so peak memory is one block in `eval.dtype` plus the windows' hidden states
plus the embedding and head, whatever the model's size; a block that cannot fit is refused before work.
Windows are fixed: the tokenized split is cut into candidate windows of `window` tokens every `stride` tokens,
`n_windows` of them are drawn with `seed` and scored in corpus order; each window starts the way the tokenizer
starts a sequence, and its first token has no context and is not scored. Reported: mean PPL = exp(mean token
NLL over all scored tokens) and the median of per-window PPL, tokens scored and tokens/s.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mintbuild.artifacts.metrics import BASELINE, read_baseline, target_metrics, write_metrics
from mintbuild.artifacts.pack import verify_manifest
from mintbuild.calibration.windows import load_tokenizer, sequence_prefix
from mintbuild.cluster import Executor, Resources, batches, executor
from mintbuild.config import EvalConfig, Params, as_dict
from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import expert_parts, open_checkpoint, stack_experts, tied_lm_head
from mintbuild.hf.streaming import StreamedModel, block_bytes, check_fits, forward_hidden
from mintbuild.io import sha256_text

log = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


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


def load_baseline(folder: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The unquantized model (the model stage's folder or the local checkpoint it names), weights in bf16."""
    ckpt = open_checkpoint(folder)
    skip = tied_lm_head(ckpt)
    state = {n: ckpt.read(n).to(torch.bfloat16) for n in ckpt.names if n != skip}
    return build_model(ckpt.config, state, dtype)


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
    ids = [windows.ids(tokens, s).tolist() for s in windows.starts]
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
    path = Path(getattr(src, "folder", None) or getattr(src, "path")).resolve()  # noqa: B009 (WeightSource: no path)
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


def evaluate_folder(
    model: torch.nn.Module | StreamedModel, tok_folder: Path, params: Params, corpus_dir: Path, progress: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(scores, settings, timings) of `model` on the eval windows of the corpus split."""
    tokenizer = load_tokenizer(tok_folder)
    tokens, corpus_sha = corpus_tokens(corpus_dir, params.eval.split, tokenizer)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    windows = choose_windows(len(tokens), params.eval, max_pos, tuple(sequence_prefix(tokenizer)))
    scores, timings = perplexity(model, tokens, windows, progress)
    return scores, eval_settings(params.eval, corpus_sha, windows), timings


def score_target(
    params: Params,
    target: str,
    open_source: Callable[[Path, dict[str, Any]], Any],
    out_root: Path | None = None,
    progress: bool = True,
    extra: Callable[..., tuple[dict[str, Any], dict[str, Any]]] | None = None,
    **kw: Any,
) -> dict[str, Any]:
    """Score `target`'s packed folder (its manifest verified; weights from `open_source(folder, manifest)`)
    on the baseline's windows and write its metrics; `extra(model, source, folder, corpus_dir, window)` adds
    (metrics, timings) of a second scorer. Refuses a baseline scored with other settings or text."""
    dtype = setup_torch(params.eval)
    out_root = Path(out_root or params.eval_out)
    folder = Path(kw.get("pack_out") or params.pack_out) / target
    if not folder.is_dir():
        raise MintError(f"{folder}: no packed model; run the pack stage for target {target!r} first")
    baseline_dir = Path(kw.get("baseline_dir") or out_root / BASELINE)
    baseline = read_baseline(baseline_dir)
    manifest = verify_manifest(folder)
    source = open_source(folder, manifest)
    model = StreamedModel(source, dtype)
    corpus_dir = Path(kw.get("corpus_out") or params.corpus.out)
    scores, settings, timings = evaluate_folder(model, folder, params, corpus_dir, progress)
    if baseline["settings"] != settings:
        raise MintError(
            f"{baseline_dir}: the baseline was scored with other eval settings or corpus; "
            "re-run `mintbuild evaluate --baseline`"
        )
    metrics = target_metrics(target, manifest, scores, baseline["metrics"])
    if extra is not None:
        more, more_timings = extra(model, source, folder, corpus_dir, scores["window"])
        metrics, timings = {**metrics, **more}, {**timings, **more_timings}
    return write_metrics(out_root / target, metrics, settings, timings)
