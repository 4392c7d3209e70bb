"""Windows start the way the model's tokenizer starts a sequence: with its BOS when it adds one (never scored),
for evaluation and calibration alike; the perplexity equals a plain transformers computation of those windows."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mintbuild.calibration.windows import choose_windows as calibration_windows
from mintbuild.calibration.windows import load_tokenizer, sequence_prefix
from mintbuild.config import EvalConfig, Params
from mintbuild.hf.evaluator import corpus_tokens, evaluate_folder, load_baseline

from .synth import tiny_llama


@pytest.fixture(scope="module", params=[True, False], ids=["adds-bos", "no-bos"])
def model(request, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bool]:
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")[:100_000]
    folder = tmp_path_factory.mktemp("bos") / "model"
    return tiny_llama(folder, text, bos=request.param), request.param


def test_the_prefix_is_what_the_tokenizer_adds(model: tuple[Path, bool]) -> None:
    folder, bos = model
    tok = load_tokenizer(folder)
    assert sequence_prefix(tok) == ([tok.convert_tokens_to_ids("<s>")] if bos else [])
    assert (tok("a b")["input_ids"][0] == tok.convert_tokens_to_ids("<s>")) is bos


def test_calibration_windows_start_with_the_prefix(model: tuple[Path, bool], corpus_dir: Path) -> None:
    folder, bos = model
    tok = load_tokenizer(folder)
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    prefix = sequence_prefix(tok)
    for w in calibration_windows(text, tok, 3, 48, 0):
        assert len(w.ids) == 48 and w.ids[: len(prefix)] == prefix
        # The rest is the text of the recorded character range, tokenized on its own.
        body = tok(text[w.char_start : w.char_end], add_special_tokens=False)["input_ids"]
        assert w.ids[len(prefix) :] == body[: 48 - len(prefix)]
        assert (tok.convert_tokens_to_ids("<s>") in w.ids[:1]) is bos


def test_perplexity_equals_transformers_on_the_same_windows(
    model: tuple[Path, bool], corpus_dir: Path
) -> None:
    """Independent oracle: transformers' own model, windows built by hand the way the runtimes' perplexity
    tools build them (BOS + text for a BOS tokenizer; text with its first token as context otherwise)."""
    from transformers import AutoModelForCausalLM

    folder, bos = model
    params = dataclasses.replace(Params(), eval=EvalConfig(window=64, n_windows=3, seed=1))
    ours, settings, _ = evaluate_folder(load_baseline(folder), folder, params, corpus_dir, progress=False)
    tok = load_tokenizer(folder)
    tokens, _ = corpus_tokens(corpus_dir, "test", tok)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    bos_id = tok.convert_tokens_to_ids("<s>")
    nll, n = 0.0, 0
    for s in settings["starts"]:
        ids = [bos_id, *tokens[s : s + 63]] if bos else list(tokens[s : s + 64])
        with torch.inference_mode():
            logits = hf(input_ids=torch.tensor([ids])).logits[0]
        target = torch.tensor(ids[1:])
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum"))
        n += len(ids) - 1
    assert ours["tokens"] == n == 3 * 63
    assert ours["ppl_mean"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert ("prefix" in settings) is bos
    assert np.isfinite(ours["ppl_median"])
