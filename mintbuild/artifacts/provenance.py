"""Whether a target's artifacts are current at a revision, and its outs' bytes by their recorded hashes.

A figure is shown for a side of a diff only if the stages that wrote it are up to date for that side:

- the working tree: `dvc status` (what `dvc repro` would rerun) names none of the target's stages, nor any
  shared stage upstream of them;
- a git revision: its committed dvc.lock is consistent for the target: each of allocate@t, pack@t, evaluate@t
  was run with the params that revision's params.yaml holds, and each one's input is the out the lock records
  for the stage before it (a lock committed half-refreshed fails this).

An out at a revision is read by the md5 its dvc.lock records: from git, from DVC's cache, or from the working
tree when the file there still has those exact bytes (an out DVC does not cache, such as a metrics file
committed with `cache: false`, is found this way while nothing rebuilt it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

WORKSPACE = "workspace"
#: The per-target chain whose last stage writes the measured figures, in pipeline order.
TARGET_CHAIN = ("allocate", "pack", "evaluate")


def git_show(path: str, rev: str) -> str | None:
    r = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def read_lock(rev: str) -> dict[str, Any]:
    """The stages of dvc.lock at `rev` (the working tree's for WORKSPACE); {} when there is none."""
    if rev == WORKSPACE:
        text = Path("dvc.lock").read_text() if Path("dvc.lock").is_file() else None
    else:
        text = git_show("dvc.lock", rev)
    return (yaml.safe_load(text) or {}).get("stages", {}) if text else {}


def _dotted(params: dict[str, Any], key: str) -> Any:
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _outs(lock: dict[str, Any]) -> dict[str, str]:
    return {o["path"]: o["md5"] for s in lock.values() for o in s.get("outs", [])}


def lock_is_current(lock: dict[str, Any], params: dict[str, Any], target: str, upto: str) -> bool:
    """The lock's chain allocate@target .. `upto`@target ran with `params` and on each other's recorded outs."""
    outs = _outs(lock)
    chain = TARGET_CHAIN[: TARGET_CHAIN.index(upto) + 1]
    for verb in chain:
        stage = lock.get(f"{verb}@{target}")
        if stage is None:
            return False
        for key, value in (stage.get("params") or {}).get("params.yaml", {}).items():
            if _dotted(params, key) != value:
                return False
        for dep in stage.get("deps", []):
            if dep["path"] in outs and outs[dep["path"]] != dep["md5"]:
                return False
    return True


def stale_workspace_stages() -> set[str] | None:
    """Stages `dvc status` says are out of date in the working tree (an always-run stage that is only
    "always changed" is not); None when DVC cannot tell (not a DVC repo)."""
    r = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        log.warning("dvc status failed; every working-tree figure is shown as not built: %s", r.stderr.strip())
        return None
    status = json.loads(r.stdout or "{}")
    return {name for name, entries in status.items() if entries != ["always changed"]}


def workspace_is_current(stale: set[str] | None, target: str, upto: str) -> bool:
    """No stage from the shared ones upstream to `upto`@target is stale (other targets' stages do not count)."""
    if stale is None:
        return False
    chain = {f"{v}@{target}" for v in TARGET_CHAIN[: TARGET_CHAIN.index(upto) + 1]}
    per_target = {f"{v}@" for v in TARGET_CHAIN}
    return not any(
        s in chain or (not any(s.startswith(p) for p in per_target) and s != "report") for s in stale
    )


def md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_out(path: str, rev: str, lock: dict[str, Any]) -> str | None:
    """An out's text at `rev`: the working tree's file for WORKSPACE; else git, DVC's cache, or the working
    tree's file if its md5 is the one `rev`'s lock records. None when no copy of those bytes is here."""
    p = Path(path)
    if rev == WORKSPACE:
        return p.read_text() if p.is_file() else None
    text = git_show(path, rev)
    if text is not None:
        return text
    try:
        import dvc.api

        return dvc.api.read(path, repo=".", rev=rev)
    except Exception as e:  # not built at that revision, or not in the local cache
        log.debug("%s@%s not in DVC's cache: %s", path, rev, e)
    want = _outs(lock).get(path)
    if want and p.is_file() and md5_file(p) == want:
        return p.read_text()
    return None
