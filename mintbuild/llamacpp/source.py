"""A GGUF file as a streamed weight source: Hugging Face tensor names in, the values llama.cpp computes with out.

The file's header is parsed by gguf-py's GGUFReader and the tensors are read one at a time with file I/O: each is dequantized with ggml's
own to_float (mintbuild.llamacpp.ggml, the function llama.cpp's CPU backend calls), then mapped back to the checkpoint's
layout the way transformers loads a GGUF (transformers.modeling_gguf_pytorch_utils): the same name map
(gguf-py's TensorNameMap for the file's architecture, walked over the model's own parameter names) and the same
per-family inverse transforms (llama's Q/K rows un-permuted; Gemma's norms stored as 1 + w, so w = stored - 1).
Values are float32 (what ggml computes with), or bfloat16 for BF16 tensors (exact either way).

Stacked expert parameters (transformers' `...experts.gate_up_proj` [E, 2I, H] and `...experts.down_proj`
[E, H, I]) read the converter's merged tensors: gate_up is `ffn_gate_exps` then `ffn_up_exps` concatenated along
the rows, as transformers' Qwen2-MoE GGUF loader interleaves them; down is `ffn_down_exps` as stored.

llama.cpp uses token_embd as the output head when the file has no output.weight, so does this source. A model
whose parameters the file does not cover, or a file tensor the model has no place for, is refused up front with
the names: that is an architecture this evaluator cannot build from this GGUF.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import STACKED_EXPERTS
from mintbuild.llamacpp import ggml

log = logging.getLogger(__name__)

#: GGUF tensors that carry no weight of the transformers model (llama.cpp's precomputed RoPE frequency factors:
#: transformers computes the same factors from config.json's rope_scaling).
NOT_WEIGHTS = frozenset({"rope_freqs.weight"})
#: GGUF's output head and the embedding llama.cpp uses in its place when the file has none.
OUTPUT, TOKEN_EMBD = "output.weight", "token_embd.weight"


def _architecture(reader: Any, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise MintError(f"{path}: no general.architecture in the GGUF metadata")
    return str(field.contents())


def _meta_model(config: dict[str, Any]) -> Any:
    """The transformers model of `config` with its parameters on the meta device (names and shapes only)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model_type = cfg.pop("model_type", None)
    if not model_type:
        raise MintError("config.json has no model_type")
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))


