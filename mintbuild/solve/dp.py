"""Exact dynamic programming over bytes, for machines without a MILP solver (and for small exact cores).

Capacity is counted in size *increments* above each row's smallest option, in units of the greatest common
divisor of all increments: a sum of increments is a multiple of that unit, so flooring the spare budget to it
loses nothing. The table keeps one row of costs at a time (min cost with at most c units used) and one small
integer argmin per (row, capacity) for the back-track; that argmin table is the memory that gets checked,
before anything is allocated.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from mintbuild.errors import MintError
from mintbuild.solve.problem import Instance

log = logging.getLogger(__name__)

DEFAULT_MAX_TABLE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class DPShape:
    units: np.ndarray  # int64 [M, Q] increments in units (garbage in padding)
    unit: int  # bytes per unit
    capacity: int  # spare budget in units
    argmin_dtype: type

    @property
    def cells(self) -> int:
        return self.units.shape[0] * (self.capacity + 1)

    @property
    def table_bytes(self) -> int:
        cost_rows = 4 * (self.capacity + 1) * 8  # old, new, candidate and mask buffers
        return self.cells * np.dtype(self.argmin_dtype).itemsize + cost_rows


def dp_shape(size: np.ndarray, count: np.ndarray, budget: int) -> DPShape:
    """Units and capacity for sorted rows (position 0 = smallest) with `count` valid options each."""
    m, q = size.shape
    valid = np.arange(q)[None, :] < count[:, None]
    inc = np.where(valid, size - size[:, :1], 0)
    unit = int(np.gcd.reduce(inc[inc > 0])) if np.any(inc > 0) else 1
    units = inc // unit
    base = int(size[:, 0].sum(dtype=np.int64)) if m else 0
    # Capacity beyond every row's largest option is never used.
    capacity = max(0, min((budget - base) // unit, int(units.max(axis=1).sum()) if m else 0))
    dtype = np.uint8 if q <= 255 else np.uint16
    return DPShape(units=units, unit=unit, capacity=capacity, argmin_dtype=dtype)


def dp_solve(
    size: np.ndarray,
    cost: np.ndarray,
    count: np.ndarray,
    budget: int,
    max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
) -> tuple[np.ndarray, float, DPShape]:
    """Min total cost with sum of sizes <= budget: positions, the optimal value and the table shape."""
    shape = dp_shape(size, count, budget)
    need = shape.table_bytes
    if need > max_table_bytes:
        raise MintError(
            f"dp table would need {need / 2**30:.2f} GiB ({size.shape[0]} rows x {shape.capacity + 1} "
            f"capacity cells of {shape.unit} B); limit is {max_table_bytes / 2**30:.2f} GiB; use method exact"
        )
    cap = shape.capacity
    m = size.shape[0]
    arg: np.ndarray = np.zeros((m, cap + 1), dtype=shape.argmin_dtype)
    old = np.zeros(cap + 1)
    new = np.empty(cap + 1)
    cand = np.empty(cap + 1)
    better = np.empty(cap + 1, dtype=bool)
    for i in range(m):
        np.add(old, cost[i, 0], out=new)
        for j in range(1, int(count[i])):
            u = int(shape.units[i, j])
            if u > cap:
                break  # sizes ascend along the row: every later option is larger still
            n = cap + 1 - u
            np.add(old[:n], cost[i, j], out=cand[:n])
            # Strict: among equal costs the earlier (smaller) option stays.
            np.less(cand[:n], new[u:], out=better[:n])
            np.copyto(new[u:], cand[:n], where=better[:n])
            np.copyto(arg[i, u:], j, where=better[:n])
        old, new = new, old
    pos = np.zeros(m, dtype=np.int64)
    c = cap
    for i in range(m - 1, -1, -1):
        j = int(arg[i, c])
        pos[i] = j
        c -= int(shape.units[i, j])
    value = float(old[cap]) if m else 0.0
    log.debug("dp: %d rows x %d cells of %d B", m, cap + 1, shape.unit)
    return pos, value, shape


def solve_dp(inst: Instance, budget: int, *, max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES) -> tuple:
    pos, value, shape = dp_solve(inst.par_size, inst.par_cost, inst.par_count, budget, max_table_bytes)
    info = {"unit_bytes": shape.unit, "capacity_cells": shape.capacity + 1, "table_bytes": shape.table_bytes}
    # The DP value is the optimum (up to float summation); report it as the bound.
    bound = value if math.isfinite(value) else -math.inf
    return pos, bound, info
