"""The published one-pass greedy (the MINT baseline), kept for comparison; not optimal.

Start every row at its smallest option; list every upgrade (row, option) that lowers the cost relative to that
start, ranked by cost saved per extra byte; walk the list once and apply an upgrade when it lowers the row's
current cost and its extra bytes fit what is left. Its bound is the LP bound, so its gap to the optimum shows.
"""

from __future__ import annotations

import time

import numpy as np

from mintbuild.solve.hull import solve_lp
from mintbuild.solve.problem import Instance


def greedy_choice(inst: Instance, budget: int) -> np.ndarray:
    rows = inst.rows
    sizes, costs = inst.sizes, inst.costs
    # Pareto position 0 is the smallest option, ties to the lower cost then the lower index.
    start = inst.par_idx[:, 0]
    s0 = sizes[rows, start]
    c0 = costs[rows, start]
    extra = sizes - s0[:, None]
    saved = c0[:, None] - costs
    up_row, up_opt = np.nonzero(np.isfinite(costs) & (extra > 0) & (saved > 0))
    eff = saved[up_row, up_opt] / extra[up_row, up_opt]
    order = np.argsort(-eff, kind="stable")  # ties keep row-major (row, then option index) order
    choice = start.astype(np.int64).copy()
    cur_size = s0.tolist()
    cur_cost = c0.tolist()
    rem = budget - inst.min_bytes
    up_row_l = up_row[order].tolist()
    up_opt_l = up_opt[order].tolist()
    new_size = sizes[up_row, up_opt][order].tolist()
    new_cost = costs[up_row, up_opt][order].tolist()
    for i, j, s, c in zip(up_row_l, up_opt_l, new_size, new_cost, strict=True):
        if c < cur_cost[i] and s - cur_size[i] <= rem:
            rem -= s - cur_size[i]
            cur_size[i] = s
            cur_cost[i] = c
            choice[i] = j
    return choice


def solve_greedy(inst: Instance, budget: int) -> tuple[np.ndarray, float, dict]:
    t0 = time.perf_counter()
    choice = greedy_choice(inst, budget)
    greedy_seconds = time.perf_counter() - t0
    lp = solve_lp(inst, budget)
    info = {"greedy_seconds": greedy_seconds, "lp_bound": lp.bound, "lambda": lp.lam}
    return inst.pos_of(choice), lp.bound, info
