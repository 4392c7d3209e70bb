"""Split budgets: each row picks an option and a side (gpu or cpu memory); both sides' bytes stay within budget.

    from mintbuild.solve.split import EITHER, solve_split
    res = solve_split(sizes, costs, where, gpu_budget, cpu_budget, cpu_price=p)

`sizes` int64 [N, K] and `costs` float64 [N, K] (inf: unavailable) as for the one-budget MCKP; `where` [N] says
which side a row may live on (GPU, CPU or EITHER). A row's bytes are charged to the side it lives on. The result
minimises  sum of chosen costs + cpu_price x (bytes on the cpu)  with gpu bytes <= gpu_budget and cpu bytes <=
cpu_budget, with a proven lower bound:

1. The relaxation R lets the EITHER rows' bytes split across the sides: with S_G, S_C, S_E the bytes of the rows
   pinned to the gpu, pinned to the cpu and free, R asks S_G <= B_gpu, S_C <= B_cpu, S_G + S_C + S_E <= B_gpu +
   B_cpu and prices cpu bytes as S_C + max(0, S_G + S_E - B_gpu). Every placed allocation is feasible in R at the
   same objective, so R's optimum bounds the real one from below. R has no "which side" choice, so no symmetry.
2. R by Lagrangian relaxation with the inner problem solved exactly: one hard constraint k is kept, the others
   move into the costs at prices y >= 0 (the overflow row's at most cpu_price), and the one-budget knapsack on k
   is solved by mintbuild.solve's proven-optimal `exact` method. Weak duality: its certified bound minus
   y . (the moved capacities) bounds R for ANY such y. Prices tried, most binding constraint first, until an
   answer that fits every constraint meets the bound: each constraint kept alone (overflow priced at cpu_price
   or 0), then, up to LP_MAX_CHOICES choices, the LP relaxation's prices (HiGHS) and the LP's own bound.
3. Placement: the free rows go to the gpu largest first while they fit, the rest to the cpu; one swap (a cpu row
   for a smaller gpu row, or for none) closes an overflow. When R filled both sides together to the byte and no
   packing splits them so, R is re-solved with an allowance of unused bytes (its first bound still holds). Two
   more candidates: every free row on the gpu, and every free row on the cpu (each side then an exact one-budget
   knapsack). The cheapest placed candidate is the answer; its distance to the bound is the reported gap.
4. Problems up to FULL_SEARCH_ROWS rows whose answer is not proven optimal are solved with the side as a choice:
   LP prices, reduced-cost fixing (an allocation cheaper than V uses only choices with reduced cost <= V - L),
   HiGHS's MILP on the core, grown until V - L is covered; every answer re-summed in integer bytes and a budget
   row HiGHS's tolerance let over is tightened by the overshoot and re-solved.

The certificate: `bound` <= the optimum <= `objective`; `optimal` when the gap is within REL_TOL.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize as so
import scipy.sparse as sp

from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.solve.problem import ABS_TOL, REL_TOL, Instance

log = logging.getLogger(__name__)

#: Sides (result) and placement rules (`where`): a row lives on the GPU or the CPU; EITHER lets the solver pick.
GPU, CPU, EITHER = 0, 1, 2
#: Problems up to this many rows whose greedy placement is not proven optimal are re-solved with the side as a
#: choice (larger ones report the placement's gap: the price of the gpu bytes it leaves unused).
FULL_SEARCH_ROWS = 256
#: The relaxation's LP (HiGHS) is solved for its prices up to this many choices (~1 s per 30,000 here).
LP_MAX_CHOICES = 60_000
#: HiGHS's fixed absolute MIP gap, in (scaled) objective units.
_HIGHS_ABS_GAP = 1e-6


@dataclass(frozen=True, eq=False)
class SplitResult:
    """One placed allocation and its certificate: `bound` is a proven lower bound on the optimal objective."""

    option: np.ndarray  # int64 [N]: option index per row
    side: np.ndarray  # int64 [N]: GPU (0) or CPU (1)
    objective: float  # loss + price (math.fsum)
    loss: float  # sum of the chosen costs, without the cpu price
    price: float  # cpu_price x cpu bytes
    bound: float
    gap: float
    rel_gap: float
    optimal: bool
    gpu_bytes: int
    cpu_bytes: int
    gpu_budget: int
    cpu_budget: int
    solve_seconds: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Floors:
    """The fewest bytes any allocation puts on the gpu, on the cpu, and on both together."""

    gpu: int
    cpu: int
    total: int


def split_floors(sizes: np.ndarray, costs: np.ndarray, where: np.ndarray) -> Floors:
    """Rows pinned to a side at their smallest usable option; every row at its smallest for the total."""
    big = np.iinfo(np.int64).max // 4
    smallest = np.where(np.isfinite(costs), np.asarray(sizes, dtype=np.int64), big).min(axis=1)
    where = np.asarray(where)
    return Floors(int(smallest[where == GPU].sum()), int(smallest[where == CPU].sum()), int(smallest.sum()))


def solve_split(
    sizes: Any,
    costs: Any,
    where: Any,
    gpu_budget: int,
    cpu_budget: int,
    *,
    cpu_price: float = 0.0,
    time_limit: float | None = None,
) -> SplitResult:
    """The cheapest option and side per row within both budgets (module doc); infeasible budgets raise
    InfeasibleBudget before any work, naming each side's floor."""
    start = time.perf_counter()
    sizes, costs, where = _validate(sizes, costs, where, cpu_price)
    gpu_budget, cpu_budget = int(gpu_budget), int(cpu_budget)
    f = split_floors(sizes, costs, where)
    if f.gpu > gpu_budget or f.cpu > cpu_budget or f.total > gpu_budget + cpu_budget:
        raise InfeasibleBudget(
            f"budgets gpu {gpu_budget:,} B / cpu {cpu_budget:,} B are below the floors: gpu {f.gpu:,} B, "
            f"cpu {f.cpu:,} B, both together {f.total:,} B"
        )
    budgets = (gpu_budget, cpu_budget)
    rows = np.arange(len(sizes))
    option, bound, info = _solve_relaxation(sizes, costs, where, budgets, cpu_price, time_limit, 0)
    cands = [(option, None if option is None else _place(sizes[rows, option], where, budgets))]
    free = where == EITHER
    allowance = 0
    while option is not None and cands[-1][1] is None and free.any() and allowance <= gpu_budget + cpu_budget:
        # The relaxation filled both sides together to the byte, and no packing of its free rows splits them
        # so: leave some bytes unused (R's bound still holds; the gap says what the allowance cost).
        allowance = max(2 * allowance, _overflow(sizes[rows, option], where, budgets), 1)
        option, _, _ = _solve_relaxation(sizes, costs, where, budgets, cpu_price, time_limit, allowance)
        info.setdefault("allowances", []).append(allowance)
        cands.append((option, None if option is None else _place(sizes[rows, option], where, budgets)))
    for first in (GPU, CPU):
        cands.append(_one_side_for_free_rows(sizes, costs, where, budgets, cpu_price, first))
    best = _best(cands, sizes, costs, cpu_price)
    value = math.inf if best is None else _value(best, sizes, costs, cpu_price)
    if len(sizes) <= FULL_SEARCH_ROWS and (
        best is None or value - bound > max(REL_TOL * abs(value), ABS_TOL)
    ):
        # Small problems whose candidates are not proven optimal: the exact search with sides as choices.
        f_opt, f_side, f_bound, info["full"] = _solve_full(
            sizes, costs, where, budgets, cpu_price, time_limit
        )
        best = _best([(f_opt, f_side)] + ([best] if best is not None else []), sizes, costs, cpu_price)
        bound = max(bound, f_bound)
    if best is None:
        raise InfeasibleBudget(f"no placement found within gpu {gpu_budget:,} B and cpu {cpu_budget:,} B")
    option, side = best
    chosen = sizes[rows, option]
    g_used = int(chosen[side == GPU].sum(dtype=np.int64))
    c_used = int(chosen[side == CPU].sum(dtype=np.int64))
    if g_used > gpu_budget or c_used > cpu_budget or ((where != EITHER) & (side != where)).any():
        raise MintError(f"split solver: a broken answer (gpu {g_used:,}/{gpu_budget:,}, cpu {c_used:,})")
    loss = math.fsum(costs[rows, option].tolist())
    price = cpu_price * c_used
    objective = loss + price
    bound = min(bound, objective)
    gap = objective - bound
    return SplitResult(
        option=option.astype(np.int64),
        side=side.astype(np.int64),
        objective=objective,
        loss=loss,
        price=price,
        bound=bound,
        gap=gap,
        rel_gap=gap / max(abs(objective), 1e-300),
        optimal=bool(gap <= max(REL_TOL * abs(objective), ABS_TOL)),
        gpu_bytes=g_used,
        cpu_bytes=c_used,
        gpu_budget=gpu_budget,
        cpu_budget=cpu_budget,
        solve_seconds=time.perf_counter() - start,
        info=info,
    )


