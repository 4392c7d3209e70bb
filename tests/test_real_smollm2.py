"""The real embedded model end to end: import (fixture), profile, allocate at several budgets."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from mintbuild.artifacts.profile import load_profile
from mintbuild.config import Params, TargetConfig
from mintbuild.formats import OPTION_SETS, PASSTHROUGH, Option
from mintbuild.stages.allocate import run as allocate

from .synth import published_solver

pytestmark = pytest.mark.e2e

OPTS = OPTION_SETS["default"]


def test_profile_of_the_real_model(smollm2_profile: Path) -> None:
    p = load_profile(smollm2_profile)
    assert len(p.tensors) == 272 and int(p["elements"].sum()) == 134_515_008
    roles = [m["role"] for m in p.tensors]
    assert roles.count("norm") == 61 and roles.count("embedding") == 1
    for r in ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down"):
        assert roles.count(r) == 30
    emb = p.names.index("model.embed_tokens.weight")
    assert p.tensors[emb]["tied_to"] == ["lm_head.weight"]
    # Hidden size 576 is not a multiple of 128: group 128 is unavailable exactly where the inner dim is 576.
    k128 = OPTS.index(Option(4, 128))
    for i, m in enumerate(p.tensors):
        if m["quantizable"]:
            assert bool(p["available"][i, k128]) == (m["shape"][-1] % 128 == 0)
            for k, o in enumerate(OPTS):
                if p["available"][i, k]:
                    assert p["bytes"][i, k] == o.nbytes(tuple(m["shape"]))
    q = p["available"].astype(bool) & np.array([not o.passthrough for o in OPTS])
    assert np.isfinite(p["nrmse"][q]).all() and (p["nrmse"][q] > 0).all()
    # Error falls with bits (same group); the veto's premise holds on a real model: 2-bit is below 9 dB
    # for most tensors, 3-bit above it.
    med = np.array([np.median(p["sqnr"][q[:, k], k]) if q[:, k].any() else np.nan for k in range(len(OPTS))])
    for g in (32, 64):
        s = [med[OPTS.index(Option(b, g))] for b in (2, 3, 4, 5, 6, 8)]
        assert all(a < b for a, b in itertools.pairwise(s)), s
    assert med[OPTS.index(Option(2, 64))] < 9.0 < med[OPTS.index(Option(3, 64))]
    assert (p["sse"][:, OPTS.index(PASSTHROUGH)] == 0).all()  # bf16 checkpoint


def test_sampled_profile_of_the_real_model_is_within_the_stated_bound(
    smollm2_dir: Path, smollm2_profile: Path, tmp_path: Path
) -> None:
    """Every tensor of the real model sampled (far below the default threshold) against the exact profile:
    each option's NRMSE within 0.5%, as the sampler's three-standard-error rule promises."""
    from mintbuild.config import ProfileConfig
    from mintbuild.stages.profile import run

    run(smollm2_dir, ProfileConfig(sample_above=1 << 40), tmp_path / "exact", progress=False)
    run(
        smollm2_dir,
        ProfileConfig(sample_above=1 << 18, sample_elements=1 << 16),
        tmp_path / "s",
        progress=False,
    )
    ex, sa = load_profile(tmp_path / "exact"), load_profile(tmp_path / "s")
    assert (sa["nrmse_rse"] > 0).any(axis=1).sum() >= 150  # q, o and the MLP of every layer, the embedding
    ok = np.isfinite(ex["nrmse"]) & (ex["nrmse"] > 0)
    rel = np.abs(sa["nrmse"][ok] / ex["nrmse"][ok] - 1)
    assert rel.max() <= 0.005, rel.max()
    assert np.all(sa["bytes"] == ex["bytes"])
    # The default profile (fixture) samples only the 28 M-value embedding, within the same bound.
    p = load_profile(smollm2_profile)
    emb = p.names.index("model.embed_tokens.weight")
    assert p["sampled_elements"][emb] < p["elements"][emb]
    assert 3 * p["nrmse_rse"].max() <= 0.005


def test_allocations_of_the_real_model(smollm2_profile: Path, smollm2_dir: Path, tmp_path: Path) -> None:
    targets = {f"t{b}": TargetConfig(bits_per_weight=b) for b in (3.5, 4.5, 6.0)}
    exact = allocate(
        Params(targets=targets, solver=published_solver()),
        None,
        smollm2_profile,
        tmp_path / "exact",
        model_dir=smollm2_dir,
    )
    cvx = allocate(
        Params(targets=targets, solver=published_solver(method="cvxpy")),
        None,
        smollm2_profile,
        tmp_path / "cvx",
    )
    objectives = []
    for name in targets:
        t = exact[name]["totals"]
        assert t["bytes"] <= t["budget"] and t["optimal"]
        assert t["objective"] == pytest.approx(cvx[name]["totals"]["objective"], rel=1e-9)
        assert cvx[name]["totals"]["bytes"] <= t["budget"]
        objectives.append(t["objective"])
        assert abs(t["avg_bits_per_weight"] - float(name[1:])) < 0.05
    assert objectives[0] > objectives[1] > objectives[2]
