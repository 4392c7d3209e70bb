"""Profile stage on tiny synthetic checkpoints: numbers, layout, determinism, sampling bound, bad input."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mintbuild.artifacts.profile import load_profile
from mintbuild.config import ProfileConfig
from mintbuild.errors import MintError
from mintbuild.formats import OPTION_SETS, PASSTHROUGH, Option
from mintbuild.stages.profile import run

from .synth import llama_tensors, write_checkpoint

OPTS = OPTION_SETS["default"]
K16 = OPTS.index(PASSTHROUGH)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("moe"), llama_tensors(experts=4))


@pytest.fixture(scope="module")
def moe_profile(moe_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "profile"
    run(moe_ckpt, ProfileConfig(), out, progress=False)
    return out


def test_roles_sizes_and_availability(moe_profile) -> None:
    p = load_profile(moe_profile)
    roles = {m["name"]: m["role"] for m in p.tensors}
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert roles["model.layers.0.input_layernorm.weight"] == "norm"
    assert roles["model.layers.1.self_attn.k_proj.weight"] == "attn_k"
    assert roles["model.layers.0.mlp.gate.weight"] == "moe_router"
    assert roles["model.layers.0.mlp.experts.down_proj"] == "moe_experts"
    emb = p.tensors[p.names.index("model.embed_tokens.weight")]
    assert emb["tied_to"] == ["lm_head.weight"]
    for i, m in enumerate(p.tensors):
        shape = tuple(m["shape"])
        for k, o in enumerate(OPTS):
            avail = bool(p["available"][i, k])
            if not m["quantizable"]:
                assert avail == o.passthrough
            else:
                assert avail == o.available(shape)
            if avail:
                assert p["bytes"][i, k] == o.nbytes(shape)
    # down_proj has inner dimension 576: group 128 is unavailable, and says why.
    i = p.names.index("model.layers.0.mlp.experts.down_proj")
    assert not p["available"][i, OPTS.index(Option(4, 128))]
    assert "576" in p.tensors[i]["unavailable"]["q4g128"]


def test_error_columns_are_consistent(moe_profile) -> None:
    p = load_profile(moe_profile)
    ok = p["available"].astype(bool)
    nrmse = np.sqrt(p["sse"] / p["norm_sq"][:, None])
    np.testing.assert_allclose(p["nrmse"][ok], nrmse[ok], rtol=1e-12)
    pos = ok & (p["sse"] > 0)
    np.testing.assert_allclose(p["sqnr"][pos], -20 * np.log10(p["nrmse"][pos]), rtol=1e-9)
    assert np.all(p["sse"][:, K16] == 0)  # bf16 checkpoint: 16-bit passthrough is lossless
    assert np.isinf(p["sqnr"][:, K16]).all()
    # 3-D experts: one decision; the worst expert is at least as bad as the aggregate.
    i = p.names.index("model.layers.1.mlp.experts.gate_up_proj")
    q = ok[i] & ~np.array([o.passthrough for o in OPTS])
    assert np.all(p["worst_nrmse"][i, q] >= p["nrmse"][i, q] * (1 - 1e-12))
    assert np.any(p["worst_nrmse"][i, q] > p["nrmse"][i, q])


def test_rerun_is_byte_identical_and_sharding_does_not_matter(moe_ckpt, moe_profile, tmp_path) -> None:
    run(moe_ckpt, ProfileConfig(), tmp_path / "again", progress=False)
    assert (tmp_path / "again/profile.safetensors").read_bytes() == (
        moe_profile / "profile.safetensors"
    ).read_bytes()
    sharded = write_checkpoint(tmp_path / "sharded", llama_tensors(experts=4), shards=3)
    run(sharded, ProfileConfig(), tmp_path / "p3", progress=False)
    a, b = load_profile(moe_profile), load_profile(tmp_path / "p3")
    assert a.names == b.names and a.provenance["checkpoint_hash"] == b.provenance["checkpoint_hash"]
    for key in ("bytes", "sse", "available"):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wider_sources_measure_against_the_original(dtype, tmp_path) -> None:
    t = llama_tensors(layers=1, dtype=dtype)
    ck = write_checkpoint(tmp_path / "ck", t, config={"num_hidden_layers": 1})
    run(ck, ProfileConfig(), tmp_path / "p", progress=False)
    p = load_profile(tmp_path / "p")
    i = p.names.index("model.layers.0.self_attn.q_proj.weight")
    w = t["model.layers.0.self_attn.q_proj.weight"].double()
    want16 = float(((w.bfloat16().double() - w) ** 2).sum())
    assert p["sse"][i, K16] == pytest.approx(want16, rel=1e-6) and want16 > 0
    assert p.tensors[i]["dtype"] == {torch.float32: "F32", torch.float16: "F16"}[dtype]


def test_all_zero_tensor_has_zero_error(tmp_path) -> None:
    t = llama_tensors(layers=1)
    t["model.layers.0.self_attn.o_proj.weight"].zero_()
    ck = write_checkpoint(tmp_path / "ck", t)
    run(ck, ProfileConfig(), tmp_path / "p", progress=False)
    p = load_profile(tmp_path / "p")
    i = p.names.index("model.layers.0.self_attn.o_proj.weight")
    ok = p["available"][i].astype(bool)
    assert np.all(p["nrmse"][i, ok] == 0) and not np.isnan(p["nrmse"][i, ok]).any()


@pytest.mark.parametrize("outliers", [False, True], ids=["smooth", "heavy-tailed"])
def test_sampled_error_within_stated_bound(outliers: bool, tmp_path) -> None:
    """A large tensor measured on a sample: every option's NRMSE within 0.5% of the exact value. Heavy tails
    make the sampler grow its sample (up to the whole tensor) until its measured standard error allows it."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(2048, 1, generator=g).abs() * 0.02 + 0.002  # rows of very different scale
    w = torch.randn(2048, 2048, generator=g) * rows
    if outliers:
        w += (torch.rand(2048, 2048, generator=g) < 1e-3) * torch.randn(2048, 2048, generator=g) * 0.3
    ck = write_checkpoint(tmp_path / "ck", {"model.layers.0.mlp.up_proj.weight": w.bfloat16()})
    run(ck, ProfileConfig(sample_above=1 << 40), tmp_path / "exact", progress=False)
    sampled_cfg = ProfileConfig(sample_above=1 << 20, sample_elements=1 << 18)
    run(ck, sampled_cfg, tmp_path / "sampled", progress=False)
    ex, sa = load_profile(tmp_path / "exact"), load_profile(tmp_path / "sampled")
    assert ex["sampled_elements"][0] == w.numel()
    q = np.array([not o.passthrough for o in OPTS])
    rel = np.abs(sa["nrmse"][0, q] / ex["nrmse"][0, q] - 1)
    assert rel.max() <= 0.005, rel
    assert 3 * sa["nrmse_rse"][0, q].max() <= 0.005
    assert np.all(sa["bytes"] == ex["bytes"])


