"""The real DVC pipeline in a temporary git repo on a tiny model: per-target stages rerun only when their own
target changes, and a new target builds only itself."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .dvcrepo import ENV, ROOT, make_repo, ran, sh, stale, tiny_params, write_params, write_text
from .synth import tiny_llama

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dvcrepo")
    text = write_text(root / "text.txt")
    model = tiny_llama(root / "tiny-model", text.read_text())
    params = tiny_params(model, text, {"a": {"bits_per_weight": 4.5}, "b": {"bits_per_weight": 6.0}})
    return make_repo(root / "repo", params), params


def test_full_build_then_only_the_edited_target_reruns(repo) -> None:
    repo_dir, params = repo
    first = ran(sh(repo_dir, "dvc", "repro"))
    per_target = {f"{s}@{t}" for s in ("allocate", "pack", "evaluate") for t in "ab"}
    assert {
        "model",
        "corpus",
        "equalize",
        "profile",
        "importance",
        "evaluate_baseline",
        "report",
    } | per_target <= first
    assert (repo_dir / "artifacts/pack/a/model.safetensors").exists()
    report = (repo_dir / "artifacts/report/report.md").read_text()
    assert (
        "| a |" in report and "| b |" in report and (repo_dir / "artifacts/report/budget_curve.png").exists()
    )
    assert "a+b/B" in report  # two measured points: the simplest form
    assert ran(sh(repo_dir, "dvc", "repro")) == set()  # nothing changed: nothing runs

    params["targets"]["a"]["description"] = "a note for reviewers"  # allocation unchanged: pack skipped
    write_params(repo_dir, params)
    assert ran(sh(repo_dir, "dvc", "repro")) == {"allocate@a", "report"}

    params["targets"]["a"]["bits_per_weight"] = 5.0
    write_params(repo_dir, params)
    assert ran(sh(repo_dir, "dvc", "repro")) == {"allocate@a", "pack@a", "evaluate@a", "report"}

    params["targets"]["c"] = {"bits_per_weight": 8.0}
    write_params(repo_dir, params)
    assert ran(sh(repo_dir, "dvc", "repro")) == {"allocate@c", "pack@c", "evaluate@c", "report"}
    predicted = sh(repo_dir, "mintbuild", "predict", "--budget", "70KB")
    assert re.search(r"\| 70\.00 KB \|.*\| [0-9.]+ \|", predicted), predicted

    # shared solver config: every allocation is out of date, nothing upstream (DVC's status; rebuilding three
    # targets would show nothing the steps above have not), and back as it was
    veto = params["solver"]["veto_sqnr_db"]
    params["solver"]["veto_sqnr_db"] = 12.0
    write_params(repo_dir, params)
    assert stale(repo_dir) == {"allocate@a", "allocate@b", "allocate@c"}
    params["solver"]["veto_sqnr_db"] = veto
    write_params(repo_dir, params)
    assert stale(repo_dir) == set()
    shown = sh(repo_dir, "dvc", "metrics", "show")
    assert "avg_bits_per_weight" in shown and "ppl_mean" in shown


def test_diff_renders_a_pull_request_comment(repo) -> None:
    repo_dir, params = repo
    sh(repo_dir, "dvc", "repro")
    sh(repo_dir, "git", "add", "-A")
    sh(repo_dir, "git", "commit", "-qm", "base")
    params["targets"]["b"]["bits_per_weight"] = 5.0
    write_params(repo_dir, params)
    sh(repo_dir, "dvc", "repro")
    md = sh(repo_dir, "mintbuild", "diff", "HEAD")
    assert "### `b` (changed)" in md and "`a`" not in md
    assert "tensor choices changed" in md and "-> q" in md
    before, after = re.search(r"\| bits/weight \| ([0-9.]+) \| ([0-9.]+) \|", md).groups()
    assert float(before) > float(after)


def test_infeasible_budget_surfaces_readably_through_dvc(repo) -> None:
    repo_dir, params = repo
    params["targets"]["d"] = {"size": "10KB"}
    write_params(repo_dir, params)
    r = subprocess.run(["dvc", "repro", "allocate@d"], cwd=repo_dir, env=ENV, capture_output=True, text=True)
    params["targets"].pop("d")
    write_params(repo_dir, params)
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "below the smallest feasible size" in out and "Traceback" not in out


def test_min_safe_builds_at_the_floor_end_to_end(repo) -> None:
    """A target below the model's floor with on_infeasible: min_safe: allocate plans the floor, pack holds the
    folder to it (not to the requested budget), and evaluate, report and diff all show the effective budget
    and the note."""
    import json

    from mintbuild.budget import format_size

    repo_dir, params = repo
    sh(repo_dir, "dvc", "repro")
    sh(repo_dir, "git", "add", "-A")
    sh(repo_dir, "git", "commit", "-qm", "before the min-safe target")
    params["targets"]["m"] = {"fraction_of_16bit": 0.1, "on_infeasible": "min_safe"}
    write_params(repo_dir, params)
    assert {"allocate@m", "pack@m", "evaluate@m"} <= ran(sh(repo_dir, "dvc", "repro"))
    totals = json.loads((repo_dir / "artifacts/allocate/m/allocation.json").read_text())["totals"]
    assert totals["effective_budget"] > totals["budget"] and totals["bytes"] <= totals["effective_budget"]
    on_disk = (repo_dir / "artifacts/pack/m/model.safetensors").stat().st_size
    assert on_disk <= totals["effective_budget"]
    metrics = json.loads((repo_dir / "artifacts/evaluate/m/metrics.json").read_text())
    assert metrics["budget"] == totals["effective_budget"] and metrics["requested_budget"] == totals["budget"]
    assert any("minimum safe size" in n for n in metrics["notes"])
    assert "minimum safe size" in (repo_dir / "artifacts/report/report.md").read_text()
    md = sh(repo_dir, "mintbuild", "diff", "HEAD")
    assert "### `m` (added)" in md and "minimum safe size" in md
    assert f"- `m`: Built at the floor {format_size(totals['effective_budget'])}" in md  # the closing list
    params["targets"].pop("m")  # leave the repo as the later tests expect it: built, without `m`
    write_params(repo_dir, params)
    for stage in ("allocate", "pack", "evaluate"):
        shutil.rmtree(repo_dir / "artifacts" / stage / "m")
    sh(repo_dir, "dvc", "repro")


def test_quality_benchmark_runs_on_the_built_artifacts(repo) -> None:
    """benchmarks/quality.py on the tiny model: mlx-lm's convert makes the reference, every mintbuild row is
    packed at no more than the reference's bytes and scored by the same evaluator."""
    import json

    repo_dir, _ = repo
    sh(repo_dir, "dvc", "repro", "profile", "importance")  # the benchmark's inputs, when run on its own
    script = ROOT / "benchmarks" / "quality.py"
    sh(repo_dir, sys.executable, str(script), "--refs", "4/32,mixed_3_6", "--methods", "greedy,fisher",
        "--windows", "1", "--peers", "none", "--gguf", "none", "--out", "artifacts/quality")  # fmt: skip
    doc = json.loads((repo_dir / "artifacts/quality/quality.json").read_text())
    rows = {(r["series"], r["ref"]): r for r in doc["rows"]}
    refs = [r for r in doc["rows"] if r["series"] in ("uniform (mlx-lm)", "mlx-lm recipe")]
    assert {r["label"] for r in refs} == {"uniform 4/g32", "mixed_3_6"}
    for ref in refs:
        for series in ("published greedy (nrmse)", "exact, fisher (default)"):
            ours = rows[(series, ref["label"])]
            assert 0 < ours["bytes"] <= ref["bytes"] and ours["ppl_mean"] > 1
    assert (repo_dir / "artifacts/quality/quality.png").stat().st_size > 1000
    assert "| uniform 4/g32 |" in (repo_dir / "artifacts/quality/quality.md").read_text()


