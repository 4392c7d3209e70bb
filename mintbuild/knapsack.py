"""The allocation problem of a profile: one multiple-choice knapsack per solver config (independent of the
budget). One decision per tensor, or per group of tensors the runtime stores as one (per-expert weights it
stacks); the role priors, the SQNR veto and the objective (nrmse, mse, fisher with the importance stage's
alphas and GPTQ rounding gains) turn the profile's errors into costs. `mintbuild allocate` solves it per
target; `mintbuild sweep` and the quality benchmark solve it for many budgets.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mintbuild.artifacts.importance import load_importance as read_importance
from mintbuild.artifacts.importance import load_rounding_gains
from mintbuild.artifacts.profile import Profile
from mintbuild.budget import ModelFacts, format_size, model_facts
from mintbuild.config import Params, SolverConfig
from mintbuild.errors import MintError
from mintbuild.formats import (
    PASSTHROUGH,
    GGUFOption,
    Option,
    header_allowance,
    passthrough_index,
    stored_entry_names,
)
from mintbuild.hf.names import expert_group as expert_name_group
from mintbuild.rounding import gptq_helps

log = logging.getLogger(__name__)

OBJECTIVES = ("nrmse", "mse", "fisher")


@dataclass
class Problem:
    """The MCKP of one profile under one solver config (independent of the budget)."""

    decisions: list[dict[str, Any]]
    options: list[Option | GGUFOption]
    sizes: np.ndarray  # int64 [D, K]; 0 where unavailable
    costs: np.ndarray  # float64 [D, K]; inf where unavailable or vetoed
    nrmse: np.ndarray  # [D, K]
    sqnr: np.ndarray  # [D, K]
    available: np.ndarray  # bool [D, K] before the veto
    header_bytes: int
    facts: ModelFacts

    @property
    def k16(self) -> int:
        return passthrough_index(self.options)


def expert_group(meta: dict[str, Any]) -> str:
    """The decision a tensor belongs to: MoE experts named one per tensor, which the runtime stacks into one
    tensor on load, share one decision (`...experts.*.w`); any other tensor is its own."""
    if meta["role"] == "moe_expert":
        return expert_name_group(meta["name"])
    return meta["name"]


def build_problem(
    profile: Profile,
    cfg: SolverConfig,
    importance: dict[str, float] | None = None,
    gains: dict[str, dict[str, float]] | None = None,
) -> Problem:
    """The knapsack of `profile` under `cfg`. The `fisher` objective needs `importance` (tensor name ->
    calibrated alpha, from the importance stage): cost = pi * alpha_cfg * sum over members of alpha * SSE * r,
    r = `gains`[tensor][option] for the tensors the packer rounds by GPTQ (`rounding_gains`), else 1."""
    if cfg.objective not in OBJECTIVES:
        raise MintError(f"solver.objective {cfg.objective!r}: choose one of {list(OBJECTIVES)}")
    if cfg.objective == "fisher" and not importance:
        raise MintError(
            "solver.objective fisher needs the importance artifact (run `mintbuild importance`), "
            "or choose objective nrmse / mse"
        )
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(profile.tensors):
        groups.setdefault(expert_group(m), []).append(i)
    names = sorted(groups)
    idx = [groups[n] for n in names]
    avail = np.stack([profile["available"][rows].astype(bool).all(axis=0) for rows in idx])
    sizes = np.stack([profile["bytes"][rows].sum(axis=0) for rows in idx]).astype(np.int64)
    sse = np.stack([np.nansum(profile["sse"][rows], axis=0) for rows in idx])
    norm = np.array([profile["norm_sq"][rows].sum() for rows in idx])
    elements = np.array([int(profile["elements"][rows].sum()) for rows in idx], dtype=np.int64)
    nrmse, sqnr = _error_metrics(sse, norm, avail)
    decisions = [_decision(profile, n, rows) for n, rows in zip(names, idx, strict=True)]
    priors = np.array([prior_for(d, cfg) for d in decisions])
    alphas = np.array([float(cfg.alpha.get(d["name"], 1.0)) for d in decisions])
    for d, p, a in zip(decisions, priors, alphas, strict=True):
        d["prior"], d["alpha"] = (None if math.isinf(p) else float(p)), float(a)
    k16 = passthrough_index(profile.options)
    costs = _costs(cfg, nrmse, sqnr, avail, priors, alphas, elements, k16)
    if cfg.objective == "fisher":
        measured = gains or {}
        fisher = _fisher_sse(profile, idx, importance or {}, measured)
        for d in decisions:
            for m in set(d["members"]) & set(measured):
                d["rounding_gain"] = {k: round(v, 4) for k, v in sorted(measured[m].items())}
        costs = np.where(np.isfinite(costs), _weights(priors, alphas)[:, None] * fisher, np.inf)
    sizes = np.where(avail, sizes, 0)
    if profile.format == "gguf":
        # The GGUF's header, KV metadata and tensor infos, padded to the data alignment: a tensor's type is a
        # fixed-size field, so this does not depend on the choices (the profile measured it on the bf16 GGUF).
        header = int(profile.summary["header_bytes"])
    else:
        header = header_allowance([e for d in decisions for m in d["members"] for e in _entries(m, d)])
    facts = model_facts(
        int(profile["elements"].sum()),
        int(profile["bytes"][:, k16].sum()),
        profile.provenance.get("model_config", {}),
    )
    return Problem(decisions, list(profile.options), sizes, costs, nrmse, sqnr, avail, header, facts)


def _entries(member: str, d: dict[str, Any]) -> list[str]:
    # Worst case for the header: a quantizable tensor stored as weight + scales + biases.
    return stored_entry_names(member, Option(4, 64) if d["quantizable"] else PASSTHROUGH)


def _decision(profile: Profile, name: str, rows: list[int]) -> dict[str, Any]:
    first = profile.tensors[rows[0]]
    return {
        "name": name,
        "members": [profile.tensors[r]["name"] for r in rows],
        "role": first["role"],
        "layer": first["layer"],
        "last_layer": bool(first.get("last_layer")),
        "elements": int(sum(profile.tensors[r]["elements"] for r in rows)),
        "quantizable": bool(first["quantizable"]),
        "tied_to": first.get("tied_to", []),
        # a GGUF profile's tensor: the type the converter wrote (what the passthrough option keeps)
        **({"gguf_type": first["gguf_type"]} if "gguf_type" in first else {}),
    }


def _error_metrics(sse: np.ndarray, norm: np.ndarray, avail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        nrmse = np.where(norm[:, None] > 0, np.sqrt(sse / norm[:, None]), np.where(sse > 0, np.inf, 0.0))
        sqnr = np.where(sse > 0, 10 * np.log10(norm[:, None] / np.where(sse > 0, sse, 1)), np.inf)
    return np.where(avail, nrmse, np.nan), np.where(avail, sqnr, np.nan)


def prior_for(d: dict[str, Any], cfg: SolverConfig) -> float:
    """pi of a decision: the first matching prior rule, else the role's prior, else the layer position's,
    else the default (the published table: embedding 10, lm_head 10, norm inf, router 8, vision 8, first
    layer 3, last layer 2, default 1)."""
    for rule in cfg.prior_rules:
        if rule.role and rule.role == d["role"]:
            return float(rule.prior)
        if rule.pattern and re.search(rule.pattern, d["name"]):
            return float(rule.prior)
    table = cfg.priors
    if d["role"] in table:
        return float(table[d["role"]])
    if d["tied_to"] and "lm_head" in table:
        return max(float(table.get("embedding", 1)), float(table["lm_head"]))
    if d["layer"] == 0 and "first_layer" in table:
        return float(table["first_layer"])
    if d["last_layer"] and "last_layer" in table:
        return float(table["last_layer"])
    return float(table.get("default", 1.0))


def _weights(priors: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    return np.where(np.isinf(priors), 1.0, priors) * alphas


def _fisher_sse(
    profile: Profile, idx: list[list[int]], importance: dict[str, float], gains: dict[str, dict[str, float]]
) -> np.ndarray:
    """Per decision and option, sum over member tensors of alpha (mean squared loss gradient) x SSE x r: the
    second-order estimate of the loss increase, r the GPTQ rounding gain of the tensor and option (1 for
    round-to-nearest, which is also what pack stores where GPTQ's gain is not below 1: `gptq_helps`). A tensor missing from the importance file gets the mean alpha of its role (logged)."""
    by_role: dict[str, list[float]] = {}
    for m in profile.tensors:
        if m["name"] in importance:
            by_role.setdefault(m["role"], []).append(float(importance[m["name"]]))
    overall = float(np.mean([v for vs in by_role.values() for v in vs])) if by_role else 1.0
    alpha = np.empty(len(profile.tensors))
    for i, m in enumerate(profile.tensors):
        a = importance.get(m["name"])
        if a is None:
            a = float(np.mean(by_role[m["role"]])) if m["role"] in by_role else overall
            if m["quantizable"]:
                log.warning("no importance for %s: using its role's mean %.3g", m["name"], a)
        alpha[i] = a
    weighted = alpha[:, None] * np.nan_to_num(profile["sse"], nan=0.0)
    for i, m in enumerate(profile.tensors):
        if m["name"] in gains:
            g = [gains[m["name"]].get(o.name, 1.0) for o in profile.options]
            weighted[i] *= [r if gptq_helps(r) else 1.0 for r in g]  # else pack rounds to nearest
    return np.stack([weighted[rows].sum(axis=0) for rows in idx])


def _costs(cfg, nrmse, sqnr, avail, priors, alphas, elements, k16) -> np.ndarray:
    weight = _weights(priors, alphas)
    if cfg.objective == "nrmse":
        costs = weight[:, None] * nrmse
    else:
        costs = (weight * elements)[:, None] * np.square(nrmse)
    usable = avail & ((sqnr >= cfg.veto_sqnr_db) | np.isnan(sqnr))
    usable[:, k16] = avail[:, k16]
    usable[np.isinf(priors)] = False
    usable[np.isinf(priors), k16] = True
    return np.where(usable, np.nan_to_num(costs, nan=np.inf, posinf=np.inf), np.inf)


def floor_bytes(problem: Problem, with_veto: bool = True) -> int:
    """Smallest achievable tensor bytes (every decision at its cheapest usable option)."""
    ok = np.isfinite(problem.costs) if with_veto else problem.available
    return int(np.where(ok, problem.sizes, np.iinfo(np.int64).max).min(axis=1).sum())


def infeasible_message(problem: Problem, name: str, budget: int, why: str, veto_db: float) -> str:
    lo = floor_bytes(problem) + problem.header_bytes
    lo_noveto = floor_bytes(problem, with_veto=False) + problem.header_bytes
    ok = np.isfinite(problem.costs)
    mins = np.where(ok, problem.sizes, np.iinfo(np.int64).max).min(axis=1)
    top = np.argsort(-mins, kind="stable")[:3]
    setters = ", ".join(f"{problem.decisions[i]['name']} ({format_size(mins[i])})" for i in top)
    return (
        f"target {name!r}: budget {budget:,} B ({format_size(budget)}; {why}) is below the smallest "
        f"feasible size "
        f"{lo:,} B ({format_size(lo)}) with the {veto_db:g} dB SQNR veto ({lo_noveto:,} B without it); "
        f"largest floor tensors: {setters}"
    )


def load_importance(path: Path, profile: Profile) -> dict[str, float]:
    """alpha per tensor from the importance stage; refuses one computed on another model than the profile's."""
    doc = read_importance(path)
    fp = doc.get("provenance", {}).get("model_fingerprint")
    if fp and fp != profile.provenance.get("model_fingerprint"):
        raise MintError(f"{path}: computed on another model than the profile's (fingerprint {fp}); re-run it")
    try:
        alpha = {str(k): float(v) for k, v in doc["alpha"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise MintError(f"{path}: not a readable importance artifact ({e})") from None
    if profile.format == "gguf":  # alphas are by checkpoint (HF) name; the profile's tensors by GGUF name
        return {m["name"]: alpha[m["hf_name"]] for m in profile.tensors if m.get("hf_name") in alpha}
    return alpha


def problem_for(
    profile: Profile,
    cfg: SolverConfig,
    importance_file: Path | None = None,
    params: Params | None = None,
) -> Problem:
    """The knapsack for `cfg`, reading the importance artifact when the objective is fisher, and pricing the
    tensors `params.pack` rounds by GPTQ (`rounding_gains`) when `params` is given."""
    importance = gains = None
    if cfg.objective == "fisher":
        importance = load_importance(importance_file or Path(cfg.importance), profile)
        if params is not None:
            gains = rounding_gains(params, profile)
    return build_problem(profile, cfg, importance, gains)


def rounding_gains(params: Params, profile: Profile) -> dict[str, dict[str, float]]:
    """{tensor: {option: r}} for the tensors `mintbuild pack` rounds by GPTQ (pack.rounding gptq: those the
    importance stage measured a Hessian for), r = GPTQ's output error over round-to-nearest's on held-out
    calibration windows, as the importance stage measured it (`importance.rounding_gains`) for this model.
    Only the fisher objective uses it (the others are the published and the data-free ones)."""
    if params.pack.rounding != "gptq" or profile.format == "gguf":  # llama-quantize rounds to nearest
        return {}
    folder = Path(params.importance.out)
    fp = read_importance(folder).get("provenance", {}).get("model_fingerprint")
    if fp != profile.provenance.get("model_fingerprint"):
        raise MintError(
            f"{folder}: measured on another model than the profile's (fingerprint {fp}); re-run it"
        )
    gains = load_rounding_gains(folder, params.pack.damp, params.pack.block)
    names = {o.name for o in profile.options}
    return {t: {o: r for o, r in g.items() if o in names} for t, g in gains.items()}
