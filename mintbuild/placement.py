"""Split targets: which side (gpu or cpu memory) each decision may live on, and the placed allocation.

A split target (`memory: {gpu: ..., cpu: ...}`, mintbuild/budget.py) states a placement rule: the preset
`placement` ("any": every tensor may go to either side; "experts_on_cpu": MoE expert tensors in cpu memory, the
rest free) and `placement_rules` tried first ({pattern or role, side}). The runtime adds its own facts: llama.cpp
keeps the token embedding (an input lookup) in cpu memory whatever the offload, so a GGUF target pins it there.
`solve_placement` sizes and places every decision at once (mintbuild.solve.split) with the target's price per
cpu byte; the GGUF header and metadata are charged to the cpu side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from mintbuild.budget import SplitBudget, format_size, resolve_split_budget
from mintbuild.config import PlacementRule
from mintbuild.errors import InfeasibleBudget, MintError

PRESETS: dict[str, list[PlacementRule]] = {
    "any": [],
    "experts_on_cpu": [
        PlacementRule(role="moe_experts", side="cpu"),  # stacked experts (one 3-D tensor per layer)
        PlacementRule(role="moe_expert", side="cpu"),  # experts stored one tensor per expert
    ],
}
#: Runtime facts: roles a format always keeps on one side. llama.cpp assigns the input layer (the token
#: embedding, a row lookup) to the cpu whatever -ngl says.
RUNTIME_PINS: dict[str, list[PlacementRule]] = {"gguf": [PlacementRule(role="embedding", side="cpu")]}
#: Target fields that only split targets use, with their defaults (left out of one-budget allocations).
SPLIT_DEFAULTS: dict[str, Any] = {"placement": "any", "placement_rules": [], "cpu_price_per_gib": 1e-6}
SIDE_NAMES = ("gpu", "cpu")
GPU, CPU, EITHER = 0, 1, 2


def where_for(decisions: list[dict[str, Any]], target: Any, name: str, fmt: str) -> np.ndarray:
    """[D] GPU / CPU / EITHER per decision: the runtime's pins, then the target's rules (first match), then its
    preset; refuses an unknown preset or side and a rule that matches no decision."""
    if target.placement not in PRESETS:
        raise MintError(f"target {name!r}: placement {target.placement!r}: choose one of {sorted(PRESETS)}")
    rules = list(RUNTIME_PINS.get(fmt, [])) + list(target.placement_rules) + PRESETS[target.placement]
    for r in rules:
        if r.side not in SIDE_NAMES or not (r.pattern or r.role):
            raise MintError(
                f"target {name!r}: placement rule {_rule_text(r)}: give a pattern or role, side gpu/cpu"
            )
    where = np.full(len(decisions), EITHER, dtype=np.int64)
    for i, d in enumerate(decisions):
        for r in rules:
            if (r.role and r.role == d["role"]) or (r.pattern and re.search(r.pattern, d["name"])):
                where[i] = SIDE_NAMES.index(r.side)
                break
    for r in target.placement_rules:
        if not any(_matches(r, d) for d in decisions):
            raise MintError(f"target {name!r}: placement rule {_rule_text(r)} matches no tensor")
    return where


def _matches(r: PlacementRule, d: dict[str, Any]) -> bool:
    return bool((r.role and r.role == d["role"]) or (r.pattern and re.search(r.pattern, d["name"])))


def _rule_text(r: PlacementRule) -> str:
    what = f"pattern {r.pattern!r}" if r.pattern else f"role {r.role!r}"
    return f"{what} -> {r.side!r}"


@dataclass(frozen=True)
class Placed:
    """A solved split target: the solver's result, the budgets, the rule per decision and the header's side."""

    result: Any  # mintbuild.solve.split.SplitResult
    budget: SplitBudget
    where: np.ndarray
    header_bytes: int  # charged to the cpu


def solve_placement(problem: Any, target: Any, name: str, fmt: str) -> Placed:
    """Size and place every decision of `problem` (knapsack.Problem) for the split target; an infeasible pair
    is refused before any work, naming each side's floor."""
    from mintbuild.solve.split import solve_split, split_floors

    if fmt == "mlx":
        raise MintError(
            f"target {name!r}: a split (gpu + cpu) budget needs a runtime that places tensors; MLX runs in "
            "unified memory: give one `memory` instead"
        )
    budget = resolve_split_budget(target, problem.facts, name)
    where = where_for(problem.decisions, target, name, fmt)
    header = int(problem.header_bytes)
    cpu_for_tensors = budget.cpu - header
    floors = split_floors(problem.sizes, problem.costs, where)
    short = []
    if floors.gpu > budget.gpu:
        short.append(
            f"gpu floor {format_size(floors.gpu)} > gpu budget {format_size(budget.gpu)} ({budget.gpu_why})"
        )
    if floors.cpu + header > budget.cpu:
        short.append(
            f"cpu floor {format_size(floors.cpu + header)} (with the {format_size(header)} header) > cpu budget "
            f"{format_size(budget.cpu)} ({budget.cpu_why})"
        )
    if floors.total + header > budget.gpu + budget.cpu:
        short.append(
            f"both sides' floor {format_size(floors.total + header)} > {format_size(budget.gpu + budget.cpu)}"
        )
    if short:
        raise InfeasibleBudget(
            f"target {name!r}: no split fits: {'; '.join(short)} (gpu floor {floors.gpu:,} B, cpu floor "
            f"{floors.cpu + header:,} B)"
        )
    price = float(target.cpu_price_per_gib) / 2**30
    res = solve_split(problem.sizes, problem.costs, where, budget.gpu, cpu_for_tensors, cpu_price=price)
    return Placed(res, budget, where, header)


