"""model=local is never stale: in a real DVC repo, a changed local folder reruns the model stage and what reads
it; an untouched, touched or unchanged one reruns nothing."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from .dvcrepo import make_repo, ran, sh, stale, tiny_params, write_text
from .synth import tiny_llama


def _rebuilt(log: str) -> set[str]:
    """Stages a `dvc repro` ran or restored from DVC's run cache (a state it had built before)."""
    return ran(log) | set(re.findall(r"Stage '([^']+)' is cached - skipping run", log))


def _reexport(weights: Path) -> None:
    """A new checkpoint at the same path (as a fine-tune or a re-export would write it): one element changed,
    same size and file name, written elsewhere and renamed into place."""
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += torch.tensor(1.0, dtype=tensors[name].dtype)
    tmp = weights.with_name("new.safetensors.partial")
    save_file(tensors, tmp, metadata={"format": "pt"})
    assert tmp.stat().st_size == weights.stat().st_size
    st = weights.stat()
    os.replace(tmp, weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # even the mtime of the old file


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("localdvc")
    text = write_text(root / "text.txt")
    model = tiny_llama(root / "tiny-model", text.read_text())
    repo = make_repo(root / "repo", tiny_params(model, text, {"a": {"bits_per_weight": 4.5}}))
    assert {"model", "corpus", "equalize"} <= ran(sh(repo, "dvc", "repro", "equalize"))
    return repo, model


def test_an_unchanged_or_touched_folder_reruns_nothing(built) -> None:
    repo, model = built
    assert ran(sh(repo, "dvc", "repro", "equalize")) == set()
    st = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ran(sh(repo, "dvc", "repro", "equalize")) == set()


def test_new_weights_at_the_same_path_rerun_the_model_and_downstream(built) -> None:
    repo, model = built
    before = (repo / "artifacts/model/manifest.json").read_bytes()
    _reexport(model / "model.safetensors")
    # `dvc status` names the stale stage once the fingerprint has been taken (repro takes it first).
    sh(repo, "dvc", "repro", "fingerprint")
    assert "model" in stale(repo)
    assert ran(sh(repo, "dvc", "repro", "equalize")) == {"model", "equalize"}
    assert (repo / "artifacts/model/manifest.json").read_bytes() != before
    assert ran(sh(repo, "dvc", "repro", "equalize")) == set()


def test_a_file_added_or_removed_reruns_the_model(built) -> None:
    repo, model = built
    # A file the model stage copies (generation settings): its out changes, so equalize reruns too.
    (model / "generation_config.json").write_text('{"do_sample": false}\n')
    assert ran(sh(repo, "dvc", "repro", "equalize")) == {"model", "equalize"}
    assert (repo / "artifacts/model/generation_config.json").is_file()
    # A file nothing reads: the model stage reruns, finds its out unchanged, and DVC stops there.
    (model / "NOTES.md").write_text("fine-tuned on ...\n")
    assert ran(sh(repo, "dvc", "repro", "equalize")) == {"model"}
    (model / "NOTES.md").unlink()
    (model / "generation_config.json").unlink()
    # Back to the folder of the previous test: DVC may take both stages from its run cache.
    assert _rebuilt(sh(repo, "dvc", "repro", "equalize")) == {"model", "equalize"}
    assert not (repo / "artifacts/model/generation_config.json").exists()
    assert ran(sh(repo, "dvc", "repro", "equalize")) == set()
