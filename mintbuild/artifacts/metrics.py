"""The evaluate stage's artifact per target (and for the 16-bit baseline): metrics.json (perplexity, bytes,
deltas) and settings.json (what must match between a target's run and the baseline's), with the run's wall clock
beside them in timings.json (not a DVC out); writer and readers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.io import atomic_dir, canonical_json
from mintbuild.artifacts import TIMINGS_FILE

log = logging.getLogger(__name__)


METRICS_FILE = "metrics.json"


BASELINE = "baseline"


SCHEMA_VERSION = 1


def read_baseline(folder: Path) -> dict[str, Any]:
    path = folder / METRICS_FILE
    if not path.is_file():
        raise MintError(f"{path}: no baseline metrics; run `mintbuild evaluate --baseline` first")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    settings = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    return {"metrics": metrics, "settings": settings}


def write_metrics(
    out: Path, metrics: dict[str, Any], settings: dict[str, Any], timings: dict[str, Any]
) -> dict[str, Any]:
    """Replace `out` whole with metrics.json, settings.json and timings.json; returns the metrics."""
    with atomic_dir(out) as tmp:
        (tmp / METRICS_FILE).write_text(canonical_json(metrics), encoding="utf-8")
        (tmp / "settings.json").write_text(canonical_json(settings), encoding="utf-8")
        (tmp / TIMINGS_FILE).write_text(canonical_json(timings), encoding="utf-8")
    log.info(
        "%s: PPL mean %.4f, median %.4f over %d tokens (%d windows of %d), %.0f tokens/s%s",
        metrics["target"],
        metrics["ppl_mean"],
        metrics["ppl_median"],
        metrics["tokens"],
        metrics["windows"],
        metrics["window"],
        timings["tokens_per_s"],
        f", {metrics['delta_ppl_mean_pct']:+.2f}% vs 16-bit" if "delta_ppl_mean_pct" in metrics else "",
    )
    return metrics


def target_metrics(
    target: str, manifest: dict[str, Any], scores: dict[str, Any], baseline: dict[str, Any]
) -> dict[str, Any]:
    """metrics.json of a packed target: its pack manifest's budget and bytes, its scores, and the change against
    the 16-bit baseline's scores (`read_baseline(...)["metrics"]`)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "target": target,
        "budget": manifest["budget"],
        "requested_budget": manifest.get("requested_budget", manifest["budget"]),
        "notes": manifest.get("notes", []),
        "bytes_on_disk": manifest["weights_bytes"],
        "avg_bits_per_weight": manifest["avg_bits_per_weight"],
        "objective": manifest["objective"],
        **scores,
        "baseline_ppl_mean": baseline["ppl_mean"],
        "baseline_ppl_median": baseline["ppl_median"],
        "delta_ppl_mean": scores["ppl_mean"] - baseline["ppl_mean"],
        "delta_ppl_median": scores["ppl_median"] - baseline["ppl_median"],
        "delta_ppl_mean_pct": 100 * (scores["ppl_mean"] / baseline["ppl_mean"] - 1),
    }
