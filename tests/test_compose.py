"""conf/ composes into the committed params.yaml; typos in conf fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from mintbuild.compose import compose_text
from mintbuild.config import load_params
from mintbuild.errors import MintError

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_is_current() -> None:
    assert (ROOT / "params.yaml").read_text() == compose_text(ROOT / "conf"), (
        "params.yaml is stale: run `mintbuild compose` and commit it"
    )


def test_default_build_targets_and_types() -> None:
    p = load_params(ROOT / "params.yaml")
    assert p.model.source == "pypi_gguf" and p.solver.method == "exact"
    assert len(p.targets) >= 5 and all(t.description for t in p.targets.values())


def test_overrides_and_typos(tmp_path) -> None:
    text = compose_text(ROOT / "conf", ["solver=mse", "+target@targets.rtx4090=rtx4090"])
    assert "objective: mse" in text and "rtx4090:" in text and "24GiB" in text
    with pytest.raises(MintError, match="sise"):
        compose_text(ROOT / "conf", ["+targets.smollm2-4bpw.sise=3MB"])
    with pytest.raises(MintError, match="nope"):
        compose_text(ROOT / "conf", ["solver=nope"])


def test_unknown_preset_and_duplicate_target_names() -> None:
    with pytest.raises(MintError, match=r"target/nope.*available in target/: .*phone_8gb.*rtx4090"):
        compose_text(ROOT / "conf", ["+target@targets.x=nope"])
    with pytest.raises(MintError, match=r"Multiple values for target@targets\.smollm2-4bpw"):
        compose_text(ROOT / "conf", ["+target@targets.smollm2-4bpw=rtx4090"])