def split_summary(placed: Placed) -> dict[str, Any]:
    """The allocation's `split` record: each side's budget, bytes used and derivation, the price, the gap."""
    r, b = placed.result, placed.budget
    return {
        "gpu": {"budget": b.gpu, "bytes": r.gpu_bytes, "slack": b.gpu - r.gpu_bytes, "derivation": b.gpu_why},
        "cpu": {
            "budget": b.cpu,
            "bytes": r.cpu_bytes + placed.header_bytes,
            "slack": b.cpu - r.cpu_bytes - placed.header_bytes,
            "derivation": b.cpu_why + " (holds the GGUF header)",
        },
        "kv_cache_bytes": b.kv_bytes,
        "loss": r.loss,
        "cpu_price": r.price,
        "objective": r.objective,
        "bound": r.bound,
        "gap": r.gap,
        "rel_gap": r.rel_gap,
        "optimal": bool(r.optimal),
    }


def split_row(alloc: dict[str, Any]) -> dict[str, Any]:
    """The report row's extra fields for a split allocation ({} for a one-budget one, whose row is unchanged)."""
    s = alloc.get("split")
    if not s:
        return {}
    return {"split": {side: {"bytes": s[side]["bytes"], "budget": s[side]["budget"]} for side in SIDE_NAMES}}


def split_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: each split target's bytes and budget per side ([] when no row is split)."""
    split = [r for r in rows if r.get("split")]
    if not split:
        return []
    lines = ["", "Split targets (bytes per memory):", "", "| target | gpu | gpu budget | cpu | cpu budget |"]
    lines.append("|---|---:|---:|---:|---:|")
    for r in split:
        g, c = r["split"]["gpu"], r["split"]["cpu"]
        lines.append(
            f"| {r['target']} | {format_size(g['bytes'])} | {format_size(g['budget'])} | "
            f"{format_size(c['bytes'])} | {format_size(c['budget'])} |"
        )
    return lines


def split_diff_rows(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`mintbuild diff` table rows: each side's bytes of budget, before and after ([] if neither is split)."""
    sa, sb = a.get("split"), b.get("split")
    if not (sa or sb):
        return []

    def cell(s: dict[str, Any] | None, side: str) -> str:
        return "-" if not s else f"{format_size(s[side]['bytes'])} of {format_size(s[side]['budget'])}"

    return [f"| {side} bytes | {cell(sa, side)} | {cell(sb, side)} |" for side in SIDE_NAMES]
