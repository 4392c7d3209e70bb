"""Exact search of the MCKP core: an expanding-core dynamic programme over sparse states (Pisinger-style).

With the LP's byte price lam and reduced costs r_ij >= 0 (zero at each row's `base` option), every allocation x
with U = budget - bytes(x) >= 0 unused bytes costs exactly

    cost(x) = L + sum_i r_i(x_i) + lam * U.

So the search is over deviations from the base: rows are added in order of their cheapest deviation; a state is
(D = bytes added over the base, R = reduced cost paid). A state can still improve only by paying at least the
next row's cheapest deviation, or by stopping with its unused bytes priced at lam, which gives the bound

    LB = R + min(lam * U, r_next)   (U >= 0),      LB = R + r_next   (over budget, must still deviate).

States whose bound exceeds the best value found are dropped, and so are states another beats on both bytes and
cost. Bytes are int64 throughout, so feasibility is exact. When no state is left, or the next row's cheapest
deviation alone exceeds the best value, the best allocation seen is optimal.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mintbuild.solve.problem import Instance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreOutcome:
    pos: np.ndarray | None  # Pareto positions of the best allocation found below `start_value`, or None
    value: float  # its R + lam * U (== start_value when nothing better was found)
    complete: bool  # True: proven optimal; False: gave up at max_states
    rows: int  # rows the search touched
    states: int  # total states kept over all steps
    peak_states: int  # most states alive after a step (each step holds at most max_states while expanding)


@dataclass
class _Step:
    parent: np.ndarray  # int64 index into the previous step's states
    option: np.ndarray  # int64 Pareto position chosen in this row, -1 for "stay at base"


def expanding_core(
    inst: Instance,
    budget: int,
    lam: float,
    reduced: np.ndarray,
    start_value: float,
    *,
    tol: float,
    max_states: int = 4_000_000,
) -> CoreOutcome:
    """Search allocations with R + lam * U < start_value (the incumbent's value over L)."""
    rows = inst.rows
    # Base: each row's zero-reduced-cost option, smallest on ties. Exactly zero by construction of `reduced`.
    base = np.argmin(reduced, axis=1)
    base_size = inst.par_size[rows, base]
    unused0 = budget - int(base_size.sum(dtype=np.int64))
    best = start_value
    best_at: tuple[int, int, int] | None = None
    if unused0 >= 0 and lam * unused0 < best - tol:
        best, best_at = lam * unused0, (-1, 0, -1)
    dev = np.isfinite(reduced) & (reduced <= best + tol)
    dev[rows, base] = False
    cand = np.flatnonzero(dev.any(axis=1))
    first = np.where(dev[cand], reduced[cand], np.inf).min(axis=1)
    order = np.argsort(first, kind="stable")
    cand, first = cand[order], first[order]

    d = np.zeros(1, dtype=np.int64)
    r = np.zeros(1)
    steps: list[_Step] = []
    total = peak = 0
    for k, i in enumerate(cand.tolist()):
        if first[k] > best + tol or d.size == 0:
            break
        opts = np.flatnonzero(dev[i] & (reduced[i] <= best + tol))
        n = d.size
        if n * (opts.size + 1) > max_states:
            # Memory guard: the caller falls back to the MILP, keeping the best allocation found so far.
            log.info("core search stopped: %d states x %d options after %d rows", n, opts.size + 1, k)
            return CoreOutcome(_trace(inst, base, cand, steps, best_at), best, False, k, total, peak)
        d = np.concatenate([d] + [d + (inst.par_size[i, j] - base_size[i]) for j in opts.tolist()])
        r = np.concatenate([r] + [r + reduced[i, j] for j in opts.tolist()])
        parent = np.tile(np.arange(n), opts.size + 1)
        option = np.repeat(np.concatenate([[-1], opts]), n)
        unused = unused0 - d
        fits = unused >= 0
        value = np.where(fits, r + lam * unused, np.inf)
        j_best = int(np.argmin(value))
        if value[j_best] < best - tol:
            best, best_at = float(value[j_best]), (k, int(parent[j_best]), int(option[j_best]))
        r_next = first[k + 1] if k + 1 < cand.size else np.inf
        bound = r + np.where(fits, np.minimum(lam * unused, r_next), r_next)
        alive = np.flatnonzero(bound <= best + tol)
        d, r, parent, option = d[alive], r[alive], parent[alive], option[alive]
        srt = _pareto_front(d, r - lam * d)
        d, r = d[srt], r[srt]
        steps.append(_Step(parent=parent[srt], option=option[srt]))
        total += d.size
        peak = max(peak, d.size)
    return CoreOutcome(_trace(inst, base, cand, steps, best_at), best, True, len(steps), total, peak)


def _pareto_front(d: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Indices, by bytes, of the states no other state beats on both bytes and cost (cost = R - lam * D)."""
    # The input is a few shifted copies of a list already sorted by d: a stable (run-merging) sort is cheap.
    srt = np.argsort(d, kind="stable")
    cs = c[srt]
    prev_min = np.concatenate([[np.inf], np.minimum.accumulate(cs)[:-1]])
    srt = srt[cs < prev_min]
    # Equal bytes: the survivors' costs fall along the group, so only the last one of each group stays.
    ds = d[srt]
    last = np.ones(srt.size, dtype=bool)
    last[:-1] = ds[1:] != ds[:-1]
    return srt[last]


def _trace(
    inst: Instance,
    base: np.ndarray,
    cand: np.ndarray,
    steps: list[_Step],
    best_at: tuple[int, int, int] | None,
) -> np.ndarray | None:
    if best_at is None:
        return None
    pos = base.astype(np.int64).copy()
    k, state, option = best_at
    while k >= 0:
        if option >= 0:
            pos[cand[k]] = option
        k -= 1
        if k >= 0:
            state, option = int(steps[k].parent[state]), int(steps[k].option[state])
    return pos
