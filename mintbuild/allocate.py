"""`mintbuild allocate`: the best storage option per tensor for each target's byte budget.

Builds the multiple-choice knapsack from the profile (one decision per tensor, or per group of tensors the
runtime stores as one, e.g. per-expert weights it stacks), applies the priors, the SQNR veto and the
objective,
checks the budget against the smallest feasible size before any work, solves it through
`mintbuild.solve.solve_mckp` (default: proven optimal, with its certificate) and writes, per target,
allocation.json (deterministic: what pack reads) and metrics.json (figures for `dvc metrics show`).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .budget import ModelFacts, format_size, model_facts, resolve_budget
from .config import Params, SolverConfig, TargetConfig, as_dict, load_params, select_targets
from .errors import InfeasibleBudget, MintError
from .formats import PASSTHROUGH, Option, header_allowance, stored_entry_names
from .io import atomic_dir, canonical_json, hash_obj
from .profile import Profile, load_profile

SCHEMA_VERSION = 1
ALLOCATION_FILE = "allocation.json"
METRICS_FILE = "metrics.json"
OBJECTIVES = ("nrmse", "mse", "fisher")
_EXPERT = re.compile(r"\.experts\.\d+\.")

log = logging.getLogger(__name__)


@dataclass
class Problem:
    """The MCKP of one profile under one solver config (independent of the budget)."""

    decisions: list[dict[str, Any]]
    options: list[Option]
    sizes: np.ndarray  # int64 [D, K]; 0 where unavailable
    costs: np.ndarray  # float64 [D, K]; inf where unavailable or vetoed
    nrmse: np.ndarray  # [D, K]
    sqnr: np.ndarray  # [D, K]
    available: np.ndarray  # bool [D, K] before the veto
    header_bytes: int
    facts: ModelFacts

    @property
    def k16(self) -> int:
        return self.options.index(PASSTHROUGH)


def tie_group(meta: dict[str, Any]) -> str:
    """Tensors the runtime stores as one (experts named one per tensor, stacked on load) share a decision."""
    if meta["role"] == "moe_expert":
        return _EXPERT.sub(".experts.*.", meta["name"])
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
        groups.setdefault(tie_group(m), []).append(i)
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
    k16 = profile.options.index(PASSTHROUGH)
    costs = _costs(cfg, nrmse, sqnr, avail, priors, alphas, elements, k16)
    if cfg.objective == "fisher":
        fisher = _fisher_sse(profile, idx, importance or {}, gains or {})
        for d in decisions:
            for m in set(d["members"]) & set(gains or {}):
                d["rounding_gain"] = {k: round(v, 4) for k, v in sorted(gains[m].items())}
        costs = np.where(np.isfinite(costs), _weights(priors, alphas)[:, None] * fisher, np.inf)
    sizes = np.where(avail, sizes, 0)
    entries = [e for d in decisions for m in d["members"] for e in _entries(m, d)]
    facts = model_facts(
        int(profile["elements"].sum()),
        int(profile["bytes"][:, k16].sum()),
        profile.provenance.get("model_config", {}),
    )
    return Problem(
        decisions, list(profile.options), sizes, costs, nrmse, sqnr, avail, header_allowance(entries), facts
    )


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
    round-to-nearest). A tensor missing from the importance file gets the mean alpha of its role (logged)."""
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
            weighted[i] *= [gains[m["name"]].get(o.name, 1.0) for o in profile.options]
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


# --- budgets and the floor -----------------------------------------------------------------------------------


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


# --- solving one target --------------------------------------------------------------------------------------


