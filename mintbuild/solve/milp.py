"""Exact MILP solve of a (small) MCKP through scipy.optimize.milp, i.e. HiGHS, with integer-byte re-checks.

scipy's HiGHS has no zero absolute-gap option (it stops at 1e-6 absolute), so costs are shifted by each row's
minimum and scaled so that 1e-6 in solver units is far below the requested absolute gap. The budget row is
written in increments over each row's smallest option, in units of their GCD, so its coefficients are integers
HiGHS can represent exactly. HiGHS still only promises feasibility to a tolerance, so every answer is
re-summed in integers and, when over, the budget row is tightened by the overshoot and the model re-solved.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.optimize as so
import scipy.sparse as sp

from mintbuild.solve.dp import dp_shape

log = logging.getLogger(__name__)

#: HiGHS's fixed absolute MIP gap, in objective units.
_HIGHS_ABS_GAP = 1e-6


@dataclass(frozen=True)
class MilpOutcome:
    pos: np.ndarray | None  # positions per row, None when HiGHS found nothing that fits
    bound: float  # proven lower bound on the sub-problem's optimum (real cost units)
    nodes: int
    resolves: int
    status: str


def milp_solve(
    size: np.ndarray,
    cost: np.ndarray,
    count: np.ndarray,
    budget: int,
    *,
    abs_gap: float,
    time_limit: float | None = None,
    max_resolves: int = 5,
) -> MilpOutcome:
    """Min total cost, one option per row, sizes summing to <= budget; rows sorted by size ascending."""
    m, q = size.shape
    shape = dp_shape(size, count, budget)
    valid = np.arange(q)[None, :] < count[:, None]
    var_row, var_pos = np.nonzero(valid)
    row_min = cost[np.arange(m), count - 1]  # the last option of a sorted Pareto row is its cheapest
    shifted = cost[var_row, var_pos] - row_min[var_row]
    scale = _objective_scale(shifted, abs_gap)
    units = shape.units[var_row, var_pos]
    n_var = var_row.size
    a = sp.csr_array(
        (
            np.concatenate([np.ones(n_var), units.astype(np.float64)]),
            (np.concatenate([var_row, np.full(n_var, m)]), np.concatenate([np.arange(n_var)] * 2)),
        ),
        shape=(m + 1, n_var),
    )
    options = {"mip_rel_gap": 0.0, "disp": False, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    capacity = shape.capacity
    base = math.fsum(row_min.tolist())
    nodes = 0
    bound = -math.inf
    for attempt in range(max_resolves + 1):
        lb = np.concatenate([np.ones(m), [-np.inf]])
        ub = np.concatenate([np.ones(m), [float(capacity)]])
        res = so.milp(
            shifted * scale,
            integrality=np.ones(n_var),
            bounds=so.Bounds(0.0, 1.0),
            constraints=so.LinearConstraint(a, lb, ub),
            options=options,
        )
        nodes += int(getattr(res, "mip_node_count", 0) or 0)
        dual = getattr(res, "mip_dual_bound", None)
        if attempt == 0 and dual is not None and math.isfinite(dual):
            # Only the first solve bounds the real problem: a tightened budget row can only raise the optimum.
            bound = base + dual / scale
        if res.x is None:
            return MilpOutcome(None, bound, nodes, attempt, f"no solution ({res.message})")
        pos = _decode(res.x, var_row, var_pos, m)
        used = int(shape.units[np.arange(m), pos].sum(dtype=np.int64))
        if used <= shape.capacity:
            status = "optimal" if res.status == 0 else f"stopped: {res.message}"
            return MilpOutcome(pos, bound, nodes, attempt, status)
        # HiGHS's feasibility tolerance let it over the budget: tighten the row by the overshoot, re-solve.
        log.info("milp: %d units over budget, re-solving with a tighter budget row", used - shape.capacity)
        capacity -= used - shape.capacity
    return MilpOutcome(None, bound, nodes, max_resolves, "over budget after re-solves")


def _objective_scale(shifted: np.ndarray, abs_gap: float) -> float:
    """Solver units per cost unit: HiGHS's 1e-6 stop must be worth <= `abs_gap`, within sane magnitudes."""
    top = float(shifted.max()) if shifted.size else 0.0
    if top <= 0.0:
        return 1.0
    want = _HIGHS_ABS_GAP / max(abs_gap, 1e-300)
    return float(np.clip(want, 1.0 / top, 1e8 / top))


def _decode(x: np.ndarray, var_row: np.ndarray, var_pos: np.ndarray, m: int) -> np.ndarray:
    """Each row's option is its variable with the largest value (first on ties)."""
    order = np.lexsort((var_pos, -x, var_row))
    first = np.ones(order.size, dtype=bool)
    first[1:] = var_row[order][1:] != var_row[order][:-1]
    pos = np.zeros(m, dtype=np.int64)
    pos[var_row[order][first]] = var_pos[order][first]
    return pos
