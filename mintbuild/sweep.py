"""`mintbuild sweep`: many budgets from the one cached profile, without touching the build's targets.

The knapsack is built once; each budget is one solve (tens of milliseconds for a 135M model), so a sweep of a
hundred budgets takes seconds. Prints a Markdown table (budget, bytes, bits/weight, objective, gap and, when a
fitted curve exists, its predicted perplexity).

`--measure` also packs and scores every budget (the pack cache makes tensors already quantized by the build or
an earlier point free) against the build's 16-bit baseline, and writes into --out (default artifacts/sweep):
sweep.md (the budget table with measured PPL and the leave-one-out prediction), rows.json, curve.json (the fit
over the measured points; `mintbuild predict --curve` reads it) and budget_curve.png.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .allocate import ALLOCATION_FILE, allocate_target, problem_for, weights_dir
from .budget import format_size
from .config import Params, SolverConfig, TargetConfig, load_params
from .errors import InfeasibleBudget, MintError
from .io import atomic_dir, atomic_write_json, canonical_json
from .profile import load_profile

log = logging.getLogger(__name__)


def solve_all(
    profile_dir: Path,
    cfg: SolverConfig,
    targets: list[tuple[str, TargetConfig]],
    importance: Path | None = None,
    params: Params | None = None,
) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(table row, allocation document or None if infeasible) per budget, from one knapsack (given the build's
    `params`, priced as `mintbuild allocate` prices it)."""
    profile = load_profile(profile_dir)
    model_dir = weights_dir(params) if params is not None else None
    problem = problem_for(profile, cfg, importance, params, model_dir)
    out = []
    for name, target in targets:
        t0 = time.perf_counter()
        try:
            doc, _ = allocate_target(problem, name, target, cfg, profile)
        except InfeasibleBudget as e:
            out.append(({"target": name, "error": str(e)}, None))
            continue
        t = doc["totals"]
        row = {"target": name, "budget": t["budget"], "bytes": t["bytes"],
               "avg_bits_per_weight": t["avg_bits_per_weight"], "objective": t["objective"], "gap": t["gap"],
               "optimal": t["optimal"], "seconds": time.perf_counter() - t0}  # fmt: skip
        out.append((row, doc))
    return out


def sweep(
    profile_dir: Path, cfg: SolverConfig, targets: list[tuple[str, TargetConfig]]
) -> list[dict[str, Any]]:
    """The table rows of an allocation-only sweep."""
    return [row for row, _ in solve_all(profile_dir, cfg, targets)]


def measure(params: Params, solved: list[tuple[dict[str, Any], dict[str, Any] | None]], out: Path,
            keep_packs: bool = False, progress: bool = True) -> list[dict[str, Any]]:  # fmt: skip
    """Pack and score every feasible budget; the report rows (see mintbuild.report.render)."""
    from tqdm import tqdm

    from .evaluate import BASELINE, run_target
    from .pack import default_cache_dir, pack_target

    baseline = Path(params.eval_out) / BASELINE
    cache = default_cache_dir(Path(params.pack_out))  # the build's: its quantized tensors are reused
    alloc_root, pack_root, eval_root = out / "allocate", out / "pack", out / "evaluate"
    rows = []
    feasible = [(r, d) for r, d in solved if d is not None]
    for row, doc in tqdm(feasible, desc="sweep", unit="budget", disable=not progress):
        name = row["target"]
        with atomic_dir(alloc_root / name) as tmp:
            (tmp / ALLOCATION_FILE).write_text(canonical_json(doc))
        pack_target(params, name, out_root=pack_root, alloc_root=alloc_root, progress=False, cache_dir=cache)
        m = run_target(params, name, eval_root, progress=False, pack_out=pack_root, baseline_dir=baseline)
        if not keep_packs:
            shutil.rmtree(pack_root / name)
        rows.append({"target": name, "budget": row["budget"], "bytes": row["bytes"],
                     "bytes_on_disk": m["bytes_on_disk"], "bpw": row["avg_bits_per_weight"],
                     "ppl_mean": m["ppl_mean"], "ppl_median": m["ppl_median"], "note": ""})  # fmt: skip
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
        pred = f" {_predicted(curve, r['budget'])} |" if curve else ""
        lines.append(
            f"| {r['target']} | {format_size(r['budget'])} | {format_size(r['bytes'])} | "
            f"{r['avg_bits_per_weight']:.3f} | {r['objective']:.5g} | {r['gap']:.1e} |{pred}"
        )
    return "\n".join(lines)


def _predicted(curve: Any, budget: int) -> str:
    """The curve's PPL at `budget`, or why there is none (a budget at or below the fitted pole is still
    allocated and listed: only its prediction is missing)."""
    try:
        return f"{curve.predict(budget):.2f}"
    except MintError:
        return f"- (at or below the curve's pole, {format_size(curve.params['B0'])})"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--sizes", nargs="+", help="absolute budgets, e.g. 60MB 70MB 80MB")
    g.add_argument("--bpw", help="bits/weight range lo:hi:step or list a,b,c")
    p.add_argument("--profile", help="profile folder (default: profile.out from params)")
    p.add_argument("--json", help="allocation-only: write the rows as JSON here")
    p.add_argument(
        "--measure",
        action="store_true",
        help="also pack and score every budget (needs the build's 16-bit baseline: `dvc repro`)",
    )
    p.add_argument(
        "--out", default="artifacts/sweep", help="--measure output folder (default: artifacts/sweep)"
    )
    p.add_argument("--keep-packs", action="store_true", help="--measure: keep the packed folders")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> None:
    from .predict import load_curve
    from .report import DEFAULT_CURVE

    params = load_params(args.params)
    if args.sizes:
        targets = [(f"size-{s}", TargetConfig(size=s)) for s in args.sizes]
    else:
        targets = [(f"bpw-{b:g}", TargetConfig(bits_per_weight=b)) for b in parse_range(args.bpw)]
    t0 = time.perf_counter()
    solved = solve_all(Path(args.profile or params.profile.out), params.solver, targets, params=params)
    rows = [r for r, _ in solved]
    log.info("%d budgets allocated in %.2f s", len(rows), time.perf_counter() - t0)
    if not args.measure:
        curve_file = Path(DEFAULT_CURVE)
        sys.stdout.write(markdown(rows, load_curve(curve_file) if curve_file.exists() else None) + "\n")
        if args.json:
            atomic_write_json(args.json, rows)
        return
    sys.stdout.write(run_measure(params, solved, Path(args.out), args.keep_packs, not args.no_progress))


def run_measure(params: Params, solved, out: Path, keep_packs: bool, progress: bool) -> str:
    from .evaluate import BASELINE
    from .report import read_if_exists, render

    baseline = read_if_exists(Path(params.eval_out) / BASELINE / "metrics.json")
    if baseline is None:
        raise MintError(f"{params.eval_out}/baseline: no 16-bit baseline; run `dvc repro evaluate_baseline`")
    t0 = time.perf_counter()
    with atomic_dir(out) as tmp:  # the whole sweep folder appears at once, or not at all
        rows = measure(params, solved, tmp, keep_packs, progress)
        text = render(rows, baseline, tmp, "sweep.md")
    log.info(
        "%d budgets packed and scored in %.1f s: %s", len(rows), time.perf_counter() - t0, out / "sweep.md"
    )
    return text
