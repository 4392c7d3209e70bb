"""`mintbuild sweep`: allocate many budgets from the one cached profile, without writing per-target artifacts.

The knapsack is built once; each budget is one solve (tens of milliseconds for a 135M model), so a sweep of a
hundred budgets takes seconds. Prints a Markdown table (budget, bytes, bits/weight, objective, gap and, when
measured points exist, the curve's predicted perplexity) and writes it as JSON when --out is given.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .allocate import allocate_target, build_problem
from .budget import format_size
from .config import TargetConfig, load_params
from .errors import InfeasibleBudget, MintError
from .io import atomic_write_json
from .profile import load_profile

log = logging.getLogger(__name__)


def sweep(profile_dir: Path, solver_cfg, targets: list[tuple[str, TargetConfig]]) -> list[dict[str, Any]]:
    profile = load_profile(profile_dir)
    problem = build_problem(profile, solver_cfg)
    rows = []
    for name, target in targets:
        t0 = time.perf_counter()
        try:
            doc, _ = allocate_target(problem, name, target, solver_cfg, profile)
        except InfeasibleBudget as e:
            rows.append({"target": name, "error": str(e)})
            continue
        t = doc["totals"]
        rows.append({"target": name, "budget": t["budget"], "bytes": t["bytes"],
                     "avg_bits_per_weight": t["avg_bits_per_weight"], "objective": t["objective"],
                     "gap": t["gap"], "optimal": t["optimal"], "seconds": time.perf_counter() - t0})  # fmt: skip
    return rows


def parse_range(spec: str) -> list[float]:
    """'3.5:8:0.5' -> [3.5, 4.0, ..., 8.0]; '3,4,5' -> [3, 4, 5]."""
    try:
        if ":" in spec:
            lo, hi, step = (float(v) for v in spec.split(":"))
            return [round(float(v), 6) for v in np.arange(lo, hi + step / 2, step)]
        return [float(v) for v in spec.split(",")]
    except ValueError:
        raise MintError(f"cannot parse range {spec!r}: use lo:hi:step or a,b,c") from None


def markdown(rows: list[dict[str, Any]], curve=None) -> str:
    head = "| target | budget | bytes | bits/weight | objective | gap |" + (
        " predicted PPL |" if curve else ""
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['target']} | infeasible: {r['error'].split(': ', 1)[-1][:80]}... |")
            continue
        pred = f" {curve.predict(r['budget']):.2f} |" if curve else ""
        lines.append(
            f"| {r['target']} | {format_size(r['budget'])} | {format_size(r['bytes'])} | "
            f"{r['avg_bits_per_weight']:.3f} | {r['objective']:.5g} | {r['gap']:.1e} |{pred}"
        )
    return "\n".join(lines)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sizes", nargs="+", help="absolute budgets, e.g. 60MB 70MB 80MB")
    g.add_argument("--bpw", help="bits/weight range lo:hi:step or list a,b,c")
    p.add_argument("--profile", help="profile folder (default: profile.out from params)")
    p.add_argument("--out", help="write the rows as JSON here")


def main(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    if args.sizes:
        targets = [(f"size-{s}", TargetConfig(size=s)) for s in args.sizes]
    else:
        targets = [(f"bpw-{b:g}", TargetConfig(bits_per_weight=b)) for b in parse_range(args.bpw)]
    t0 = time.perf_counter()
    rows = sweep(Path(args.profile or params.profile.out), params.solver, targets)
    log.info("%d budgets in %.2f s", len(rows), time.perf_counter() - t0)
    print(markdown(rows))
    if args.out:
        atomic_write_json(args.out, rows)
