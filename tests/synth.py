"""Tiny synthetic Llama-shaped checkpoints for fast tests (real safetensors files, random weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mintbuild.config import PUBLISHED_PRIORS, SolverConfig
from mintbuild.errors import MintError


def llama_tensors(
    layers: int = 2,
    hidden: int = 256,
    inter: int = 576,
    vocab: int = 1000,
    experts: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        # Realistic scale and a few heavy-tailed entries, as trained weights have.
        x = torch.randn(*shape, generator=g) * 0.02
        x += (torch.rand(*shape, generator=g) < 1e-3) * torch.randn(*shape, generator=g) * 0.2
        return x.to(dtype)

    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        t[p + "self_attn.q_proj.weight"] = w(hidden, hidden)
        t[p + "self_attn.k_proj.weight"] = w(hidden // 4, hidden)
        t[p + "self_attn.v_proj.weight"] = w(hidden // 4, hidden)
        t[p + "self_attn.o_proj.weight"] = w(hidden, hidden)
        if experts:
            t[p + "mlp.gate.weight"] = w(experts, hidden)
            t[p + "mlp.experts.gate_up_proj"] = w(experts, 2 * inter, hidden)
            t[p + "mlp.experts.down_proj"] = w(experts, hidden, inter)
        else:
            t[p + "mlp.gate_proj.weight"] = w(inter, hidden)
            t[p + "mlp.up_proj.weight"] = w(inter, hidden)
            t[p + "mlp.down_proj.weight"] = w(hidden, inter)
    t["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    return t


def write_checkpoint(
    folder: Path, tensors: dict[str, torch.Tensor], shards: int = 1, config: dict | None = None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    cfg = {
        "model_type": "llama",
        "tie_word_embeddings": True,
        "num_hidden_layers": 2,
        "num_key_value_heads": 1,
        "num_attention_heads": 4,
        "hidden_size": 256,
    }
    (folder / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / fname))
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


def tiny_llama(
    out: Path,
    text: str | None = None,
    vocab: int = 512,
    *,
    dtype: torch.dtype = torch.bfloat16,
    shard: bool = False,
    tie: bool = True,
    bos: bool = False,
    hidden: int = 64,
    layers: int = 2,
) -> Path:
    """A 2-layer random-init Llama (hidden 64; `hidden`, `layers` to change) that transformers and mlx-lm load: a real model folder for tests
    that run stages. With `text`, a small byte-level BPE tokenizer of `vocab` tokens trained on it (the model's
    vocabulary is the tokenizer's); without, no tokenizer and a vocabulary of `vocab`. `shard` saves it as
    several safetensors files with an index. `bos`: the tokenizer adds <s> in front of every text, as Llama's,
    Gemma's and Mistral's do when asked for special tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if text is not None:
        vocab = _train_tokenizer(out, text, vocab, bos)
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer_config.json").write_text("{}\n")
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(out, max_shard_size="60KB" if shard else "1GB")
    return out


def _train_tokenizer(out: Path, text: str, vocab: int, bos: bool = False) -> int:
    """Save a byte-level BPE tokenizer trained on `text` into `out` (adding <s> in front of every text when
    `bos`); returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    return tok.get_vocab_size()


def published_solver(**kw: Any) -> SolverConfig:
    """The published objective and priors (nrmse, role table): data-free, so a test needs no importance stage."""
    return SolverConfig(objective="nrmse", priors=dict(PUBLISHED_PRIORS), **kw)


#: Tiny configs of the families mintbuild supports (transformers config classes, random weights, no hub).
FAMILIES: dict[str, dict[str, object]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    # A sliding window no shorter than the tests' sequences: mlx-lm's gemma2 does not apply one at all, and its
    # gemma3_text needs a full sliding_window_pattern (6 layers) of blocks.
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 64},
    "gemma3_text": {
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,
        "num_hidden_layers": 6,
    },
    "phi3": {"tie_word_embeddings": False},
    "qwen2_moe": {
        "tie_word_embeddings": False,  # as the real ones; mlx-lm's qwen2_moe always has its own lm_head
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
}


def tiny_family(
    out: Path, family: str, text: str, vocab: int = 512, seed: int = 0, bos: bool = False
) -> Path:
    """A 2-layer random-init model of `family` (hidden 64, GQA 4/2 heads) with a byte-level BPE tokenizer
    trained on `text`, saved as a bf16 Hugging Face folder that transformers and mlx-lm load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    n_vocab = _train_tokenizer(out, text, vocab, bos)
    base = {
        "vocab_size": n_vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    cfg = AutoConfig.for_model(family, **{**base, **FAMILIES[family]})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms away from their init, so that a wrong norm fold would show in the logits
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.1 * torch.randn(p.shape))
    model.to(torch.bfloat16).save_pretrained(out)
    return out


def load_model(model_dir: Path) -> Any:
    """The whole model in float32 through transformers: the reference the streamed stages are compared with."""
    import torch
    from transformers import AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise MintError(f"{model_dir}: no config.json (not a Hugging Face model folder)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise MintError(
            f"{model_dir}: transformers cannot load the model ({str(e).splitlines()[0]})"
        ) from None
    model.eval()  # no dropout; gradients still flow
    return model