def test_quality_benchmark_peer_rows(repo) -> None:
    """`--peers awq,dynamic_quant@5`: mlx-lm's own AWQ and dynamic_quant run (benchmarks/peers.py, MLX on the
    preloaded OpenBLAS) on the importance stage's calibration windows, each folder is scored, and mintbuild's
    fisher row allocated at a peer's bytes is no larger than it."""
    import json

    repo_dir, params = repo
    sh(repo_dir, "dvc", "repro", "profile", "importance")
    script = ROOT / "benchmarks" / "quality.py"
    sh(repo_dir, sys.executable, str(script), "--refs", "4/64", "--methods", "fisher", "--windows", "1",
       "--peers", "awq,dynamic_quant@5", "--gguf", "none", "--out", "artifacts/quality_peers")  # fmt: skip
    doc = json.loads((repo_dir / "artifacts/quality_peers/quality.json").read_text())
    peers = {r["label"]: r for r in doc["rows"] if r["series"] == "mlx-lm calibrated"}
    assert set(peers) == {"AWQ 4/g64", "dynamic_quant 5.00 bpw (4/g64 + 5/g64)"}
    cal = params["importance"]
    blas = doc["settings"]["blas"]
    # The preload must interpose MLX's sgemm_: the reference BLAS is ~15x slower here; 2x leaves room for load.
    assert blas["speedup"] > 2, blas
    for label, peer in peers.items():
        assert peer["bytes"] > 0 and peer["ppl_mean"] > 1 and peer["seconds"] > 0
        assert peer["extra"]["calibration_tokens"] == cal["n_windows"] * cal["window"]
        assert peer["extra"]["blas"] == blas["openblas"]
        # float32 arithmetic (MLX's BLAS path), stored back in the checkpoint's bfloat16 as mlx-lm writes it
        assert (peer["extra"]["compute_dtype"], peer["extra"]["stored_dtype"]) == (
            "mlx.core.float32",
            "mlx.core.bfloat16",
        )
        ours = [r for r in doc["rows"] if r["series"] == "exact, fisher (default)" and r["ref"] == label]
        assert len(ours) == 1 and 0 < ours[0]["bytes"] <= peer["bytes"] and ours[0]["ppl_mean"] > 1
    dynamic = peers["dynamic_quant 5.00 bpw (4/g64 + 5/g64)"]["extra"]
    assert 0 < dynamic["high_layers"] < dynamic["layers"]  # a real mix, not uniform 4 or 5 bits
    assert abs(dynamic["mlx_bpw"] - 5) < 0.1  # at its target (mlx-lm's count), not stuck at the 4-bit floor
    assert "| AWQ 4/g64 |" in (repo_dir / "artifacts/quality_peers/quality.md").read_text()


