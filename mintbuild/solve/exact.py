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
    core_target: int = 256,
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
        "core_rounds": [],
    }
    tol = _FIX_SLACK * max(1.0, abs(ub))
    if ub - lp.bound <= tol:
        return pos, lp.bound, info
    lagr = row_lagrangian(inst, lp.lam)
    reduced = np.where(inst.valid, lagr - lagr.min(axis=1, keepdims=True), np.inf)
    # Guess a threshold that keeps a core of about `core_target` extra options. If the core's optimum then
    # lies within it of L, the guess is proven sufficient; otherwise one more round with the true gap proves it.
    threshold = min(ub - lp.bound, _nth_positive(reduced, core_target))
    bound = lp.bound
    while True:
        keep = reduced <= threshold + tol
        keep[inst.rows, pos] = True  # the incumbent always stays feasible in the core
        cand, core_bound, round_info = _solve_core(
            inst, budget, pos, keep, core_solver, dp_max_cells, time_limit, ub
        )
        info["core_rounds"].append(round_info)
        if cand is not None and (c := inst.cost_of(cand)) < ub:
            pos, ub = cand, c
        if threshold + tol >= ub - lp.bound:
            # Every allocation cheaper than ub uses only kept options: the core's bound is global.
            bound = max(lp.bound, min(ub, core_bound))
            break
        threshold = ub - lp.bound
    return pos, bound, info


def _nth_positive(reduced: np.ndarray, n: int) -> float:
    """The n-th smallest positive reduced cost (inf when there are fewer)."""
    flat = reduced[(reduced > 0) & np.isfinite(reduced)]
    if flat.size <= n:
        return np.inf
    return float(np.partition(flat, n)[n])


def _solve_core(
    inst: Instance,
    budget: int,
    pos: np.ndarray,
    keep: np.ndarray,
    core_solver: str,
    dp_max_cells: int,
    time_limit: float | None,
    ub: float,
) -> tuple[np.ndarray | None, float, dict]:
    """Solve the problem restricted to kept options: (positions, lower bound on the restricted optimum, info)."""
    core = np.flatnonzero(keep.sum(axis=1) >= 2)
    info: dict = {"rows": int(core.size), "options": int(keep[core].sum())}
    if core.size == 0:
        # Every row is fixed at the incumbent's option: the restricted problem has one allocation.
        info["solver"] = "none"
        return pos, inst.cost_of(pos), info
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
        info.update(solver="dp", cells=shape.cells)
    else:
        abs_gap = 1e-3 * REL_TOL * max(abs(ub), 1e-300)
        out = milp_solve(size, cost, count, core_budget, abs_gap=abs_gap, time_limit=time_limit)
        sub = out.pos
        core_bound = fixed_cost + out.bound
        info.update(solver="highs", nodes=out.nodes, resolves=out.resolves, status=out.status)
    if sub is None:
        return None, core_bound, info
    cand = pos.copy()
    cand[core] = cols[np.arange(core.size), sub]
    if inst.bytes_of(cand) > budget:  # defensive: both core solvers already check integer bytes
        cand, _ = repair(inst, cand, budget)
    log.debug("exact: core %d rows / %d options via %s", core.size, int(count.sum()), info["solver"])
    return cand, core_bound, info
