"""A real DVC repository in a temporary folder for tests that run the pipeline: this checkout's dvc.yaml and
mintbuild/ copied in, git and DVC initialised, params.yaml for a tiny local model and a text-file corpus."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "DVC_NO_ANALYTICS": "1",
    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.com",
}
WORDS = [
    "the",
    "model",
    "fits",
    "the",
    "budget",
    "of",
    "every",
    "device",
    "and",
    "the",
    "build",
    "is",
    "one",
    "command",
]


def sh(repo: Path, *cmd: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(cmd, cwd=repo, env={**ENV, **(env or {})}, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


#: Stages that run on every `dvc repro` by design (dvc.yaml: always_changed): the model's content fingerprint,
#: which reruns nothing downstream while it is unchanged.
ALWAYS_RUN = {"fingerprint"}


def ran(log: str) -> set[str]:
    """The stages a `dvc repro` log says it ran (the always-run fingerprint left out)."""
    return set(re.findall(r"Running stage '([^']+)'", log)) - ALWAYS_RUN


def stale(repo: Path) -> set[str]:
    """The stages `dvc status` says are out of date (the always-run fingerprint's "always changed" left out)."""
    import json

    r = subprocess.run(["dvc", "status", "--json"], cwd=repo, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return {k for k, v in json.loads(r.stdout or "{}").items() if v != ["always changed"]}


def write_text(path: Path, docs: int = 8, words: int = 600) -> Path:
    """A small deterministic corpus: `docs` documents of `words` words."""
    path.write_text(
        "\n\n".join(
            f"Document {i}. " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
            for i in range(docs)
        )
    )
    return path


def tiny_params(model: Path, text: Path, targets: dict) -> dict:
    """The checkout's params.yaml for a local tiny model: short windows, few of them."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"] = {"source": "local", "path": str(model), "out": "artifacts/model", "name": "tiny"}
    p["corpus"] = {
        "source": "text_file",
        "path": str(text),
        "out": "artifacts/corpus",
        "test_fraction": 0.5,
        "seed": 0,
    }
    p["targets"] = targets
    # MLX targets only: the tiny model's own BPE tokenizer is not one llama.cpp's converter recognises
    p["convert"]["enabled"] = False
    p["eval"].update({"window": 64, "n_windows": 2})
    # 3 Hessian windows: 64 held-out tokens, fewer than the 128-wide down_proj's inputs (their gains come from
    # the held-out inputs) and as many as the 64-wide others' (from the held-out Hessian): both paths run
    p["importance"].update({"window": 64, "n_windows": 2, "hessian_windows": 3})
    p["equalize"].update({"window": 64, "n_windows": 2, "samples": 64, "rank": 16, "grid": 6})
    return p


def write_params(repo: Path, params: dict) -> None:
    """params.yaml as `mintbuild compose` would write it: `by_format` derived from the targets."""
    from mintbuild.config import targets_by_format

    params = {**params, "by_format": targets_by_format(params.get("targets"))}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=True))


def make_repo(repo: Path, params: dict) -> Path:
    """A git + DVC repository at `repo` with this checkout's pipeline and `params`."""
    repo.mkdir(parents=True)
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", repo / ".dvcignore")
    shutil.copytree(ROOT / "mintbuild", repo / "mintbuild", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        ROOT / "hydra_plugins", repo / "hydra_plugins", ignore=shutil.ignore_patterns("__pycache__")
    )
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    write_params(repo, params)
    return repo


def out_hashes(repo: Path) -> dict[str, str]:
    """Every DVC out of the repo's dvc.lock: path -> md5."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
