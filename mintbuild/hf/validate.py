"""A checkpoint's tensors agree with its config.json, checked from the headers before any stage does work.

The expected tensor set is transformers' own: the causal-LM class that config.json names, built on the meta
device (no memory, no weights), so every family transformers supports is covered without a table of ours. A
checkpoint is refused, with one line naming the file, the tensor and the expected shape, when

- a tensor the model has is missing (an untied config without `lm_head.weight`: transformers would initialise
  that head at random; a layer fewer than `num_hidden_layers`),
- a tensor is there that the model does not have (a layer beyond `num_hidden_layers`, a stray name),
- a shape disagrees with the config (hidden size, heads, vocabulary, intermediate size),
- config.json ties the head to the embedding but the checkpoint's `lm_head.weight` holds other values
  (transformers would drop it silently). An identical copy of the embedding is accepted.

MoE experts that transformers stacks in one 3-D parameter (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]) are expected per expert (`experts.<e>.gate_proj.weight` [I, H], ...) unless the
checkpoint stores them stacked, as checkpoints do either way.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import STACKED_EXPERTS, Checkpoint, open_checkpoint

log = logging.getLogger(__name__)

#: Tensors older exports carry that no model reads (transformers ignores them on load).
_ALWAYS_IGNORED = (re.compile(r"rotary_emb\.inv_freq$"),)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _shape(shape: Any) -> list[int]:
    return [int(d) for d in shape]


def _meta_model(folder: Path) -> Any:
    """transformers' causal LM for `folder`/config.json, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise MintError(
            f"{folder / 'config.json'}: transformers cannot build this model ({reason})"
        ) from None


def _head_is_tied(model: Any) -> bool:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def expected_shapes(model: Any, stored: set[str]) -> dict[str, list[int]]:
    """name -> shape of every tensor a checkpoint of `model` holds (`stored`: the checkpoint's names, to tell
    stacked from per-expert MoE storage). A tied head is not expected (its copy is checked separately)."""
    head = "lm_head.weight" if _head_is_tied(model) else None
    out: dict[str, list[int]] = {}
    for name, tensor in model.state_dict().items():
        if name == head:
            continue
        m = STACKED_EXPERTS.match(name)
        if m and tensor.ndim == 3 and name not in stored:
            n_exp, rows, cols = _shape(tensor.shape)
            parts = ("gate_proj", "up_proj") if m["what"] == "gate_up_proj" else ("down_proj",)
            for e in range(n_exp):
                for part in parts:
                    out[f"{m['stem']}.{e}.{part}.weight"] = [rows // len(parts), cols]
        else:
            out[name] = _shape(tensor.shape)
    return out


def _ignored(model: Any) -> list[re.Pattern]:
    pats = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    return [*_ALWAYS_IGNORED, *(re.compile(p) for p in pats)]


def _config_says(model: Any) -> str:
    cfg = model.config
    keys = ("num_hidden_layers", "hidden_size", "vocab_size", "tie_word_embeddings")
    return ", ".join(f"{k} {getattr(cfg, k)}" for k in keys if hasattr(cfg, k))


def validate_checkpoint(folder: str | Path) -> Checkpoint:
    """Refuse (MintError, one line) a checkpoint folder whose tensors disagree with its config.json; return the
    indexed checkpoint. Reads headers only, plus the head and embedding when config.json ties them."""
    folder = Path(folder)
    ckpt = open_checkpoint(folder)
    model = _meta_model(folder)
    config_file = folder / "config.json"
    have = ckpt.tensors
    want = expected_shapes(model, set(have))
    for name in sorted(want, key=_order):
        if name not in have:
            hint = ""
            if name == "lm_head.weight":
                hint = " (tie_word_embeddings is false: transformers would initialise the head at random)"
            raise MintError(
                f"{config_file}: tensor {name} (shape {want[name]}) is missing from the checkpoint{hint}; "
                f"config: {_config_says(model)}"
            )
        if list(have[name].shape) != want[name]:
            raise MintError(
                f"{have[name].file}: tensor {name} has shape {list(have[name].shape)}, config.json expects "
                f"{want[name]}"
            )
    ignored = _ignored(model)
    for name in sorted(set(have) - set(want), key=_order):
        if name == "lm_head.weight" and _head_is_tied(model):
            _check_tied_copy(ckpt, model, config_file)
            continue
        if any(p.search(name) for p in ignored):
            continue
        raise MintError(
            f"{have[name].file}: tensor {name} (shape {list(have[name].shape)}) is not in the model "
            f"{config_file.name} describes (expected no such tensor; {_config_says(model)})"
        )
    log.info("%s: %d tensors agree with config.json", folder, len(have))
    return ckpt


def _order(name: str) -> tuple[int, str]:
    """Layers in numeric order, so the first error named is the first layer that is wrong."""
    m = _LAYER.search(name)
    return (int(m.group(1)) if m else -1, name)


def _check_tied_copy(ckpt: Checkpoint, model: Any, config_file: Path) -> None:
    """A tied config's stored head must be the embedding itself (exporters sometimes write both)."""
    import torch

    embed_name = next(n for n, p in model.named_parameters() if p is model.get_input_embeddings().weight)
    head, embed = ckpt.tensors["lm_head.weight"], ckpt.tensors.get(embed_name)
    if embed is not None and head.shape == embed.shape:
        a, b = ckpt.read("lm_head.weight"), ckpt.read(embed_name)
        if a.dtype == b.dtype and torch.equal(a, b):
            return
    raise MintError(
        f"{head.file}: tensor lm_head.weight differs from {embed_name} (expected a copy of shape "
        f"{list(embed.shape) if embed is not None else '?'}), but {config_file.name} ties them "
        "(tie_word_embeddings true): transformers would drop this head; set tie_word_embeddings false or "
        "remove lm_head.weight"
    )
