"""`mintbuild allocate`: the best storage option per tensor for each target's byte budget.

Builds the multiple-choice knapsack from the profile (one decision per tensor, or per group of tensors the
runtime stores as one, e.g. per-expert weights it stacks), applies the priors, the SQNR veto and the
objective,
checks the budget against the smallest feasible size before any work, solves it through
`mintbuild.solve.solve_mckp` (default: proven optimal, with its certificate) and writes, per target,
allocation.json (deterministic: what pack reads) and metrics.json (figures for `dvc metrics show`).

Each target builds one format (config.target_format): an MLX target is allocated from the MLX profile, a GGUF
target from the GGUF profile (profile_gguf: ggml types, the GGUF header as the fixed bytes); a GGUF allocation
records "format": "gguf" and whether the profile measured with the imatrix pack must then use. A target
whose format has no profile for this model (llama.cpp's converter did not take it) is written as a not-built
record with the converter's reason (mintbuild.artifacts.not_built), so that the rest of the build goes on.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from mintbuild import __version__
from mintbuild.artifacts.allocation import SCHEMA_VERSION, write_allocation
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.artifacts.not_built import not_built_allocation, profile_refused, record
from mintbuild.artifacts.profile import Profile, load_profile
from mintbuild.budget import format_size, is_split, resolve_budget
from mintbuild.config import (
    Params,
    SolverConfig,
    TargetConfig,
    as_dict,
    load_params,
    select_targets,
    target_format,
)
from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.hf.checkpoint import fingerprint, open_checkpoint
from mintbuild.io import hash_obj
from mintbuild.knapsack import Problem, floor_bytes, infeasible_message, problem_for
from mintbuild.placement import SIDE_NAMES, SPLIT_DEFAULTS, solve_placement, split_summary

log = logging.getLogger(__name__)

#: What a target does when its budget is below the floor: refuse (the default), or build at the floor.
ON_INFEASIBLE = ("error", "min_safe")


# --- budgets and the floor -----------------------------------------------------------------------------------


# --- solving one target --------------------------------------------------------------------------------------


def allocate_target(
    problem: Problem, name: str, target: TargetConfig, cfg: SolverConfig, profile: Profile
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(allocation document, metrics, timings) for one target."""
    from mintbuild.solve import solve_mckp

    if is_split(target):
        return allocate_split_target(problem, name, target, cfg, profile)
    budget, why = resolve_budget(target, problem.facts, name)
    if target.on_infeasible not in ON_INFEASIBLE:
        raise MintError(
            f"target {name!r}: on_infeasible {target.on_infeasible!r}: choose {' or '.join(ON_INFEASIBLE)}"
        )
    notes = []
    tensor_budget = budget - problem.header_bytes
    floor = floor_bytes(problem)
    if tensor_budget < floor:
        if target.on_infeasible != "min_safe":
            raise InfeasibleBudget(infeasible_message(problem, name, budget, why, cfg.veto_sqnr_db))
        notes.append(
            f"budget {format_size(budget)} is below the floor; built at the minimum safe size instead"
        )
        log.warning(
            "%s: budget %s (%s) is below this model's floor %s in %s: built at the floor (on_infeasible: "
            "min_safe)", name, format_size(budget), why, format_size(floor + problem.header_bytes), profile.format,
        )  # fmt: skip
        tensor_budget = floor
    if budget >= problem.sizes[:, problem.k16].sum() + problem.header_bytes:
        notes.append("budget is at or above the 16-bit size: every tensor stays 16-bit")
    t0 = time.perf_counter()
    res = solve_mckp(problem.sizes, problem.costs, int(tensor_budget), method=cfg.method, **_solver_opts(cfg))
    seconds = time.perf_counter() - t0
    doc = _document(problem, name, target, cfg, profile, budget, why, tensor_budget, res, notes)
    metrics = {**doc["totals"], "target": name}
    return doc, metrics, {"solve_seconds": round(seconds, 4)}


