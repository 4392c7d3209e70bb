"""Proven-optimal MCKP: LP bound from the hulls, reduced-cost fixing, exact solve of the small core.

1. LP relaxation (hull greedy): the dual price `lam` of a byte and the Lagrangian bound L.
2. Incumbent: the LP solution with its fractional row rounded down, then single-row improvements.
3. Reduced-cost fixing. For any allocation x within budget and lam >= 0,
       cost(x) >= L + sum_i r_i(x_i),  r_ij = c_ij + lam*(s_ij - s_i0) - min_j(c_ij + lam*(s_ij - s_i0)) >= 0,
   so an option with r_ij > UB - L lies in no allocation cheaper than the incumbent UB: drop it. Rows left
   with one option are fixed; the rest form the core.
4. Core: exact DP when its table is small, else HiGHS MILP with zero relative gap. Every allocation better
   than the incumbent lives in the core, so the optimum is min(UB, core optimum) and a lower bound on the core
   (plus the fixed rows) is a lower bound on the whole problem.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .dp import DEFAULT_MAX_TABLE_BYTES, dp_shape, dp_solve
from .hull import row_lagrangian, solve_lp
from .local import improve, repair
from .milp import milp_solve
from .problem import REL_TOL, Instance

log = logging.getLogger(__name__)

#: Relative float slack when comparing reduced costs with the gap: keeps (never drops) borderline options.
_FIX_SLACK = 1e-10
CORE_SOLVERS = ("auto", "dp", "milp")


def solve_exact(
    inst: Instance,
    budget: int,
    *,
    core_solver: str = "auto",
    dp_max_cells: int = 4_000_000,
    time_limit: float | None = None,
) -> tuple[np.ndarray, float, dict]:
    if core_solver not in CORE_SOLVERS:
        raise ValueError(f"core_solver must be one of {CORE_SOLVERS}, got {core_solver!r}")
    lp = solve_lp(inst, budget)
    pos = improve(inst, lp.rounded, budget)
    ub = inst.cost_of(pos)
    info: dict = {
        "lp_bound": lp.bound,
        "lambda": lp.lam,
        "incumbent": ub,
        "pareto_options": int(inst.par_count.sum()),
        "hull_points": lp.hull_points,
        "core_rows": 0,
        "core_options": 0,
        "core_solver": "none",
    }
    tol = _FIX_SLACK * max(1.0, abs(ub))
    if ub - lp.bound <= tol:
        return pos, lp.bound, info
    keep = _reduced_cost_keep(inst, lp.lam, ub - lp.bound + tol, pos)
    core = np.flatnonzero(keep.sum(axis=1) >= 2)
    info["core_rows"] = int(core.size)
    info["core_options"] = int(keep[core].sum())
    if core.size == 0:
        # Every row is fixed at the incumbent's option: nothing cheaper exists.
        return pos, ub, info
    return _solve_core(
        inst, budget, pos, ub, lp.bound, keep, core, core_solver, dp_max_cells, time_limit, info
    )


def _reduced_cost_keep(inst: Instance, lam: float, threshold: float, pos: np.ndarray) -> np.ndarray:
    lagr = row_lagrangian(inst, lam)
    reduced = lagr - lagr.min(axis=1, keepdims=True)
    keep = inst.valid & (reduced <= threshold)
    keep[inst.rows, pos] = True  # the incumbent always stays feasible in the core
    return keep


def _solve_core(
    inst: Instance,
    budget: int,
    pos: np.ndarray,
    ub: float,
    lp_bound: float,
    keep: np.ndarray,
    core: np.ndarray,
    core_solver: str,
    dp_max_cells: int,
    time_limit: float | None,
    info: dict,
) -> tuple[np.ndarray, float, dict]:
    # Compact each core row's kept Pareto positions (still size-ascending) into a small padded problem.
    kept = keep[core]
    count = kept.sum(axis=1).astype(np.int64)
    width = int(count.max())
    cols = np.argsort(~kept, axis=1, kind="stable")[:, :width]
    valid = np.arange(width)[None, :] < count[:, None]
    size = np.where(valid, inst.par_size[core[:, None], cols], 0)
    cost = np.where(valid, inst.par_cost[core[:, None], cols], np.inf)
    fixed = np.ones(inst.n_rows, dtype=bool)
    fixed[core] = False
    fixed_rows = np.flatnonzero(fixed)
    core_budget = budget - int(inst.par_size[fixed_rows, pos[fixed_rows]].sum(dtype=np.int64))
    fixed_cost = math.fsum(inst.par_cost[fixed_rows, pos[fixed_rows]].tolist())

    use_dp = core_solver == "dp" or (
        core_solver == "auto" and dp_shape(size, count, core_budget).cells <= dp_max_cells
    )
    if use_dp:
        sub, value, shape = dp_solve(size, cost, count, core_budget, DEFAULT_MAX_TABLE_BYTES)
        core_bound = fixed_cost + value
        info.update(core_solver="dp", core_cells=shape.cells)
    else:
        out = milp_solve(
            size,
            cost,
            count,
            core_budget,
            abs_gap=1e-3 * REL_TOL * max(abs(ub), 1e-300),
            time_limit=time_limit,
        )
        sub = out.pos
        core_bound = fixed_cost + out.bound
        info.update(
            core_solver="highs", core_nodes=out.nodes, core_resolves=out.resolves, core_status=out.status
        )

    best = pos
    if sub is not None:
        cand = pos.copy()
        cand[core] = cols[np.arange(core.size), sub]
        if inst.bytes_of(cand) > budget:  # defensive: the core solvers already check bytes
            cand, _ = repair(inst, cand, budget)
        if inst.cost_of(cand) < ub:
            best = cand
    bound = max(lp_bound, min(ub, core_bound))
    log.debug("exact: core %d rows / %d options via %s", core.size, int(count.sum()), info["core_solver"])
    return best, bound, info
