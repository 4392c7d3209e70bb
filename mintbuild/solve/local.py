"""Local moves on Pareto positions: fill leftover bytes (improve) and get back under budget (repair).

Both work in exact integer bytes and pick moves deterministically (best move; lowest row, then position, on
ties).
"""

from __future__ import annotations

import numpy as np

from mintbuild.solve.problem import Instance


def improve(inst: Instance, pos: np.ndarray, budget: int, max_moves: int = 256) -> np.ndarray:
    """Repeatedly apply the single-row change that saves the most cost and still fits the budget."""
    pos = pos.copy()
    rows = inst.rows
    for _ in range(max_moves):
        rem = budget - inst.bytes_of(pos)
        d_size = inst.par_size - inst.par_size[rows, pos][:, None]
        d_cost = inst.par_cost - inst.par_cost[rows, pos][:, None]
        ok = inst.valid & (d_size <= rem) & (d_cost < 0)
        if not ok.any():
            break
        flat = int(np.argmin(np.where(ok, d_cost, np.inf)))
        row, col = divmod(flat, inst.par_size.shape[1])
        pos[row] = col
    return pos


def repair(inst: Instance, pos: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """Move rows to smaller options until the bytes fit; returns the positions and the number of moves."""
    pos = pos.copy()
    rows = inst.rows
    moves = 0
    while (over := inst.bytes_of(pos) - budget) > 0:
        saved = inst.par_size[rows, pos][:, None] - inst.par_size
        loss = inst.par_cost - inst.par_cost[rows, pos][:, None]
        ok = inst.valid & (saved > 0)
        if not ok.any():  # cannot happen above min_bytes, which the caller checked
            raise AssertionError("repair: no smaller option left while over budget")
        covers = ok & (saved >= over)
        if covers.any():
            # One move is enough: take the one that loses least.
            score = np.where(covers, loss, np.inf)
        else:
            score = np.where(ok, loss / np.maximum(saved, 1), np.inf)
        flat = int(np.argmin(score))
        row, col = divmod(flat, inst.par_size.shape[1])
        pos[row] = col
        moves += 1
    return pos, moves
