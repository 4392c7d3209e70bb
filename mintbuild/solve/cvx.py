"""The whole MCKP as one cvxpy boolean program, compiled once and re-solved per budget.

One boolean per available option, one-hot rows, and one budget row whose right-hand side is a `cp.Parameter`,
so a sweep over budgets reuses the compiled problem. Sizes enter as increments over each row's smallest option
in units of their GCD and costs as shifts over each row's cheapest option (scaled), which keeps the solver's
numbers small and its fixed absolute tolerances negligible. The solver's answer is never trusted for
feasibility: it is re-summed in integer bytes and repaired when over.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from mintbuild.errors import MintError
from mintbuild.solve.hull import solve_lp
from mintbuild.solve.local import improve, repair
from mintbuild.solve.problem import Instance, MCKPResult, finish, unconstrained

#: Largest shifted cost coefficient in solver units (1e-6 absolute then costs ~1e-10 of a coefficient).
_COST_SCALE_TOP = 1e4


class CvxpyMCKP:
    """A reusable cvxpy model of one instance: `CvxpyMCKP(sizes, costs).solve(budget, solver="HIGHS")`.

    With `prune_dominated` (default) only each row's Pareto options get a variable: an option another beats on
    both size and cost is never needed, and dropping them roughly halves the model. Without it, every
    available option gets one (an oracle that shares no presolve with the other methods).
    """

    def __init__(self, sizes: Any, costs: Any = None, *, prune_dominated: bool = True) -> None:
        self.inst = sizes if isinstance(sizes, Instance) else Instance(sizes, costs)
        self.prune_dominated = prune_dominated
        self._problem: Any = None  # a cvxpy Problem once built (cvxpy is imported lazily)

    def _build(self) -> None:
        import cvxpy as cp
        import scipy.sparse as sp

        inst = self.inst
        if self.prune_dominated:
            var_row, var_pos = np.nonzero(inst.valid)
            self.var_row, self.var_opt = var_row, inst.par_idx[var_row, var_pos]
        else:
            self.var_row, self.var_opt = np.nonzero(np.isfinite(inst.costs))
        n_var = self.var_row.size
        inc = inst.sizes[self.var_row, self.var_opt] - inst.min_sizes[self.var_row]
        self.unit = int(np.gcd.reduce(inc[inc > 0])) if np.any(inc > 0) else 1
        row_min = inst.par_cost[inst.rows, inst.cheapest_pos]
        self.base_cost = math.fsum(row_min.tolist())
        shifted = inst.costs[self.var_row, self.var_opt] - row_min[self.var_row]
        top = float(shifted.max()) if n_var else 0.0
        self.scale = _COST_SCALE_TOP / top if top > 0 else 1.0
        onehot = sp.csr_array((np.ones(n_var), (self.var_row, np.arange(n_var))), shape=(inst.n_rows, n_var))
        self.x = cp.Variable(n_var, boolean=True)
        self.capacity = cp.Parameter(nonneg=True)
        self._problem = cp.Problem(
            cp.Minimize((shifted * self.scale) @ self.x),
            [onehot @ self.x == 1, (inc // self.unit).astype(np.float64) @ self.x <= self.capacity],
        )

    def solve(
        self,
        budget: Any,
        *,
        solver: str = "HIGHS",
        time_limit: float | None = None,
        verbose: bool = False,
        _start: float | None = None,
    ) -> MCKPResult:
        import cvxpy as cp

        start = time.perf_counter() if _start is None else _start
        inst = self.inst
        b = inst.check_budget(budget)
        if b >= inst.cheapest_bytes:
            return unconstrained(inst, b, "cvxpy", start)
        if self._problem is None:
            self._build()
        self.capacity.value = float((b - inst.min_bytes) // self.unit)
        t0 = time.perf_counter()
        failed = False
        try:
            self._problem.solve(solver=solver, verbose=verbose, **_solver_options(solver, time_limit))
            status = str(self._problem.status)
        except cp.error.SolverError as err:
            failed, status = True, f"solver error: {err}"
        info: dict[str, Any] = {
            "solver": solver,
            "status": status,
            "solver_seconds": time.perf_counter() - t0,
            "variables": int(self.var_row.size),
        }
        lp = solve_lp(inst, b)
        # After a failure the stats (and x) may still hold a previous budget's answer: use neither.
        solver_bound = -math.inf if failed else self._solver_bound()
        bound = max(lp.bound, solver_bound)
        info.update(lp_bound=lp.bound, solver_bound=solver_bound)
        if failed or self.x.value is None:
            # No answer at all (solver failure or time limit): fall back to the LP-rounding incumbent.
            pos = improve(inst, lp.rounded, b)
            info["fallback"] = "lp-rounding"
        else:
            pos = inst.pos_of(self._decode(self.x.value))
        if inst.bytes_of(pos) > b:
            info["over_budget_bytes"] = inst.bytes_of(pos) - b
            pos, info["repair_moves"] = repair(inst, pos, b)
            pos = improve(inst, pos, b)
        return finish(inst, pos, bound, b, "cvxpy", start, info)

    def _decode(self, x: np.ndarray) -> np.ndarray:
        """Each row's option: its variable with the largest value (first on ties)."""
        order = np.lexsort((self.var_opt, -x, self.var_row))
        first = np.ones(order.size, dtype=bool)
        first[1:] = self.var_row[order][1:] != self.var_row[order][:-1]
        choice = np.zeros(self.inst.n_rows, dtype=np.int64)
        choice[self.var_row[order][first]] = self.var_opt[order][first]
        return choice

    def _solver_bound(self) -> float:
        stats = self._problem.solver_stats.extra_stats if self._problem.solver_stats else None
        if stats is None:
            return -math.inf
        dual = (
            stats.get("mip_dual_bound") if isinstance(stats, dict) else getattr(stats, "mip_dual_bound", None)
        )
        if dual is None or not math.isfinite(dual):
            return -math.inf
        return self.base_cost + float(dual) / self.scale


def _solver_options(solver: str, time_limit: float | None) -> dict[str, Any]:
    if solver == "HIGHS":
        opts: dict[str, Any] = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0, "random_seed": 0}
        if time_limit is not None:
            opts["time_limit"] = float(time_limit)
        return opts
    if solver == "SCIPY":
        scipy_opts: dict[str, Any] = {"mip_rel_gap": 0.0}
        if time_limit is not None:
            scipy_opts["time_limit"] = float(time_limit)
        return {"scipy_options": scipy_opts}
    if time_limit is not None:
        raise MintError(f"time_limit is only wired for HIGHS and SCIPY, not {solver}")
    return {}
