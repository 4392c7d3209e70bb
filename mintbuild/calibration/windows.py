"""Calibration toolkit shared by the calibration stages (equalize, importance) and evaluate, as siblings:
the train-split text, the one tokenizer loader, seeded token windows, torch settings and the stages' shared
command-line arguments.

Windows: start at a line beginning of train.txt, chosen with a seeded permutation, non-overlapping; each starts
the way the model's tokenizer starts a sequence (its BOS when it adds one: `sequence_prefix`), followed by the
text's tokens from there, ``window`` tokens in all. Their character ranges in train.txt are recorded so anyone
can check that calibration never touched the evaluation text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mintbuild.artifacts.model import TOKENIZER_FILES, resolve_weights_dir
from mintbuild.config import Params, load_params
from mintbuild.errors import MintError
from mintbuild.io import sha256_file

SPLIT = "train"

log = logging.getLogger(__name__)


#: A window of n tokens is first looked for in this many chars per token (doubled until it fits).
_CHARS_PER_TOKEN = 6


@dataclass(frozen=True)
class Window:
    #: Character range [char_start, char_end) of train.txt that the window's text tokens cover.
    char_start: int
    char_end: int
    #: The sequence prefix (BOS, when the tokenizer adds one), then the text tokens.
    ids: list[int]


def sequence_prefix(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text when asked for special tokens (its BOS, for tokenizers that add
    one), read from the tokenizer's own behaviour rather than guessed from the model family. Windows start with
    it, as the runtimes' perplexity tools and generation start a sequence; its positions are never scored."""
    probe = "The quick brown fox."
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def read_train_text(corpus_dir: Path) -> tuple[str, str]:
    """(text of the train split, sha256 of the file); checks the file against meta.json when there is one."""
    path = Path(corpus_dir) / f"{SPLIT}.txt"
    if not path.is_file():
        raise MintError(f"{path}: no calibration split; run `mintbuild corpus` first")
    sha = sha256_file(path)
    meta_path = Path(corpus_dir) / "meta.json"
    if meta_path.is_file():
        recorded = json.loads(meta_path.read_text(encoding="utf-8")).get("splits", {}).get(SPLIT, {})
        if recorded.get("sha256") not in (None, sha):
            raise MintError(f"{path}: sha256 {sha[:12]} differs from meta.json ({recorded['sha256'][:12]})")
    return path.read_text(encoding="utf-8"), sha


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((model_dir / n).is_file() for n in TOKENIZER_FILES):
        raise MintError(f"{model_dir}: no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return AutoTokenizer.from_pretrained(str(model_dir))


def choose_windows(text: str, tokenizer: Any, n_windows: int, length: int, seed: int) -> list[Window]:
    """`n_windows` non-overlapping windows of exactly `length` tokens (the tokenizer's sequence prefix, then text
    from a line start of `text`).

    Only the chosen spans are tokenised (the whole 2.4 MB split would cost seconds): a seeded permutation of
    the line starts is walked until enough windows fit. Returned in text order.
    """
    prefix = sequence_prefix(tokenizer)
    if n_windows < 1 or length < len(prefix) + 2:
        raise MintError(
            f"calibration: need n_windows >= 1 and window >= {len(prefix) + 2} (got {n_windows}, {length})"
        )
    starts = [0] + [m.end() for m in re.finditer(r"\n(?=[^\n])", text)]
    order = np.random.default_rng(seed).permutation(len(starts))
    chosen: list[Window] = []
    for k in order[: max(50 * n_windows, 1000)]:
        w = _window_at(text, tokenizer, starts[int(k)], length - len(prefix), prefix)
        if w and not any(w.char_start < c.char_end and c.char_start < w.char_end for c in chosen):
            chosen.append(w)
            if len(chosen) == n_windows:
                break
    if not chosen:
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        raise MintError(f"the corpus {SPLIT} split has {n:,} tokens, fewer than one window of {length}")
    if len(chosen) < n_windows:
        log.warning("only %d non-overlapping windows of %d tokens found", len(chosen), length)
    return sorted(chosen, key=lambda w: w.char_start)


def _window_at(text: str, tokenizer: Any, start: int, length: int, prefix: list[int]) -> Window | None:
    span = length * _CHARS_PER_TOKEN
    while True:
        end = min(len(text), start + span)
        enc = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        # The last token must not be cut by the span end (drop it unless the span reaches the end of text).
        usable = len(ids) if end == len(text) else len(ids) - 1
        if usable >= length:
            end_char = start + int(enc["offset_mapping"][length - 1][1])
            return Window(start, end_char, [*prefix, *ids[:length]])
        if end == len(text):
            return None
        span *= 2


@contextlib.contextmanager
def torch_settings(threads: int, seed: int | None = None) -> Iterator[None]:
    """Deterministic algorithms, `threads` CPU threads (0 = torch's default) and an optional seed; torch's
    global settings are restored afterwards (the calibration stages run inside tests and benchmarks too)."""
    import torch

    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if threads:
            torch.set_num_threads(threads)
        if seed is not None:
            torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def calibration_windows(
    model_dir: Path, corpus_dir: Path, n_windows: int, window: int, seed: int
) -> tuple[Any, list[Window], str]:
    """(checkpoint, windows of the train split capped at the model's context, train.txt sha256); the checkpoint
    is opened first so that bad weights fail before the slow work."""
    from mintbuild.hf.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    text, train_sha = read_train_text(corpus_dir)
    tokenizer = load_tokenizer(model_dir)
    max_pos = ckpt.config.get("max_position_embeddings")
    length = min(window, max_pos) if max_pos else window
    return ckpt, choose_windows(text, tokenizer, n_windows, length, seed), train_sha


def round_sig(x: float, digits: int) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits - 1}e}")


def calibration_parser(p: argparse.ArgumentParser, model_stage: str, out_key: str) -> None:
    """The arguments of a calibration stage (importance, equalize): params, model, corpus, out, progress."""
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--model", help=f"HF model folder (default: the {model_stage} stage's output)")
    p.add_argument("--corpus", help="corpus folder with train.txt (default: corpus.out from params)")
    p.add_argument("--out", help=f"output folder (default: {out_key} from params)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def calibration_args(args: argparse.Namespace, model_stage: str) -> tuple[Params, Path, Path]:
    """(params, model folder, corpus folder) of a calibration stage's command line; the model folder defaults
    to the output of `model_stage` (`model` or `equalize`)."""
    params = load_params(args.params)
    model_out = Path(getattr(params, model_stage).out)
    model_dir = Path(args.model) if args.model else resolve_weights_dir(model_out)
    return params, model_dir, Path(args.corpus or params.corpus.out)
