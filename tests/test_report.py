"""The report stage's predictors (budget curve and objective fit, leave-one-out), `mintbuild predict` from a
fresh allocation, and the dvc plots the report feeds (`dvc plots show` / `dvc plots diff` in a temp repo).

Perplexities here follow a known law of the real allocations' objectives (as tests/test_curve.py draws points
from a known curve): the fit must recover it, and predict must reproduce it at a budget nobody measured."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mintbuild.artifacts.curve import load_predictor
from mintbuild.config import Params, ProfileConfig, TargetConfig
from mintbuild.io import atomic_write_json
from mintbuild.stages.allocate import run as allocate_run
from mintbuild.stages.predict import predict
from mintbuild.stages.profile import run as profile_run
from mintbuild.stages.report import fit_predictors
from mintbuild.stages.report import run as report_run
from mintbuild.stages.sweep import predicted_ppl

from .synth import llama_tensors, published_solver, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PPL16, SLOPE = 12.0, 9.0
BPW = (3.5, 4.0, 5.0, 6.0, 8.0)


def law(objective: float) -> float:
    """ln PPL = ln PPL16 + SLOPE x objective."""
    return PPL16 * math.exp(SLOPE * objective)


def _metrics(folder: Path, ppl: float, nbytes: int) -> None:
    atomic_write_json(folder / "metrics.json", {"ppl_mean": ppl, "ppl_median": ppl, "bytes_on_disk": nbytes})


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Params, Path]:
    """A profile of a tiny synthetic checkpoint, the allocate stage's real allocations of five targets, and
    their "measured" PPL from the law; the report stage run on them."""
    root = tmp_path_factory.mktemp("report")
    ck = write_checkpoint(root / "ck", llama_tensors(layers=3), config={"num_hidden_layers": 3})
    params = Params(
        targets={f"b{b:g}": TargetConfig(bits_per_weight=b) for b in BPW},
        solver=published_solver(),
        profile=ProfileConfig(out=str(root / "profile")),
        allocate_out=str(root / "allocate"),
        eval_out=str(root / "evaluate"),
    )
    profile_run(ck, params.profile, root / "profile", progress=False)
    docs = allocate_run(params, None, root / "profile", root / "allocate")
    for name, doc in docs.items():
        t = doc["totals"]
        _metrics(root / "evaluate" / name, law(t["objective"]), t["bytes"])
    _metrics(root / "evaluate" / "baseline", PPL16, 2 * t["parameters"])
    report_run(params, root / "report")
    return params, root / "report"


def test_report_fits_both_predictors_and_uses_the_better_one(build) -> None:
    _, report = build
    pred = load_predictor(report / "predictor.json")
    assert pred["uses"] == "objective"
    fit = pred["objective_fit"]
    assert fit.form == "anchored" and fit.params["b"] == pytest.approx(SLOPE, rel=1e-9)
    assert pred["leave_one_out"]["objective"]["max_abs_pct"] < 1e-6
    # Left out, the smallest budget may lie at or below the pole of the curve fitted to the others.
    assert pred["leave_one_out"]["curve"]["n"] >= len(BPW) - 1
    assert pred["scope"]["objective_kind"] == "nrmse" and pred["scope"]["profile_hash"]
    md = (report / "report.md").read_text()
    assert "curve (LOO)" in md and "objective (LOO)" in md and "use the **objective** predictor" in md
    rows = json.loads((report / "rows.json").read_text())
    for r in rows:
        assert r["loo_objective"] == pytest.approx(r["ppl_mean"], rel=1e-9)
        assert r["predicted"] == r["loo_objective"]
    assert (report / "curve.json").is_file() and (report / "budget_curve.png").stat().st_size > 1000


def test_the_curve_is_chosen_where_it_predicts_better() -> None:
    """Rows whose PPL follows the budget and not the objective: the report keeps the curve."""
    b = [60e6, 70e6, 80e6, 100e6, 130e6]
    rows = [
        {"target": f"t{i}", "bytes": x, "ppl_mean": 20 + 1e3 / ((x - 50e6) / 1e6) ** 1.5, "objective": o,
         "scope": {"objective_kind": "fisher"}}
        for i, (x, o) in enumerate(zip(b, [0.3, 0.01, 0.2, 0.02, 0.1], strict=True))
    ]  # fmt: skip
    pred = fit_predictors(rows, {"ppl_mean": 20.0})
    assert pred.uses == "curve"
    assert pred.errors["curve"]["max_abs_pct"] < pred.errors["objective"]["max_abs_pct"]
    # Targets allocated under different objectives have no common objective scale: no objective fit.
    rows[0]["scope"] = {"objective_kind": "mse"}
    assert fit_predictors(rows[:3], {"ppl_mean": 20.0}).objective is None


def test_predict_allocates_an_unmeasured_budget_and_predicts_from_its_objective(build, tmp_path) -> None:
    """`mintbuild predict` solves the budget as allocate does (same objective) and maps it through the fit; the
    sweep's rows get the same prediction from the report."""
    params, report = build
    rows, uses = predict(params, [950_000, 1_200_000], report)
    assert uses == "objective"
    params.targets = {"x": TargetConfig(size="1.2MB")}
    doc = allocate_run(params, None, Path(params.profile.out), tmp_path)["x"]
    row = rows[1]
    assert row["objective"] == pytest.approx(doc["totals"]["objective"], rel=1e-12)
    assert row["bytes"] == doc["totals"]["bytes"]
    assert row["predicted"] == pytest.approx(law(row["objective"]), rel=1e-9)
    assert rows[0]["predicted"] > rows[1]["predicted"] > PPL16
    from mintbuild.artifacts.curve import objective_scope
    from mintbuild.stages.report import row_of

    sweep_row = row_of("x", doc, None)
    assert sweep_row["scope"] == objective_scope(doc["totals"], doc["provenance"])
    got = predicted_ppl(sweep_row, report)
    assert got["predictor"] == "objective" and got["predicted"] == pytest.approx(row["predicted"], rel=1e-9)


