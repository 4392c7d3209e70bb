"""The LP relaxation of the MCKP, solved exactly by a greedy over lower-convex-hull segments.

Relaxing "one option per row" to a convex combination, each row only ever uses its lower convex hull in the
(size, cost) plane, and the LP optimum takes hull segments in order of decreasing efficiency (cost saved per
extra byte) until the budget runs out, the last one fractionally. Its efficiency is the dual price `lam` of a
byte. The bound reported is the Lagrangian value

    L(lam) = sum_i min_j (c_ij + lam * (s_ij - s_i0)) - lam * (budget - sum_i s_i0),

which equals the LP optimum at the LP's `lam` and, by weak duality, is a valid lower bound for any lam >= 0
however the hull was rounded: the certificate does not rest on the hull being computed exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mintbuild.solve.problem import Instance


@dataclass(frozen=True)
class LPRelaxation:
    lam: float  # dual price of a byte (cost per byte)
    bound: float  # Lagrangian bound L(lam), a valid lower bound on the optimum
    rounded: (
        np.ndarray
    )  # int64 [N] Pareto positions: the LP solution rounded down, then leftover bytes filled
    critical_row: int  # the row the LP takes fractionally
    hull_points: int


def lower_hull(inst: Instance) -> tuple[np.ndarray, np.ndarray]:
    """Per-row lower convex hull of the Pareto points: positions [N, H] (padded with the last), counts."""
    alive = inst.valid.copy()
    todo = np.flatnonzero(inst.par_count >= 3)  # one or two points are their own hull
    while todo.size:
        pop = _non_convex(inst.par_size[todo].astype(np.float64), inst.par_cost[todo], alive[todo])
        hit = pop.any(axis=1)
        alive[todo[hit]] &= ~pop[hit]
        todo = todo[hit]  # rows that lost nothing are final
    depth = alive.sum(axis=1).astype(np.int64)
    hull = np.argsort(~alive, axis=1, kind="stable")[:, : max(int(depth.max(initial=1)), 1)]
    # Pad each row with its last hull point so that gathers stay in range.
    cols = np.minimum(np.arange(hull.shape[1])[None, :], depth[:, None] - 1)
    return np.take_along_axis(hull, cols, axis=1), depth


def _non_convex(s: np.ndarray, c: np.ndarray, alive: np.ndarray) -> np.ndarray:
    """Alive points on or above the chord between their nearest alive neighbours.

    None of them is a hull vertex, so all can go at once; collinear points go too, so that efficiencies strictly
    decrease along each row's hull.
    """
    n, width = s.shape
    idx = np.broadcast_to(np.arange(width), (n, width))
    left = np.maximum.accumulate(np.where(alive, idx, -1), axis=1)
    left = np.concatenate([np.full((n, 1), -1), left[:, :-1]], axis=1)
    right = np.minimum.accumulate(np.where(alive, idx, width)[:, ::-1], axis=1)[:, ::-1]
    right = np.concatenate([right[:, 1:], np.full((n, 1), width)], axis=1)
    inner = alive & (left >= 0) & (right < width)
    flat = (np.arange(n) * width)[:, None]
    li = (flat + np.clip(left, 0, width - 1)).ravel()
    ri = (flat + np.clip(right, 0, width - 1)).ravel()
    ls, lc = s.ravel()[li].reshape(n, width), c.ravel()[li].reshape(n, width)
    rs, rc = s.ravel()[ri].reshape(n, width), c.ravel()[ri].reshape(n, width)
    with np.errstate(invalid="ignore"):
        return inner & ((c - lc) * (rs - ls) >= (rc - lc) * (s - ls))


def solve_lp(inst: Instance, budget: int) -> LPRelaxation:
    """The LP relaxation for a budget with min_bytes <= budget < cheapest_bytes (a constrained instance)."""
    hull, depth = lower_hull(inst)
    rows = inst.rows
    hs = inst.par_size[rows[:, None], hull]
    hc = inst.par_cost[rows[:, None], hull]
    seg_valid = np.arange(1, hull.shape[1])[None, :] < depth[:, None]
    ds = hs[:, 1:] - hs[:, :-1]
    dc = hc[:, :-1] - hc[:, 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(seg_valid, dc / np.where(seg_valid, ds, 1), -1.0)
    # Float rounding must never let a row's later segment sort before an earlier one.
    eff = np.minimum.accumulate(eff, axis=1)
    seg_row, seg_pos = np.nonzero(seg_valid)
    seg_eff = eff[seg_row, seg_pos]
    order = np.lexsort((seg_pos, seg_row, -seg_eff))
    cum = np.cumsum(ds[seg_row, seg_pos][order])
    slack = budget - inst.min_bytes
    t = int(np.searchsorted(cum, slack, side="right"))
    if t >= order.size:
        raise ValueError("solve_lp needs a constrained instance (budget below the cheapest allocation)")
    crit = order[t]
    lam = float(seg_eff[crit])
    taken = np.bincount(seg_row[order[:t]], minlength=inst.n_rows)
    rem = slack - (int(cum[t - 1]) if t else 0)
    taken = fill_option(taken, seg_row[order[t:]], seg_pos[order[t:]], ds[seg_row, seg_pos][order[t:]], rem)
    rounded = hull[rows, taken]
    return LPRelaxation(
        lam=lam,
        bound=lagrangian_bound(inst, lam, budget),
        rounded=rounded.astype(np.int64),
        critical_row=int(seg_row[crit]),
        hull_points=int(depth.sum()),
    )


def row_lagrangian(inst: Instance, lam: float) -> np.ndarray:
    """c_ij + lam * (s_ij - s_i0) for every Pareto option [N, P] (inf in padding)."""
    inc = (inst.par_size - inst.min_sizes[:, None]).astype(np.float64)
    return inst.par_cost + lam * inc


def lagrangian_bound(inst: Instance, lam: float, budget: int) -> float:
    per_row = row_lagrangian(inst, lam).min(axis=1)
    return math.fsum(per_row.tolist()) - lam * float(budget - inst.min_bytes)


def fill_option(taken: np.ndarray, row: np.ndarray, pos: np.ndarray, ds: np.ndarray, rem: int) -> np.ndarray:
    """Continue the hull greedy past the critical segment, skipping what does not fit (a row's later segments
    only once its earlier ones are in)."""
    taken = taken.copy()
    fits = ds <= rem
    for i, j, d in zip(row[fits].tolist(), pos[fits].tolist(), ds[fits].tolist(), strict=True):
        if d <= rem and taken[i] == j:
            taken[i] = j + 1
            rem -= d
    return taken
