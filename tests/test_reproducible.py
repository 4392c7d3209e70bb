"""Reproducible builds: the same commit gives the same bytes whatever the thread count, and a team shares one
DVC cache through a remote (push after a build, pull or `mintbuild diff` in another clone)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .dvcrepo import make_repo, out_hashes, ran, sh, stale, tiny_params, write_params, write_text
from .synth import tiny_llama

pytestmark = pytest.mark.e2e


def _threads(n: int) -> dict[str, str]:
    """Every thread pool a stage can use: torch (OpenMP, MKL), numba, BLAS."""
    return {
        v: str(n) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The same pipeline built twice from scratch, on 1 thread and on 2 (a model large enough that MKL splits
    its work: hidden 256, windows of 256 tokens)."""
    root = tmp_path_factory.mktemp("repro")
    text = write_text(root / "text.txt", docs=8, words=2000)
    model = tiny_llama(root / "model", text.read_text(), hidden=256, layers=2)
    params = tiny_params(model, text, {"a": {"bits_per_weight": 4.5}})
    params["eval"].update({"window": 256, "n_windows": 2})
    params["importance"].update({"window": 256, "n_windows": 2, "hessian_windows": 4})
    params["equalize"].update({"window": 256, "n_windows": 2, "samples": 256, "rank": 32, "grid": 11})
    one = make_repo(root / "one", params)
    two = make_repo(root / "two", params)
    sh(one, "dvc", "repro", env=_threads(1))
    sh(two, "dvc", "repro", env=_threads(2))
    return one, two, params


def test_one_and_two_threads_build_the_same_bytes(built) -> None:
    one, two, _ = built
    a, b = out_hashes(one), out_hashes(two)
    assert len(a) >= 10 and a.keys() == b.keys()
    differ = sorted(k for k in a if a[k] != b[k])
    assert not differ, f"outs that depend on the thread count: {differ}"
    # the wall clock is kept, but beside the outs, where DVC does not hash it
    timings = json.loads((one / "artifacts/evaluate/a/timings.json").read_text())
    assert timings["seconds"] > 0 and "seconds" not in (one / "artifacts/evaluate/a/metrics.json").read_text()


def test_a_remote_shares_the_build_and_diff_reads_both_sides(built, tmp_path: Path) -> None:
    """`dvc push` to a folder remote after the build; a second clone pulls every out without running a stage,
    and a pull request's `mintbuild diff main` reads main's side through the remote."""
    one, _, params = built
    remote = tmp_path / "remote"
    sh(one, "dvc", "remote", "add", "-d", "team", str(remote))
    sh(one, "git", "add", "-A")
    sh(one, "git", "commit", "-qm", "build")
    sh(one, "git", "branch", "-M", "main")
    sh(one, "dvc", "push")

    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(one), str(clone))
    sh(clone, "dvc", "pull")
    assert out_hashes(clone) == out_hashes(one)
    assert ran(sh(clone, "dvc", "repro")) == set()  # everything pulled: nothing to rebuild
    assert stale(clone) == set()

    review = tmp_path / "review"  # a reviewer's clone: nothing pulled, main's side comes from the remote
    sh(tmp_path, "git", "clone", "-q", str(one), str(review))
    shutil.copytree(clone / "artifacts", review / "artifacts", dirs_exist_ok=True)
    params["targets"]["a"]["bits_per_weight"] = 5.0
    write_params(review, params)
    sh(review, "dvc", "repro")
    md = sh(review, "mintbuild", "diff", "main")
    assert "### `a` (changed)" in md and "| - |" not in md, md
