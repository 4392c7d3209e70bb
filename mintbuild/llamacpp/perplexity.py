"""llama.cpp's own perplexity on a GGUF, and ours on exactly the same chunks, scored the same way.

llama-perplexity (tools/perplexity, the default mode) tokenizes the text file itself (with BOS in front when the
GGUF's vocabulary adds one), cuts the tokens into consecutive chunks of `ctx` tokens, overwrites each chunk's first
token with BOS when the vocabulary adds one, runs each chunk from an empty cache and scores only the second half:
the logits at positions ctx/2 .. ctx-2 predict the tokens at ctx/2+1 .. ctx-1, so ctx - ctx/2 - 1 tokens per
chunk. It prints the running PPL after each chunk (with `--ppl-output-type 1` also the running mean NLL to six
decimals) and a final estimate. `chunks()` rebuilds those chunks from the HF tokenizer's ids of the same text, and
`score_chunks()` scores them with our layer-streamed evaluator at the same positions, so the two numbers differ
only by the arithmetic (llama.cpp's fp32 kernels on ggml types, with activations quantized to Q8 for the
quantized matmuls) and, should they differ, by tokenization. The tool does not print its tokens; the number of
chunks it found must be the one our token count gives (the tests compare the tokens themselves, read from the
tool's --kl-divergence-base file).

The text file is written here (the corpus split plus one newline, which the tool's `-f` strips), so that its
prompt is the split's text exactly. The tool runs with `-t threads` (0: its own default), `-c ctx` and `--chunks`.
A failed run, or one that printed no final estimate (a text too short for two chunks), is one line with the
tool's last error.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mintbuild.errors import MintError
from mintbuild.hf.streaming import StreamedModel, check_fits, forward_hidden
from mintbuild.llamacpp.build import run_tool

log = logging.getLogger(__name__)

TOOL = "llama-perplexity"

#: |our PPL / llama-perplexity's - 1| beyond which the stage warns. Measured on SmolLM2, 4 chunks of 512, llama.cpp
#: on 2 threads: F32 GGUF +1.0e-5 (the same model function: only fp32 summation order differs), BF16 +2.1e-4 (ggml
#: rounds activations to bf16 for bf16 matmuls), Q8_0 -5.6e-3, Q4_0 -1.2e-3, Q4_K_M -6.3e-3 (per chunk -1.4% ..
#: +1.5%). The quantized gap is llama.cpp's, not the weights': it quantizes activations to Q8 for quantized matmuls,
#: and our PPL with the Q8_0 weights is within 1.2e-4 of the 16-bit model's while llama-perplexity's rises 0.6%.
#: 2% is 3x the largest overall gap measured.
TOLERANCE = 0.02

_CHUNK_LINE = re.compile(r"^\s*\d+\s+(\d+\.\d+)\s+(-?\d+\.\d+)\s+(\S+)\s*$")
_FINAL = re.compile(r"Final estimate: PPL = (\d+\.\d+) \+/- (\d+\.\d+)")
_SETUP = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


@dataclass(frozen=True)
class LlamaRun:
    """What llama-perplexity printed: the final PPL (4 decimals, as printed) and each chunk's mean NLL (from the
    running means, 6 decimals), with the chunk count and length it used."""

    ppl: float
    ppl_stderr: float
    ctx: int
    chunk_nll: list[float]
    seconds: float = 0.0
    command: list[str] = field(default_factory=list)

    @property
    def chunks(self) -> int:
        return len(self.chunk_nll)

    @property
    def scored_per_chunk(self) -> int:
        return scored_per_chunk(self.ctx)

    @property
    def scored_tokens(self) -> int:
        return self.chunks * self.scored_per_chunk


def first_scored(ctx: int) -> int:
    """Position of the first scored token in a chunk of `ctx` (the one llama-perplexity predicts from the logits
    at ctx/2)."""
    return ctx // 2 + 1


def scored_per_chunk(ctx: int) -> int:
    return ctx - first_scored(ctx)


def parse_output(stdout: str, stderr: str, ctx: int) -> LlamaRun:
    """The final PPL and per-chunk mean NLL from a `--ppl-output-type 1` run's output."""
    text = stdout + "\n" + stderr
    final = _FINAL.search(text)
    if not final:
        raise MintError(f"{TOOL} printed no final estimate: {_last_line(stderr or stdout)}")
    setup = _SETUP.search(text)
    if setup and int(setup.group(2)) != ctx:
        raise MintError(f"{TOOL} ran chunks of {setup.group(2)} tokens, asked for {ctx}")
    running = [float(m.group(2)) for ln in stdout.splitlines() if (m := _CHUNK_LINE.match(ln))]
    if not running or (setup and len(running) != int(setup.group(1))):
        raise MintError(
            f"{TOOL}: {len(running)} per-chunk lines in its output, expected {setup and setup[1]}"
        )
    # line k (from 0) holds the mean NLL over chunks 0..k (equal token counts): chunk k's mean is the difference
    chunk_nll = [running[0]] + [(k + 1) * running[k] - k * running[k - 1] for k in range(1, len(running))]
    return LlamaRun(float(final.group(1)), float(final.group(2)), ctx, chunk_nll)


