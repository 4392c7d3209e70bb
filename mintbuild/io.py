"""Atomic writes and content hashing shared by every stage.

Every artifact is written to a temporary sibling and renamed into place, so a crash never leaves a
half-written file or folder where a later stage (or DVC) would take it for a finished one. The temporary
sibling's name carries the writer's PID (`.<name>.<pid>.<random>.tmp`); a process killed outright (SIGKILL,
out of memory) cannot remove it, so the next atomic write to the same destination removes the temporary
siblings whose writer is not running (and PID-less `.<name>.<random>.tmp` ones, whose writer cannot be known).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and fixed separators: identical input gives identical bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of `path` left by killed writers: `.<name>.<pid>.<random>.tmp` whose PID
    is not running, PID-less `.<name>.<random>.tmp` (8 random characters), and `.<name>.old-<pid>` (the
    previous output, moved aside just before the rename) of dead writers. Returns what was removed."""
    path = Path(path)
    name = re.escape(path.name)
    with_pid = re.compile(rf"\.{name}\.(\d+)\.[A-Za-z0-9_]+\.tmp|\.{name}\.old-(\d+)")
    legacy = re.compile(rf"\.{name}\.[A-Za-z0-9_]{{8}}\.tmp")  # mkstemp/mkdtemp's 8 random characters
    removed: list[Path] = []
    try:
        siblings = list(path.parent.iterdir())
    except FileNotFoundError:
        return removed
    for p in siblings:
        m = with_pid.fullmatch(p.name)
        stale = (m is not None and not _pid_alive(int(m.group(1) or m.group(2)))) or bool(
            legacy.fullmatch(p.name)
        )
        if not stale:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, canonical_json(obj))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` as a whole, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _make_readable(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; published artifacts are world-readable like any file."""
    os.chmod(folder, 0o755)
    for p in folder.rglob("*"):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_obj(obj: Any) -> str:
    """sha256 of a JSON-able object in canonical form (infinities allowed: configs hold `inf` priors)."""
    return sha256_text(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True))


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """A JSON artifact; a missing file is a MintError ending with `missing` (what to run), bad JSON names it."""
    from mintbuild.errors import MintError

    path = Path(path)
    if not path.is_file():
        raise MintError(f"{path}: {missing}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MintError(f"{path}: invalid JSON ({e})") from None
