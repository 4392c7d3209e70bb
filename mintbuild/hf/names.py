"""Hugging Face checkpoint tensor names: the per-expert MoE naming every stage that groups tensors shares.

A MoE checkpoint stores one tensor per expert (`model.layers.3.mlp.experts.7.up_proj.weight`); transformers and
mlx-lm stack them into one tensor on load, so one decision, one importance pool and one GGUF tensor cover all
experts of a name.
"""

from __future__ import annotations

import re

#: `.experts.<e>.` in a per-expert tensor's name; group 1 is the expert's index.
EXPERT = re.compile(r"\.experts\.(\d+)\.")


def expert_group(name: str) -> str:
    """The name shared by every expert of a per-expert tensor (`...experts.*.up_proj.weight`); any other name
    unchanged."""
    return EXPERT.sub(".experts.*.", name)
