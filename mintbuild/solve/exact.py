"""Proven-optimal MCKP: LP bound from the hulls, reduced-cost fixing, exact search of the small core.

1. LP relaxation (hull greedy): the byte price `lam` and the Lagrangian bound L (hull.py).
2. Incumbent UB: the LP solution rounded down, leftover bytes filled along the hull, then single-row moves.
3. Reduced costs r_ij = c_ij + lam*(s_ij - s_i0) - min_j(...) >= 0. For any allocation within budget,
   cost(x) = L + sum_i r_i(x_i) + lam * unused >= L + sum_i r_i(x_i), so an option with r_ij > UB - L lies in
   no allocation cheaper than UB (reduced-cost fixing); the rows left with a choice form the core.
4. Core: the expanding-core DP of core.py enumerates, up to dominance and bounds, every allocation cheaper than
   UB, in exact integer bytes; when it finishes, the best allocation seen is optimal and its value is the bound.
   If it would need more than `max_states` states, the fixed core goes to HiGHS (milp.py) instead, whose dual
   bound (plus the fixed rows) is then the certificate.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from mintbuild.solve.core import expanding_core
from mintbuild.solve.hull import row_lagrangian, solve_lp
from mintbuild.solve.local import improve, repair
from mintbuild.solve.milp import milp_solve
from mintbuild.solve.problem import REL_TOL, Instance

log = logging.getLogger(__name__)

#: Relative float slack in bound comparisons: borderline states and options are kept, never dropped.
_FLOAT_SLACK = 1e-12
CORE_SOLVERS = ("auto", "milp")


def solve_exact(
    inst: Instance,
    budget: int,
    *,
    core_solver: str = "auto",
    max_states: int = 4_000_000,
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
    }
    tol = _FLOAT_SLACK * abs(ub)
    if ub - lp.bound <= tol:
        info["core_solver"] = "none"
        return pos, lp.bound, info
    lagr = row_lagrangian(inst, lp.lam)
    reduced = np.where(inst.valid, lagr - lagr.min(axis=1, keepdims=True), np.inf)
    if core_solver == "auto":
        out = expanding_core(inst, budget, lp.lam, reduced, ub - lp.bound, tol=tol, max_states=max_states)
        info.update(
            core_solver="states", core_rows=out.rows, core_states=out.states, core_peak=out.peak_states
        )
        if out.pos is not None and inst.bytes_of(out.pos) <= budget and (c := inst.cost_of(out.pos)) < ub:
            pos, ub = out.pos, c
        if out.complete:
            # Nothing cheaper than the best value by more than `tol` survived the search.
            return pos, min(ub, lp.bound + out.value) - tol, info
        log.info("exact: state search gave up; solving the fixed core with HiGHS")
    return _milp_core(inst, budget, pos, ub, lp.bound, reduced, tol, time_limit, info)


def _milp_core(
    inst: Instance,
    budget: int,
    pos: np.ndarray,
    ub: float,
    lp_bound: float,
    reduced: np.ndarray,
    tol: float,
    time_limit: float | None,
    info: dict,
) -> tuple[np.ndarray, float, dict]:
    """HiGHS on the options that survive reduced-cost fixing against the incumbent."""
    keep = reduced <= ub - lp_bound + tol
    keep[inst.rows, pos] = True  # the incumbent always stays feasible in the core
    core = np.flatnonzero(keep.sum(axis=1) >= 2)
    info.update(core_solver="highs", core_rows=int(core.size), core_options=int(keep[core].sum()))
    if core.size == 0:
        return pos, ub, info  # every row is fixed at the incumbent's option
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
    abs_gap = 1e-3 * REL_TOL * max(abs(ub), 1e-300)
    out = milp_solve(size, cost, count, core_budget, abs_gap=abs_gap, time_limit=time_limit)
    info.update(core_nodes=out.nodes, core_resolves=out.resolves, core_status=out.status)
    if out.pos is not None:
        cand = pos.copy()
        cand[core] = cols[np.arange(core.size), out.pos]
        if inst.bytes_of(cand) > budget:  # defensive: milp_solve already checks integer bytes
            cand, _ = repair(inst, cand, budget)
        if inst.cost_of(cand) < ub:
            pos, ub = cand, inst.cost_of(cand)
    # Every allocation cheaper than the incumbent lies in the core, so min(UB, core bound) bounds the optimum.
    return pos, max(lp_bound, min(ub, fixed_cost + out.bound)), info