def _write_conf(repo_dir: Path, params: dict) -> None:
    """conf/ (the shipped groups plus this repo's model, text and targets as the root config) composing into
    this repo's params.yaml, for `dvc exp run` with Hydra enabled and for `mintbuild sweep`."""
    shutil.copytree(ROOT / "conf", repo_dir / "conf", dirs_exist_ok=True)
    groups = [{"model": "local"}, {"corpus": "text_file"}, {"profile": "default"}, {"solver": "exact"},
              {"eval": "default"}, {"importance": "default"}, {"equalize": "awq"}, {"pack": "gptq"}, "_self_"]  # fmt: skip
    root = {"defaults": groups, **params, "by_format": "${mintbuild_by_format:${targets}}"}
    (repo_dir / "conf/config.yaml").write_text(yaml.safe_dump(root, sort_keys=True))


def test_sweep_measures_points_and_fits_a_curve(repo) -> None:
    """`mintbuild sweep --multirun` (the Hydra app over conf/) on the built artifacts: every budget allocated
    (fisher objective, from the importance stage) and predicted from the build's report; with measure=true
    packed and scored against the 16-bit baseline, the predictors fitted to those points, and `predict
    --report` answers from them. The build's own targets are untouched."""
    import json

    repo_dir, params = repo
    _write_conf(repo_dir, params)
    before = (repo_dir / "artifacts/report/report.md").read_text()
    quick = repo_dir / "artifacts/sweep/quick"
    sh(
        repo_dir,
        "mintbuild",
        "sweep",
        "-m",
        "target.bits_per_weight=range(4,8.5,0.5)",
        f"hydra.sweep.dir={quick}",
    )
    rows = json.loads((quick / "sweep.json").read_text())
    ok = [r for r in rows if "error" not in r]  # the solver's veto may put 4 bits/weight below the floor
    assert len(rows) == 9 and len(ok) >= 5 and all(r["scope"]["objective_kind"] == "fisher" for r in ok)
    assert any(r["predicted"] for r in ok)  # from the build report (none at or below the curve's pole)
    out = repo_dir / "artifacts/sweep/measured"
    sh(repo_dir, "mintbuild", "sweep", "-m", "target.bits_per_weight=5,6,8", "measure=true",
        f"hydra.sweep.dir={out}")  # fmt: skip
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["target"] for r in rows] == ["5bpw", "6bpw", "8bpw"]
    assert all(r["bytes_on_disk"] <= r["budget"] and r["ppl_mean"] > 1 for r in rows)
    md = (out / "sweep.md").read_text()
    assert "| 6bpw |" in md and "Budget curve:" in md and "objective (LOO)" in md
    assert not (out / "1/pack").exists()  # packs are dropped once scored
    assert (out / "1/evaluate/6bpw/metrics.json").is_file() and (out / "budget_curve.json").is_file()
    predicted = sh(repo_dir, "mintbuild", "predict", "--report", str(out), "--budget", "55KB")
    assert re.search(r"\| 55\.00 KB \|.*\| [0-9.]+ \|", predicted), predicted
    assert (repo_dir / "artifacts/report/report.md").read_text() == before


