"""`mintbuild sweep`: budget sweeps as a Hydra application over conf/ (conf/sweep.yaml), one job per budget.

    mintbuild sweep --multirun target.size=55MB,60MB,70MB,80MB
    mintbuild sweep --multirun 'target.bits_per_weight=range(3.5,8,0.5)'
    mintbuild sweep --multirun target=rtx4090,laptop_16gb,phone_8gb
    mintbuild sweep --multirun target.bits_per_weight=4,5,6 measure=true hydra/launcher=joblib

Overrides use Hydra's grammar (lists, `range(...)`, `choice(...)`, `glob(...)`, group overrides such as
`solver=nrmse`, `+experiment=published`); Hydra's BasicSweeper expands them and its launcher runs the jobs
(`basic`, in this process, by default; `hydra/launcher=joblib` runs them in parallel processes, which pays for
itself only with measure=true). Each job allocates its budget from the build's cached profile and importance
with the build's solver (milliseconds; the knapsack is built once per process), writes
<job>/allocate/<label>/allocation.json and <job>/row.json, and predicts its PPL with the report's predictors
(artifacts/report). With `measure=true` it also packs (sharing the build's pack cache) and scores the model
against the build's 16-bit baseline. The multirun folder keeps Hydra's layout (numbered job folders with
.hydra/ and the job's log, multirun.yaml) plus ONE summary over all jobs (`Summary`, a Hydra callback):
sweep.md and sweep.json (the table), budget_curve.json and budget_curve.png (the curve), and with measured jobs
curve.json and predictor.json (both predictors fitted to the sweep's own points, leave-one-out errors). A run
without --multirun is one job in hydra.run.dir, summarised the same way.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mintbuild.artifacts.allocation import write_allocation
from mintbuild.artifacts.curve import (
    CURVE_FILE,
    PREDICTOR_FILE,
    load_curve,
    load_predictor,
    objective_fit_for,
    objective_scope,
)
from mintbuild.artifacts.metrics import BASELINE
from mintbuild.artifacts.profile import Profile, load_profile
from mintbuild.budget import format_size
from mintbuild.config import Params, TargetConfig, as_dict
from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.io import atomic_write_json, canonical_json, hash_obj
from mintbuild.knapsack import Problem, problem_for
from mintbuild.stages.allocate import allocate_target

log = logging.getLogger(__name__)

CONFIG_NAME = "sweep"
ROW_FILE = "row.json"
SUMMARY_MD = "sweep.md"
SUMMARY_JSON = "sweep.json"
#: Keys of conf/sweep.yaml that are the sweep's own, not the build's (Params).
SWEEP_KEYS = ("target", "measure", "keep_packs", "report")

#: (profile folder, solver, importance, pack settings) -> the loaded profile and its knapsack: a multirun in
#: one process (the basic launcher) builds the problem once.
_PROBLEMS: dict[str, tuple[Profile, Problem]] = {}


# --- one job ---------------------------------------------------------------------------------------------------


def job_config(cfg: DictConfig) -> tuple[Params, TargetConfig, dict[str, Any]]:
    """The build's parameters, the job's target and the sweep options of a composed conf/sweep.yaml, validated
    against the schemas (an unknown key or a wrong type is a MintError naming it)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    opts = {k: data.pop(k) for k in SWEEP_KEYS if k in data}
    try:
        params = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Params), data))
        target = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(TargetConfig), opts["target"] or {})
        )
    except OmegaConfBaseException as e:
        raise MintError(f"conf/{CONFIG_NAME}.yaml: {str(e).splitlines()[0]}") from None
    # merged onto the Params and TargetConfig schemas, to_object returns instances of them
    return cast(Params, params), cast(TargetConfig, target), opts


def label(target: TargetConfig, preset: str | None = None) -> str:
    """A short name for the job's budget, usable as a folder name: 60MB, 4.5bpw, 0.3x16bit, rtx4090."""
    if preset:
        text = preset
    elif target.size:
        text = str(target.size)
    elif target.bits_per_weight is not None:
        text = f"{target.bits_per_weight:g}bpw"
    elif target.fraction_of_16bit is not None:
        text = f"{target.fraction_of_16bit:g}x16bit"
    elif target.memory:
        text = f"mem{target.memory}"
    else:
        text = "no-budget"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def problem(params: Params) -> tuple[Profile, Problem]:
    """The build's profile and its knapsack under params.solver, priced as `mintbuild allocate` prices it."""
    key = hash_obj(
        {"profile": str(Path(params.profile.out).resolve()), "solver": as_dict(params.solver),
         "pack": as_dict(params.pack), "importance": str(Path(params.importance.out).resolve())}
    )  # fmt: skip
    if key not in _PROBLEMS:
        profile = load_profile(Path(params.profile.out))
        _PROBLEMS[key] = (profile, problem_for(profile, params.solver, None, params))
    return _PROBLEMS[key]


