"""`mintbuild report`: the budget table, the fitted prediction curve and its plot, for every built target.

Reads each target's allocation and evaluation metrics and the 16-bit baseline, writes artifacts/report/:
report.md (the table: budget, bytes on disk, bits/weight, mean and median PPL, predicted PPL, note),
budget_curve.png (bytes on x, PPL on y, the fit and the 16-bit line) and curve.json (the fit that `predict`
and `diff` use). A target's "predicted" PPL comes from the curve fitted to the *other* targets
(leave-one-out), i.e. what the curve would have said before that target was quantized.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .budget import format_size
from .config import Params, load_params
from .curve import Curve, fit_curve
from .errors import MintError
from .io import atomic_dir, canonical_json

log = logging.getLogger(__name__)

CURVE_FILE = "curve.json"
#: Where `predict`, `diff` and `sweep` find the build's fitted curve (the report stage's default output).
DEFAULT_CURVE = f"artifacts/report/{CURVE_FILE}"


def collect(params: Params) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    rows = []
    for name in sorted(params.targets):
        alloc = read_if_exists(Path(params.allocate_out) / name / "allocation.json")
        metrics = read_if_exists(Path(params.eval_out) / name / "metrics.json")
        if alloc is None:
            continue
        t = alloc["totals"]
        rows.append({
            "target": name, "budget": t["budget"], "bytes": t["bytes"],
            "bytes_on_disk": (metrics or {}).get("bytes_on_disk"), "bpw": t["avg_bits_per_weight"],
            "ppl_mean": (metrics or {}).get("ppl_mean"), "ppl_median": (metrics or {}).get("ppl_median"),
            "note": "; ".join(alloc.get("notes", [])),
        })  # fmt: skip
    baseline = read_if_exists(Path(params.eval_out) / "baseline" / "metrics.json")
    return sorted(rows, key=lambda r: r["bytes"]), baseline


def read_if_exists(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def fit_rows(rows: list[dict[str, Any]], floor: float = 0.0) -> Curve | None:
    pts = [(r["bytes"], r["ppl_mean"]) for r in rows if r["ppl_mean"]]
    if not pts:
        return None
    x, y = zip(*pts, strict=True)
    return fit_curve(list(x), list(y), a_min=floor)


def leave_one_out(rows: list[dict[str, Any]], floor: float = 0.0) -> None:
    """rows[i]["predicted"]: the curve fitted without row i, evaluated at its bytes."""
    measured = [r for r in rows if r["ppl_mean"]]
    for r in measured:
        others = [o for o in measured if o is not r]
        r["predicted"] = None
        if len(others) >= 2:
            with contextlib.suppress(MintError):
                r["predicted"] = float(fit_rows(others, floor).predict(r["bytes"]))


def markdown(rows, baseline, curve: Curve | None) -> str:
    lines = ["# Budget curve", ""]
    if baseline:
        lines.append(
            f"16-bit baseline: mean PPL {baseline['ppl_mean']:.3f}, median {baseline['ppl_median']:.3f}, "
            f"{format_size(baseline['bytes_on_disk'])} on disk."
        )
    if curve:
        lines.append(f"Fit: `{curve.describe()}`.")
    lines += [
        "",
        "| target | budget | bytes on disk | bits/weight | mean PPL | median PPL | predicted PPL | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['target']} | {format_size(r['budget'])} | {format_size(r['bytes_on_disk'] or r['bytes'])} | "
            f"{r['bpw']:.3f} | {_f(r['ppl_mean'])} | {_f(r['ppl_median'])} | {_f(r.get('predicted'))} | "
            f"{r['note']} |"
        )
    lines += [
        "",
        "Predicted: the curve fitted to the other targets (leave-one-out), before this one was built.",
        "",
    ]
    return "\n".join(lines)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot(rows, baseline, curve: Curve | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    pts = [(r["bytes"] / 1e6, r["ppl_mean"], r["target"]) for r in rows if r["ppl_mean"]]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label="measured (mean PPL)")
    if curve and pts:
        xs = np.linspace(
            max(min(p[0] for p in pts) * 0.98, curve.params["B0"] / 1e6 * 1.01),
            max(p[0] for p in pts) * 1.05,
            200,
        )
        ax.plot(xs, curve.predict(xs * 1e6), "-", label=f"fit ({curve.form})")
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
    rows, baseline = collect(params)
    if not rows:
        raise MintError(f"no allocations under {params.allocate_out}: run `dvc repro` first")
    with atomic_dir(out) as tmp:
        return render(rows, baseline, tmp, "report.md")


def render(rows: list[dict[str, Any]], baseline: dict[str, Any] | None, folder: Path, md_name: str) -> str:
    """Fit the curve to the measured rows and write `md_name`, rows.json, curve.json and budget_curve.png
    into `folder` (the caller's temporary folder). Rows: target, budget, bytes, bytes_on_disk, bpw, ppl_mean,
    ppl_median, note."""
    floor = float(baseline["ppl_mean"]) if baseline else 0.0
    curve = fit_rows(rows, floor)
    leave_one_out(rows, floor)
    text = markdown(rows, baseline, curve)
    (folder / md_name).write_text(text)
    (folder / "rows.json").write_text(canonical_json(rows))
    if curve:
        fit = {"form": curve.form, "params": curve.params, "rmse": curve.rmse, "n_points": curve.n_points}
        (folder / CURVE_FILE).write_text(canonical_json(fit))
    plot(rows, baseline, curve, folder / "budget_curve.png")
    return text


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="composed parameters (default: params.yaml)")
    p.add_argument("--out", default="artifacts/report", help="output folder (default: artifacts/report)")


def main(args: argparse.Namespace) -> None:
    print(run(load_params(args.params), Path(args.out)))
