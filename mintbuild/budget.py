"""Byte budgets of hardware targets.

A target states its budget in exactly one way:
  - `size`: absolute bytes with an explicit unit. KB/MB/GB/TB are decimal (10^3, 10^6, 10^9, 10^12: the units
    of disk sizes and of model-hub file listings); KiB/MiB/GiB/TiB are binary (2^10, ...: the units GPU and
    phone memory really come in, so device presets use GiB). A bare number is refused: say `B`.
  - `bits_per_weight`: average bits per parameter over the whole model (all tensors, 16-bit ones included).
  - `fraction_of_16bit`: a fraction of the model's 16-bit size.
  - `memory` minus headroom: the device's memory minus `reserve` (runtime, OS, activations) and minus the KV
    cache of `kv_context` tokens x `kv_batch` sequences, 2 x layers x kv_heads x head_dim x context x batch x
    `kv_bytes`, computed from the model's config.json.
The budget covers every byte of the packed model's tensor data plus the safetensors header allowance.

A split target names two memories, `memory: {gpu: 24GiB, cpu: 128GiB}` (and `reserve` per side, likewise):
each side's budget is its memory minus its reserve, and the gpu side also minus the KV cache
(`resolve_split_budget`); every tensor then lives on one side.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from mintbuild.errors import MintError

UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][0-9]+)?)\s*(?P<unit>[A-Za-z]+)?\s*$")


def parse_size(text: str | int | float, what: str = "size") -> int:
    """'24GiB' -> 25769803776, '79.3 MB' -> 79300000, '512B' -> 512. Unitless, negative: errors."""
    s = str(text).strip()
    if s.startswith("-"):
        raise MintError(f"{what} {text!r} is negative")
    m = _SIZE.match(s)
    if not m:
        raise MintError(f"{what} {text!r} is not a size: write a number and a unit, e.g. 24GiB or 80MB")
    unit = m.group("unit")
    if unit is None:
        raise MintError(f"{what} {text!r} has no unit: write e.g. {s}B, {s}MB (10^6) or {s}MiB (2^20)")
    factor = UNITS.get(unit.upper())
    if factor is None:
        raise MintError(f"{what} {text!r}: unknown unit {unit!r}; use one of {', '.join(_unit_names())}")
    return math.floor(float(m.group("num")) * factor)


def _unit_names() -> list[str]:
    return ["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]


def format_size(n: int | float) -> str:
    """Human-readable decimal size (the budget table shows MB = 10^6 bytes)."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class ModelFacts:
    """What a budget needs to know about the model."""

    parameters: int
    bytes_16bit: int
    layers: int
    kv_heads: int
    head_dim: int