def test_sampling_spends_its_effort_where_the_error_varies(tmp_path) -> None:
    """Per-option samples: the 4-6 bit options settle on a small share of a large heavy-tailed tensor (the
    take-all stratum of outlier units carries their variance), and every estimate is within the bound."""
    from mintbuild.hf.checkpoint import TensorInfo
    from mintbuild.mlx.measure import measure_quantized

    g = torch.Generator().manual_seed(5)
    w = torch.randn(4096, 4096, generator=g) * (torch.randn(4096, 1, generator=g) * 0.3).exp() * 0.02
    w += (torch.rand(4096, 4096, generator=g) < 1e-4) * torch.randn(4096, 4096, generator=g) * 0.3
    w = w.bfloat16()
    opts = [o for o in OPTS if not o.passthrough]
    info = TensorInfo("model.layers.0.mlp.up_proj.weight", "BF16", tuple(w.shape), tmp_path, 0, 0)
    norm = float(w.float().square().sum())
    exact = measure_quantized(info, w, torch.bfloat16, opts, norm, ProfileConfig(sample_above=1 << 30))
    sse, _, rse, taken = measure_quantized(info, w, torch.bfloat16, opts, norm, ProfileConfig())
    assert (exact[3] == w.numel()).all() and (exact[2] == 0).all()
    assert np.abs(np.sqrt(sse / exact[0]) - 1).max() <= 0.005
    assert 3 * rse.max() <= 0.005
    mid = [k for k, o in enumerate(opts) if 4 <= o.bits <= 6]
    assert taken[mid].max() <= 0.1 * w.numel(), dict(
        zip([o.name for o in opts], taken / w.numel(), strict=True)
    )
    assert taken.sum() <= 0.25 * len(opts) * w.numel()


