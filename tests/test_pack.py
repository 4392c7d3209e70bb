"""The packer: bit-exact with mx.quantize through its own code path, planned bytes == written bytes, the
budget on disk, the cache, byte-identical output and the bad-input refusals."""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
import torch

from mintbuild.artifacts.pack import MANIFEST_FILE
from mintbuild.config import Params, ProfileConfig, TargetConfig
from mintbuild.errors import MintError
from mintbuild.formats import Option
from mintbuild.hf.checkpoint import fingerprint, open_checkpoint
from mintbuild.io import sha256_file
from mintbuild.mlx.folder import WEIGHTS_FILE
from mintbuild.mlx.quant.pack_kernel import quantize_pack
from mintbuild.mlx.quant.reference import pack_codes, quantize_codes
from mintbuild.stages.pack import pack_target

from .synth import published_solver

#: Two budgets far enough apart that the smaller one must be worse.
TARGETS = {"hi": TargetConfig(bits_per_weight=8.0), "lo": TargetConfig(bits_per_weight=3.5)}
_BUILDS: dict[str, Any] = {}


def real_build(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Any]:
    """Profile + allocate the real SmolLM2 at two budgets and pack both; shared by test_evaluate (once)."""
    if "build" in _BUILDS:
        return _BUILDS["build"]
    from mintbuild.stages.allocate import run as allocate_run
    from mintbuild.stages.profile import run as profile_run

    root = tmp_path_factory.mktemp("packbuild")
    profile_run(smollm2_dir, ProfileConfig(), root / "profile", progress=False)
    params = Params(targets=dict(TARGETS), solver=published_solver())
    params.model.out = params.equalize.out = str(smollm2_dir)  # the 16-bit baseline reads model.out
    params.pack.rounding = (
        "rtn"  # mx.quantize's bits exactly; test_gptq.py packs the same allocations with GPTQ
    )
    params.allocate_out = str(root / "allocate")
    params.pack_out = str(root / "pack")
    params.eval_out = str(root / "evaluate")
    allocate_run(params, None, root / "profile", root / "allocate", smollm2_dir)
    results = {t: pack_target(params, t, progress=False, cache_dir=root / "cache") for t in sorted(TARGETS)}
    _BUILDS["build"] = {"root": root, "params": params, "results": results}
    return _BUILDS["build"]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> dict[str, Any]:
    return real_build(tmp_path_factory, smollm2_dir)


# ---------------------------------------------------------------- the mx.quantize oracle


