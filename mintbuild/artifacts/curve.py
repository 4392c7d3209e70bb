"""The report stage's fitted predictors: curve.json (PPL from the budget), predictor.json (PPL from the
allocation's objective, which of the two `predict` and `sweep` use, and where it applies), and
budget_curve.json (the points `dvc plots` draws); where the readers find them, the writers and the readers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mintbuild.curve import Curve, ObjectiveFit
from mintbuild.errors import MintError
from mintbuild.io import canonical_json

log = logging.getLogger(__name__)

CURVE_FILE = "curve.json"
PREDICTOR_FILE = "predictor.json"
#: Measured targets as rows for `dvc plots` (bytes vs mean PPL, the 16-bit line, the predictions).
PLOT_FILE = "budget_curve.json"
REPORT_DIR = "artifacts/report"
#: Where `predict`, `diff` and `sweep` find the build's fitted curve (the report stage's default output).
DEFAULT_CURVE = f"{REPORT_DIR}/{CURVE_FILE}"
SCHEMA_VERSION = 1


def write_curve(folder: Path, curve: Curve) -> None:
    fit = {"form": curve.form, "params": curve.params, "rmse": curve.rmse, "n_points": curve.n_points}
    (Path(folder) / CURVE_FILE).write_text(canonical_json(fit))


def load_curve(path: Path) -> Curve:
    path = Path(path)
    if not path.exists():
        raise MintError(
            f"{path}: no fitted curve yet (build and evaluate some targets, then `mintbuild report`)"
        )
    d = json.loads(path.read_text())
    return Curve(d["form"], d["params"], d["rmse"], d["n_points"])


def write_predictor(
    folder: Path,
    fit: ObjectiveFit | None,
    scope: dict[str, Any],
    uses: str,
    loo: dict[str, dict[str, float | None]],
) -> None:
    """predictor.json: the objective fit (None when too few targets were measured), the scope it is valid in
    (objective kind, solver config and profile hashes, as allocation.json records them), which predictor
    the leave-one-out errors chose (`uses`: objective or curve) and those errors."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "uses": uses,
        "objective_fit": None
        if fit is None
        else {"form": fit.form, "params": fit.params, "rmse": fit.rmse, "n_points": fit.n_points},
        "scope": scope,
        "leave_one_out": loo,
    }
    (Path(folder) / PREDICTOR_FILE).write_text(canonical_json(doc))


def load_predictor(path: Path) -> dict[str, Any] | None:
    """predictor.json as written, with "objective_fit" as an ObjectiveFit (or None); None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    f = d.get("objective_fit")
    d["objective_fit"] = f and ObjectiveFit(f["form"], f["params"], f["rmse"], f["n_points"])
    return d


def objective_scope(allocation_totals: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """What an objective value means: the same objective, solver settings and profile give comparable values."""
    return {
        "objective_kind": allocation_totals.get("objective_kind"),
        "solver_config_hash": provenance.get("solver_config_hash"),
        "profile_hash": provenance.get("profile_hash"),
    }


def objective_fit_for(predictor: dict[str, Any] | None, scope: dict[str, Any]) -> ObjectiveFit | None:
    """The objective fit when it applies to allocations of `scope` (else None, and why in the log)."""
    if not predictor or predictor.get("objective_fit") is None:
        return None
    if predictor["scope"] != scope:
        diff = sorted(k for k in scope if scope[k] != predictor["scope"].get(k))
        log.info("the report's objective fit does not apply here (different %s)", ", ".join(diff))
        return None
    return predictor["objective_fit"]