def test_dvc_exp_run_composes_conf_and_reruns_only_the_overridden_target(repo) -> None:
    """With Hydra enabled, `dvc exp run` composes conf/ into params.yaml itself and `-S` overrides it: the build
    as conf/ groups (the shipped ones plus this repo's model, text and targets) reruns nothing, then one
    target's override reruns only that target."""
    repo_dir, params = repo
    _write_conf(repo_dir, params)
    sh(repo_dir, "dvc", "config", "hydra.enabled", "True")
    sh(repo_dir, "git", "add", "-A")
    sh(repo_dir, "git", "commit", "-qm", "conf")
    assert ran(sh(repo_dir, "dvc", "exp", "run")) == set()
    rerun = ran(sh(repo_dir, "dvc", "exp", "run", "-S", "targets.a.bits_per_weight=4.75"))
    assert rerun == {"allocate@a", "pack@a", "evaluate@a", "report"}
    assert yaml.safe_load((repo_dir / "params.yaml").read_text())["targets"]["a"]["bits_per_weight"] == 4.75
    assert "targets.a.bits_per_weight" in sh(repo_dir, "dvc", "exp", "show", "--csv")


def _ppl_row(md: str, target: str, row: str) -> tuple[str, str]:
    section = md.split(f"### `{target}`", 1)[1].split("### ", 1)[0]
    match = re.search(rf"\| {row} \| ([^|]+) \| ([^|]+) \|", section)
    assert match, section
    return match.group(1).strip(), match.group(2).strip()


def test_diff_never_shows_a_stale_measurement(repo) -> None:
    """The reviewer's scenario: a branch changes one target's bits_per_weight and re-allocates only. The diff
    shows main's measurement as main's, the branch's as "not built" beside the prediction; once the branch is
    evaluated, its own figure, and main's still (read from DVC's cache after the workspace file is rebuilt)."""
    import json

    repo_dir, params = repo
    sh(repo_dir, "dvc", "repro")
    sh(repo_dir, "git", "add", "-A")
    sh(repo_dir, "git", "commit", "-qm", "main", "--allow-empty")
    main_ppl = json.loads((repo_dir / "artifacts/evaluate/a/metrics.json").read_text())["ppl_mean"]
    old_bpw = params["targets"]["a"]["bits_per_weight"]
    params["targets"]["a"]["bits_per_weight"] = old_bpw + 0.25
    write_params(repo_dir, params)
    assert ran(sh(repo_dir, "dvc", "repro", "allocate@a")) == {"allocate@a"}
    md = sh(repo_dir, "mintbuild", "diff", "HEAD")
    assert _ppl_row(md, "a", "measured PPL") == (f"{main_ppl:.3f}", "not built"), md
    predicted = _ppl_row(md, "a", "predicted PPL")
    assert all(re.fullmatch(r"[0-9.]+", v) for v in predicted), predicted
    assert "### `b`" not in md  # untouched targets stay out of the comment

    sh(repo_dir, "dvc", "repro")
    new_ppl = json.loads((repo_dir / "artifacts/evaluate/a/metrics.json").read_text())["ppl_mean"]
    assert new_ppl != main_ppl
    md = sh(repo_dir, "mintbuild", "diff", "HEAD")
    assert _ppl_row(md, "a", "measured PPL") == (f"{main_ppl:.3f}", f"{new_ppl:.3f}"), md

    params["targets"]["a"]["bits_per_weight"] = old_bpw  # back to main
    write_params(repo_dir, params)
    sh(repo_dir, "dvc", "repro")