def test_sampled_stacked_experts_keep_the_per_expert_worst_case(tmp_path) -> None:
    """A stacked [E, out, in] tensor measured on a sample: its NRMSE within the bound and its per-expert worst
    case close to the exact one (expert 1 carries outliers, so it is the worst)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 1024, 1024, generator=g) * 0.02
    w[2] *= 0.25  # relative error is scale-free: expert 2 is not worse for being smaller
    w[1] += (torch.rand(1024, 1024, generator=g) < 2e-3) * torch.randn(1024, 1024, generator=g) * 0.3
    ck = write_checkpoint(tmp_path / "ck", {"model.layers.0.mlp.experts.down_proj": w.bfloat16()})
    run(ck, ProfileConfig(sample_above=1 << 40), tmp_path / "exact", progress=False)
    run(
        ck, ProfileConfig(sample_above=1 << 20, sample_elements=1 << 17), tmp_path / "sampled", progress=False
    )
    ex, sa = load_profile(tmp_path / "exact"), load_profile(tmp_path / "sampled")
    q = np.array([not o.passthrough for o in OPTS]) & ex["available"][0].astype(bool)
    assert (sa["nrmse_rse"][0, q] > 0).sum() >= 10  # most options were estimated from a sample
    assert np.abs(sa["nrmse"][0, q] / ex["nrmse"][0, q] - 1).max() <= 0.005
    four = [k for k, o in enumerate(OPTS) if o.bits == 4 and q[k]]
    assert (ex["worst_nrmse"][0, four] > 1.05 * ex["nrmse"][0, four]).all()  # the outlier expert is worse
    assert np.abs(sa["worst_nrmse"][0, q] / ex["worst_nrmse"][0, q] - 1).max() <= 0.05


# --- bad input ----------------------------------------------------------------------------------------------


def _good(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ck", llama_tensors(layers=1))


def _corrupt(kind: str, tmp_path: Path) -> tuple[Path, str]:
    ck = _good(tmp_path)
    f = ck / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if kind == "missing":
        return tmp_path / "nope", "no such file"
    if kind == "not_safetensors":
        f.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)
        return ck, "not a safetensors file"
    if kind == "truncated":
        f.write_bytes(data[: len(data) // 2])
        return ck, "truncated"
    if kind == "lying_offsets":
        name = "model.layers.0.self_attn.q_proj.weight"
        header[name]["data_offsets"][1] += 2
        raw = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
        return ck, name
    if kind == "nan":
        t = llama_tensors(layers=1)
        t["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
        write_checkpoint(ck, t)
        return ck, "model.layers.0.mlp.up_proj.weight"
    if kind == "integer":
        t = llama_tensors(layers=1)
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 8, dtype=torch.int8)
        write_checkpoint(ck, t)
        return ck, "pre-quantized"
    if kind in ("index_missing_shard", "index_missing_tensor"):
        f.unlink()
        sh = write_checkpoint(ck, llama_tensors(layers=1), shards=2)
        idx = json.loads((sh / "model.safetensors.index.json").read_text())
        if kind == "index_missing_shard":
            (sh / "model-00002-of-00002.safetensors").unlink()
            return sh, "model-00002-of-00002.safetensors"
        idx["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors"
        (sh / "model.safetensors.index.json").write_text(json.dumps(idx))
        return sh, "model.layers.0.ghost.weight"
    raise AssertionError(kind)


BAD = [
    "missing",
    "not_safetensors",
    "truncated",
    "lying_offsets",
    "nan",
    "integer",
    "index_missing_shard",
    "index_missing_tensor",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_is_one_clear_error(kind: str, tmp_path: Path) -> None:
    path, needle = _corrupt(kind, tmp_path)
    with pytest.raises(MintError, match=None) as e:
        run(path, ProfileConfig(), tmp_path / "out", progress=False)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["truncated", "nan"])
def test_cli_exit_code_no_traceback_no_partial_artifact(kind: str, tmp_path: Path) -> None:
    path, needle = _corrupt(kind, tmp_path)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mintbuild.cli",
            "profile",
            "--params",
            str(tmp_path / "none.yaml"),
            "--model",
            str(path),
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and needle in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_lm_head_tied_copy_is_skipped(tmp_path) -> None:
    t = llama_tensors(layers=1)
    t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
    ck = write_checkpoint(tmp_path / "ck", t)
    run(ck, ProfileConfig(), tmp_path / "p", progress=False)
    assert "lm_head.weight" not in load_profile(tmp_path / "p").names
    save_file({"x": torch.zeros(2)}, str(tmp_path / "p" / "profile.safetensors"))
    with pytest.raises(MintError, match="schema version"):
        load_profile(tmp_path / "p")