def test_targets_built_at_the_floor_or_not_built_are_explained_in_one_line_each() -> None:
    """The report lists a target built at its floor (the floor and the asked budget named) and a target not
    built (its reason) below the table; `mintbuild diff` says the same of the head revision's allocations."""
    from mintbuild.artifacts.not_built import not_built_allocation
    from mintbuild.stages.diff import status_line
    from mintbuild.stages.report import explained, markdown, row_of

    totals = {"budget": 1_000, "effective_budget": 1_500, "bytes": 1_480, "avg_bits_per_weight": 6.0,
              "objective": 1.0, "objective_kind": "nrmse"}  # fmt: skip
    floored = {
        "totals": totals,
        "notes": ["budget 1000 B is below the floor; built at the minimum safe size instead"],
    }
    feasible = {"totals": {**totals, "budget": 2_000, "effective_budget": 2_000}, "notes": []}
    reason = "convert_hf_to_gguf.py failed (exit 1): ValueError: Error: Missing /m/tokenizer.model"
    gone = not_built_allocation("g", "gguf", reason, {"bits_per_weight": 5.0})
    rows = [row_of("f", floored, None), row_of("ok", feasible, None)]
    lines = explained(rows, [{"target": "g", "format": "gguf", "note": reason}])
    assert "- `f` (mlx): built at the floor 1.50 KB, the minimum safe size (asked 1.00 KB)" in lines
    assert f"- `g` (gguf): {reason}" in lines and not any("`ok`" in ln for ln in lines)
    assert [r["at_floor"] for r in rows] == [True, False]
    md = markdown(
        rows, None, fit_predictors(rows, None), not_built=[{"target": "g", "format": "gguf", "note": reason}]
    )
    assert "Not built:" in md and reason in md
    assert status_line(gone) == f"Not built: {reason}"
    assert status_line(floored) == "Built at the floor 1.50 KB, the minimum safe size (asked 1.00 KB)"
    assert status_line(feasible) is None and status_line(None) is None


# --- dvc plots -------------------------------------------------------------------------------------------------


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
    subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True)


@pytest.mark.e2e
def test_dvc_plots_show_and_diff_render_the_report_and_quality_data(build, tmp_path) -> None:
    """dvc.yaml's top-level plots over a written report folder and a quality.json: `dvc plots show --json`
    lists both with data (series: measured, 16-bit, both predictors; one per benchmark method), and
    `dvc plots diff HEAD` puts the committed and the changed report side by side."""
    _, report = build
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _dvc(repo, "init", "-q")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    (repo / ".dvc/plots").mkdir(exist_ok=True)
    shutil.copy(ROOT / ".dvc/plots/series.json", repo / ".dvc/plots/series.json")
    shutil.copytree(report, repo / "artifacts/report")
    quality = {"settings": {"windows": 1}, "seconds": 1.0, "rows": [
        {"series": "16-bit", "label": "16-bit", "bytes": 4_000_000, "ppl_mean": 12.0},
        {"series": "uniform (mlx-lm)", "label": "uniform 4/g64", "bytes": 1_100_000, "ppl_mean": 15.0},
        {"series": "exact, fisher (default)", "label": "uniform 4/g64", "bytes": 1_099_000, "ppl_mean": 13.9},
        {"series": "exact, fisher (default)", "label": "mixed_2_6", "bytes": None, "ppl_mean": None}]}  # fmt: skip
    atomic_write_json(repo / "artifacts/quality/quality.json", quality)
    shown = json.loads(_dvc(repo, "plots", "show", "--json"))
    assert not shown.get("errors"), shown["errors"]
    data = {k: v[0]["content"]["data"]["values"] for k, v in shown["data"].items()}
    assert set(data) == {"budget_curve", "quality"}
    series = {d["series"] for d in data["budget_curve"]}
    assert series == {
        "measured (mean PPL)",
        "16-bit",
        "budget curve, leave-one-out",
        "objective fit, leave-one-out",
    }
    measured = sorted((d["mb"], d["ppl"]) for d in data["budget_curve"] if d["series"].startswith("measured"))
    assert len(measured) == len(BPW) and all(p > PPL16 for _, p in measured)
    assert {d["series"] for d in data["quality"]} >= {"uniform (mlx-lm)", "exact, fisher (default)"}
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "report")
    rows = json.loads((repo / "artifacts/report/budget_curve.json").read_text())
    (repo / "artifacts/report/budget_curve.json").write_text(
        json.dumps([{**r, "ppl": r["ppl"] * 1.1} for r in rows])
    )
    diff = json.loads(_dvc(repo, "plots", "diff", "HEAD", "--json"))
    revs = {d["rev"] for d in diff["data"]["budget_curve"][0]["content"]["data"]["values"]}
    assert revs == {"workspace", "HEAD"}
