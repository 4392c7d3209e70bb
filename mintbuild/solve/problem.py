"""Problem arrays, validation, the result record and the steps every method shares.

An instance is N rows (decisions) x K options, each option a size in bytes (int64) and a cost (float64, `inf`
when unavailable or vetoed). Every method works on each row's Pareto set: the options no other option beats on
both size and cost. A dominated option can always be swapped for the option that dominates it without raising
the cost or the bytes, so an optimum over the Pareto sets is an optimum over all options; the swap is also the
tie-break every method reports (equal cost: smaller size, then lower index).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mintbuild.errors import InfeasibleBudget, MintError

#: `optimal` means objective - bound <= REL_TOL * |objective| (or <= ABS_TOL).
REL_TOL = 1e-9
ABS_TOL = 1e-12
#: Totals must stay well inside int64 so that cumulative sums of sizes cannot overflow.
MAX_TOTAL_BYTES = 2**62


@dataclass(frozen=True, eq=False)
class MCKPResult:
    """One allocation and its certificate: `bound` is a proven lower bound on the optimal objective."""

    choice: np.ndarray  # int64 [N], option index per row
    objective: float  # sum of chosen costs (math.fsum, so independent of summation order)
    bound: float
    gap: float  # objective - bound
    rel_gap: float  # gap / max(|objective|, tiny)
    bytes: int  # exact sum of chosen sizes
    budget: int
    method: str
    optimal: bool
    solve_seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def slack(self) -> int:
        return self.budget - self.bytes


def exact_int_sum(values: np.ndarray) -> int:
    """Sum of an int64 array as a python int, without int64 overflow."""
    if values.size == 0:
        return 0
    if int(np.abs(values).max()) * values.size < MAX_TOTAL_BYTES:
        return int(values.sum(dtype=np.int64))
    return sum(values.tolist())


def as_budget(budget: Any) -> int:
    """A budget in bytes as a python int; integral floats (1e11) are accepted, fractions are not."""
    if isinstance(budget, bool):
        raise MintError(f"budget must be an integer number of bytes, got {budget!r}")
    if isinstance(budget, int | np.integer):
        return int(budget)
    if isinstance(budget, float | np.floating) and math.isfinite(budget) and float(budget).is_integer():
        return int(budget)
    raise MintError(f"budget must be an integer number of bytes, got {budget!r}")


class Instance:
    """Validated arrays plus the per-row Pareto sets (padded to P columns, size ascending, cost descending).

    par_idx [N, P] original option index (-1 in padding), par_size [N, P] int64 (0 in padding),
    par_cost [N, P] float64 (inf in padding), par_count [N]. Position 0 is each row's smallest option, position count-1 its
    cheapest.
    """

    def __init__(self, sizes: Any, costs: Any) -> None:
        self.sizes, self.costs = _validate(sizes, costs)
        self.n_rows, self.n_options = self.sizes.shape
        self.rows = np.arange(self.n_rows)
        self.par_idx, self.par_size, self.par_cost, self.par_count = _pareto(self.sizes, self.costs)
        self.valid = np.arange(self.par_idx.shape[1])[None, :] < self.par_count[:, None]
        self.min_sizes = self.par_size[:, 0] if self.n_rows else np.zeros(0, np.int64)
        self.min_bytes = exact_int_sum(self.min_sizes)
        last = self.par_count - 1
        self.cheapest_pos = last
        self.cheapest_bytes = exact_int_sum(self.par_size[self.rows, last])

    # -- conversions between Pareto positions and option indices --

    def choice_of(self, pos: np.ndarray) -> np.ndarray:
        return self.par_idx[self.rows, pos].astype(np.int64)

    def pos_of(self, choice: np.ndarray) -> np.ndarray:
        """The Pareto position that dominates (or is) each chosen option: the first with cost <= its cost."""
        chosen_cost = self.costs[self.rows, choice]
        beaten = self.valid & (self.par_cost > chosen_cost[:, None])
        return beaten.sum(axis=1).astype(np.int64)

    def bytes_of(self, pos: np.ndarray) -> int:
        return exact_int_sum(self.par_size[self.rows, pos])

    def cost_of(self, pos: np.ndarray) -> float:
        return math.fsum(self.par_cost[self.rows, pos].tolist())

    # -- budget checks --

    def check_budget(self, budget: Any) -> int:
        """The budget as an int; raises InfeasibleBudget, before any work, when no allocation fits."""
        b = as_budget(budget)
        if b < self.min_bytes:
            # Rows whose smallest option is largest set the floor: those are the tensors to name.
            floor = np.argsort(-self.min_sizes, kind="stable")[:5]
            named = ", ".join(f"row {int(i)} ({int(self.min_sizes[i])} B)" for i in floor)
            err = InfeasibleBudget(
                f"budget {b} B is below the minimum achievable {self.min_bytes} B "
                f"(every row at its smallest available option; short by {self.min_bytes - b} B); "
                f"largest floors: {named}"
            )
            err.min_bytes = self.min_bytes
            err.budget = b
            err.floor_rows = [int(i) for i in floor]
            raise err
        return b


def _validate(sizes: Any, costs: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(sizes)
    c = np.asarray(costs, dtype=np.float64)
    if s.ndim != 2 or c.shape != s.shape:
        raise MintError(f"sizes and costs must be 2-D arrays of one shape, got {s.shape} and {c.shape}")
    whole = np.issubdtype(s.dtype, np.integer) or (np.all(np.isfinite(s)) and np.all(s == np.round(s)))
    if s.size and not whole:
        raise MintError("sizes must be whole numbers of bytes")
    s = s.astype(np.int64)
    avail = np.isfinite(c)
    _check_rows(np.isnan(c).any(axis=1), "has a NaN cost")
    _check_rows((c < 0).any(axis=1), "has a negative cost")
    _check_rows((avail & (s < 0)).any(axis=1), "has a negative size")
    _check_rows(~avail.any(axis=1), "has no available option (every cost is inf)")
    biggest = np.where(avail, s, 0).max(axis=1) if s.size else np.zeros(0, np.int64)
    if exact_int_sum(biggest) >= MAX_TOTAL_BYTES:
        raise MintError(f"total size {exact_int_sum(biggest)} B is too large (limit 2**62)")
    return s, c


def _check_rows(bad: np.ndarray | np.bool_, what: str) -> None:
    if bad.any():
        rows = np.flatnonzero(bad)
        more = f" (and {rows.size - 1} more rows)" if rows.size > 1 else ""
        raise MintError(f"row {int(rows[0])} {what}{more}")


def _pareto(sizes: np.ndarray, costs: np.ndarray) -> tuple[np.ndarray, ...]:
    n = sizes.shape[0]
    if n == 0:
        return (
            np.zeros((0, 1), np.int64),
            np.zeros((0, 1), np.int64),
            np.zeros((0, 1)),
            np.zeros(0, np.int64),
        )
    avail = np.isfinite(costs)
    size_key = np.where(avail, sizes, np.iinfo(np.int64).max)
    # Sort each row by (size, cost, index): lexsort is stable, so the original index breaks the last ties.
    order = np.lexsort((costs, size_key), axis=1)
    s_sorted = np.take_along_axis(size_key, order, axis=1)
    c_sorted = np.take_along_axis(costs, order, axis=1)
    prev_min = np.concatenate([np.full((n, 1), np.inf), np.minimum.accumulate(c_sorted, axis=1)[:, :-1]], 1)
    # Kept iff strictly cheaper than every smaller-or-equal option before it.
    keep = c_sorted < prev_min
    count = keep.sum(axis=1).astype(np.int64)
    width = int(count.max())
    compact = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    valid = np.arange(width)[None, :] < count[:, None]
    idx = np.where(valid, np.take_along_axis(order, compact, axis=1), -1).astype(np.int64)
    size = np.where(valid, np.take_along_axis(s_sorted, compact, axis=1), 0).astype(np.int64)
    cost = np.where(valid, np.take_along_axis(c_sorted, compact, axis=1), np.inf)
    return idx, size, cost, count


def is_optimal(objective: float, bound: float) -> bool:
    return objective - bound <= max(REL_TOL * abs(objective), ABS_TOL)


def finish(
    inst: Instance, pos: np.ndarray, bound: float, budget: int, method: str, start: float, info: dict
) -> MCKPResult:
    """Build the result from Pareto positions: exact bytes re-checked, objective by fsum (exactly rounded)."""
    pos = np.asarray(pos, dtype=np.int64)
    nbytes = inst.bytes_of(pos)
    if nbytes > budget:
        # Every method repairs before it gets here: this is a bug, never a user error.
        raise AssertionError(f"{method}: allocation uses {nbytes} B > budget {budget} B")
    objective = inst.cost_of(pos)
    bound = min(float(bound), objective)
    gap = objective - bound
    return MCKPResult(
        choice=inst.choice_of(pos),
        objective=objective,
        bound=bound,
        gap=gap,
        rel_gap=gap / max(abs(objective), 1e-300),
        bytes=nbytes,
        budget=budget,
        method=method,
        optimal=is_optimal(objective, bound),
        solve_seconds=time.perf_counter() - start,
        info=info,
    )


def unconstrained(inst: Instance, budget: int, method: str, start: float) -> MCKPResult:
    """Every row at its cheapest option fits: that is the optimum, and its own bound."""
    return finish(inst, inst.cheapest_pos, math.inf, budget, method, start, {"unconstrained": True})


MethodFn = Callable[..., tuple[np.ndarray, float, dict]]


def run(inst: Instance, budget: Any, method: str, fn: MethodFn, opts: dict, start: float) -> MCKPResult:
    """Shared frame: budget checks before any work, the unconstrained shortcut, then the method."""
    inspect.signature(fn).bind(inst, 0, **opts)  # a misspelt option fails even when the shortcut applies
    b = inst.check_budget(budget)
    if b >= inst.cheapest_bytes:
        return unconstrained(inst, b, method, start)
    pos, bound, info = fn(inst, b, **opts)
    return finish(inst, pos, bound, b, method, start, info)
