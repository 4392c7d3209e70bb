"""The choice model behind split budgets: rows x choices, a few byte constraints (one may be soft: bytes over it
cost a price), solved with a certificate.

- `solve_by_lagrangian`: Lagrangian relaxation whose inner problem is a one-budget knapsack solved exactly by
  mintbuild.solve (`exact`): one hard constraint kept, the others priced into the costs at y >= 0; by weak
  duality its certified bound minus y . (the priced capacities) bounds the model for any such y.
- `core_search`: reduced-cost fixing at the LP's prices (an allocation cheaper than V uses only choices with
  reduced cost <= V - L) and HiGHS's MILP on the remaining core, grown until V - L is covered; every answer is
  re-summed in integer bytes, and a budget row HiGHS's tolerance let over is tightened by the overshoot.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.optimize as so
import scipy.sparse as sp

from mintbuild.errors import InfeasibleBudget
from mintbuild.solve.problem import ABS_TOL, REL_TOL

log = logging.getLogger(__name__)

#: The LP (HiGHS) is solved for its prices up to this many choices (~1 s per 30,000 here).
LP_MAX_CHOICES = 60_000
#: HiGHS's fixed absolute MIP gap, in (scaled) objective units.
_HIGHS_ABS_GAP = 1e-6


@dataclass
class ChoiceModel:
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


def solve_by_lagrangian(model: ChoiceModel) -> tuple[np.ndarray | None, float, dict]:
    """(choice per row or None, proven lower bound, info). Lagrangian duals with the inner knapsack solved
    exactly: a hard constraint k is kept, the others move into the costs at prices y >= 0 (the soft row's at
    most its overflow price; any such prices give a valid bound), and the one-budget knapsack on k is solved by
    mintbuild.solve's exact method. Prices tried: each hard constraint with rows in it, kept alone with the soft
    row at 0 or its overflow price; and, up to LP_MAX_CHOICES choices, the LP relaxation's prices (HiGHS) with
    the highest-priced hard constraint kept, plus the LP's own bound. The best bound is kept; the cheapest
    answer that fits every constraint is the incumbent."""
    trials: list[tuple[np.ndarray, int]] = []
    support = np.asarray(model.a.any(axis=1))
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


def _lagrangian_exact(model: ChoiceModel, y: np.ndarray, k: int) -> tuple[np.ndarray | None, float]:
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


def reduced_costs(model: ChoiceModel, time_limit: float | None) -> tuple[np.ndarray, float]:
    """Reduced costs and the Lagrangian bound at the LP's prices."""
    y, _ = _lp_duals(model, time_limit)
    lagr = model.cost + y @ model.a.astype(np.float64)
    row_min = np.full(model.n_rows, np.inf)
    np.minimum.at(row_min, model.row, lagr)
    lower = math.fsum(row_min.tolist()) - float(y @ model.cap.astype(np.float64))
    return np.maximum(lagr - row_min[model.row], 0.0), lower


def _lp_duals(model: ChoiceModel, time_limit: float | None) -> tuple[np.ndarray, dict]:
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


def core_search(
    model: ChoiceModel,
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
    model: ChoiceModel, reduced: np.ndarray, tau: float, scale_ref: float, time_limit: float | None
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
    sub = ChoiceModel(
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


def _milp(model: ChoiceModel, scale_ref: float, time_limit: float | None, resolves: int = 5) -> tuple:
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