def hf_to_gguf_names(params: Sequence[str], architecture: str, n_blocks: int, path: Path) -> dict[str, str]:
    """GGUF tensor name of each HF parameter name that gguf-py's TensorNameMap for `architecture` knows (the map
    llama.cpp's converter writes with). A name is tried whole, then without its leading module names, as
    transformers tries it on each submodule."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        raise MintError(f"{path}: GGUF architecture {architecture!r} is not one gguf-py knows")
    name_map = get_tensor_name_map(arch, n_blocks)
    out = {}
    for name in params:
        stem, dot, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):  # a bare parameter (a stacked expert tensor) is a weight
            stem, dot, suffix = name, ".", "weight"
        parts = stem.split(".")
        for i in range(len(parts)):
            g = name_map.get_name(".".join(parts[i:]))
            if g is not None:
                out[name] = g + dot + suffix
                break
    return out


def _fused_experts(params: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """{stacked `...experts.gate_up_proj`: its gate and up parts under the converter's per-kind names}."""
    return {
        n: (f"{m['stem']}.gate_proj", f"{m['stem']}.up_proj")
        for n in params if (m := STACKED_EXPERTS.match(n)) and m["what"] == "gate_up_proj"
    }  # fmt: skip


class GGUFSource:
    """The tensors of one GGUF file under the names of the transformers model `config` describes.

    `config` is the model's config.json (default: the one beside the file). `names` maps every HF parameter
    name the file provides to its GGUF tensor name.
    """

    def __init__(self, path: Path, config: dict[str, Any] | None = None) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path = Path(path)
        if not self.path.is_file():
            raise MintError(f"{self.path}: no such GGUF file")
        if config is None:
            cfg_path = self.path.parent / "config.json"
            if not cfg_path.is_file():
                raise MintError(f"{cfg_path}: no config.json beside the GGUF (the model's architecture)")
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        self.config: dict[str, Any] = dict(config)
        try:
            self.reader = GGUFReader(str(self.path))
        except (ValueError, OSError) as e:
            raise MintError(f"{self.path}: not a readable GGUF file ({e})") from None
        self.architecture = _architecture(self.reader, self.path)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=self.config)
        model = _meta_model(self.config)
        model_type = self.config.get("model_type")
        self._check_hparams(model.config)
        params = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        self._shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        fused = _fused_experts(params)
        to_gguf = hf_to_gguf_names(
            [*params, *(p for ps in fused.values() for p in ps)], self.architecture,
            int(self.config["num_hidden_layers"]), self.path,
        )  # fmt: skip
        wanted = set(params)
        #: the GGUF tensors concatenated (along the rows) into a fused HF parameter, in order
        self.parts: dict[str, tuple[str, ...]] = {
            hf: tuple(to_gguf[p] for p in ps) for hf, ps in fused.items()
            if all(to_gguf.get(p) in self._tensors for p in ps)
        }  # fmt: skip
        self.names: dict[str, str] = {
            hf: g for hf, g in to_gguf.items() if g in self._tensors and hf in wanted
        }
        self.names.update({hf: gs[0] for hf, gs in self.parts.items()})
        head = next((hf for hf, g in to_gguf.items() if g == OUTPUT), None)
        if head and head not in self.names and TOKEN_EMBD in self._tensors:
            self.names[head] = TOKEN_EMBD  # llama.cpp's fallback: the embedding is the output head
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        head_param = model.get_output_embeddings()
        skip = {n for n, p in model.named_parameters(remove_duplicate=False)
                if tied and head_param is not None and p is head_param.weight and n != head}  # fmt: skip
        missing = sorted(wanted - set(self.names) - skip)
        if missing:
            raise MintError(
                f"{self.path}: the {model_type} architecture needs {len(missing)} tensor(s) this "
                f"{self.architecture} GGUF does not provide under gguf-py's names, e.g. {missing[:3]}"
            )
        used = set(self.names.values()).union(*self.parts.values())
        extra = sorted(g for g in self._tensors if g not in used and g not in NOT_WEIGHTS)
        if extra:
            raise MintError(
                f"{self.path}: {len(extra)} GGUF tensor(s) have no place in the {model_type} architecture, "
                f"e.g. {extra[:3]}: the evaluator would not compute what llama.cpp computes"
            )
        log.info("%s: %d tensors of a %s GGUF mapped to %s", self.path.name, len(self._tensors),
                 self.architecture, model_type)  # fmt: skip

    def _check_hparams(self, hf_config: Any) -> None:
        """Refuse a config.json whose shape or numerics differ from the GGUF's (the function llama.cpp runs):
        blocks, width, heads, norm epsilon, RoPE base, where both give one number."""
        rope = getattr(hf_config, "rope_parameters", None) or {}
        pairs = {
            "block_count": ("num_hidden_layers", getattr(hf_config, "num_hidden_layers", None)),
            "embedding_length": ("hidden_size", getattr(hf_config, "hidden_size", None)),
            "attention.head_count": ("num_attention_heads", getattr(hf_config, "num_attention_heads", None)),
            "attention.head_count_kv": (
                "num_key_value_heads",
                getattr(hf_config, "num_key_value_heads", None),
            ),
            "attention.layer_norm_rms_epsilon": ("rms_norm_eps", getattr(hf_config, "rms_norm_eps", None)),
            "rope.freq_base": ("rope_theta", rope.get("rope_theta") if isinstance(rope, dict) else None),
        }
        for key, (name, want) in pairs.items():
            field = self.reader.fields.get(f"{self.architecture}.{key}")
            if field is None or not isinstance(want, int | float):
                continue
            got = field.contents()
            if isinstance(got, int | float) and not math.isclose(float(got), float(want), rel_tol=1e-6):
                raise MintError(
                    f"{self.path}: {self.architecture}.{key} is {got} but config.json's {name} is {want}: "
                    "the GGUF is not this model"
                )

    def has(self, name: str) -> bool:
        return name in self.names

    def gguf_name(self, name: str) -> str:
        if name not in self.names:
            raise MintError(f"{self.path}: no GGUF tensor for {name}")
        return self.names[name]

    def tensor_type(self, name: str) -> str:
        """The ggml type of the GGUF tensor behind HF name `name` ("Q4_K", "BF16", ...)."""
        return self._tensors[self.gguf_name(name)].tensor_type.name

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: self._read(n) for n in names}

    def _bytes(self, t: Any) -> np.ndarray:
        """A tensor's bytes, read with file I/O: pages touched through the reader's map would stay resident
        until the map goes (the whole file, by the end of a pass), a read buffer goes with the tensor."""
        with open(self.path, "rb") as f:
            f.seek(int(t.data_offset))
            buf = np.fromfile(f, dtype=np.uint8, count=int(t.n_bytes))
        if buf.size != int(t.n_bytes):
            raise MintError(f"{self.path}: tensor {t.name} is truncated ({buf.size} of {t.n_bytes} bytes)")
        return buf

    def _read(self, name: str) -> torch.Tensor:
        if name in self.parts:  # a fused stacked-expert parameter: [E, rows, cols] parts, rows concatenated
            out = torch.cat([self._read_gguf(g) for g in self.parts[name]], dim=1)
        else:
            out = self._read_gguf(self.gguf_name(name))
        # the model's shape where only unit dimensions differ (a gate vector stored 1-D or 2-D, to which
        # transformers' processor adds one)
        want = self._shapes.get(name, tuple(out.shape))
        if tuple(out.shape) != want and math.prod(want) == out.numel():
            out = out.reshape(want)
        if tuple(out.shape) != want:
            raise MintError(f"{self.path}: tensor {self.names[name]} has shape {list(out.shape)}, "
                            f"the model's {name} {list(want)}")  # fmt: skip
        return out

    def _read_gguf(self, g: str) -> torch.Tensor:
        t = self._tensors[g]
        kind = t.tensor_type.name
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # ggml lists ne[0] (the row) first
        if math.prod(shape) != int(t.n_elements):
            raise MintError(f"{self.path}: tensor {g} has shape {list(shape)} but {t.n_elements} elements")
        try:
            values = ggml.dequantize(self._bytes(t), kind, shape)
        except MintError as e:
            raise MintError(f"{self.path}: tensor {g} ({kind}): {e}") from None
        # The family's inverse transform, as transformers applies it when it loads this GGUF (a row
        # permutation, or Gemma's norm offset: exact in float32 for norm values in [0.5, 2]).
        values = np.ascontiguousarray(self.processor.process(weights=values, name=g).weights)
        out = torch.from_numpy(values)
        if kind == "BF16":
            as_bf16 = out.to(torch.bfloat16)
            if torch.equal(as_bf16.float(), out):
                return as_bf16
        return out