def model_facts(parameters: int, bytes_16bit: int, config: dict[str, Any]) -> ModelFacts:
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or (int(config.get("hidden_size") or 0) // max(heads, 1)))
    return ModelFacts(parameters, bytes_16bit, layers, kv_heads, head_dim)


def kv_cache_bytes(facts: ModelFacts, context: int, batch: int = 1, nbytes: int = 2) -> int:
    if context and not (facts.layers and facts.kv_heads and facts.head_dim):
        raise MintError(
            "KV-cache headroom needs num_hidden_layers, num_key_value_heads and head_dim (or hidden_size and "
            "num_attention_heads) in the model's config.json"
        )
    return 2 * facts.layers * facts.kv_heads * facts.head_dim * context * batch * nbytes


def resolve_budget(target: Any, facts: ModelFacts, name: str) -> tuple[int, str]:
    """(budget bytes, a one-line explanation of how it was derived) for a target config."""
    ways = {k: getattr(target, k, None) for k in ("size", "bits_per_weight", "fraction_of_16bit", "memory")}
    given = [k for k, v in ways.items() if v not in (None, "")]
    if len(given) != 1:
        listed = ", ".join(ways)
        how = "none" if not given else ", ".join(given)
        raise MintError(f"target {name!r}: give exactly one budget ({listed}); got {how}")
    way = given[0]
    if way == "memory" and is_split(target):
        raise MintError(
            f"target {name!r} names two memories {dict(target.memory)}: a split target has two budgets "
            "(resolve_split_budget), not one"
        )
    if way == "size":
        b = parse_size(target.size, f"target {name!r} size")
        return b, f"size {target.size}"
    if way == "bits_per_weight":
        bpw = float(target.bits_per_weight)
        if bpw <= 0:
            raise MintError(f"target {name!r}: bits_per_weight must be positive, got {bpw}")
        return math.floor(bpw * facts.parameters / 8), f"{bpw} bits/weight x {facts.parameters:,} parameters"
    if way == "fraction_of_16bit":
        f = float(target.fraction_of_16bit)
        if f <= 0:
            raise MintError(f"target {name!r}: fraction_of_16bit must be positive, got {f}")
        return math.floor(f * facts.bytes_16bit), f"{f} x 16-bit size {facts.bytes_16bit:,} B"
    return _device_budget(target, facts, name)


def _device_budget(target: Any, facts: ModelFacts, name: str) -> tuple[int, str]:
    memory = parse_size(target.memory, f"target {name!r} memory")
    reserve = parse_size(target.reserve, f"target {name!r} reserve") if target.reserve else 0
    kv = kv_cache_bytes(
        facts, int(target.kv_context or 0), int(target.kv_batch or 1), int(target.kv_bytes or 2)
    )
    budget = memory - reserve - kv
    why = f"memory {target.memory} - reserve {target.reserve or 0} - KV cache {format_size(kv)}"
    if target.kv_context:
        why += f" ({target.kv_context} tokens x {target.kv_batch or 1})"
    if budget <= 0:
        raise MintError(f"target {name!r}: no memory left for weights ({why} = {budget:,} B)")
    return budget, why


#: The two memories of a split target: gpu (device memory: the KV cache lives here) and cpu (system RAM).
SIDES = ("gpu", "cpu")


def is_split(target: Any) -> bool:
    """Whether the target names several memories (`memory: {gpu: ..., cpu: ...}`)."""
    return isinstance(getattr(target, "memory", None), dict)


@dataclass(frozen=True)
class SplitBudget:
    """Bytes for weights on each side of a split target, and how each was derived."""

    gpu: int
    cpu: int
    gpu_why: str
    cpu_why: str
    kv_bytes: int

    def side(self, s: str) -> int:
        return self.gpu if s == "gpu" else self.cpu


def resolve_split_budget(target: Any, facts: ModelFacts, name: str) -> SplitBudget:
    """Each side's weight budget: memory[side] - reserve[side], minus the KV cache on the gpu side. Refuses a
    second budget way, unknown or missing sides, and a side with nothing left."""
    others = [
        k for k in ("size", "bits_per_weight", "fraction_of_16bit") if getattr(target, k) not in (None, "")
    ]
    if others:
        raise MintError(f"target {name!r}: a split target's budget is its memories; drop {', '.join(others)}")
    memory = _per_side(target.memory, name, "memory", required=True)
    reserve = target.reserve
    if reserve not in (None, "") and not isinstance(reserve, dict):
        raise MintError(
            f"target {name!r}: reserve {reserve!r}: give a split target's reserve per side, e.g. "
            "{gpu: 1GiB, cpu: 8GiB}"
        )
    reserve = _per_side(reserve or {}, name, "reserve", required=False)
    kv = kv_cache_bytes(
        facts, int(target.kv_context or 0), int(target.kv_batch or 1), int(target.kv_bytes or 2)
    )
    out: dict[str, tuple[int, str]] = {}
    for side in SIDES:
        mem = parse_size(memory[side], f"target {name!r} memory.{side}")
        res = parse_size(reserve[side], f"target {name!r} reserve.{side}") if side in reserve else 0
        left = mem - res - (kv if side == "gpu" else 0)
        why = f"{side} memory {memory[side]} - reserve {reserve.get(side, 0)}"
        if side == "gpu":
            why += f" - KV cache {format_size(kv)}"
            if target.kv_context:
                why += f" ({target.kv_context} tokens x {target.kv_batch or 1})"
        if left <= 0:
            raise MintError(f"target {name!r}: no {side} memory left for weights ({why} = {left:,} B)")
        out[side] = (left, why)
    return SplitBudget(out["gpu"][0], out["cpu"][0], out["gpu"][1], out["cpu"][1], kv)


def _per_side(value: Any, name: str, what: str, required: bool) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MintError(f"target {name!r}: {what} {value!r}: name each side, e.g. {{gpu: 24GiB, cpu: 64GiB}}")
    unknown = sorted(set(value) - set(SIDES))
    missing = [s for s in SIDES if s not in value] if required else []
    if unknown or missing:
        raise MintError(
            f"target {name!r}: {what} sides {sorted(value)}: a split target names exactly {list(SIDES)}"
            + (f" (unknown: {unknown})" if unknown else "")
            + (f" (missing: {missing})" if missing else "")
        )
    return dict(value)