def allocate_target(
    problem: Problem, name: str, target: TargetConfig, cfg: SolverConfig, profile: Profile
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(allocation document, metrics) for one target."""
    from .solve import solve_mckp

    budget, why = resolve_budget(target, problem.facts, name)
    notes = []
    tensor_budget = budget - problem.header_bytes
    floor = floor_bytes(problem)
    if tensor_budget < floor:
        if target.on_infeasible != "min_safe":
            raise InfeasibleBudget(infeasible_message(problem, name, budget, why, cfg.veto_sqnr_db))
        notes.append(
            f"budget {format_size(budget)} is below the floor; built at the minimum safe size instead"
        )
        tensor_budget = floor
    if budget >= problem.sizes[:, problem.k16].sum() + problem.header_bytes:
        notes.append("budget is at or above the 16-bit size: every tensor stays 16-bit")
    t0 = time.perf_counter()
    res = solve_mckp(problem.sizes, problem.costs, int(tensor_budget), method=cfg.method, **_solver_opts(cfg))
    seconds = time.perf_counter() - t0
    doc = _document(problem, name, target, cfg, profile, budget, why, tensor_budget, res, notes)
    metrics = {**doc["totals"], "target": name, "solve_seconds": round(seconds, 4)}
    return doc, metrics


def _solver_opts(cfg: SolverConfig) -> dict[str, Any]:
    if cfg.method == "cvxpy":
        return {"solver": cfg.milp_solver}
    if cfg.method == "dp":
        return {"max_table_bytes": cfg.dp_max_table_bytes}
    return {}


def _document(problem, name, target, cfg, profile, budget, why, tensor_budget, res, notes) -> dict[str, Any]:
    choice = np.asarray(res.choice)
    rows = np.arange(len(choice))
    tensor_bytes = int(problem.sizes[rows, choice].sum())
    params = problem.facts.parameters
    decisions = []
    for i, d in enumerate(problem.decisions):
        o = problem.options[choice[i]]
        sq = float(problem.sqnr[i, choice[i]])
        decisions.append({
            **{k: v for k, v in d.items() if not k.startswith("_")},
            "option": o.name, "bits": o.bits, "group": o.group,
            "bytes": int(problem.sizes[i, choice[i]]),
            "nrmse": float(problem.nrmse[i, choice[i]]),
            "sqnr_db": None if math.isinf(sq) else sq,  # None: lossless
            "cost": float(problem.costs[i, choice[i]]),
        })  # fmt: skip
    totals = {
        "budget": int(budget),
        "budget_derivation": why,
        "tensor_bytes": tensor_bytes,
        "header_allowance": problem.header_bytes,
        "bytes": tensor_bytes + problem.header_bytes,
        "slack": int(budget - tensor_bytes - problem.header_bytes),
        "parameters": params,
        "avg_bits_per_weight": 8 * tensor_bytes / params,
        "objective": float(res.objective),
        "bound": float(res.bound),
        "gap": float(res.gap),
        "optimal": bool(res.optimal),
        "solver": res.method,
        "objective_kind": cfg.objective,
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "target": name,
        # The description is for people: editing it must not change the artifact (nor rebuild pack/evaluate).
        "target_config": {k: v for k, v in as_dict(target).items() if k != "description"},
        "provenance": {
            "profile_hash": profile.hash,
            "checkpoint_hash": profile.provenance["checkpoint_hash"],
            "model_fingerprint": profile.provenance.get("model_fingerprint"),
            "solver_config_hash": hash_obj(as_dict(cfg)),
            "mintbuild_version": __version__,
        },
        "totals": totals,
        "notes": notes,
        "roles": role_summary(decisions),
        "decisions": decisions,
    }


def role_summary(decisions: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    for d in decisions:
        slot = out.setdefault(d["role"], {}).setdefault(d["option"], {"decisions": 0, "bytes": 0})
        slot["decisions"] += 1
        slot["bytes"] += d["bytes"]
    return out


# --- stage ---------------------------------------------------------------------------------------------------


def check_model(profile: Profile, params: Params, model_dir: Path | None) -> None:
    """Refuse a profile made from another checkpoint than the configured model."""
    from .checkpoint import fingerprint, open_checkpoint

    if model_dir is None or not model_dir.exists():
        return
    fp = fingerprint(open_checkpoint(model_dir))
    if fp != profile.provenance.get("model_fingerprint"):
        raise MintError(
            f"the profile was made from another model than {model_dir} (fingerprint "
            f"{profile.provenance.get('model_fingerprint')} != {fp}); re-run `mintbuild profile`"
        )


def load_importance(path: Path, profile: Profile) -> dict[str, float]:
    """alpha per tensor from the importance stage; refuses one computed on another model than the profile's."""
    from .importance import load_importance as read_importance

    doc = read_importance(path)
    fp = doc.get("provenance", {}).get("model_fingerprint")
    if fp and fp != profile.provenance.get("model_fingerprint"):
        raise MintError(f"{path}: computed on another model than the profile's (fingerprint {fp}); re-run it")
    try:
        return {str(k): float(v) for k, v in doc["alpha"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise MintError(f"{path}: not a readable importance artifact ({e})") from None


def problem_for(
    profile: Profile,
    cfg: SolverConfig,
    importance_file: Path | None = None,
    params: Params | None = None,
    model_dir: Path | None = None,
) -> Problem:
    """The knapsack for `cfg`, reading the importance artifact when the objective is fisher, and pricing the
    tensors `params.pack` rounds by GPTQ (`rounding_gains`) when `params` is given."""
    importance = gains = None
    if cfg.objective == "fisher":
        importance = load_importance(importance_file or Path(cfg.importance), profile)
        if params is not None:
            gains = rounding_gains(params, profile, model_dir)
    return build_problem(profile, cfg, importance, gains)


def rounding_gains(params: Params, profile: Profile, model_dir: Path | None) -> dict[str, dict[str, float]]:
    """{tensor: {option: r}} for the tensors `mintbuild pack` rounds by GPTQ (pack.rounding gptq: those the
    importance stage measured a Hessian for), r = GPTQ's output error over round-to-nearest's, GPTQ fitted on
    the even-numbered calibration windows and both measured on the odd ones (1 when there is a single window).
    Only the fisher objective uses it (the others are the published and the data-free ones)."""
    from .checkpoint import fingerprint, open_checkpoint
    from .gptq import rounding_gain
    from .importance import load_hessians

    if params.pack.rounding != "gptq":
        return {}
    if model_dir is None:
        raise MintError(
            f"pack.rounding gptq: the allocation prices GPTQ on the model's weights, but {params.equalize.out} "
            "has none; run `mintbuild equalize` (or set pack.rounding: rtn)"
        )
    ckpt, gains = open_checkpoint(model_dir), {}
    hs = load_hessians(Path(params.importance.out), fingerprint(ckpt))
    for name, h in sorted(hs.full.items()):
        if name not in hs.even:
            raise MintError(
                f"{params.importance.out}: no even-window Hessian of {name}; re-run `mintbuild importance`"
            )
        shape = tuple(ckpt.tensors[name].shape)
        options = [o for o in profile.options if not o.passthrough and not o.unavailable_reason(shape)]
        # Fitted on the even windows, measured on the odd ones: the gain on tokens GPTQ did not see.
        fit, held_out = hs.even[name], h - hs.even[name]
        gains[name] = rounding_gain(
            ckpt.read(name), fit, held_out, options, params.pack.damp, params.pack.block
        )
        log.info("GPTQ rounding of %s: output error x %s of round-to-nearest", name,
                 ", ".join(f"{k} {v:.2f}" for k, v in gains[name].items()))  # fmt: skip
    return gains


def run(
    params: Params,
    targets: list[str] | None,
    profile_dir: Path,
    out_root: Path,
    model_dir: Path | None = None,
    importance_file: Path | None = None,
) -> dict[str, dict[str, Any]]:
    names = select_targets(params, targets)
    if params.solver.method not in ("exact", "cvxpy", "dp", "greedy"):
        raise MintError(f"solver.method {params.solver.method!r}: choose exact, cvxpy, dp or greedy")
    profile = load_profile(profile_dir)
    check_model(profile, params, model_dir)
    problem = problem_for(profile, params.solver, importance_file, params, model_dir)
    results = {}
    for name in names:
        doc, metrics = allocate_target(problem, name, params.targets[name], params.solver, profile)
        with atomic_dir(out_root / name) as tmp:
            (tmp / ALLOCATION_FILE).write_text(canonical_json(doc))
            (tmp / METRICS_FILE).write_text(canonical_json(metrics))
        t = doc["totals"]
        log.info(
            "%s: %s of %s (%.2f bits/weight), objective %.6g, gap %.2g, %s, %.3f s",
            name,
            format_size(t["bytes"]),
            format_size(t["budget"]),
            t["avg_bits_per_weight"],
            t["objective"],
            t["gap"],
            "optimal" if t["optimal"] else "not proven optimal",
            metrics["solve_seconds"],
        )
        results[name] = doc
    return results


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--target", action="append", help="target name (repeatable); default: every target")
    p.add_argument("--size", help="override the budget of the (single) target, e.g. 70MB")
    p.add_argument("--profile", help="profile folder (default: profile.out from params)")
    p.add_argument("--out", help="output root (default: allocate_out from params); one folder per target")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    if args.size:
        if not args.target or len(args.target) != 1:
            raise MintError("--size needs exactly one --target")
        t = params.targets[args.target[0]] if args.target[0] in params.targets else TargetConfig()
        params.targets[args.target[0]] = TargetConfig(
            **{
                **as_dict(t),
                "size": args.size,
                "bits_per_weight": None,
                "fraction_of_16bit": None,
                "memory": None,
            }
        )
    model_dir = weights_dir(params)
    run(
        params,
        args.target,
        Path(args.profile or params.profile.out),
        Path(args.out or params.allocate_out),
        model_dir,
    )


def weights_dir(params: Params) -> Path | None:
    """The weights folder the build packs (the equalize stage's), or None before it exists."""
    try:
        from .model import resolve_weights_dir

        return resolve_weights_dir(Path(params.equalize.out))
    except MintError:
        return None
