"""`mintbuild sweep` as a Hydra app: real multiruns (Hydra's sweeper, the basic and joblib launchers) over
conf/ on a tiny synthetic profile, and DVC's experiment queue over a tiny allocate pipeline in a temp repo."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from mintbuild.config import Params, ProfileConfig, TargetConfig
from mintbuild.stages.allocate import run as allocate_run
from mintbuild.stages.profile import run as profile_run

from .dvcrepo import ENV as DVC_ENV
from .dvcrepo import ROOT
from .synth import llama_tensors, published_solver, write_checkpoint

ENV = {**DVC_ENV, "HYDRA_FULL_ERROR": "1"}


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    """The profile stage's real output for a tiny synthetic Llama-shaped checkpoint."""
    root = tmp_path_factory.mktemp("sweep")
    ck = write_checkpoint(root / "ck", llama_tensors(layers=3), config={"num_hidden_layers": 3})
    profile_run(ck, ProfileConfig(), root / "profile", progress=False)
    return root / "profile"


def _sh(cwd: Path, *cmd: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r


def _sweep(cwd: Path, profile: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`mintbuild sweep` over this repo's conf/, the published data-free objective (no importance stage)."""
    base = [f"profile.out={profile}", "solver=nrmse", "pack=rtn", f"report={cwd / 'no-report'}"]
    return _sh(cwd, "mintbuild", "sweep", "--conf", str(ROOT / "conf"), *overrides, *base)


@pytest.mark.e2e
def test_multirun_of_budgets_allocates_every_job_and_writes_one_summary(profile, tmp_path) -> None:
    """Hydra's range() grammar expands to one job per budget, run by the basic launcher: Hydra's layout (one
    numbered folder per job with .hydra/ and the job's log, multirun.yaml) plus one summary table (Markdown
    and JSON) and curve over all jobs; an infeasible budget is a row that says so; every allocation is the
    allocate stage's own, byte for byte."""
    out = tmp_path / "multirun"
    r = _sweep(
        tmp_path, profile, "--multirun", "target.bits_per_weight=range(2,9,2)", f"hydra.sweep.dir={out}"
    )
    jobs = sorted(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1", "2", "3"]
    for j in jobs:
        assert (out / j / ".hydra/config.yaml").is_file() and (out / j / ".hydra/overrides.yaml").is_file()
        assert (out / j / "sweep.log").is_file()
    assert (out / "multirun.yaml").is_file()
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["target"] for r in rows] == ["2bpw", "4bpw", "6bpw", "8bpw"]
    assert "below the smallest feasible size" in rows[0]["error"]
    ok = rows[1:]
    assert all(r["bytes"] <= r["budget"] and r["optimal"] and r["predicted"] is None for r in ok)
    assert all(a["objective"] > b["objective"] for a, b in itertools.pairwise(ok))
    md = (out / "sweep.md").read_text()
    assert md.count("\n| ") == len(rows) + 1 and "| 2bpw | infeasible" in md
    assert md in r.stdout  # the summary is also printed
    assert json.loads((out / "budget_curve.json").read_text()) == []  # nothing measured nor predicted
    # The allocate stage on the same profile and target writes the same allocation.
    params = Params(targets={"6bpw": TargetConfig(bits_per_weight=6.0)}, solver=published_solver())
    allocate_run(params, None, profile, tmp_path / "alloc")
    assert (tmp_path / "alloc/6bpw/allocation.json").read_bytes() == (
        out / "2/allocate/6bpw/allocation.json"
    ).read_bytes()


@pytest.mark.e2e
def test_joblib_launcher_runs_a_list_of_sizes_in_parallel_processes(profile, tmp_path) -> None:
    """The joblib launcher (hydra-joblib-launcher) with two workers: three jobs, one summary, and the same
    allocations as the basic launcher gives."""
    sizes = ["950KB", "1.1MB", "1.5MB"]
    par, seq = tmp_path / "joblib", tmp_path / "basic"
    _sweep(tmp_path, profile, "-m", f"target.size={','.join(sizes)}", "hydra/launcher=joblib",
           "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={par}")  # fmt: skip
    _sweep(tmp_path, profile, "-m", f"target.size={','.join(sizes)}", f"hydra.sweep.dir={seq}")
    a, b = (json.loads((d / "sweep.json").read_text()) for d in (par, seq))
    assert [r["target"] for r in a] == sizes
    for x, y in zip(a, b, strict=True):
        assert (x["bytes"], x["objective"]) == (y["bytes"], y["objective"])
    assert all("error" not in r and r["bytes"] <= r["budget"] for r in a) and (par / "sweep.md").is_file()


@pytest.mark.e2e
def test_a_run_without_multirun_is_one_job_and_typos_fail(profile, tmp_path) -> None:
    """Without --multirun, one job in hydra.run.dir, summarised the same way; an unknown key fails loudly."""
    out = tmp_path / "run"
    _sweep(tmp_path, profile, "target.fraction_of_16bit=0.3", f"hydra.run.dir={out}")
    (row,) = json.loads((out / "sweep.json").read_text())
    assert row["target"] == "0.3x16bit" and row["bytes"] <= row["budget"]
    bad = subprocess.run(
        ["mintbuild", "sweep", "--conf", str(ROOT / "conf"), "target.sise=5MB", f"hydra.run.dir={out}2"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0 and "sise" in bad.stderr


# --- DVC's experiment queue -------------------------------------------------------------------------------------


def _queue_repo(root: Path, profile: Path) -> Path:
    """A git + DVC repo: this repo's conf/ with one target `t` and the data-free objective, Hydra enabled,
    and a one-stage pipeline allocating every target from a committed tiny profile."""
    repo = root / "repo"
    shutil.copytree(ROOT / "conf", repo / "conf")
    # conf/config.yaml's by_format resolver, which DVC's own composition loads as a Hydra plugin
    shutil.copytree(
        ROOT / "hydra_plugins", repo / "hydra_plugins", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(profile, repo / "profile")
    cfg = yaml.safe_load((ROOT / "conf/config.yaml").read_text())
    cfg["defaults"] = [d for d in cfg["defaults"] if not (isinstance(d, dict) and "target@" in next(iter(d)))]
    cfg["defaults"] = [{"solver": "nrmse"} if d == {"solver": "exact"} else d for d in cfg["defaults"]]
    cfg["targets"] = {"t": {"bits_per_weight": 4.0}}
    (repo / "conf/config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    dvc_yaml = {
        "stages": {
            "allocate": {
                "foreach": "${targets}",
                "do": {
                    "cmd": "mintbuild allocate --target ${key} --profile profile --out allocate",
                    "deps": ["profile"],
                    "params": ["targets.${key}", "solver"],
                    "outs": ["allocate/${key}/allocation.json"],
                    "metrics": [{"allocate/${key}/metrics.json": {"cache": False}}],
                },
            }
        }
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    _sh(repo, "git", "init", "-q")
    _sh(repo, "dvc", "init", "-q")
    _sh(repo, "dvc", "config", "hydra.enabled", "True")
    _sh(repo, "mintbuild", "compose")
    _sh(repo, "dvc", "repro", "-q")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-qm", "tiny allocate pipeline")
    return repo


@pytest.mark.e2e
def test_dvc_queue_runs_a_budget_sweep_as_experiments(profile, tmp_path) -> None:
    """docs/configuration.md's commands: `dvc exp run --queue -S 'targets.t.bits_per_weight=3.5,4.5,5.5'` queues three
    experiments (Hydra's sweep grammar), `dvc queue start` runs them, `dvc exp show` lists each with its
    parameter and its allocation's metrics."""
    repo = _queue_repo(tmp_path, profile)
    _sh(repo, "dvc", "exp", "run", "--queue", "-S", "targets.t.bits_per_weight=3.5,4.5,5.5")
    queued = _sh(repo, "dvc", "queue", "status").stdout
    assert queued.count("Queued") == 3, queued
    _sh(repo, "dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + 600  # a guard against a hung worker, not a speed requirement
    while time.monotonic() < deadline:
        status = _sh(repo, "dvc", "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    assert status.count("Success") == 3, status
    shown = json.loads(_sh(repo, "dvc", "exp", "show", "--json").stdout)
    exps = [e for rev in shown for exp in (rev.get("experiments") or []) for e in exp["revs"]]
    got = {}
    for e in exps:
        data = e["data"]
        bpw = data["params"]["params.yaml"]["data"]["targets"]["t"]["bits_per_weight"]
        metrics = data["metrics"]["allocate/t/metrics.json"]["data"]
        got[bpw] = metrics
    assert sorted(got) == [3.5, 4.5, 5.5], got
    objs = [got[b]["objective"] for b in (3.5, 4.5, 5.5)]
    assert objs[0] > objs[1] > objs[2]
    assert all(m["bytes"] <= m["budget"] for m in got.values())


def test_a_budget_at_or_below_the_curves_pole_keeps_its_row_without_a_prediction(tmp_path) -> None:
    """With only a budget curve in the report (no objective fit for this scope), budgets above its pole are
    predicted from the curve and those at or below it are listed without a prediction (moved here from
    test_allocate)."""
    import numpy as np

    from mintbuild.artifacts.curve import write_curve
    from mintbuild.curve import fit_curve
    from mintbuild.stages.sweep import predicted_ppl

    pole = 1e6
    b = np.linspace(pole * 1.1, pole * 3, 6)
    write_curve(tmp_path, fit_curve(b, 20 + 1e3 / ((b - pole) / 1e3)))
    scope = {"objective_kind": "nrmse", "solver_config_hash": "x", "profile_hash": "y"}
    below = predicted_ppl({"bytes": int(pole * 0.9), "objective": 1.0, "scope": scope}, tmp_path)
    above = predicted_ppl({"bytes": int(pole * 2), "objective": 1.0, "scope": scope}, tmp_path)
    assert below == {"predicted": None, "predictor": None}
    assert above["predictor"] == "curve" and above["predicted"] > 20