def _validate(sizes: Any, costs: Any, where: Any, price: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    inst = Instance(sizes, costs)  # the one-budget checks: shapes, whole bytes, NaN, rows with no option
    where = np.asarray(where)
    if where.shape != (inst.n_rows,) or not np.isin(where, (GPU, CPU, EITHER)).all():
        raise MintError(f"where must be [N] of GPU (0), CPU (1) or EITHER (2), one per row ({inst.n_rows})")
    if inst.n_rows == 0:
        raise MintError("split problem has no rows")
    if not (math.isfinite(price) and price >= 0):
        raise MintError(f"cpu price must be a non-negative number, got {price!r}")
    return inst.sizes, inst.costs, where.astype(np.int64)


# --- the generic core search: rows x choices, a few byte rows (one may be soft: over it costs a price) -------


@dataclass
class _Model:
    """Choices flattened: `row` [M], `cost` [M], `a` int64 [m, M] bytes per constraint, `cap` int64 [m]; the
    optional soft constraint may be exceeded at `soft_price` per byte (a continuous variable in the MILP)."""

    row: np.ndarray
    n_rows: int
    cost: np.ndarray
    a: np.ndarray
    cap: np.ndarray
    soft: int | None = None
    soft_price: float = 0.0

    def value(self, pick: np.ndarray) -> float:
        return math.fsum(self.cost[pick].tolist()) + self.soft_price * self.overflow(pick)

    def used(self, pick: np.ndarray) -> np.ndarray:
        return self.a[:, pick].sum(axis=1, dtype=np.int64)

    def overflow(self, pick: np.ndarray) -> int:
        if self.soft is None:
            return 0
        return max(0, int(self.used(pick)[self.soft]) - int(self.cap[self.soft]))

    def fits(self, pick: np.ndarray) -> bool:
        hard = np.ones(len(self.cap), dtype=bool)
        if self.soft is not None:
            hard[self.soft] = False
        return bool((self.used(pick)[hard] <= self.cap[hard]).all())


def _solve_model(model: _Model) -> tuple[np.ndarray | None, float, dict]:
    """(choice per row or None, proven lower bound, info). Lagrangian duals with the inner knapsack solved
    exactly: a hard constraint k is kept, the others move into the costs at prices y >= 0 (the soft row's at
    most its overflow price; any such prices give a valid bound), and the one-budget knapsack on k is solved by
    mintbuild.solve's exact method. Prices tried: each hard constraint with rows in it, kept alone with the soft
    row at 0 or its overflow price; and, up to LP_MAX_CHOICES choices, the LP relaxation's prices (HiGHS) with
    the highest-priced hard constraint kept, plus the LP's own bound. The best bound is kept; the cheapest
    answer that fits every constraint is the incumbent."""
    trials: list[tuple[np.ndarray, int]] = []
    support = model.a.any(axis=1)
    hard = [k for k in range(len(model.cap)) if k != model.soft and support[k]] or [0]
    # Most binding first (usage with every row at its cheapest option over capacity): the usual answer is
    # proven by the first trial, and the rest are skipped.
    cheapest = np.full(model.n_rows, np.inf)
    np.minimum.at(cheapest, model.row, model.cost)
    first = _lowest_index_per_row(model.row, model.cost <= cheapest[model.row], model.n_rows)
    pressure = model.a[:, first].sum(axis=1) / np.maximum(model.cap, 1)
    hard.sort(key=lambda k: -pressure[k])
    soft_prices = [0.0] if model.soft is None else sorted({0.0, model.soft_price}, reverse=True)
    for k in hard:
        for price in soft_prices:
            y = np.zeros(len(model.cap))
            if model.soft is not None:
                y[model.soft] = price
            trials.append((y, k))
    bound = -math.inf
    info: dict[str, Any] = {"lagrangian": []}
    best_pick, best_value = None, math.inf

    def attempt(y: np.ndarray, k: int) -> bool:
        nonlocal bound, best_pick, best_value
        pick, b = _lagrangian_exact(model, y, k)
        info["lagrangian"].append({"kept": k, "bound": b})
        bound = max(bound, b)
        if pick is not None and model.fits(pick) and (v := model.value(pick)) < best_value:
            best_pick, best_value = pick, v
        return best_pick is not None and best_value - bound <= max(REL_TOL * abs(best_value), ABS_TOL)

    if any(attempt(y, k) for y, k in trials):
        return best_pick, bound, info
    if model.row.size <= LP_MAX_CHOICES:
        y, lp_info = _lp_duals(model, None)
        lagr = model.cost + y @ model.a.astype(np.float64)
        row_min = np.full(model.n_rows, np.inf)
        np.minimum.at(row_min, model.row, lagr)
        lp_bound = math.fsum(row_min.tolist()) - float(y @ model.cap.astype(np.float64))
        bound = max(bound, lp_bound)
        info.update(lp_info, lp_bound=lp_bound)
        attempt(y, max(hard, key=lambda k: y[k]))
    return best_pick, bound, info


def _lowest_index_per_row(row: np.ndarray, ok: np.ndarray, n_rows: int) -> np.ndarray:
    """Per row, the lowest choice index where `ok` holds (every row has one)."""
    idx = np.flatnonzero(ok)
    out = np.empty(n_rows, dtype=np.int64)
    out[row[idx[::-1]]] = idx[::-1]
    return out


def _lagrangian_exact(model: _Model, y: np.ndarray, k: int) -> tuple[np.ndarray | None, float]:
    """Keep hard constraint k, move the others into the costs at prices y, and solve that one-budget knapsack
    exactly (mintbuild.solve). Its certified bound minus the moved constraints' priced capacities bounds the
    model (weak duality); (its answer, that bound), or (None, -inf) if k alone cannot be met."""
    from mintbuild.solve import solve_mckp

    others = np.arange(len(y)) != k
    cost = model.cost + y[others] @ model.a[others].astype(np.float64)
    width = int(np.bincount(model.row, minlength=model.n_rows).max())
    slot = np.zeros(model.row.size, dtype=np.int64)
    order = np.argsort(model.row, kind="stable")
    starts = np.searchsorted(model.row[order], np.arange(model.n_rows))
    slot[order] = np.arange(order.size) - starts[model.row[order]]
    sizes = np.zeros((model.n_rows, width), dtype=np.int64)
    costs = np.full((model.n_rows, width), np.inf)
    sizes[model.row, slot] = model.a[k]
    costs[model.row, slot] = cost
    index = np.full((model.n_rows, width), -1, dtype=np.int64)
    index[model.row, slot] = np.arange(model.row.size)
    try:
        res = solve_mckp(sizes, costs, int(model.cap[k]), method="exact")
    except InfeasibleBudget:
        return None, -math.inf
    bound = res.bound - float(y[others] @ model.cap[others].astype(np.float64))
    return index[np.arange(model.n_rows), res.choice], bound


def _reduced(model: _Model, time_limit: float | None) -> tuple[np.ndarray, float]:
    """Reduced costs and the Lagrangian bound at the LP's prices."""
    y, _ = _lp_duals(model, time_limit)
    lagr = model.cost + y @ model.a.astype(np.float64)
    row_min = np.full(model.n_rows, np.inf)
    np.minimum.at(row_min, model.row, lagr)
    lower = math.fsum(row_min.tolist()) - float(y @ model.cap.astype(np.float64))
    return np.maximum(lagr - row_min[model.row], 0.0), lower


def _lp_duals(model: _Model, time_limit: float | None) -> tuple[np.ndarray, dict]:
    """Byte prices (cost per byte) of the constraints in the LP relaxation; zeros if HiGHS fails (L(0) is still
    a valid bound, only weaker). The soft row's price is capped at its overflow price. Any prices give a valid
    bound: the LP's are the best."""
    cost, scale = _scaled(model.cost, model.row, model.n_rows)
    m = model.cost.size
    a_ub = model.a.astype(np.float64)
    c = cost * scale
    if model.soft is not None:
        c = np.concatenate([c, [model.soft_price * scale]])
        col = np.zeros((len(model.cap), 1))
        col[model.soft] = -1.0
        a_ub = np.hstack([a_ub, col])
    a_eq = sp.csr_array((np.ones(m), (model.row, np.arange(m))), shape=(model.n_rows, a_ub.shape[1]))
    opts: dict[str, Any] = {"presolve": True}
    if time_limit is not None:
        opts["time_limit"] = float(time_limit)
    t0 = time.perf_counter()
    res = so.linprog(
        c,
        A_ub=sp.csr_array(a_ub),
        b_ub=model.cap.astype(np.float64),
        A_eq=a_eq,
        b_eq=np.ones(model.n_rows),
        bounds=[(0.0, 1.0)] * m + ([(0.0, None)] if model.soft is not None else []),
        method="highs",
        options=opts,
    )
    info = {"lp_seconds": round(time.perf_counter() - t0, 4), "choices": m}
    if res.status != 0 or res.ineqlin is None:
        log.info("split: LP relaxation not solved (%s); pricing bytes at 0", res.message)
        return np.zeros(len(model.cap)), info
    y = np.maximum(-np.asarray(res.ineqlin.marginals, dtype=np.float64), 0.0) / scale
    if model.soft is not None:
        y[model.soft] = min(y[model.soft], model.soft_price)
    return y, info


def _scaled(cost: np.ndarray, row: np.ndarray, n_rows: int) -> tuple[np.ndarray, float]:
    """Costs shifted by their row's minimum, and the factor bringing the largest to 1 (HiGHS's tolerances are
    absolute)."""
    row_min = np.full(n_rows, np.inf)
    np.minimum.at(row_min, row, cost)
    shifted = cost - row_min[row]
    top = float(shifted.max()) if shifted.size else 0.0
    return shifted, (1.0 / top if top > 0 else 1.0)


def _core_search(
    model: _Model,
    reduced: np.ndarray,
    lower: float,
    time_limit: float | None,
    incumbent: np.ndarray | None = None,
) -> tuple[np.ndarray, float, dict]:
    """MILPs over growing cores until the answer's distance from the Lagrangian bound is covered by the core's
    threshold tau: every allocation cheaper than V uses only choices with r <= V - L."""
    scale_ref = max(abs(lower), 1e-300)
    tau = REL_TOL * scale_ref
    best: np.ndarray | None = incumbent
    best_value = math.inf if incumbent is None else model.value(incumbent)
    if incumbent is not None:
        tau = max(tau, best_value - lower)
    cores: list[dict] = []
    while True:
        everything = bool((reduced <= tau).all())
        pick, core_bound, core_info = _solve_core(model, reduced, tau, scale_ref, time_limit)
        cores.append(core_info)
        if pick is not None and (v := model.value(pick)) < best_value:
            best, best_value = pick, v
        if best is not None and best_value - lower <= tau * (1 + 1e-12):
            return best, max(lower, min(core_bound, lower + tau)), {"cores": cores}
        if everything:
            if best is None:
                raise InfeasibleBudget("no allocation fits both budgets")
            return best, max(lower, min(core_bound, best_value)), {"cores": cores}
        # Nothing fit in the core: grow it fast; else grow it to cover every allocation cheaper than V.
        tau = tau * 100 if best is None else max(best_value - lower, tau * 2)


def _solve_core(
    model: _Model, reduced: np.ndarray, tau: float, scale_ref: float, time_limit: float | None
) -> tuple[np.ndarray | None, float, dict]:
    """HiGHS on the choices with reduced cost <= tau; rows with one such choice are fixed at it."""
    n = model.n_rows
    # Each row's Lagrangian choice always stays (reduced cost 0; lowest index on ties).
    order = np.lexsort((np.arange(model.row.size), reduced, model.row))
    first = np.ones(order.size, dtype=bool)
    first[1:] = model.row[order][1:] != model.row[order][:-1]
    base = np.empty(n, dtype=np.int64)
    base[model.row[order][first]] = order[first]
    keep = reduced <= tau
    keep[base] = True
    per_row = np.bincount(model.row[keep], minlength=n)
    var = np.flatnonzero(keep & (per_row[model.row] >= 2))
    fixed = base[per_row < 2]
    info: dict[str, Any] = {"tau": tau, "core_rows": int((per_row >= 2).sum()), "core_choices": int(var.size)}
    pick = base.copy()
    if var.size == 0:
        ok = model.fits(pick)
        return (pick if ok else None), (model.value(pick) if ok else math.inf), info
    rows_core, local = np.unique(model.row[var], return_inverse=True)
    sub = _Model(
        local, rows_core.size, model.cost[var], model.a[:, var], model.cap - model.a[:, fixed].sum(axis=1),
        model.soft, model.soft_price,
    )  # fmt: skip
    sol, sub_bound, milp_info = _milp(sub, scale_ref, time_limit)
    info.update(milp_info)
    if sol is None:
        return None, math.inf, info
    pick[rows_core] = var[sol]
    # The core's optimum plus the fixed rows' cost bounds every allocation inside the core (the soft overflow
    # is priced on the whole constraint, which the sub-model's shifted capacity keeps).
    return pick, math.fsum(model.cost[fixed].tolist()) + sub_bound, info


def _milp(model: _Model, scale_ref: float, time_limit: float | None, resolves: int = 5) -> tuple:
    """(chosen local index per row or None, proven bound on the model's optimum, info)."""
    hard = np.ones(len(model.cap), dtype=bool)
    if model.soft is not None:
        hard[model.soft] = False
    if (model.cap[hard] < 0).any():
        return None, math.inf, {"status": "fixed rows over budget"}
    shifted, scale = _scaled(model.cost, model.row, model.n_rows)
    top = float(shifted.max()) if shifted.size else 0.0
    if top > 0:  # HiGHS's absolute gap (1e-6 solver units) is worth a tenth of the answer's REL_TOL
        scale = float(np.clip(_HIGHS_ABS_GAP / max(0.1 * REL_TOL * scale_ref, 1e-300), 1.0 / top, 1e8 / top))
    row_min = np.full(model.n_rows, np.inf)
    np.minimum.at(row_min, model.row, model.cost)
    base = math.fsum(row_min.tolist())
    m = model.cost.size
    n_con = len(model.cap)
    c = shifted * scale
    a = model.a.astype(np.float64)
    integrality = np.ones(m)
    bounds_lo, bounds_hi = np.zeros(m), np.ones(m)
    if model.soft is not None:
        col = np.zeros((n_con, 1))
        col[model.soft] = -1.0
        a = np.hstack([a, col])
        c = np.concatenate([c, [model.soft_price * scale]])
        integrality = np.concatenate([integrality, [0]])
        bounds_lo, bounds_hi = np.append(bounds_lo, 0.0), np.append(bounds_hi, np.inf)
    a_all = sp.vstack(
        [
            sp.csr_array((np.ones(m), (model.row, np.arange(m))), shape=(model.n_rows, a.shape[1])),
            sp.csr_array(a),
        ]
    ).tocsr()
    options: dict[str, Any] = {"mip_rel_gap": 0.0, "disp": False, "presolve": True}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    cap = model.cap.astype(np.int64).copy()
    bound, nodes = -math.inf, 0
    for attempt in range(resolves + 1):
        res = so.milp(
            c,
            integrality=integrality,
            bounds=so.Bounds(bounds_lo, bounds_hi),
            constraints=so.LinearConstraint(
                a_all,
                np.concatenate([np.ones(model.n_rows), np.full(n_con, -np.inf)]),
                np.concatenate([np.ones(model.n_rows), cap.astype(np.float64)]),
            ),
            options=options,
        )
        nodes += int(getattr(res, "mip_node_count", 0) or 0)
        dual = getattr(res, "mip_dual_bound", None)
        if attempt == 0 and dual is not None and math.isfinite(dual):
            bound = (
                base + dual / scale
            )  # only the first solve bounds the model: tightening raises its optimum
        if res.x is None:
            return None, math.inf, {"status": f"no solution ({res.message})", "nodes": nodes}
        sol = _decode(res.x[:m], model.row, model.n_rows)
        over = np.where(hard, model.used(sol) - model.cap, 0)
        if (over <= 0).all():
            status = "optimal" if res.status == 0 else f"stopped: {res.message}"
            return sol, bound, {"status": status, "nodes": nodes, "resolves": attempt}
        # HiGHS's feasibility tolerance let a budget row over: tighten it by the overshoot and re-solve.
        log.info("split milp: over budget by %s bytes; re-solving tighter", over.tolist())
        cap = cap - np.maximum(over, 0)
    return None, bound, {"status": "over budget after re-solves", "nodes": nodes}


def _decode(x: np.ndarray, row: np.ndarray, n_rows: int) -> np.ndarray:
    """Each row's choice is its variable with the largest value (first on ties)."""
    order = np.lexsort((np.arange(x.size), -x, row))
    first = np.ones(order.size, dtype=bool)
    first[1:] = row[order][1:] != row[order][:-1]
    out = np.empty(n_rows, dtype=np.int64)
    out[row[order][first]] = order[first]
    return out


# --- the relaxation R, the placement, and the whole problem -------------------------------------------------


def _pareto_choices(sizes: np.ndarray, cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, option) of each row's options no other option of the row beats on bytes and cost."""
    inst = Instance(sizes, cost)
    row, pos = np.nonzero(inst.valid)
    return row, inst.par_idx[row, pos]


def _solve_relaxation(
    sizes: np.ndarray,
    costs: np.ndarray,
    where: np.ndarray,
    budgets: tuple[int, int],
    price: float,
    time_limit: float | None,
    allowance: int,
) -> tuple[np.ndarray, float, dict]:
    """R's optimal options (index per row), its proven lower bound, info. Constraints: gpu-pinned bytes <= B_gpu,
    cpu-pinned bytes <= B_cpu, all bytes <= B_gpu + B_cpu, and gpu-pinned + free bytes <= B_gpu (soft: each
    byte over lives on the cpu at `price`)."""
    bg, bc = budgets
    eff = costs + np.where(where == CPU, price, 0.0)[:, None] * sizes  # pinned-cpu rows pay for every byte
    row, opt = _pareto_choices(sizes, eff)
    s = sizes[row, opt]
    w = where[row]
    a = np.stack([np.where(w == GPU, s, 0), np.where(w == CPU, s, 0), s, np.where(w != CPU, s, 0)])
    model = _Model(
        row, len(sizes), eff[row, opt], a, np.array([bg, bc, bg + bc - allowance, bg], np.int64), 3, price
    )
    pick, bound, info = _solve_model(model)
    if pick is None:
        return None, bound, info
    option = np.empty(len(sizes), dtype=np.int64)
    option[row[pick]] = opt[pick]
    return option, bound, info


def _place(chosen: np.ndarray, where: np.ndarray, budgets: tuple[int, int]) -> np.ndarray | None:
    """Sides for the chosen bytes: pinned rows on their side; free rows on the gpu largest first while they fit
    (ties: lower row first), the rest on the cpu; None if the cpu then overflows."""
    bg, bc = budgets
    side = np.where(where == EITHER, CPU, where).astype(np.int64)
    room = bg - int(chosen[where == GPU].sum(dtype=np.int64))
    free = np.flatnonzero(where == EITHER)
    for i in free[np.lexsort((free, -chosen[free]))].tolist():
        if chosen[i] <= room:
            side[i] = GPU
            room -= int(chosen[i])
    over = int(chosen[side == CPU].sum(dtype=np.int64)) - bc
    if over <= 0:
        return side
    # One swap: a free cpu row j to the gpu in exchange for a free gpu row i (or none), s_j - s_i in [over, room].
    on_gpu = np.concatenate([[-1], free[side[free] == GPU]])
    on_cpu = free[side[free] == CPU]
    g_sizes = np.where(on_gpu >= 0, chosen[np.maximum(on_gpu, 0)], 0)
    order = np.argsort(g_sizes, kind="stable")
    g_sorted = g_sizes[order]
    for j in on_cpu.tolist():
        lo = np.searchsorted(g_sorted, chosen[j] - room, side="left")
        hi = np.searchsorted(g_sorted, chosen[j] - over, side="right")
        if lo < hi:
            i = int(on_gpu[order[lo]])
            side[j] = GPU
            if i >= 0:
                side[i] = CPU
            return side
    return None


def _solve_full(
    sizes: np.ndarray,
    costs: np.ndarray,
    where: np.ndarray,
    budgets: tuple[int, int],
    price: float,
    time_limit: float | None,
) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """The problem with one choice per (option, allowed side): options, sides, bound, info."""
    parts = []
    for side in (GPU, CPU):
        allowed = (where == side) | (where == EITHER)
        eff = np.where(allowed[:, None], costs + (price if side == CPU else 0.0) * sizes, np.inf)
        ok = np.flatnonzero(allowed)
        if ok.size == 0:
            continue
        r, o = _pareto_choices(sizes[ok], eff[ok])
        parts.append((ok[r], o, np.full(r.size, side), eff[ok[r], o]))
    row = np.concatenate([p[0] for p in parts])
    opt = np.concatenate([p[1] for p in parts])
    sd = np.concatenate([p[2] for p in parts])
    cost = np.concatenate([p[3] for p in parts])
    s = sizes[row, opt]
    a = np.stack([np.where(sd == GPU, s, 0), np.where(sd == CPU, s, 0)])
    model = _Model(row, len(sizes), cost, a, np.array(budgets, dtype=np.int64))
    pick, bound, info = _core_search(model, *_reduced(model, time_limit), time_limit)
    option = np.empty(len(sizes), dtype=np.int64)
    side = np.empty(len(sizes), dtype=np.int64)
    option[row[pick]], side[row[pick]] = opt[pick], sd[pick]
    return option, side, bound, info


def _value(cand: tuple[np.ndarray, np.ndarray], sizes: np.ndarray, costs: np.ndarray, price: float) -> float:
    option, side = cand
    rows = np.arange(len(sizes))
    return math.fsum(costs[rows, option].tolist()) + price * int(sizes[rows, option][side == CPU].sum())


def _best(cands: list, sizes: np.ndarray, costs: np.ndarray, price: float) -> tuple | None:
    """The cheapest placed candidate (the first on ties), None if none was placed."""
    placed = [c for c in cands if c[0] is not None and c[1] is not None]
    if not placed:
        return None
    values = [_value(c, sizes, costs, price) for c in placed]
    return placed[int(np.argmin(values))]


def _one_side_for_free_rows(
    sizes: np.ndarray,
    costs: np.ndarray,
    where: np.ndarray,
    budgets: tuple[int, int],
    price: float,
    side: int,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Every free row on `side`: two independent one-budget knapsacks, solved exactly (mintbuild.solve). The
    usual answer when the free rows fit one side (e.g. attention on the gpu, experts pinned to the cpu)."""
    from mintbuild.solve import solve_mckp

    option = np.empty(len(sizes), dtype=np.int64)
    sides = np.where(where == EITHER, side, where).astype(np.int64)
    for s in (GPU, CPU):
        rows = np.flatnonzero(sides == s)
        if rows.size == 0:
            continue
        cost = costs[rows] + (price * sizes[rows] if s == CPU else 0.0)
        try:
            option[rows] = solve_mckp(sizes[rows], cost, budgets[s], method="exact").choice
        except InfeasibleBudget:
            return None, None
    return option, sides


def _overflow(chosen: np.ndarray, where: np.ndarray, budgets: tuple[int, int]) -> int:
    """Bytes the greedy placement leaves over the cpu budget (0 if it fits)."""
    side = np.where(where == EITHER, CPU, where)
    room = budgets[GPU] - int(chosen[where == GPU].sum(dtype=np.int64))
    free = np.flatnonzero(where == EITHER)
    for i in free[np.lexsort((free, -chosen[free]))].tolist():
        if chosen[i] <= room:
            side[i] = GPU
            room -= int(chosen[i])
    return max(0, int(chosen[side == CPU].sum(dtype=np.int64)) - budgets[CPU])
