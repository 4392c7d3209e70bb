"""`mintbuild predict --budget X`: the perplexity of the best model at a budget, before anything is packed.

Allocates each budget from the cached profile (and importance) exactly as `mintbuild allocate` would
(milliseconds, no torch) and predicts its mean PPL with the report's predictors (artifacts/report, written by
`mintbuild report` from the measured targets): from the allocation's own objective (predictor.json: ln PPL =
ln PPL_16bit + b x objective) and from the budget alone (curve.json). It prints both and marks the one the
report chose by its leave-one-out errors; the objective fit is used only for allocations of the same
objective, solver settings and profile it was fitted on.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from mintbuild.artifacts.curve import (
    CURVE_FILE,
    PREDICTOR_FILE,
    REPORT_DIR,
    load_curve,
    load_predictor,
    objective_fit_for,
    objective_scope,
)
from mintbuild.artifacts.profile import load_profile
from mintbuild.budget import format_size, parse_size
from mintbuild.config import Params, as_dict, load_params
from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.io import hash_obj
from mintbuild.knapsack import Problem, floor_bytes, infeasible_message, problem_for

log = logging.getLogger(__name__)


def allocate_objective(problem: Problem, budget: int, params: Params) -> dict[str, Any]:
    """Bytes and objective of the optimal allocation at `budget` (whole-model bytes), as `allocate` solves it."""
    from mintbuild.solve import solve_mckp

    tensor_budget = budget - problem.header_bytes
    if tensor_budget < floor_bytes(problem):
        why = f"size {format_size(budget)}"
        raise InfeasibleBudget(
            infeasible_message(problem, "predict", budget, why, params.solver.veto_sqnr_db)
        )
    cfg = params.solver
    opts: dict[str, Any] = {"solver": cfg.milp_solver} if cfg.method == "cvxpy" else {}
    if cfg.method == "dp":
        opts = {"max_table_bytes": cfg.dp_max_table_bytes}
    res = solve_mckp(problem.sizes, problem.costs, int(tensor_budget), method=cfg.method, **opts)
    rows = range(len(res.choice))
    tensor_bytes = int(sum(int(problem.sizes[i, res.choice[i]]) for i in rows))
    return {
        "budget": budget,
        "bytes": tensor_bytes + problem.header_bytes,
        "bpw": 8 * tensor_bytes / problem.facts.parameters,
        "objective": float(res.objective),
        "optimal": bool(res.optimal),
    }


def predict(params: Params, budgets: list[int], report_dir: Path) -> tuple[list[dict[str, Any]], str]:
    """One row per budget (bytes, bits/weight, objective, predicted PPL by each predictor, the chosen one)
    and the name of the predictor the report chose."""
    profile = load_profile(Path(params.profile.out))
    problem = problem_for(profile, params.solver, None, params)
    scope = objective_scope(
        {"objective_kind": params.solver.objective},
        {"solver_config_hash": hash_obj(as_dict(params.solver)), "profile_hash": profile.hash},
    )
    predictor = load_predictor(report_dir / PREDICTOR_FILE)
    fit = objective_fit_for(predictor, scope)
    curve = load_curve(report_dir / CURVE_FILE) if (report_dir / CURVE_FILE).exists() else None
    if fit is None and curve is None:
        raise MintError(
            f"{report_dir}: no fitted predictor yet (build and evaluate some targets: `dvc repro`)"
        )
    uses = (predictor or {}).get("uses", "curve")
    if uses == "objective" and fit is None:
        uses = "curve"
    if uses == "curve" and curve is None:
        uses = "objective"
    rows = []
    for b in budgets:
        row = allocate_objective(problem, b, params)
        row["objective_ppl"] = float(fit.predict(row["objective"])) if fit else None
        row["curve_ppl"] = _curve_ppl(curve, row["bytes"])
        row["predicted"] = row[f"{uses}_ppl"]
        rows.append(row)
    return rows, uses


def _curve_ppl(curve: Any, nbytes: int) -> float | None:
    if curve is None:
        return None
    try:
        return float(curve.predict(nbytes))
    except MintError:  # at or below the curve's pole
        return None


def markdown(rows: list[dict[str, Any]], uses: str) -> str:
    star = {k: " *" if k == uses else "" for k in ("objective", "curve")}
    lines = [
        f"| budget | bytes | bits/weight | objective | PPL from objective{star['objective']} | "
        f"PPL from curve{star['curve']} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {format_size(r['budget'])} | {format_size(r['bytes'])} | {r['bpw']:.3f} | {r['objective']:.5g} "
            f"| {_f(r['objective_ppl'])} | {_f(r['curve_ppl'])} |"
        )
    lines.append(f"\n* the predictor the report chose by leave-one-out error ({uses})")
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", required=True, nargs="+", help="budget(s) with a unit, e.g. 70MB 24GiB")
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument(
        "--report",
        default=REPORT_DIR,
        help=f"the report folder holding {PREDICTOR_FILE} and {CURVE_FILE} (default: {REPORT_DIR})",
    )


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    budgets = [parse_size(b, "budget") for b in args.budget]
    rows, uses = predict(params, budgets, Path(args.report))
    sys.stdout.write(markdown(rows, uses))
