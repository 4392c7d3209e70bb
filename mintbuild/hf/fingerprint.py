"""Content fingerprints of a model folder: every top-level file's size and sha256.

Two folders with equal fingerprints hold the same bytes under the same names, whatever their mtimes; a changed
byte, or a file added or removed, changes the fingerprint. Hashing a many-GB checkpoint on every `dvc repro`
would cost minutes, so a file's sha256 is memoised under its stat identity (device, inode, size, mtime and
ctime, as git's index does): any write to a file, or a new file renamed into place, changes its ctime or inode,
so a memoised hash is only reused for bytes nobody touched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mintbuild.errors import MintError
from mintbuild.io import atomic_write_json, sha256_file
from mintbuild.wheels import cache_dir

log = logging.getLogger(__name__)

FINGERPRINT_SCHEMA = 1
#: sha256 memo: one JSON object, stat key -> hex digest (kept beside the downloaded wheels).
MEMO_NAME = "sha256-memo.json"


def _memo_path() -> Path:
    return cache_dir() / MEMO_NAME


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _load_memo() -> dict[str, str]:
    try:
        memo = json.loads(_memo_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # no memo yet, or a torn one: hashing again is always correct
    return memo if isinstance(memo, dict) else {}


def folder_files(folder: Path) -> list[Path]:
    """The top-level regular files of `folder` in name order (hidden files, e.g. .DS_Store, left out): all the
    files the model stage and its readers open live at the top level of a Hugging Face folder."""
    if not folder.is_dir():
        raise MintError(f"{folder}: model folder does not exist")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def file_digests(files: list[Path]) -> dict[str, dict[str, Any]]:
    """name -> {"size", "sha256"} for `files`, hashing only files whose stat identity is not memoised."""
    memo = _load_memo()
    keys = {p: _stat_key(p) for p in files}
    todo = [p for p in files if keys[p] not in memo]
    total = sum(p.stat().st_size for p in todo)
    done, t0 = 0, time.monotonic()
    for p in todo:
        memo[keys[p]] = sha256_file(p)
        done += p.stat().st_size
        rate = done / max(time.monotonic() - t0, 1e-9)
        log.info(
            "sha256 %s: %.2f of %.2f GB, ETA %.0f s", p.name, done / 1e9, total / 1e9, (total - done) / rate
        )
    if todo:
        # Keep only entries whose file still exists with that identity, so the memo never grows without bound.
        live = {k: v for k, v in memo.items() if _still_there(k)}
        atomic_write_json(_memo_path(), live)
    return {p.name: {"size": p.stat().st_size, "sha256": memo[keys[p]]} for p in files}


def _still_there(key: str) -> bool:
    path = Path(key.split("|", 1)[0])
    try:
        return path.is_file() and _stat_key(path) == key
    except OSError:
        return False


def folder_fingerprint(folder: str | os.PathLike) -> dict[str, Any]:
    """The fingerprint of a local model folder: its resolved path and every top-level file's size and sha256."""
    resolved = Path(folder).expanduser().resolve()
    return {
        "schema_version": FINGERPRINT_SCHEMA,
        "path": str(resolved),
        "files": file_digests(folder_files(resolved)),
    }
