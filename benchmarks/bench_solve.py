"""Benchmark the MCKP solvers on synthetic profiles shaped like real models.

    .venv/bin/python benchmarks/bench_solve.py                      # N = 300, 2,000, 20,000 x 19 options
    .venv/bin/python benchmarks/bench_solve.py --sizes 20000 --methods exact greedy

For each N it prints, from one run, each solver's wall time, "to optimum" = (objective - optimum) / optimum with
the optimum proven by `exact`, "certified" = (objective - own lower bound) / objective, i.e. the gap the solver
proves by itself, and the spare bytes. `dp` runs where
its table fits the memory limit and its work estimate is under --dp-max-work; otherwise the row says why not.
Goal on the 2-core reference machine: `exact` proves optimality at N = 20,000 in <= 1 s.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import numpy as np

from mintbuild.errors import MintError
from mintbuild.solve import MCKPResult, solve_mckp
from mintbuild.solve.dp import DEFAULT_MAX_TABLE_BYTES, dp_shape
from mintbuild.solve.problem import Instance

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # the test-only instance generator lives in tests/
from tests.mckp_instances import synthetic_profile

log = logging.getLogger("bench_solve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 2000, 20000], help="decisions per profile")
    p.add_argument("--bits", type=float, default=4.5, help="budget as average bits per weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--methods",
        nargs="+",
        default=["exact", "cvxpy", "greedy", "dp"],
        choices=["exact", "cvxpy", "greedy", "dp"],
    )
    p.add_argument(
        "--cvxpy-solvers", nargs="+", default=["HIGHS"], help="cvxpy solvers to run (HIGHS, SCIPY)"
    )
    p.add_argument("--cvxpy-time-limit", type=float, default=120.0, help="seconds per cvxpy solve")
    p.add_argument("--repeat", type=int, default=3, help="runs of exact per profile (median time reported)")
    p.add_argument("--dp-max-table-bytes", type=int, default=DEFAULT_MAX_TABLE_BYTES)
    p.add_argument(
        "--dp-max-work",
        type=float,
        default=2e10,
        help="skip dp above this many cell updates (~2-4 ns each here)",
    )
    return p.parse_args(argv)


def dp_skip_reason(sizes: np.ndarray, costs: np.ndarray, budget: int, args: argparse.Namespace) -> str | None:
    inst = Instance(sizes, costs)
    shape = dp_shape(inst.par_size, inst.par_count, budget)
    if shape.table_bytes > args.dp_max_table_bytes:
        return f"table {shape.table_bytes / 2**30:.1f} GiB > {args.dp_max_table_bytes / 2**30:.1f} GiB"
    work = float((shape.capacity + 1) * (inst.par_count - 1).sum())
    if work > args.dp_max_work:
        return f"{work:.1e} cell updates > --dp-max-work {args.dp_max_work:.0e}"
    return None


def row(
    label: str, res: MCKPResult | None, optimum: float, seconds: float | None = None, note: str = ""
) -> str:
    if res is None:
        return f"  {label:<14} {'-':>9} {'-':>12} {'-':>12} {'-':>12}  {note}"
    secs = res.solve_seconds if seconds is None else seconds
    to_opt = (res.objective - optimum) / optimum
    return (
        f"  {label:<14} {secs:>8.3f}s {to_opt:>12.3e} {res.rel_gap:>12.3e} {res.slack:>12d}  "
        f"{'optimal' if res.optimal else 'not proven'}{'; ' + note if note else ''}"
    )


def bench_profile(n: int, args: argparse.Namespace) -> None:
    prof = synthetic_profile(n, seed=args.seed)
    budget = prof.budget(args.bits)
    log.info(
        "N = %d decisions x %d options, %.3g weights, budget %d B (%.2f bits/weight)",
        n,
        prof.sizes.shape[1],
        prof.weights,
        budget,
        args.bits,
    )
    runs = [solve_mckp(prof.sizes, prof.costs, budget) for _ in range(max(1, args.repeat))]
    ref = runs[0]
    assert all(r.choice.tobytes() == ref.choice.tobytes() for r in runs), "exact is not deterministic"
    optimum = ref.objective
    log.info("  %-14s %9s %12s %12s %12s", "method", "time", "to optimum", "certified", "slack B")
    for method in args.methods:
        if method == "exact":
            times = [r.solve_seconds for r in runs]
            note = (
                f"median of {len(times)}, min {min(times):.3f}s; core {ref.info.get('core_rows', 0)} rows, "
                f"{ref.info.get('core_states', 0)} states"
            )
            log.info(row("exact", ref, optimum, statistics.median(times), note))
        elif method == "greedy":
            res = solve_mckp(prof.sizes, prof.costs, budget, method="greedy")
            note = f"one pass {res.info['greedy_seconds']:.3f}s + LP bound"
            log.info(row("greedy", res, optimum, note=note))
        elif method == "cvxpy":
            for solver in args.cvxpy_solvers:
                res = solve_mckp(
                    prof.sizes,
                    prof.costs,
                    budget,
                    method="cvxpy",
                    solver=solver,
                    time_limit=args.cvxpy_time_limit,
                )
                note = f"solver {res.info['solver_seconds']:.2f}s, {res.info['variables']} binaries, {res.info['status']}"
                if "over_budget_bytes" in res.info:
                    note += f"; repaired {res.info['over_budget_bytes']} B over budget"
                log.info(row(f"cvxpy {solver}", res, optimum, note=note))
        elif method == "dp":
            reason = dp_skip_reason(prof.sizes, prof.costs, budget, args)
            if reason:
                log.info(row("dp", None, optimum, note=f"skipped: {reason}"))
                continue
            try:
                res = solve_mckp(
                    prof.sizes, prof.costs, budget, method="dp", max_table_bytes=args.dp_max_table_bytes
                )
            except MintError as err:
                log.info(row("dp", None, optimum, note=f"refused: {err}"))
                continue
            log.info(row("dp", res, optimum, note=f"{res.info['capacity_cells']} cells"))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    for n in args.sizes:
        bench_profile(n, args)


if __name__ == "__main__":
    main()