@pytest.mark.parametrize(
    "opt", [Option(3, 32), Option(3, 128), Option(5, 64), Option(6, 32), Option(6, 128), Option(2, 64),
            Option(4, 64), Option(8, 128)], ids=str,
)  # fmt: skip
@pytest.mark.parametrize(
    "shape", [(48, 384), (3, 16, 256), (13, 384)], ids=["2d", "3d-experts", "rows-not-a-multiple-of-8"]
)
def test_packer_equals_mx_quantize(opt: Option, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(opt.bits * 1000 + opt.group)
    w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    rows = w.reshape(-1, shape[-1])
    # An all-zero and a constant group in the 8-row block path and in the leftover rows' scalar path.
    for r in (1, rows.shape[0] - 2):
        rows[r, : opt.group] = 0
        rows[r + 1, : opt.group] = 0.5
    words, scales, biases = quantize_pack(w, opt)
    qm, sm, bm = mx.quantize(
        mx.array(w.float().numpy()).astype(mx.bfloat16), group_size=opt.group, bits=opt.bits
    )
    assert words.dtype == np.uint32 and np.array_equal(words, np.array(qm))
    assert np.array_equal(scales, np.array(sm.view(mx.uint16)))
    assert np.array_equal(biases, np.array(bm.view(mx.uint16)))
    q, s, _b = quantize_codes(w, opt)  # and with the profile's quantizer
    assert np.array_equal(words, pack_codes(q, opt.bits))
    assert np.array_equal(scales, s.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_packer_is_bit_exact_on_many_values(bits: int) -> None:
    """2 M bf16 values of very different row scales against mx.quantize, bit for bit: 512 rows through the
    8-row vector path and 3 leftover rows through the scalar path (whose multiply by a float64 reciprocal
    pack.py proves equal to MLX's float32 division)."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(515, 4096, generator=g) * (torch.randn(515, 1, generator=g) * 2).exp() * 0.02
    w = w.to(torch.bfloat16)
    opt = Option(bits, 64)
    words, scales, biases = quantize_pack(w, opt)
    qm, sm, bm = mx.quantize(mx.array(w.float().numpy()).astype(mx.bfloat16), group_size=64, bits=bits)
    assert np.array_equal(words, np.array(qm))
    assert np.array_equal(scales, np.array(sm.view(mx.uint16)))
    assert np.array_equal(biases, np.array(bm.view(mx.uint16)))


def test_packer_refuses_nan_and_unavailable_groups() -> None:
    w = torch.zeros(4, 64, dtype=torch.bfloat16)
    w[2, 5] = float("nan")
    with pytest.raises(MintError, match="NaN or Inf"):
        quantize_pack(w, Option(4, 32))
    with pytest.raises(MintError, match="not a multiple of group 128"):
        quantize_pack(torch.zeros(4, 576, dtype=torch.bfloat16), Option(4, 128))


# ---------------------------------------------------------------- the real model


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


@pytest.mark.e2e
def test_planned_bytes_equal_written_bytes(build: dict[str, Any]) -> None:
    for target, res in build["results"].items():
        alloc = json.loads((build["root"] / "allocate" / target / "allocation.json").read_text())
        header = _header(res.out / WEIGHTS_FILE)
        sizes = {
            k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"
        }
        for d in alloc["decisions"]:
            stems = {m.removesuffix(".weight") for m in d["members"]}
            stored = [k for k in sizes if k in d["members"] or k.rsplit(".", 1)[0] in stems]
            assert sum(sizes[k] for k in stored) == d["bytes"], d["name"]
        on_disk = (res.out / WEIGHTS_FILE).stat().st_size
        assert on_disk <= alloc["totals"]["budget"]
        assert on_disk - sum(sizes.values()) <= alloc["totals"]["header_allowance"]
        assert "lm_head.weight" not in header  # tied: stored once as the embedding
        cfg = json.loads((res.out / "config.json").read_text())
        assert cfg["quantization"] == cfg["quantization_config"] and cfg["quantization"]["mode"] == "affine"
        assert (res.out / "tokenizer.json").is_file()
        # safetensors' rule: the data section is covered exactly, no hole and no overlap (in any order).
        spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        # The weights' sha256 is taken while writing: it must equal a fresh read of every file.
        files = json.loads((res.out / MANIFEST_FILE).read_text())["files"]
        assert {n: f["sha256"] for n, f in files.items()} == {n: sha256_file(res.out / n) for n in files}


@pytest.mark.e2e
def test_cached_repack_is_byte_identical(
    build: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A repack from the cache writes the same bytes, and with progress off (DVC) says how far it is."""
    caplog.set_level(logging.INFO, logger="mintbuild.progress")
    params, first = build["params"], build["results"]["lo"]
    again = pack_target(params, "lo", out_root=tmp_path, progress=False, cache_dir=build["root"] / "cache")
    assert again.cache_misses == 0 and again.cache_hits == first.cache_hits + first.cache_misses
    said = [r.getMessage() for r in caplog.records if r.name == "mintbuild.progress"]
    n = len(again.plan.items)
    assert said and said[-1].startswith("pack lo ") and "(100%)" in said[-1], said
    assert said[-1].endswith(f"done [{n}/{n} tensors]"), said[-1]
    for name in sorted(p.name for p in first.out.iterdir()):
        assert (first.out / name).read_bytes() == (tmp_path / "lo" / name).read_bytes(), name


@pytest.mark.e2e
def test_dry_run_writes_nothing(build: dict[str, Any], tmp_path: Path) -> None:
    res = pack_target(build["params"], "hi", out_root=tmp_path, dry_run=True, progress=False)
    assert res.plan.file_bytes <= res.plan.budget and not any(tmp_path.iterdir())


# ---------------------------------------------------------------- bad input


def _fake_allocation(root: Path, target: str, fp: str) -> None:
    folder = root / target
    folder.mkdir(parents=True)
    doc = {"target": target, "provenance": {"model_fingerprint": fp}, "decisions": [],
           "totals": {"budget": 1, "header_allowance": 0}}  # fmt: skip
    (folder / "allocation.json").write_text(json.dumps(doc))


@pytest.mark.e2e
def test_refuses_allocation_of_another_model(smollm2_dir: Path, tmp_path: Path) -> None:
    _fake_allocation(tmp_path / "alloc", "t", "0" * 32)
    params = Params(targets={"t": TargetConfig(size="1MB")}, solver=published_solver())
    params.equalize.out = str(smollm2_dir)
    with pytest.raises(MintError, match="made from another model") as e:
        pack_target(params, "t", out_root=tmp_path / "pack", alloc_root=tmp_path / "alloc", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "pack").exists()


@pytest.mark.e2e
def test_refuses_missing_tokenizer(smollm2_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "manifest.json"):
        (model / name).symlink_to(smollm2_dir / name)
    _fake_allocation(tmp_path / "alloc", "t", fingerprint(open_checkpoint(model)))
    params = Params(targets={"t": TargetConfig(size="1MB")}, solver=published_solver())
    params.equalize.out = str(model)
    with pytest.raises(MintError, match="no tokenizer"):
        pack_target(params, "t", out_root=tmp_path / "pack", alloc_root=tmp_path / "alloc", progress=False)
    assert not (tmp_path / "pack").exists()


@pytest.mark.e2e
def test_refuses_wrong_tokenizer(smollm2_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(smollm2_dir, model, symlinks=True)
    cfg = json.loads((model / "config.json").read_text())
    cfg["vocab_size"] = 1000  # the tokenizer's ids no longer fit the embedding
    (model / "config.json").write_text(json.dumps(cfg))
    _fake_allocation(tmp_path / "alloc", "t", fingerprint(open_checkpoint(model)))
    params = Params(targets={"t": TargetConfig(size="1MB")}, solver=published_solver())
    params.equalize.out = str(model)
    with pytest.raises(MintError, match="wrong tokenizer"):
        pack_target(params, "t", out_root=tmp_path / "pack", alloc_root=tmp_path / "alloc", progress=False)
    assert not (tmp_path / "pack").exists() and MANIFEST_FILE
