"""x"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mintbuild.artifacts.pack import read_config, verify_manifest
from mintbuild.errors import MintError
from mintbuild.hf.evaluator import build_model
from mintbuild.mlx.folder import PackedTensors, dequantize_module, dequantized_state

log = logging.getLogger(__name__)


class PackedSource:
    """A packed MLX folder: quantized modules dequantized to bf16 as MLX does (mlx_folder.dequantize_module),
    16-bit tensors as stored."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.config = read_config(self.folder)
        self.quant = self.config.get("quantization") or {}
        files = sorted(self.folder.glob("model*.safetensors"))
        if not files:
            raise MintError(f"{self.folder}: no model*.safetensors")
        self._tensors = PackedTensors(files)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def _raw(self, name: str) -> torch.Tensor:
        return self._tensors.read(name)

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            stem = name.removesuffix(".weight")
            if f"{stem}.scales" in self._tensors:
                raw = {f"{stem}.{k}": self._raw(f"{stem}.{k}") for k in ("weight", "scales", "biases")}
                out[name] = dequantize_module(stem, raw, self.quant)
            else:
                out[name] = self._raw(name).to(torch.bfloat16)
        return out


def load_packed(folder: Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, manifest) of a packed folder, after verifying it against its manifest."""
    manifest = verify_manifest(folder)
    config = read_config(folder)
    return build_model(config, dequantized_state(folder, config), dtype), manifest
