"""`mintbuild report`: the budget table, both quality predictors and their leave-one-out errors, for every target.

Reads each target's allocation and evaluation metrics and the 16-bit baseline, fits the two predictors of
`mintbuild.curve` to the measured targets (the budget curve PPL(B), and ln PPL from the allocation's objective)
and writes artifacts/report/:
- report.md: per target budget, bytes on disk, bits/weight, objective, mean and median PPL, and what each
  predictor said leave-one-out (fitted to the *other* targets, i.e. before this one was quantized), with the
  errors and which predictor `predict` and `sweep` use (the one with the smaller worst leave-one-out error);
- curve.json (the budget curve; `diff` reads it), predictor.json (the objective fit, its scope, the choice);
- rows.json (every row) and budget_curve.json (the measured targets as `dvc plots` data: bytes, mean PPL,
  the 16-bit line and both predictions; dvc.yaml's top-level `plots:` declares it);
- budget_curve.png (the same plot for a reader without DVC; none when nothing is measured or predicted).
Below the table, one line per target that is not what it asked for: built at the floor (its budget was below the
model's smallest safe size; the floor is named), or not built (e.g. no GGUF of this model: the converter's reason).
`mintbuild sweep` writes the same files for a multirun's jobs (`render`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mintbuild.artifacts.curve import PLOT_FILE, objective_scope, write_curve, write_predictor
from mintbuild.artifacts.not_built import is_built, note_of
from mintbuild.budget import format_size
from mintbuild.config import Params, load_params
from mintbuild.curve import Curve, ObjectiveFit, fit_curve, fit_objective, leave_one_out
from mintbuild.errors import MintError
from mintbuild.io import atomic_dir, canonical_json
from mintbuild.placement import split_row, split_table

log = logging.getLogger(__name__)

#: The 16-bit model in the plot data (its line spans the measured budgets).
BASELINE_SERIES = "16-bit"


def collect(params: Params) -> tuple[list[dict[str, Any]], dict[str, Any] | None, list[dict[str, Any]]]:
    """(rows of the built targets by bytes, the baseline's metrics, the not-built records by target name)."""
    rows, not_built = [], []
    for name in sorted(params.targets):
        alloc = read_if_exists(Path(params.allocate_out) / name / "allocation.json")
        metrics = read_if_exists(Path(params.eval_out) / name / "metrics.json")
        if alloc is None:
            continue
        if not is_built(alloc):
            not_built.append({"target": name, "format": alloc.get("format", "mlx"), "note": note_of(alloc)})
            continue
        rows.append(row_of(name, alloc, metrics))
    baseline = read_if_exists(Path(params.eval_out) / "baseline" / "metrics.json")
    return sorted(rows, key=lambda r: r["bytes"]), baseline, not_built


def row_of(name: str, alloc: dict[str, Any], metrics: dict[str, Any] | None) -> dict[str, Any]:
    """A table row from an allocation document and (when evaluated) its metrics. `at_floor`: the budget was
    below the model's floor in its format and the target was built at the floor (on_infeasible: min_safe)."""
    t = alloc["totals"]
    m = metrics or {}
    effective = t.get("effective_budget", t["budget"])
    at_floor = effective > t["budget"]
    notes = list(alloc.get("notes", []))
    if at_floor:  # the floor, named (the allocation's note predates it and stays as it was)
        notes = [
            f"built at the floor {format_size(effective)}, the minimum safe size (asked {format_size(t['budget'])})"
        ] + [n for n in notes if not n.endswith("built at the minimum safe size instead")]
    return {
        "target": name, "format": alloc.get("format", "mlx"),
        "budget": effective, "bytes": t["bytes"], "bytes_on_disk": m.get("bytes_on_disk"),
        "bpw": t["avg_bits_per_weight"], "objective": t["objective"],
        "scope": objective_scope(t, alloc.get("provenance", {})),
        "ppl_mean": m.get("ppl_mean"), "ppl_median": m.get("ppl_median"),
        "at_floor": at_floor, "note": "; ".join(notes),
        **split_row(alloc),
    }  # fmt: skip


def read_if_exists(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Predictors:
    """Both predictors fitted to every measured row, their leave-one-out errors and the choice."""

    curve: Curve | None
    objective: ObjectiveFit | None
    scope: dict[str, Any]
    #: "objective" or "curve": the smaller worst leave-one-out error (objective on a tie or with no curve).
    uses: str
    #: predictor -> {"max_abs_pct": ..., "mean_abs_pct": ...} over the rows it predicted leave-one-out.
    errors: dict[str, dict[str, float | None]]


def fit_predictors(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> Predictors:
    """Fit the curve (budget bytes -> PPL) and the objective fit (objective -> ln PPL) to the measured rows and
    set r["loo_curve"], r["loo_objective"] (leave-one-out predictions) and, unless a row has one (a sweep's
    rows carry the build's), r["predicted"] (the chosen one's leave-one-out prediction).
    The objective fit needs every measured row in one scope (the same objective, solver and profile)."""
    floor = float(baseline["ppl_mean"]) if baseline else 0.0
    base_ppl = float(baseline["ppl_mean"]) if baseline else None
    measured = [r for r in rows if r.get("ppl_mean")]
    for r in rows:
        r["loo_curve"] = r["loo_objective"] = None
    # One runtime's curve: the format with the most measured rows (MLX and GGUF files of equal bytes differ in
    # quality, so their points are not one rate-distortion curve); the other format's rows are listed, not fitted.
    formats = Counter(r.get("format", "mlx") for r in measured)
    if len(formats) > 1:
        fitted = max(sorted(formats), key=lambda f: formats[f])
        measured = [r for r in measured if r.get("format", "mlx") == fitted]
        log.info("predictors fitted to the %s rows only (%s)", fitted, dict(formats))
    if not measured:
        return Predictors(None, None, {}, "curve", {})
    x = np.array([r["bytes"] for r in measured], dtype=float)
    y = np.array([r["ppl_mean"] for r in measured], dtype=float)
    curve = fit_curve(x, y, a_min=floor)
    for r, p in zip(measured, leave_one_out(x, y, lambda a, b: fit_curve(a, b, a_min=floor)), strict=True):
        r["loo_curve"] = p
    scopes = {json.dumps(r.get("scope"), sort_keys=True) for r in measured}
    obj = None
    scope = measured[0].get("scope") or {}
    if len(scopes) == 1 and all(r.get("objective") is not None for r in measured):
        o = np.array([r["objective"] for r in measured], dtype=float)
        obj = fit_objective(o, y, base_ppl)
        # Anchored at the 16-bit model, one point already fixes the slope.
        loo = leave_one_out(o, y, lambda a, b: fit_objective(a, b, base_ppl), min_points=1 if base_ppl else 2)
        for r, p in zip(measured, loo, strict=True):
            r["loo_objective"] = p
    elif len(scopes) > 1:
        log.info("targets allocated under different objectives, solvers or profiles: no objective fit")
    errors = {k: _errors(measured, f"loo_{k}") for k in ("curve", "objective")}
    uses = "objective" if obj is not None else "curve"
    ec, eo = errors["curve"]["max_abs_pct"], errors["objective"]["max_abs_pct"]
    if obj is not None and ec is not None and (eo is None or ec < eo):
        uses = "curve"
    for r in measured:
        r.setdefault("predicted", r[f"loo_{uses}"])  # a sweep's rows keep the build's prediction
    return Predictors(curve, obj, scope, uses, errors)


def _errors(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    err = [abs(r[key] / r["ppl_mean"] - 1) * 100 for r in rows if r.get(key) is not None]
    if not err or len(err) < len(rows):  # a predictor that cannot predict every row is not the better one
        return {"max_abs_pct": None, "mean_abs_pct": None, "n": len(err)}
    return {"max_abs_pct": max(err), "mean_abs_pct": float(np.mean(err)), "n": len(err)}


def markdown(
    rows,
    baseline,
    pred: Predictors,
    title: str = "Budget curve",
    not_built: list[dict[str, Any]] | None = None,
) -> str:
    lines = [f"# {title}", ""]
    if baseline:
        lines.append(
            f"16-bit baseline: mean PPL {baseline['ppl_mean']:.3f}, median {baseline['ppl_median']:.3f}, "
            f"{format_size(baseline['bytes_on_disk'])} on disk."
        )
    if pred.curve:
        lines.append(f"Budget curve: `{pred.curve.describe()}`.")
    if pred.objective:
        lines.append(f"Objective fit: `{pred.objective.describe()}`.")
    lines += [
        "",
        "| target | format | budget | bytes on disk | bits/weight | objective | mean PPL | median PPL | "
        "curve (LOO) | objective (LOO) | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r.get('format', 'mlx')} | {format_size(r['budget'])} | {format_size(r['bytes_on_disk'] or r['bytes'])} | "
            f"{r['bpw']:.3f} | {_g(r.get('objective'))} | {_f(r.get('ppl_mean'))} | {_f(r.get('ppl_median'))} "
            f"| {_pred(r, 'loo_curve')} | {_pred(r, 'loo_objective')} | {r.get('note', '')} |"
        )
    lines += split_table(rows)
    lines += ["", _verdict(pred), ""]
    lines += explained(rows, not_built or [])
    return "\n".join(lines)


def explained(rows: list[dict[str, Any]], not_built: list[dict[str, Any]]) -> list[str]:
    """The targets that are not what they asked for, one line each: built at the floor (the budget was below
    the model's smallest safe size in its format), or not built and why."""
    floor = [r for r in rows if r.get("at_floor")]
    lines = []
    if floor:
        lines += [
            "Built at the floor (the budget is below this model's smallest safe size in its format):",
            "",
        ]
        lines += [f"- `{r['target']}` ({r.get('format', 'mlx')}): {r['note']}" for r in floor] + [""]
    if not_built:
        lines += ["Not built:", ""]
        lines += [f"- `{r['target']}` ({r['format']}): {r['note']}" for r in not_built] + [""]
    return lines


def _verdict(pred: Predictors) -> str:
    if not pred.errors:
        return "No target is measured yet: nothing to predict from."
    text = (
        "Leave-one-out: each target predicted by a fit to the *other* targets, i.e. before it was quantized "
        "(in brackets the error vs its measured mean PPL). Worst error: curve "
        f"{_pct(pred.errors['curve']['max_abs_pct'])}, objective {_pct(pred.errors['objective']['max_abs_pct'])}."
    )
    return text + (
        f" `mintbuild predict` and `mintbuild sweep` use the **{pred.uses}** predictor (the smaller worst error)."
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _pred(r: dict[str, Any], key: str) -> str:
    p = r.get(key)
    if p is None:
        return "-"
    return f"{p:.2f} ({(p / r['ppl_mean'] - 1) * 100:+.1f}%)"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _g(v: float | None) -> str:
    return "-" if v is None else f"{v:.5g}"


#: The series of the plot data (budget_curve.json), the key of each row that holds its PPL.
PLOT_SERIES = {
    "measured (mean PPL)": "ppl_mean",
    "budget curve, leave-one-out": "loo_curve",
    "objective fit, leave-one-out": "loo_objective",
}


def plot_rows(rows: list[dict[str, Any]], baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The `dvc plots` data, one point per row: target, bytes, mb (x), ppl (y) and series: the measured mean
    PPL, each predictor's leave-one-out prediction, the 16-bit model's PPL at the same bytes (its line) and,
    for rows not measured (a sweep), the build's prediction. Points that do not exist are left out (DVC needs
    every row to hold the plotted fields), so the file is in long form, coloured by `series` (the `series`
    template, .dvc/plots/series.json)."""
    out = []
    for r in sorted(rows, key=lambda r: r["bytes"]):
        at = {"target": r["target"], "bytes": r["bytes"], "mb": round(r["bytes"] / 1e6, 4)}
        if not r.get("ppl_mean"):
            if r.get("predicted") is not None:
                out.append({**at, "ppl": r["predicted"], "series": f"predicted ({r.get('predictor')})"})
            continue
        if baseline:
            out.append({**at, "ppl": baseline["ppl_mean"], "series": BASELINE_SERIES})
        out += [{**at, "ppl": r[k], "series": s} for s, k in PLOT_SERIES.items() if r.get(k) is not None]
    return out


def plot(rows, baseline, pred: Predictors, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["bytes"] / 1e6, r["ppl_mean"], r) for r in rows if r.get("ppl_mean")]
    unmeasured = [
        (r["bytes"] / 1e6, r["predicted"]) for r in rows if not r.get("ppl_mean") and r.get("predicted")
    ]
    if not pts and not unmeasured:
        return  # nothing measured or predicted: no plot
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label="measured (mean PPL)")
    if pred.curve and pts:
        lo = max(min(p[0] for p in pts) * 0.98, pred.curve.params["B0"] / 1e6 * 1.01)
        xs = np.linspace(lo, max(p[0] for p in pts) * 1.05, 200)
        ax.plot(xs, pred.curve.predict(xs * 1e6), "-", label=f"budget curve ({pred.curve.form})")
    obj = [(p[0], p[2]["loo_objective"]) for p in pts if p[2].get("loo_objective") is not None]
    if obj:
        ax.plot(*zip(*obj, strict=True), "x", label="objective fit, leave-one-out")
    if unmeasured:
        ax.plot(*zip(*unmeasured, strict=True), "+", label="predicted (not measured)")
    if baseline:
        ax.axhline(baseline["ppl_mean"], color="gray", ls="--", label="16-bit")
    ax.set_xlabel("model bytes (MB)")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # Fixed metadata so the PNG is byte-identical for identical inputs.
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def run(params: Params, out: Path) -> str:
    rows, baseline, not_built = collect(params)
    if not rows and not not_built:
        raise MintError(f"no allocations under {params.allocate_out}: run `dvc repro` first")
    with atomic_dir(out) as tmp:
        return render(rows, baseline, tmp, "report.md", not_built=not_built)


def render(
    rows: list[dict[str, Any]],
    baseline: dict[str, Any] | None,
    folder: Path,
    md_name: str,
    title: str = "Budget curve",
    not_built: list[dict[str, Any]] | None = None,
) -> str:
    """Fit both predictors to the measured rows and write `md_name`, rows.json, budget_curve.json (plot data),
    curve.json and predictor.json (when fitted) and budget_curve.png into `folder` (the caller's temporary
    folder). Rows: target, budget, bytes, bytes_on_disk, bpw, objective, scope, ppl_mean, ppl_median, note."""
    pred = fit_predictors(rows, baseline)
    text = markdown(rows, baseline, pred, title, not_built)
    (folder / md_name).write_text(text)
    (folder / "rows.json").write_text(canonical_json(_finite(rows)))
    (folder / PLOT_FILE).write_text(canonical_json(plot_rows(rows, baseline)))
    if pred.curve:
        write_curve(folder, pred.curve)
    if pred.errors:
        write_predictor(folder, pred.objective, pred.scope, pred.uses, pred.errors)
    plot(rows, baseline, pred, folder / "budget_curve.png")
    return text


def _finite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in rows
    ]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--out", default="artifacts/report", help="output folder (default: artifacts/report)")


def main(args: argparse.Namespace) -> None:
    print(run(load_params(args.params), Path(args.out)))
