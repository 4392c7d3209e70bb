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

from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.solve.choice_model import ChoiceModel, core_search, reduced_costs, solve_by_lagrangian
from mintbuild.solve.problem import ABS_TOL, REL_TOL, Instance

log = logging.getLogger(__name__)

#: Sides (result) and placement rules (`where`): a row lives on the GPU or the CPU; EITHER lets the solver pick.
GPU, CPU, EITHER = 0, 1, 2
#: Problems up to this many rows whose greedy placement is not proven optimal are re-solved with the side as a
#: choice (larger ones report the placement's gap: the price of the gpu bytes it leaves unused).
FULL_SEARCH_ROWS = 256


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
    cands: list[tuple[np.ndarray | None, np.ndarray | None]] = [
        (option, None if option is None else _place(sizes[rows, option], where, budgets))
    ]
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
) -> tuple[np.ndarray | None, float, dict]:
    """R's optimal options (index per row), its proven lower bound, info. Constraints: gpu-pinned bytes <= B_gpu,
    cpu-pinned bytes <= B_cpu, all bytes <= B_gpu + B_cpu, and gpu-pinned + free bytes <= B_gpu (soft: each
    byte over lives on the cpu at `price`)."""
    bg, bc = budgets
    eff = costs + np.where(where == CPU, price, 0.0)[:, None] * sizes  # pinned-cpu rows pay for every byte
    row, opt = _pareto_choices(sizes, eff)
    s = sizes[row, opt]
    w = where[row]
    a = np.stack([np.where(w == GPU, s, 0), np.where(w == CPU, s, 0), s, np.where(w != CPU, s, 0)])
    model = ChoiceModel(
        row, len(sizes), eff[row, opt], a, np.array([bg, bc, bg + bc - allowance, bg], np.int64), 3, price
    )
    pick, bound, info = solve_by_lagrangian(model)
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
    model = ChoiceModel(row, len(sizes), cost, a, np.array(budgets, dtype=np.int64))
    pick, bound, info = core_search(model, *reduced_costs(model, time_limit), time_limit)
    option = np.empty(len(sizes), dtype=np.int64)
    sides = np.empty(len(sizes), dtype=np.int64)
    option[row[pick]], sides[row[pick]] = opt[pick], sd[pick]
    return option, sides, bound, info


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