def allocate_split_target(
    problem: Problem, name: str, target: TargetConfig, cfg: SolverConfig, profile: Profile
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A gpu + cpu target: every decision sized and placed (mintbuild.placement); the document records each
    decision's side and both sides' bytes (`split`)."""
    placed = solve_placement(problem, target, name, profile.format)
    r, b = placed.result, placed.budget
    res = SimpleNamespace(
        choice=r.option, objective=r.objective, bound=r.bound, gap=r.gap, optimal=r.optimal, method="split"
    )
    why = f"gpu: {b.gpu_why}; cpu: {b.cpu_why}"
    total = b.gpu + b.cpu
    doc = _document(problem, name, target, cfg, profile, total, why, total - placed.header_bytes, res, [])
    for d, side in zip(doc["decisions"], r.side.tolist(), strict=True):
        d["side"] = SIDE_NAMES[side]
    doc["split"] = split_summary(placed)
    metrics = {
        **doc["totals"],
        "target": name,
        "gpu_bytes": r.gpu_bytes,
        "cpu_bytes": doc["split"]["cpu"]["bytes"],
    }
    return doc, metrics, {"solve_seconds": round(r.solve_seconds, 4)}


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
    # What pack, evaluate, report and diff hold the build to: the budget, or the minimum safe size when the
    # target asked for it (on_infeasible: min_safe) and the budget is below it.
    effective = max(int(budget), int(tensor_budget) + problem.header_bytes)
    totals = {
        "budget": int(budget),
        "effective_budget": effective,
        "budget_derivation": why,
        "tensor_bytes": tensor_bytes,
        "header_allowance": problem.header_bytes,
        "bytes": tensor_bytes + problem.header_bytes,
        "slack": int(effective - tensor_bytes - problem.header_bytes),
        "parameters": params,
        "avg_bits_per_weight": 8 * tensor_bytes / params,
        "objective": float(res.objective),
        "bound": float(res.bound),
        "gap": float(res.gap),
        "optimal": bool(res.optimal),
        "solver": res.method,
        "objective_kind": cfg.objective,
    }
    gguf = (
        {"format": "gguf", "imatrix": bool(profile.provenance.get("imatrix"))}
        if profile.format == "gguf"
        else {}
    )
    return {
        "schema_version": SCHEMA_VERSION,
        "target": name,
        # the runtime: absent for MLX, so an MLX allocation does not depend on the GGUF code path at all
        **gguf,
        # The description is for people: editing it must not change the artifact (nor rebuild pack/evaluate).
        # (and the default format, mlx, is implicit: MLX allocations stay as they were before GGUF existed)
        "target_config": target_record(target, floored=effective > int(budget)),
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


def target_record(target: TargetConfig, floored: bool) -> dict[str, Any]:
    """The target as its allocation records it: the fields that decide the allocation. The description is for
    people, the default format (mlx) is implicit, and `on_infeasible` is recorded only where it took effect (the
    budget was below the floor); elsewhere it is at its default, so that a feasible target allocates to the same
    bytes whatever it would have done below its floor (and pack and evaluate do not rerun when it changes)."""
    doc = {
        k: v
        for k, v in as_dict(target).items()
        if k != "description"
        and not (k == "formats" and v == ["mlx"])
        and not (
            k in SPLIT_DEFAULTS and v == SPLIT_DEFAULTS[k]
        )  # a one-budget target records no split fields
    }
    if not floored:
        doc["on_infeasible"] = TargetConfig.on_infeasible
    return doc


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
    if model_dir is None or not model_dir.exists():
        return
    fp = fingerprint(open_checkpoint(model_dir))
    if fp != profile.provenance.get("model_fingerprint"):
        raise MintError(
            f"the profile was made from another model than {model_dir} (fingerprint "
            f"{profile.provenance.get('model_fingerprint')} != {fp}); re-run `mintbuild profile`"
        )


def run(
    params: Params,
    targets: list[str] | None,
    profile_dir: Path,
    out_root: Path,
    model_dir: Path | None = None,
    importance_file: Path | None = None,
    gguf_profile_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Allocate each target from the profile of its format: `profile_dir` (mlx) or `gguf_profile_dir` (gguf,
    default profile.gguf_out); each profile and its knapsack are built once."""
    names = select_targets(params, targets)
    if params.solver.method not in ("exact", "cvxpy", "dp", "greedy"):
        raise MintError(f"solver.method {params.solver.method!r}: choose exact, cvxpy, dp or greedy")
    dirs = {"mlx": Path(profile_dir), "gguf": Path(gguf_profile_dir or params.profile.gguf_out)}
    problems: dict[str, tuple[Profile, Problem]] = {}
    results = {}
    for name in names:
        fmt = target_format(params.targets[name], name)
        refused = profile_refused(dirs[fmt])
        if (
            refused is not None
        ):  # no profile of this format for this model: the target says why, the build goes on
            t = params.targets[name]
            doc = not_built_allocation(name, fmt, refused, target_record(t, floored=False))
            write_allocation(out_root / name, doc, record(name, fmt, refused))
            log.warning("%s: not built (%s): %s", name, fmt, refused)
            results[name] = doc
            continue
        if fmt not in problems:
            profile = load_profile(dirs[fmt])
            if profile.format != fmt:
                raise MintError(f"{dirs[fmt]}: a {profile.format} profile, but target {name!r} builds {fmt}")
            check_model(profile, params, model_dir)
            problems[fmt] = (profile, problem_for(profile, params.solver, importance_file, params))
        profile, problem = problems[fmt]
        doc, metrics, timings = allocate_target(problem, name, params.targets[name], params.solver, profile)
        write_allocation(out_root / name, doc, metrics, timings)
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
            timings["solve_seconds"],
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
        return resolve_weights_dir(Path(params.equalize.out))
    except MintError:
        return None
