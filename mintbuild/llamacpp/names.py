"""Checkpoint (Hugging Face) tensor names as llama.cpp's converter names them in a GGUF.

One job: the map HF name -> GGUF name, through gguf-py's `get_tensor_name_map(arch, n_blocks)` (the
TensorNameMap the converter itself uses) for the architecture and block count recorded in the GGUF. MoE experts
stored one tensor per expert (`...experts.<e>.down_proj.weight`) are merged by the converter into one 3-D tensor
(`blk.<l>.ffn_down_exps.weight`, [experts, out, in]): such a name maps to the merged tensor and its expert index.
Only names that exist in the GGUF are kept, so a tensor the converter renames in its own way (or drops) has no
entry rather than a wrong one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from mintbuild.errors import MintError
from mintbuild.hf.names import EXPERT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFName:
    """Where a checkpoint tensor went: the GGUF tensor, and the expert's index in a merged expert tensor."""

    name: str
    expert: int | None = None


def tensor_name_map(arch: str, n_blocks: int):
    """gguf-py's TensorNameMap for the GGUF architecture name `arch` (general.architecture, e.g. "llama")."""
    import gguf

    by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in by_name:
        raise MintError(f"gguf-py {gguf.__name__} knows no architecture {arch!r}")
    return gguf.get_tensor_name_map(by_name[arch], n_blocks)


def hf_to_gguf(
    hf_names: Iterable[str], arch: str, n_blocks: int, gguf_names: Iterable[str]
) -> dict[str, GGUFName]:
    """{HF name: GGUFName} for every HF tensor whose converted name is a tensor of the GGUF."""
    tmap = tensor_name_map(arch, n_blocks)
    present = set(gguf_names)
    out: dict[str, GGUFName] = {}
    missed = []
    for hf in hf_names:
        m = EXPERT.search(hf)
        key, expert = (EXPERT.sub(".experts.", hf), int(m.group(1))) if m else (hf, None)
        name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if name in present:
            out[hf] = GGUFName(name, expert)
        else:
            missed.append(hf)
    if missed:
        log.debug("%d checkpoint tensors have no GGUF tensor of the mapped name: %s", len(missed), missed[:5])
    return out


def gguf_to_hf(mapping: dict[str, GGUFName]) -> dict[str, list[str]]:
    """{GGUF name: the HF names it holds} (several for merged experts, in expert order)."""
    out: dict[str, list[tuple[int, str]]] = {}
    for hf, g in mapping.items():
        out.setdefault(g.name, []).append((g.expert if g.expert is not None else -1, hf))
    return {k: [hf for _, hf in sorted(v)] for k, v in out.items()}
