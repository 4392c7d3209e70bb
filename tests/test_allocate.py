"""Allocate stage: budgets, priors, veto, expert groups, the floor, determinism, on tiny synthetic profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mintbuild.artifacts.profile import load_profile
from mintbuild.budget import ModelFacts, kv_cache_bytes, parse_size, resolve_budget
from mintbuild.config import Params, PriorRule, ProfileConfig, TargetConfig
from mintbuild.errors import InfeasibleBudget, MintError
from mintbuild.formats import PASSTHROUGH
from mintbuild.knapsack import build_problem, floor_bytes
from mintbuild.solve import solve_mckp
from mintbuild.stages.allocate import run
from mintbuild.stages.profile import run as profile_run

from .synth import llama_tensors, published_solver, write_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("alloc")
    t = llama_tensors(layers=3, experts=0)
    # Per-expert tensors the runtime stacks: they must share one decision.
    for e in range(3):
        t[f"model.layers.1.mlp.experts.{e}.w1.weight"] = llama_tensors(layers=1, seed=e)[
            "model.layers.0.mlp.up_proj.weight"
        ]
    ck = write_checkpoint(root / "ck", t, config={"num_hidden_layers": 3})
    profile_run(ck, ProfileConfig(), root / "profile", progress=False)
    return ck, root / "profile"


def _params(**targets: TargetConfig) -> Params:
    return Params(targets=dict(targets), solver=published_solver())


@pytest.mark.parametrize(
    "text,want",
    [
        ("80MB", 80_000_000),
        ("80 MiB", 80 * 2**20),
        ("24GiB", 24 * 2**30),
        ("1.5GB", 1_500_000_000),
        ("512B", 512),
        ("2kb", 2000),
    ],
)
def test_parse_size(text: str, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize(
    "bad,needle",
    [("80", "no unit"), ("-5MB", "negative"), ("5 parsecs", "unknown unit"), ("lots", "not a size")],
)
def test_parse_size_refuses(bad: str, needle: str) -> None:
    with pytest.raises(MintError, match=needle):
        parse_size(bad)


def test_budget_ways_and_kv_cache() -> None:
    facts = ModelFacts(parameters=1_000_000, bytes_16bit=2_000_000, layers=30, kv_heads=3, head_dim=64)
    assert kv_cache_bytes(facts, 2048) == 2 * 30 * 3 * 64 * 2048 * 2
    assert resolve_budget(TargetConfig(bits_per_weight=4.0), facts, "t")[0] == 500_000
    assert resolve_budget(TargetConfig(fraction_of_16bit=0.25), facts, "t")[0] == 500_000
    b, why = resolve_budget(TargetConfig(memory="1GiB", reserve="100MiB", kv_context=2048), facts, "t")
    assert b == 2**30 - 100 * 2**20 - kv_cache_bytes(facts, 2048) and "KV cache" in why
    with pytest.raises(MintError, match="exactly one budget"):
        resolve_budget(TargetConfig(), facts, "t")
    with pytest.raises(MintError, match="exactly one budget"):
        resolve_budget(TargetConfig(size="1MB", bits_per_weight=4), facts, "t")
    with pytest.raises(MintError, match="no memory left"):
        resolve_budget(TargetConfig(memory="1MB", kv_context=4096), facts, "t")


def test_problem_priors_veto_and_expert_groups(setup) -> None:
    _, prof_dir = setup
    prof = load_profile(prof_dir)
    pb = build_problem(prof, published_solver())
    by = {d["name"]: (i, d) for i, d in enumerate(pb.decisions)}
    # The three per-expert tensors are one decision of their summed bytes.
    i, d = by["model.layers.1.mlp.experts.*.w1.weight"]
    assert len(d["members"]) == 3
    rows = [prof.names.index(m) for m in d["members"]]
    assert pb.sizes[i, pb.k16] == prof["bytes"][rows, pb.k16].sum()
    assert by["model.embed_tokens.weight"][1]["prior"] == 10.0
    assert by["model.layers.0.self_attn.q_proj.weight"][1]["prior"] == 3.0  # first layer
    assert by["model.layers.2.self_attn.q_proj.weight"][1]["prior"] == 2.0  # last layer
    assert by["model.layers.1.self_attn.q_proj.weight"][1]["prior"] == 1.0
    i, d = by["model.norm.weight"]
    assert d["prior"] is None and np.isfinite(pb.costs[i]).sum() == 1 and np.isfinite(pb.costs[i, pb.k16])
    # Veto: an option below 9 dB is never usable, and 2-bit on Gaussian weights is below it.
    finite = np.isfinite(pb.costs)
    finite[:, pb.k16] = False
    assert np.all(pb.sqnr[finite] >= 9.0)
    assert not finite[:, [k for k, o in enumerate(pb.options) if o.bits == 2]].any()
    # Prior rules come first; an infinite prior keeps the tensor 16-bit.
    cfg = published_solver(
        prior_rules=[PriorRule(pattern=r"layers\.1\.self_attn\.q_proj", prior=float("inf"))]
    )
    pb2 = build_problem(prof, cfg)
    j = [d["name"] for d in pb2.decisions].index("model.layers.1.self_attn.q_proj.weight")
    assert np.isfinite(pb2.costs[j]).sum() == 1 and np.isfinite(pb2.costs[j, pb2.k16])


@pytest.mark.parametrize("objective", ["nrmse", "mse"])
@pytest.mark.parametrize("bpw", [3.6, 4.5, 6.0])
def test_allocations_fit_and_match_an_independent_solver(setup, tmp_path, objective: str, bpw: float) -> None:
    _, prof_dir = setup
    params = _params(t=TargetConfig(bits_per_weight=bpw))
    params.solver.objective = objective
    doc = run(params, None, prof_dir, tmp_path)["t"]
    tot = doc["totals"]
    assert tot["bytes"] <= tot["budget"] and tot["optimal"] and tot["gap"] <= 1e-9 * max(1, tot["objective"])
    assert sum(d["bytes"] for d in doc["decisions"]) == tot["tensor_bytes"]
    pb = build_problem(load_profile(prof_dir), params.solver)
    dp = solve_mckp(pb.sizes, pb.costs, tot["budget"] - pb.header_bytes, method="dp")
    assert tot["objective"] == pytest.approx(dp.objective, rel=1e-9, abs=1e-12)
    for d in doc["decisions"]:
        assert d["sqnr_db"] is None or d["sqnr_db"] >= 9.0
    saved = json.loads((tmp_path / "t" / "allocation.json").read_text())
    assert saved["totals"] == tot and (tmp_path / "t" / "metrics.json").exists()


def test_allocation_is_byte_identical(setup, tmp_path) -> None:
    _, prof_dir = setup
    params = _params(a=TargetConfig(bits_per_weight=4.25))
    run(params, None, prof_dir, tmp_path / "1")
    run(params, None, prof_dir, tmp_path / "2")
    assert (tmp_path / "1/a/allocation.json").read_bytes() == (tmp_path / "2/a/allocation.json").read_bytes()


def test_below_floor_refuses_before_work_or_builds_at_floor(setup, tmp_path) -> None:
    _, prof_dir = setup
    pb = build_problem(load_profile(prof_dir), published_solver())
    floor = floor_bytes(pb) + pb.header_bytes
    assert floor > floor_bytes(pb, with_veto=False) + pb.header_bytes
    with pytest.raises(InfeasibleBudget) as e:
        run(_params(x=TargetConfig(size=f"{floor - 1}B")), None, prof_dir, tmp_path)
    msg = str(e.value)
    assert f"{floor:,} B" in msg and "without it" in msg and "model.embed_tokens.weight" in msg
    assert not (tmp_path / "x").exists()
    doc = run(_params(x=TargetConfig(size="1KB", on_infeasible="min_safe")), None, prof_dir, tmp_path)["x"]
    assert doc["totals"]["bytes"] == floor and "minimum safe size" in doc["notes"][0]
    doc = run(_params(x=TargetConfig(size=f"{floor}B")), None, prof_dir, tmp_path)["x"]
    assert doc["totals"]["bytes"] <= floor


def test_on_infeasible_does_not_change_a_feasible_allocation(setup, tmp_path) -> None:
    """The default targets ask for min_safe; where the budget is above the floor that changes no byte of the
    allocation (so pack and evaluate do not rerun), and where it is below, the record says min_safe."""
    _, prof_dir = setup
    for policy in ("error", "min_safe"):
        run(
            _params(a=TargetConfig(bits_per_weight=4.25, on_infeasible=policy)),
            None,
            prof_dir,
            tmp_path / policy,
        )
    error, min_safe = ((tmp_path / p / "a/allocation.json").read_bytes() for p in ("error", "min_safe"))
    assert error == min_safe and json.loads(error)["target_config"]["on_infeasible"] == "error"
    doc = run(_params(x=TargetConfig(size="1KB", on_infeasible="min_safe")), None, prof_dir, tmp_path)["x"]
    assert doc["target_config"]["on_infeasible"] == "min_safe"
    assert doc["totals"]["effective_budget"] > doc["totals"]["budget"]
    with pytest.raises(MintError, match="on_infeasible 'minsafe'"):
        run(_params(x=TargetConfig(size="1KB", on_infeasible="minsafe")), None, prof_dir, tmp_path)


def test_the_shipped_default_targets_build_at_the_floor(setup, tmp_path) -> None:
    """Every target conf/config.yaml puts in the default build asks for min_safe: on a model whose floor is
    above every budget (bits_per_weight 0.5 here), each builds at the floor instead of failing the build."""
    from dataclasses import replace

    from mintbuild.config import load_params
    from mintbuild.stages.compose import compose_text

    _, prof_dir = setup
    text = compose_text(Path(__file__).resolve().parents[1] / "conf")
    (tmp_path / "params.yaml").write_text(text)
    shipped = load_params(tmp_path / "params.yaml").targets
    mlx = {n: t for n, t in shipped.items() if t.formats == ["mlx"]}
    assert {t.on_infeasible for t in shipped.values()} == {"min_safe"} and len(mlx) >= 6
    tiny = {n: replace(t, bits_per_weight=0.5, fraction_of_16bit=None) for n, t in mlx.items()}
    docs = run(_params(**tiny), None, prof_dir, tmp_path / "out")
    pb = build_problem(load_profile(prof_dir), published_solver())
    floor = floor_bytes(pb) + pb.header_bytes
    assert {d["totals"]["bytes"] for d in docs.values()} == {floor}
    assert all("minimum safe size" in d["notes"][0] for d in docs.values())


def test_budget_above_16bit_keeps_everything_16bit(setup, tmp_path) -> None:
    _, prof_dir = setup
    doc = run(_params(big=TargetConfig(fraction_of_16bit=1.5)), None, prof_dir, tmp_path)["big"]
    assert {d["option"] for d in doc["decisions"]} == {PASSTHROUGH.name}
    assert any("16-bit" in n for n in doc["notes"])


def test_bad_configs(setup, tmp_path) -> None:
    ck, prof_dir = setup
    with pytest.raises(MintError, match="unknown target"):
        run(_params(a=TargetConfig(size="1MB")), ["b"], prof_dir, tmp_path)
    p = _params(a=TargetConfig(size="1MB"))
    p.solver.method = "magic"
    with pytest.raises(MintError, match=r"solver\.method"):
        run(p, None, prof_dir, tmp_path)
    # A profile of another model than the configured one.
    other = write_checkpoint(tmp_path / "other", llama_tensors(layers=1))
    with pytest.raises(MintError, match="another model"):
        run(_params(a=TargetConfig(size="10MB")), None, prof_dir, tmp_path, model_dir=other)
    run(_params(a=TargetConfig(size="10MB")), None, prof_dir, tmp_path, model_dir=ck)