_LOG_PREFIX = re.compile(r"^\d+\.\d+\.\d+\.\d+ ([IWE]) ")


def _last_line(text: str) -> str:
    """The tool's last error line (its log's level E), else its last line, without the log's time stamp."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if (m := _LOG_PREFIX.match(ln)) and m.group(1) == "E"]
    return _LOG_PREFIX.sub("", (errors or lines or ["(no output)"])[-1])


def run_llama_perplexity(gguf: Path, text: str, ctx: int, chunks: int, threads: int = 0) -> LlamaRun:
    """Run llama-perplexity on `text` (written to a temporary file) with chunks of `ctx` tokens, at most `chunks`
    of them."""
    if ctx < 4:
        raise MintError(f"{TOOL}: a context of {ctx} tokens is too short (need at least 4)")
    if not Path(gguf).is_file():
        raise MintError(f"{gguf}: no GGUF file to run {TOOL} on")
    with tempfile.TemporaryDirectory(prefix="mintbuild-ppl-") as tmp:
        path = Path(tmp) / "eval.txt"
        path.write_text(text + "\n", encoding="utf-8")  # -f strips one trailing newline: the prompt is `text`
        args: list[Any] = ["-m", gguf, "-f", path, "-c", ctx, "--chunks", chunks, "--ppl-output-type", 1]
        if threads:
            args += ["-t", threads]
        t0 = time.perf_counter()
        proc = run_tool(TOOL, args)
        seconds = time.perf_counter() - t0
    run = parse_output(proc.stdout, proc.stderr, ctx)
    if run.chunks != chunks:
        log.warning("%s scored %d chunks of %d tokens (asked for %d): the text is shorter", TOOL, run.chunks,
                    ctx, chunks)  # fmt: skip
    log.info("%s: PPL %.4f over %d chunks of %d (%d tokens scored) in %.1f s", TOOL, run.ppl, run.chunks, ctx,
             run.scored_tokens, seconds)  # fmt: skip
    return LlamaRun(run.ppl, run.ppl_stderr, ctx, run.chunk_nll, round(seconds, 3), [TOOL, *map(str, args)])


def chunks(ids: Sequence[int], prefix: Sequence[int], ctx: int, n: int) -> list[np.ndarray]:
    """llama-perplexity's chunks of the text whose tokens (without special tokens) are `ids`: the tokens with the
    tokenizer's prefix (its BOS, when it adds one) cut into `n` chunks of `ctx`, each chunk's first token
    replaced by the BOS when there is one."""
    full = np.concatenate([np.asarray(prefix, dtype=np.int64), np.asarray(ids, dtype=np.int64)])
    if len(full) < n * ctx:
        raise MintError(f"the text has {len(full):,} tokens, fewer than {n} chunks of {ctx}")
    out = []
    for i in range(n):
        c = full[i * ctx : (i + 1) * ctx].copy()
        if len(prefix):
            c[0] = prefix[-1]
        out.append(c)
    return out


def score_chunks(model: StreamedModel, windows: list[np.ndarray], progress: bool = False) -> list[float]:
    """Our mean NLL of each chunk at llama-perplexity's positions (tokens first_scored(ctx) .. ctx-1), every
    chunk through decoder block l before block l+1 is read."""
    ctx = len(windows[0])
    first = first_scored(ctx)
    size = torch.empty((), dtype=model.dtype).element_size()
    acts = 2 * len(windows) * ctx * model.config.hidden_size * size
    check_fits(model, acts + ctx * model.config.vocab_size * 4, "evaluate (llama-perplexity chunks)")
    hidden, _ = forward_hidden(model, [w.tolist() for w in windows], progress, desc="evaluate: chunks")
    out = []
    with torch.inference_mode():
        for ids, h in zip(windows, hidden, strict=True):
            logits = model.head(torch.as_tensor(ids)[None], h).logits[0]
            target = torch.as_tensor(ids[first:], dtype=torch.long)
            nll = torch.nn.functional.cross_entropy(logits[first - 1 : -1].float(), target, reduction="mean")
            out.append(float(nll))
    return out


def gguf_adds_bos(reader: Any) -> bool | None:
    """tokenizer.ggml.add_bos_token of a GGUF (None when the file does not say)."""
    f = reader.fields.get("tokenizer.ggml.add_bos_token")
    return None if f is None else bool(f.contents())


def compare(
    model: StreamedModel,
    gguf: Path,
    text: str,
    ids: Sequence[int],
    prefix: Sequence[int],
    ctx: int,
    n_chunks: int,
    threads: int = 0,
    progress: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, timings) of llama-perplexity on `text` and of our evaluator (`model`, the same GGUF through
    gguf_source) on the same chunks: `ids` are the HF tokenizer's tokens of `text` without special tokens and
    `prefix` what the tokenizer puts in front (its BOS)."""
    n_tokens = len(prefix) + len(ids)
    if n_tokens < 2 * ctx:
        raise MintError(f"the text has {n_tokens:,} tokens; {TOOL} needs at least two chunks of {ctx}")
    run = run_llama_perplexity(gguf, text, ctx, n_chunks, threads)
    if run.chunks != min(n_chunks, n_tokens // ctx):
        raise MintError(
            f"{TOOL} found {run.chunks} chunks of {ctx} tokens in the text, our tokenizer's {n_tokens:,} tokens "
            f"give {min(n_chunks, n_tokens // ctx)}: the two tokenize the text differently"
        )
    t0 = time.perf_counter()
    ours = score_chunks(model, chunks(ids, prefix, ctx, run.chunks), progress)
    seconds = time.perf_counter() - t0
    ours_ppl = math.exp(sum(ours) / len(ours))
    rel = ours_ppl / run.ppl - 1
    if abs(rel) > TOLERANCE:
        log.warning("our PPL %.4f on llama-perplexity's chunks differs from its %.4f by %+.2f%% (tolerance %.1f%%)",
                    ours_ppl, run.ppl, 100 * rel, 100 * TOLERANCE)  # fmt: skip
    metrics = {
        "ppl": run.ppl,
        "ppl_stderr": run.ppl_stderr,
        "chunks": run.chunks,
        "ctx": ctx,
        "scored_tokens": run.scored_tokens,
        "text_tokens": n_tokens,
        "chunk_ppl": [round(math.exp(v), 4) for v in run.chunk_nll],
        "ours_same_chunks": ours_ppl,
        "ours_chunk_ppl": [math.exp(v) for v in ours],
        "rel_diff": float(f"{rel:.3g}"),
        "tolerance": TOLERANCE,
        "bos": bool(len(prefix)),
        "threads": threads,
    }
    timings = {"llama_perplexity_seconds": run.seconds, "ours_same_chunks_seconds": round(seconds, 3)}
    return metrics, timings
