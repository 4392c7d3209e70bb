"""`mintbuild evaluate-gguf`: perplexity of each packed GGUF target, scored twice on the corpus test split.

Our layer-streamed evaluator (mintbuild.hf.evaluator) reads the GGUF through mintbuild.llamacpp.source (ggml's
own dequantization, one tensor at a time) on the same windows with the same BOS rule as every target, so its
ppl_mean is comparable with the MLX targets' and the baseline's. And the real client, llama-perplexity, scores
the split's text with chunks of `window` tokens, `n_windows` of them, on `threads` threads; our evaluator scores
exactly its chunks at its positions (mintbuild.llamacpp.perplexity), and metrics.json carries both numbers and
their relative difference under `llama_perplexity`. A target whose pack folder is a not-built record gets that
record as its metrics.json and settings.json.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from mintbuild.artifacts.not_built import read_note, write_not_built_metrics
from mintbuild.calibration.windows import load_tokenizer, sequence_prefix
from mintbuild.config import Params, load_params, select_targets
from mintbuild.errors import MintError
from mintbuild.hf.evaluator import score_target
from mintbuild.hf.streaming import StreamedModel
from mintbuild.llamacpp.perplexity import compare as llama_compare
from mintbuild.llamacpp.source import GGUFSource

log = logging.getLogger(__name__)


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
    """Score the packed GGUF of `target` with our evaluator and with llama-perplexity; write its metrics."""

    def source(folder: Path, manifest: dict[str, Any]) -> GGUFSource:
        gguf = gguf_file(folder, manifest)
        if gguf is None:
            raise MintError(f"{folder}: an MLX folder, not a GGUF target; score it with `mintbuild evaluate`")
        src = GGUFSource(gguf)
        check_bos(src, folder)
        return src

    def llama(model: StreamedModel, src: GGUFSource, folder: Path, corpus_dir: Path, window: int) -> Any:
        lp, timings = score_llama_perplexity(model, src.path, folder, params, corpus_dir, window, progress)
        return {"format": "gguf", "llama_perplexity": lp}, timings

    return score_target(params, target, source, out_root, progress, extra=llama, **kw)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--target", action="append", help="target name (repeatable); default: every GGUF target")
    p.add_argument("--out", help="output root (default: eval_out from params)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    out = Path(args.out) if args.out else None
    for name in select_targets(params, args.target, "gguf"):
        note = read_note(Path(params.pack_out) / name)
        if note is not None:  # not built (no GGUF of this model): its metrics say why
            write_not_built_metrics(out or Path(params.eval_out), name, note)
            continue
        run_target(params, name, out, progress=not args.no_progress)