def allocate_job(
    params: Params, target: TargetConfig, name: str, job_dir: Path, report: Path
) -> dict[str, Any]:
    """Allocate one budget into `job_dir`/allocate/`name`; the job's row (an `error` row if infeasible)."""
    profile, prob = problem(params)
    t0 = time.perf_counter()
    try:
        doc, metrics, timings = allocate_target(prob, name, target, params.solver, profile)
    except InfeasibleBudget as e:
        return {"target": name, "error": str(e)}
    write_allocation(job_dir / "allocate" / name, doc, metrics, timings)
    t = doc["totals"]
    row = {
        "target": name, "budget": t.get("effective_budget", t["budget"]), "bytes": t["bytes"], "bytes_on_disk": None,
        "bpw": t["avg_bits_per_weight"], "objective": t["objective"], "gap": t["gap"], "optimal": t["optimal"],
        "scope": objective_scope(t, doc["provenance"]), "seconds": round(time.perf_counter() - t0, 4),
        "ppl_mean": None, "ppl_median": None, "note": "; ".join(doc["notes"]),
    }  # fmt: skip
    row.update(predicted_ppl(row, report))
    return row


def predicted_ppl(row: dict[str, Any], report: Path) -> dict[str, Any]:
    """The build report's prediction for an allocation: its chosen predictor (objective fit when it applies to
    this allocation's scope, else the budget curve)."""
    predictor = load_predictor(report / PREDICTOR_FILE)
    fit = objective_fit_for(predictor, row["scope"])
    if fit is not None and (predictor or {}).get("uses") == "objective":
        return {"predicted": float(fit.predict(row["objective"])), "predictor": "objective"}
    if (report / CURVE_FILE).exists():
        try:
            return {
                "predicted": float(load_curve(report / CURVE_FILE).predict(row["bytes"])),
                "predictor": "curve",
            }
        except MintError:  # at or below the curve's pole
            pass
    if fit is not None:
        return {"predicted": float(fit.predict(row["objective"])), "predictor": "objective"}
    return {"predicted": None, "predictor": None}


def measure_job(params: Params, name: str, job_dir: Path, keep_packs: bool) -> dict[str, Any]:
    """Pack the job's allocation (the build's pack cache makes tensors quantized before free) and score it
    against the build's 16-bit baseline; its bytes on disk and perplexities."""
    from mintbuild.mlx.pack_cache import default_cache_dir
    from mintbuild.stages.evaluate import run_target
    from mintbuild.stages.pack import pack_target

    baseline = Path(params.eval_out) / BASELINE
    if not (baseline / "metrics.json").is_file():
        raise MintError(f"{baseline}: no 16-bit baseline; run `dvc repro evaluate_baseline` first")
    pack_root = job_dir / "pack"
    pack_target(params, name, out_root=pack_root, alloc_root=job_dir / "allocate", progress=False,
                cache_dir=default_cache_dir(Path(params.pack_out)))  # fmt: skip
    m = run_target(
        params, name, job_dir / "evaluate", progress=False, pack_out=pack_root, baseline_dir=baseline
    )
    if not keep_packs:
        shutil.rmtree(pack_root)
    return {"bytes_on_disk": m["bytes_on_disk"], "ppl_mean": m["ppl_mean"], "ppl_median": m["ppl_median"]}


def job(cfg: DictConfig) -> dict[str, Any]:
    """Hydra's task function: one budget. Writes the job's row.json into its output folder and returns it. An
    infeasible budget is a row that says so; any other MintError (no profile, a bad key) stops the sweep with
    its one-line message (exit status 2), as every mintbuild verb does."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    try:
        return _job(cfg, hc)
    except MintError as e:
        log.error("%s", e)
        sys.stderr.write(f"mintbuild {CONFIG_NAME}: error: {e}\n")
        raise SystemExit(2) from None


def _job(cfg: DictConfig, hc: Any) -> dict[str, Any]:
    params, target, opts = job_config(cfg)
    job_dir = Path(hc.runtime.output_dir)
    name = label(target, hc.runtime.choices.get("target"))
    row = allocate_job(params, target, name, job_dir, Path(opts["report"]))
    row["job"] = hc.job.get("num", 0) if hc.mode.name == "MULTIRUN" else 0
    row["overrides"] = list(hc.overrides.task)
    if opts["measure"] and "error" not in row:
        row.update(measure_job(params, name, job_dir, opts["keep_packs"]))
    atomic_write_json(job_dir / ROW_FILE, row)
    if "error" in row:
        log.warning("%s: %s", name, row["error"])
    else:
        log.info("%s: %s, %.3f bits/weight, objective %.5g%s", name, format_size(row["bytes"]), row["bpw"],
                 row["objective"], f", PPL {row['ppl_mean']:.3f}" if row["ppl_mean"] else "")  # fmt: skip
    return row


# --- the summary over all jobs -----------------------------------------------------------------------------------


class Summary(Callback):
    """Hydra callback (conf/sweep.yaml `hydra.callbacks.summary`): once every job of a multirun (or the single
    job of a run) has finished, write the summary over all of them into the sweep folder and print its table."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sys.stdout.write(summarize(Path(config.hydra.sweep.dir), _baseline_dir(config)))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        sys.stdout.write(summarize(Path(config.hydra.run.dir), _baseline_dir(config)))


