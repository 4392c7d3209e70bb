"""The multiple-choice knapsack behind every allocation: one option per row, total bytes within a budget.

    from mintbuild.solve import solve_mckp
    res = solve_mckp(sizes, costs, budget, method="exact")

`sizes` int64 [N, K] bytes, `costs` float64 [N, K] (inf = unavailable or vetoed), `budget` int bytes. Methods:
`exact` (default; proven optimum with certificate), `cvxpy` (whole problem as a boolean program; `solver=`
"HIGHS" or "SCIPY"), `dp` (dynamic programming over bytes; refuses above `max_table_bytes`), `greedy` (the
published one-pass baseline, not optimal). A budget below the smallest allocation raises InfeasibleBudget
before any work; a budget that fits every row's cheapest option returns that directly.
"""

from __future__ import annotations

import time
from typing import Any

from mintbuild.errors import MintError
from mintbuild.solve.cvx import CvxpyMCKP
from mintbuild.solve.dp import solve_dp
from mintbuild.solve.exact import solve_exact
from mintbuild.solve.greedy import solve_greedy
from mintbuild.solve.problem import Instance as MCKPInstance
from mintbuild.solve.problem import MCKPResult, MethodFn, run

METHODS = ("exact", "cvxpy", "dp", "greedy")
_FUNCS: dict[str, MethodFn] = {"exact": solve_exact, "dp": solve_dp, "greedy": solve_greedy}

__all__ = ["METHODS", "CvxpyMCKP", "MCKPInstance", "MCKPResult", "solve_mckp"]


def solve_mckp(sizes: Any, costs: Any, budget: Any, method: str = "exact", **opts: Any) -> MCKPResult:
    """Pick one option per row minimising total cost with total bytes <= budget (see the module doc)."""
    start = time.perf_counter()
    if method not in METHODS:
        raise MintError(f"unknown solver method {method!r}; choose one of {', '.join(METHODS)}")
    inst = MCKPInstance(sizes, costs)
    if method == "cvxpy":
        prune = opts.pop("prune_dominated", True)
        return CvxpyMCKP(inst, prune_dominated=prune).solve(budget, _start=start, **opts)
    return run(inst, budget, method, _FUNCS[method], opts, start)
