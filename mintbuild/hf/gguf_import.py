"""A GGUF's weights as dense safetensors, one tensor in memory at a time.

transformers converts a GGUF by dequantizing every tensor into one float32 state dict and loading a model from
it: the whole model twice in float32 (12 GB for a 1.8B model, 280 GB for a 70B). This module runs the same
per-tensor conversion transformers does (its dequantize, its architecture's tensor processor, its GGUF-to-HF
name map built on a model with no storage) and writes each result straight into safetensors shards, so the peak
is one shard of the output dtype plus a few float32 copies of the largest tensor:

    peak RSS ~ shard_bytes (2 GiB by default) + 3 x 4 x (largest tensor's elements) + the GGUF's pages as read
               (a read-only map: clean pages the kernel reclaims under pressure) + ~0.5 GB of interpreter

Measured: Qwen2.5-Coder-1.5B from its 1.0 GB Q4_K_M file, 4.84 GB (the whole-model load: 12.1 GB).

Guarantees: every tensor of the model's state dict is written exactly once (the tied head under the
embedding's name only) or the import fails naming what is missing; values are bit-identical to transformers'
whole-model load cast to the same dtype (tests/test_gguf_import.py compares both on several families); a
model that fits one shard is one `model.safetensors` with its tensors in name order, as before; more shards are
`model-0000i-of-0000n.safetensors` plus the standard index, each shard's tensors in name order.

Architectures whose tensor processor builds one HF tensor from several GGUF tensors (transformers'
mixture-of-experts processors) are not streamed: `streams(architecture)` says which are, and the model stage
loads the others whole.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.progress import progress

log = logging.getLogger(__name__)

#: Bytes of output-dtype tensors gathered before a shard is written.
SHARD_BYTES = 2 << 30

#: GGUF architectures converted whole: transformers' processors for them build HF tensors from several GGUF
#: tensors (experts) or were not checked one tensor at a time. Every other architecture's processor maps each GGUF
#: tensor to at most one HF tensor (the base processor, llama's q/k un-permutation, gemma's norm offset, ...).
_NOT_STREAMED = ("qwen2moe", "qwen3moe", "gpt_oss", "gpt-oss", "minimax-m2", "bloom", "t5", "t5encoder")


def architecture(gguf_path: Path) -> str:
    """The GGUF's `general.architecture`."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import read_field

    return str(read_field(GGUFReader(str(gguf_path)), "general.architecture")[0])


def streams(arch: str) -> bool:
    """True when the architecture's tensors convert one by one (see the module docstring)."""
    return arch not in _NOT_STREAMED


def empty_model(folder: Path, gguf_name: str) -> Any:
    """The GGUF's transformers model with no storage (meta device), float32: its config, state-dict names and
    generation config, as a whole-model load would give them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, gguf_file=gguf_name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def write_weights(
    gguf_path: Path, model: Any, dtype: str, dst: Path, shard_bytes: int = SHARD_BYTES
) -> list[str]:
    """Convert every tensor of `gguf_path` into `dst` as `dtype` safetensors for `model` (from empty_model);
    return the weight files written, in order."""
    import torch
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    reader = GGUFReader(str(gguf_path))
    arch = str(read_field(reader, "general.architecture")[0])
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    parsed["tensors"] = {}
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
    mapping = get_gguf_hf_weights_map(model, processor)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    expected = set(model.state_dict())
    if tied and "model.embed_tokens.weight" in expected:
        expected.discard("lm_head.weight")  # the tied matrix is stored once, under the embedding's name
    writer = _ShardWriter(dst, shard_bytes)
    torch_dtype = getattr(torch, dtype)
    with progress(len(reader.tensors), f"model: {gguf_path.name} to {dtype}", "tensors") as bar:
        for tensor in reader.tensors:
            result = processor.process(
                weights=dequantize(tensor.data, tensor.tensor_type),
                name=tensor.name,
                tensor_key_mapping=mapping,
                parsed_parameters=parsed,
            )
            if result.name in mapping:
                parsed["tensors"][mapping[result.name]] = torch.from_numpy(result.weights.copy())
            for name, value in parsed["tensors"].items():
                if name in expected:
                    writer.add(name, _checked(name, value.to(torch_dtype).contiguous(), dtype, gguf_path))
            parsed["tensors"] = {}
            bar.update(1)
    missing = sorted(expected - writer.names)
    if missing:
        raise MintError(
            f"{gguf_path.name}: {len(missing)} of the model's {len(expected)} tensors are not in the file "
            f"(first: {missing[0]})"
        )
    return writer.close()


def _checked(name: str, t: Any, dtype: str, gguf_path: Path) -> Any:
    import torch

    if not torch.isfinite(t).all():
        raise MintError(f"{gguf_path.name}: non-finite values after conversion to {dtype} in {name}")
    return t


class _ShardWriter:
    """Tensors gathered until `shard_bytes`, each shard written in name order; names fixed by close()."""

    def __init__(self, dst: Path, shard_bytes: int) -> None:
        self.dst, self.shard_bytes = dst, shard_bytes
        self.pending: dict[str, Any] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.names: set[str] = set()
        self.total = 0

    def add(self, name: str, tensor: Any) -> None:
        if name in self.names:
            raise MintError(f"tensor {name} produced twice by the GGUF conversion")
        self.names.add(name)
        self.pending[name] = tensor
        size = tensor.numel() * tensor.element_size()
        self.pending_bytes += size
        self.total += size
        if self.pending_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        tensors = {n: self.pending[n] for n in sorted(self.pending)}
        save_file(tensors, str(self._temp(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(tensors))
        self.pending, self.pending_bytes = {}, 0

    def _temp(self, i: int) -> Path:
        return self.dst / f".shard-{i:05d}.safetensors"

    def close(self) -> list[str]:
        self._flush()
        n = len(self.shards)
        files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for i, f in enumerate(files):
            self._temp(i).rename(self.dst / f)
        if n > 1:
            weight_map = {name: f for f, names in zip(files, self.shards, strict=True) for name in names}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        count = sum(len(s) for s in self.shards)
        log.info("wrote %d tensors (%.2f GB) to %d file(s)", count, self.total / 1e9, n)
        return files