def _baseline_dir(config: DictConfig) -> Path:
    return Path(config.get("eval_out") or Params.eval_out) / BASELINE


def read_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's row under `sweep_dir` (a multirun's numbered folders, or a run's own folder), by job."""
    files = sorted(sweep_dir.glob(f"*/{ROW_FILE}")) + sorted(sweep_dir.glob(ROW_FILE))
    return sorted((json.loads(f.read_text()) for f in files), key=lambda r: r.get("job", 0))


def summarize(sweep_dir: Path, baseline_dir: Path) -> str:
    """Write the summary over every job into `sweep_dir`: sweep.md (the table; with measured jobs also both
    predictors fitted to them and their leave-one-out errors), sweep.json (the rows), budget_curve.json and
    budget_curve.png (bytes vs PPL: measured, predicted, the 16-bit line), and with measured jobs curve.json and
    predictor.json. Returns sweep.md's text."""
    from mintbuild.stages.report import read_if_exists, render

    rows = read_rows(sweep_dir)
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["bytes"])
    measured = any(r.get("ppl_mean") for r in ok)
    baseline = read_if_exists(baseline_dir / "metrics.json") if measured else None
    tmp = Path(tempfile.mkdtemp(prefix=".summary.", dir=sweep_dir))
    try:
        fitted = render(ok, baseline, tmp, SUMMARY_MD, title="Predictors fitted to this sweep") if ok else ""
        text = f"# Sweep of {len(rows)} budgets\n\n" + table(rows) + ("\n" + fitted if measured else "")
        (tmp / SUMMARY_MD).write_text(text)
        (tmp / SUMMARY_JSON).write_text(canonical_json(rows))
        (tmp / "rows.json").unlink(missing_ok=True)  # sweep.json holds every row, the infeasible ones too
        for f in tmp.iterdir():
            f.replace(sweep_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return text


def table(rows: list[dict[str, Any]]) -> str:
    """The allocation table: budget, bytes, bits/weight, objective, gap, predicted PPL (and measured)."""
    measured = any(r.get("ppl_mean") for r in rows)
    head = "| job | budget | bytes | bits/weight | objective | gap | predicted PPL |" + (
        " mean PPL |" if measured else ""
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: r.get("job", 0)):
        if "error" in r:
            lines.append(f"| {r['target']} | infeasible: {r['error'].split(': ', 1)[-1][:100]}... |")
            continue
        pred = "-" if r.get("predicted") is None else f"{r['predicted']:.2f} ({r['predictor']})"
        lines.append(
            f"| {r['target']} | {format_size(r['budget'])} | {format_size(r['bytes'])} | {r['bpw']:.3f} | "
            f"{r['objective']:.5g} | {r['gap']:.1e} | {pred} |"
            + (f" {_f(r.get('ppl_mean'))} |" if measured else "")
        )
    return "\n".join(lines) + "\n"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


# --- the command ---------------------------------------------------------------------------------------------------


def run_app(conf_dir: Path, hydra_args: list[str], config_name: str = CONFIG_NAME) -> None:
    """Run the Hydra app over `conf_dir` with Hydra's own command line (`--multirun`, overrides, ...)."""
    import hydra
    from hydra.core.global_hydra import GlobalHydra

    conf_dir = conf_dir.resolve()
    if not (conf_dir / f"{config_name}.yaml").is_file():
        raise MintError(f"{conf_dir}/{config_name}.yaml does not exist (the sweep app's configuration)")
    GlobalHydra.instance().clear()
    app = hydra.main(version_base="1.3", config_path=str(conf_dir), config_name=config_name)(job)
    argv = sys.argv
    sys.argv = [f"mintbuild {CONFIG_NAME}", *hydra_args]  # hydra.main reads its command line from sys.argv
    try:
        app()
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. target.size=55MB,60MB measure=true")
    p.add_argument("-m", "--multirun", action="store_true", help="one job per combination of the overrides")
    p.add_argument("--conf", default="conf", help="config folder holding sweep.yaml (default: conf)")
    p.add_argument("-c", "--cfg", choices=["job", "hydra", "all"], help="print the composed config and exit")
    p.add_argument(
        "--info", nargs="?", const="all", help="Hydra's information (config search path, defaults)"
    )


def main(args: argparse.Namespace) -> None:
    hydra_args = [*(["--multirun"] if args.multirun else []), *(["--cfg", args.cfg] if args.cfg else [])]
    hydra_args += [*(["--info", args.info] if args.info else []), *args.overrides]
    run_app(Path(args.conf), hydra_args)
