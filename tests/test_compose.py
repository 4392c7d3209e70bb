"""conf/ composes into the committed params.yaml; typos in conf fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest

from mintbuild.config import load_params
from mintbuild.errors import MintError
from mintbuild.stages.compose import check, compose_text

ROOT = Path(__file__).resolve().parents[1]


def test_committed_params_yaml_is_current() -> None:
    check(ROOT / "conf", ROOT / "params.yaml")


def test_check_accepts_what_dvc_exp_run_writes_and_refuses_a_stale_file(tmp_path) -> None:
    """`dvc exp run` with Hydra enabled composes conf/ itself (DVC's own code, its own key order, no header):
    the same parameters pass the check, an override does not."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), [])
    assert out.read_text() != compose_text(ROOT / "conf")  # different text...
    check(ROOT / "conf", out)  # ...same parameters
    compose_and_dump(out, str(ROOT / "conf"), None, "config", str(tmp_path), ["solver.veto_sqnr_db=12"])
    with pytest.raises(MintError, match="stale"):
        check(ROOT / "conf", out)


def test_default_build_targets_and_types() -> None:
    p = load_params(ROOT / "params.yaml")
    assert p.model.source == "pypi_gguf" and p.solver.method == "exact"
    assert len(p.targets) >= 5 and all(t.description for t in p.targets.values())


def test_overrides_and_typos(tmp_path) -> None:
    text = compose_text(ROOT / "conf", ["solver=mse", "+target@targets.rtx4090=rtx4090"])
    assert "objective: mse" in text and "rtx4090:" in text and "24GiB" in text
    with pytest.raises(MintError, match="sise"):
        compose_text(ROOT / "conf", ["+targets.bpw4.sise=3MB"])
    with pytest.raises(MintError, match="nope"):
        compose_text(ROOT / "conf", ["solver=nope"])


def test_unknown_preset_and_duplicate_target_names() -> None:
    with pytest.raises(MintError, match=r"target/nope.*available in target/: .*phone_8gb.*rtx4090"):
        compose_text(ROOT / "conf", ["+target@targets.x=nope"])
    with pytest.raises(MintError, match=r"Multiple values for target@targets\.bpw4"):
        compose_text(ROOT / "conf", ["+target@targets.bpw4=rtx4090"])


def test_experiments_override_several_groups_at_once(tmp_path) -> None:
    out = tmp_path / "params.yaml"
    out.write_text(compose_text(ROOT / "conf", ["+experiment=published"]))
    p = load_params(out)
    assert (p.solver.method, p.solver.objective, p.profile.options) == ("greedy", "nrmse", "seed")
    assert p.solver.priors["embedding"] == 10.0  # the published priors come with the published objective
    out.write_text(compose_text(ROOT / "conf", ["+experiment=devices"]))
    p = load_params(out)
    assert {"rtx4090", "laptop-16gb", "phone-8gb", "workstation-64gb", "bpw4"} <= set(p.targets)
    assert p.targets["rtx4090"].memory == "24GiB" and p.solver.objective == "fisher"
