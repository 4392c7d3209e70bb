"""The allocate stage's artifact per target: allocation.json (every decision, totals, certificate, provenance)
and metrics.json (what DVC shows); the file names, the schema version and the reader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mintbuild.io import atomic_dir, canonical_json, read_json
from mintbuild.artifacts import TIMINGS_FILE

SCHEMA_VERSION = 1
ALLOCATION_FILE = "allocation.json"
METRICS_FILE = "metrics.json"


def load_allocation(root: Path, target: str) -> dict[str, Any]:
    """`root`/`target`/allocation.json."""
    return read_json(
        Path(root) / target / ALLOCATION_FILE,
        f"no allocation; run `mintbuild allocate --target {target}` first",
    )


def write_allocation(
    folder: Path,
    doc: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    timings: dict[str, Any] | None = None,
) -> None:
    """Write `folder`/allocation.json (and metrics.json, and the solve time to timings.json, which DVC does not
    hash) atomically: the folder is replaced whole."""
    with atomic_dir(folder) as tmp:
        (tmp / ALLOCATION_FILE).write_text(canonical_json(doc))
        if metrics is not None:
            (tmp / METRICS_FILE).write_text(canonical_json(metrics))
        if timings is not None:
            (tmp / TIMINGS_FILE).write_text(canonical_json(timings))
