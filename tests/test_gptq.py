"""GPTQ rounding: the format is MLX's (mx.dequantize reads it), a diagonal Hessian gives round-to-nearest bit
for bit, a correlated one lowers the output error (also on tokens it never saw), the importance stage's head
Hessian is X^T X of the head's real inputs, and the packer uses it only where it should."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numba
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmarks.bench_gptq import reference_gptq_codes
from mintbuild.artifacts.importance import HESSIAN_FILE, load_hessians
from mintbuild.artifacts.pack import MANIFEST_FILE, read_config
from mintbuild.calibration.hessians import compute_hessians
from mintbuild.config import ImportanceConfig, PackConfig
from mintbuild.errors import MintError
from mintbuild.formats import Option
from mintbuild.mlx import gptq
from mintbuild.mlx.folder import WEIGHTS_FILE, dequantized_state
from mintbuild.mlx.gptq import gptq_codes, output_error, rounding_gain
from mintbuild.mlx.pack import Rounding, gptq_pack
from mintbuild.mlx.quant.reference import dequantize_codes, quantize_codes, quantize_dequantize
from mintbuild.stages.importance import run
from mintbuild.stages.pack import pack_target
from tests.test_importance import assert_train_only
from tests.test_pack import real_build

OPTIONS = [Option(4, 64), Option(3, 32), Option(2, 64), Option(6, 128), Option(8, 32)]


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w += (torch.rand(rows, cols, generator=g) < 2e-3) * torch.randn(rows, cols, generator=g) * 0.2
    return w.to(torch.bfloat16)


def tokens(n: int, cols: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few loud channels, as a transformer's hidden states have."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=torch.Generator().manual_seed(99)) / cols**0.5
    x = torch.randn(n, cols, generator=g) @ (mix + torch.eye(cols))
    x[:, :4] *= 20
    return x


@pytest.mark.parametrize("opt", OPTIONS, ids=str)
def test_diagonal_hessian_is_round_to_nearest(opt: Option, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing to compensate, GPTQ rounds every weight to nearest on its group's grid: on the clipped grids
    it chose, and bit for bit `quantize_codes` when clipping is off."""
    w = weights(40, 256, opt.bits)
    h = torch.diag(torch.rand(256, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1)
    q, s, b = gptq_codes(w, h, opt, damp=0.1, block=128)
    s32, b32 = gptq.clipped_group_params(w.to(torch.bfloat16), h, opt.bits, opt.group)
    groups = w.to(torch.bfloat16).float().reshape(40, -1, opt.group)
    nearest = torch.round((groups - b32[..., None]) / s32[..., None]).clamp(0, (1 << opt.bits) - 1)
    assert torch.equal(q, nearest.to(torch.uint8).reshape(40, 256))
    assert torch.equal(s, s32.to(torch.bfloat16)) and torch.equal(b, b32.to(torch.bfloat16))
    monkeypatch.setattr(gptq, "CLIP_SHRINKS", (1.0,))
    q, s, b = gptq_codes(w, h, opt, damp=0.1, block=128)
    q0, s0, b0 = quantize_codes(w, opt)
    assert torch.equal(q, q0) and torch.equal(s.view(torch.int16), s0.view(torch.int16))
    assert torch.equal(b.view(torch.int16), b0.view(torch.int16))


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).float().to(torch.bfloat16).double().numpy()


@pytest.mark.parametrize("opt", [Option(4, 64), Option(3, 32), Option(2, 64)], ids=str)
def test_clipped_grids_are_the_least_output_error_per_group(opt: Option) -> None:
    """Each group's grid is, among its range shrunk by each of CLIP_SHRINKS, the one whose round-to-nearest output
    error on the group's inputs (H's diagonal block) is least, up to the float32 rounding the search's arithmetic
    allows: checked group by group in numpy float64, with each candidate grid made by `mx.quantize` itself (of
    the group clipped to the shrunk range)."""
    w = weights(24, 128, 11)
    x = tokens(512, 128, 4).double()
    h = x.T @ x
    s32, _ = gptq.clipped_group_params(w.to(torch.bfloat16), h, opt.bits, opt.group)
    w16 = w.to(torch.bfloat16).float().numpy()
    g, n_bins, shrunk = opt.group, (1 << opt.bits) - 1, 0
    for r in range(w.shape[0]):
        for j in range(128 // g):
            vals, hb = w16[r, j * g : (j + 1) * g], h[j * g : (j + 1) * g, j * g : (j + 1) * g].numpy()
            errs, grids, slack = [], [], []
            for a in gptq.CLIP_SHRINKS:
                clipped = np.clip(vals, vals.min() * np.float32(a), vals.max() * np.float32(a))
                _, sc, bi = mx.quantize(mx.array(clipped[None]), group_size=g, bits=opt.bits)
                sc, bi = float(np.array(sc)[0, 0]), float(np.array(bi)[0, 0])
                q = np.clip(np.round((vals.astype(np.float64) - bi) / sc), 0, n_bins)
                deq = _bf16(_bf16(q * _bf16(np.array(sc))) + _bf16(np.array(bi)))
                e = vals - deq
                errs.append(float(e @ hb @ e))
                grids.append(sc)
                # the float32 search's rounding: g + 3 roundings (H to float32, the products and sums) per term
                slack.append((g + 3) * 2.0**-24 * float(np.abs(e) @ np.abs(hb) @ np.abs(e)))
            ours = int(np.argmin([abs(sc - float(s32[r, j])) for sc in grids]))
            assert grids[ours] == pytest.approx(float(s32[r, j]), rel=1e-6), (r, j)
            best = int(np.argmin(errs))
            assert errs[ours] <= errs[best] + slack[ours] + slack[best], (r, j, ours, errs)
            shrunk += gptq.CLIP_SHRINKS[ours] < 1
    # Not vacuous: some groups keep round-to-nearest's grid and some are clipped.
    assert 0 < shrunk < w.shape[0] * 128 // g, shrunk


@pytest.mark.parametrize("opt", [Option(4, 64), Option(3, 32)], ids=str)
def test_gptq_lowers_output_error_on_seen_and_unseen_tokens(opt: Option) -> None:
    w = weights(64, 256, 7)
    seen, unseen = tokens(2048, 256, 0), tokens(2048, 256, 1)
    h_seen, h_unseen = (x.double().T @ x.double() for x in (seen, unseen))
    q, s, b = gptq_codes(w, h_seen, opt, damp=0.1)
    deq, rtn = dequantize_codes(q, s, b, opt.group), quantize_dequantize(w, opt)
    # Measured: 0.30 (q4g64) and 0.39 (q3g32) on the tokens the Hessian came from, 0.33 / 0.42 on new ones
    # (0.46 / 0.49 and 0.50 / 0.54 on unclipped grids).
    assert output_error(w, deq, h_seen) < 0.65 * output_error(w, rtn, h_seen)
    assert output_error(w, deq, h_unseen) < 0.7 * output_error(w, rtn, h_unseen)
    # Every code is a valid code and every group's values lie on its own grid (the format is unchanged).
    assert int(q.max()) < 1 << opt.bits


@pytest.mark.parametrize("opt", [Option(4, 64), Option(3, 32)], ids=str)
def test_act_order_rounds_the_loud_inputs_first(opt: Option, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loud inputs stored last: taken in stored order, their columns are rounded when no column is left to take
    up their error, and GPTQ is barely better than round-to-nearest; in act order it keeps its gain (on
    round-to-nearest's grids, so that the order alone is measured)."""
    monkeypatch.setattr(gptq, "CLIP_SHRINKS", (1.0,))
    w = weights(64, 256, 7)

    def loud_last(seed: int) -> torch.Tensor:
        x = tokens(2048, 256, seed)
        x[:, :4] /= 20
        x[:, -4:] *= 20
        return x

    h_seen, h_unseen = (x.double().T @ x.double() for x in (loud_last(0), loud_last(1)))
    assert gptq.act_order(h_seen)[:4].sort().values.tolist() == [252, 253, 254, 255]
    rtn = output_error(w, quantize_dequantize(w, opt), h_unseen)
    stored_order = gptq.Factor(torch.arange(256), gptq.inverse_cholesky_t(h_seen, 0.1))
    gains = []
    for fac in (None, stored_order):
        q, s, b = gptq_codes(w, h_seen, opt, damp=0.1, fac=fac)
        gains.append(output_error(w, dequantize_codes(q, s, b, opt.group), h_unseen) / rtn)
    # Measured on the unseen tokens: 0.52 / 0.55 in act order, 0.98 / 0.97 in stored order (q4g64 / q3g32).
    assert gains[0] < 0.6 and gains[1] > 0.9


def test_gptq_pack_is_what_mlx_dequantizes() -> None:
    opt, w = Option(4, 64), weights(48, 384, 3)
    h = tokens(1024, 384, 2).double()
    h = h.T @ h
    words, scales, biases = gptq_pack(w, opt, h, Rounding("gptq", damp=0.1, block=128))
    got = mx.dequantize(
        mx.array(words), mx.array(scales).view(mx.bfloat16), mx.array(biases).view(mx.bfloat16),
        group_size=64, bits=4,
    )  # fmt: skip
    q, s, b = gptq_codes(w, h, opt, damp=0.1)
    want = dequantize_codes(q, s, b, 64)
    assert np.array_equal(np.array(got.astype(mx.float32)), want.float().numpy())
    # Blocks are a speed knob: a different block size gives the same codes up to float rounding.
    q2, _, _ = gptq_codes(w, h, opt, damp=0.1, block=64)
    assert (q2 != q).float().mean() < 1e-3


def test_rounding_gain_is_held_out_and_row_sampled() -> None:
    opts, w = [Option(4, 64), Option(3, 32)], weights(256, 256, 5)
    fit, held = (x.double().T @ x.double() for x in (tokens(1024, 256, 3), tokens(1024, 256, 4)))
    full = rounding_gain(w, fit, held, opts, damp=0.1, block=128, rows=256)
    sampled = rounding_gain(w, fit, held, opts, damp=0.1, block=128, rows=64)
    for o in opts:
        # Measured: 0.373 / 0.427 on all rows, 0.402 / 0.392 on a quarter of them.
        assert 0.3 < full[o.name] < 0.7 and sampled[o.name] == pytest.approx(full[o.name], rel=0.1)
    # A diagonal Hessian leaves nothing to compensate: without clipping GPTQ is round-to-nearest, the gain 1.
    diag = torch.diag(torch.diagonal(fit))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gptq, "CLIP_SHRINKS", (1.0,))
        assert rounding_gain(w, diag, held, opts, damp=0.1, block=128) == {o.name: 1.0 for o in opts}


def test_gptq_refuses_bad_input() -> None:
    w = weights(8, 64, 0)
    with pytest.raises(MintError, match="does not match 64 input columns"):
        gptq_codes(w, torch.eye(32), Option(4, 32), 0.1)
    with pytest.raises(MintError, match="2-D"):
        gptq_codes(w[None], torch.eye(64), Option(4, 32), 0.1)
    bad = w.clone()
    bad[1, 3] = float("inf")
    with pytest.raises(MintError, match="NaN or Inf"):
        gptq_pack(bad, Option(4, 32), torch.eye(64), Rounding("gptq"))


# ---------------------------------------------------------------- the numba kernel against the torch column loop

#: The reference's block product is MKL's sgemm, which sums each dot product as the kernel does (a chain of
#: FMAs in order of the column): with MKL every byte must match. Another BLAS may sum in another order, and a
#: last-bit difference can flip a code that sits on a rounding boundary; there only rare codes may differ.
EXACT = torch.backends.mkl.is_available()


def edge_weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """weights() with the rows that take MLX's special branches: all-zero rows and groups, a constant row (the
    scale clamped to EPS, then re-derived from the edge), a range far below EPS, huge values and an outlier."""
    w = weights(rows, cols, seed).float()
    w[3] = 0.0
    w[5] = 0.5
    w[7] *= 1e-9
    w[9, :64] = 0.0
    w[11] *= 1e4
    w[13, 100] = -3.0
    return w.to(torch.bfloat16)


def assert_same_rounding(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...], group: int) -> None:
    """Codes, scales and biases byte for byte (EXACT), else fewer than 0.1% of codes differ and the dequantized
    weights stay as close to each other as two block sizes' results do."""
    if EXACT:
        for a, b in zip(got, want, strict=True):
            assert a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return
    assert (got[0] != want[0]).float().mean() < 1e-3
    deq, ref = dequantize_codes(*got, group).float(), dequantize_codes(*want, group).float()
    assert (deq - ref).norm() < 0.05 * ref.norm()


@pytest.mark.parametrize("block", [128, 64])
@pytest.mark.parametrize("data", ["random", "edge"])
@pytest.mark.parametrize(
    "opt",
    [Option(2, 64), Option(3, 32), Option(4, 64), Option(4, 128), Option(8, 32), Option(8, 128)],
    ids=str,
)
def test_kernel_equals_the_torch_column_loop(opt: Option, data: str, block: int) -> None:
    # 203 rows: a whole row block, then a partial one with a partial tile of panels and a partial panel (lanes
    # past the last row).
    w = (weights if data == "random" else edge_weights)(203, 384, opt.bits + opt.group)
    h = tokens(1024, 384, 6).double()
    h = h.T @ h
    if data == "edge":
        h[7], h[:, 7] = 0.0, 0.0  # an input that never fired
    got = gptq_codes(w, h, opt, damp=0.1, block=block)
    assert_same_rounding(got, reference_gptq_codes(w, h, opt, damp=0.1, block=block), opt.group)


def test_kernel_carries_column_counts_that_are_not_whole_tiles() -> None:
    """The product takes 4 columns at a time; a group of 10 leaves 2 over after each block (not an MLX group,
    but the kernel must not depend on one)."""
    opt, w = Option(3, 10), weights(20, 60, 2)
    h = tokens(512, 60, 1).double()
    h = h.T @ h
    for block in (10, 20):
        got = gptq_codes(w, h, opt, damp=0.1, block=block)
        assert_same_rounding(got, reference_gptq_codes(w, h, opt, damp=0.1, block=block), opt.group)


def test_result_does_not_depend_on_threads_or_row_split() -> None:
    """Byte-identical builds whatever the thread count: rows go through the kernel in blocks split between the
    threads, and each row's arithmetic is the same in any block, lane or thread."""
    opt, w = Option(4, 64), weights(1000, 256, 11)
    h = tokens(2048, 256, 5).double()
    h = h.T @ h
    saved = numba.get_num_threads(), torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            torch.set_num_threads(threads)
            runs.append(gptq_codes(w, h, opt, damp=0.1))
    finally:
        numba.set_num_threads(saved[0])
        torch.set_num_threads(saved[1])
    parts = [gptq_codes(w[a:b], h, opt, damp=0.1) for a, b in ((0, 333), (333, 340), (340, 1000))]
    joined = tuple(torch.cat(p) for p in zip(*parts, strict=True))
    for other in (runs[1], joined):
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.e2e
def test_rounding_gain_is_unchanged_by_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    opts, w = [Option(4, 64), Option(2, 32), Option(8, 64)], weights(300, 256, 8)
    fit, held = (x.double().T @ x.double() for x in (tokens(1024, 256, 3), tokens(1024, 256, 4)))
    gains = rounding_gain(w, fit, held, opts, damp=0.1, block=128, rows=200)
    monkeypatch.setattr(gptq, "gptq_codes", reference_gptq_codes)
    want = rounding_gain(w, fit, held, opts, damp=0.1, block=128, rows=200)
    assert gains == (want if EXACT else pytest.approx(want, rel=1e-2))


def test_gptq_refuses_partial_groups() -> None:
    with pytest.raises(MintError, match="whole groups of 128 in 192 columns"):
        gptq_codes(weights(8, 192, 0), torch.eye(192), Option(4, 128), 0.1)


# ---------------------------------------------------------------- the importance stage's head Hessian

TINY = ImportanceConfig(n_windows=1, window=64, seed=0, threads=1, hessian_windows=3)


@pytest.mark.e2e
def test_input_hessians_are_xtx_of_every_linear_input(tmp_path: Path, corpus_dir: Path) -> None:
    """Every linear layer's H (and the head's) is X^T X of its inputs in the whole unstreamed model, layers that
    read one tensor share one stored H, the even-window half GPTQ's gain is fitted on is the even windows' sum,
    and the stage writes it all byte-identically on a rerun."""
    from safetensors.torch import save

    from mintbuild.artifacts.importance import SCHEMA_VERSION
    from mintbuild.calibration.hessians import HessianStore, InputHessians, measure
    from mintbuild.calibration.windows import calibration_windows
    from mintbuild.hf.streaming import CheckpointSource, StreamedModel
    from tests.synth import tiny_llama
    from tests.test_importance import whole_model_hessians

    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")[:200_000]
    model_dir = tiny_llama(tmp_path / "model", text)
    record, kept, gains = compute_hessians(model_dir, corpus_dir, TINY, PackConfig(), progress=False)
    head = "model.embed_tokens.weight"  # tied: the head is the embedding
    assert record["tokens"] == 3 * 64 and len(record["windows"]) == 3 and record["head"] == head
    _, windows, _ = calibration_windows(model_dir, corpus_dir, 3, 64, 0)
    per_window = [whole_model_hessians(model_dir, [w]) for w in windows]
    oracle = {n: sum(p[n] for p in per_window) for n in per_window[0]}
    assert set(record["tensors"]) == set(oracle) == set(gains)  # 2 blocks x 7 linears + the head
    for n, t in record["tensors"].items():
        torch.testing.assert_close(kept[t["key"]].double(), oracle[n], rtol=1e-5, atol=1e-4, msg=n)
    key = {
        n.removeprefix("model.layers.0.").removesuffix(".weight"): t["key"]
        for n, t in record["tensors"].items()
    }
    assert key["self_attn.q_proj"] == key["self_attn.k_proj"] == key["self_attn.v_proj"]
    assert key["mlp.gate_proj"] == key["mlp.up_proj"] and len(kept) == 2 * 4 + 1
    halves: dict[str, torch.Tensor] = {}
    hs = InputHessians(set(oracle), lambda names, even, _held: halves.update(dict.fromkeys(names, even)))
    measure(StreamedModel(CheckpointSource(model_dir), torch.float32, head=False), windows, hs, True, False)
    for n in oracle:
        even = per_window[0][n] + per_window[2][n]
        torch.testing.assert_close(halves[n], even, rtol=1e-5, atol=1e-4, msg=n)
    # The stage writes them next to importance.json, byte-identical on a rerun, with its sha256 recorded.
    a = run(model_dir, corpus_dir, TINY, tmp_path / "a", False)
    b = run(model_dir, corpus_dir, TINY, tmp_path / "b", False)
    assert (tmp_path / "a" / HESSIAN_FILE).read_bytes() == (tmp_path / "b" / HESSIAN_FILE).read_bytes()
    # The stage keeps them on disk until it writes the file one tensor at a time: the bytes are save_file's of
    # the in-memory Hessians, and neither the spill nor a temporary folder is left behind.
    meta = {"schema_version": str(SCHEMA_VERSION)}
    assert (tmp_path / "a" / HESSIAN_FILE).read_bytes() == save(dict(kept), metadata=meta)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "hessian.safetensors",
        "imatrix.safetensors",
        "importance.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    spilled = HessianStore(tmp_path / "spill")
    for k, h in kept.items():
        spilled.put(k, h.double())
    assert len(list((tmp_path / "spill").iterdir())) == len(kept) and not spilled._memory
    assert all(torch.equal(spilled[k], kept[k]) for k in kept)
    assert_train_only({"provenance": a["provenance"], "windows": a["hessian"]["windows"]}, corpus_dir)
    assert a["hessian"] == b["hessian"] and a["rounding_gain"] == b["rounding_gain"]
    loaded = load_hessians(tmp_path / "a", a["provenance"]["model_fingerprint"])
    assert set(loaded.full) == set(oracle)
    assert (
        loaded.full["model.layers.1.self_attn.k_proj.weight"]
        is loaded.full["model.layers.1.self_attn.q_proj.weight"]
    )
    # read by rows from the file (nothing mapped): the values safetensors itself reads, row blocks and diagonal too
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "a" / HESSIAN_FILE))
    for n, t in a["hessian"]["tensors"].items():
        h, want = loaded.full[n], stored[t["key"]]
        assert torch.equal(h.load(), want) and torch.equal(h[1:3], want[1:3]), n
        assert torch.equal(h[torch.tensor([2, 0])], want[[2, 0]]), n
        assert torch.equal(h.diagonal(), torch.diagonal(want).double()), n
    only_head = run(model_dir, corpus_dir, replace(TINY, hessians="head"), tmp_path / "h", False)
    assert list(only_head["hessian"]["tensors"]) == [head] == list(only_head["rounding_gain"]["tensors"])
    cfg = ImportanceConfig(n_windows=1, window=64, hessian_windows=0)
    none = run(model_dir, corpus_dir, cfg, tmp_path / "c", False)
    assert "hessian" not in none and not (tmp_path / "c" / HESSIAN_FILE).exists()


# ---------------------------------------------------------------- the packer on the real model


@pytest.fixture(scope="module")
def gptq_build(
    tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path, corpus_dir: Path
) -> dict[str, Any]:
    """real_build's allocations packed again with GPTQ, from a head Hessian of 8 x 256 train tokens (the head
    only: test_families packs every family with every linear layer's)."""
    build = real_build(tmp_path_factory, smollm2_dir)
    root = tmp_path_factory.mktemp("gptq")
    cfg = ImportanceConfig(n_windows=1, window=256, hessian_windows=8, hessians="head")
    run(smollm2_dir, corpus_dir, cfg, root / "importance", progress=False)
    params = build["params"]
    params.importance.out = str(root / "importance")
    params.pack.rounding = "gptq"
    try:
        res = pack_target(params, "lo", out_root=root / "pack", progress=False, cache_dir=root / "cache")
        again = pack_target(params, "lo", out_root=root / "again", progress=False, cache_dir=root / "cache2")
    finally:
        params.pack.rounding = "rtn"
    return {"rtn": build["results"]["lo"].out, "root": build["root"], "gptq": res.out, "again": again.out, "hessian": root / "importance" / HESSIAN_FILE,
            "params": params}  # fmt: skip


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS_FILE))


@pytest.mark.e2e
def test_pack_rounds_only_the_head_by_gptq(gptq_build: dict[str, Any]) -> None:
    rtn, gptq = _tensors(gptq_build["rtn"]), _tensors(gptq_build["gptq"])
    assert rtn.keys() == gptq.keys()
    differ = sorted(k for k in rtn if not torch.equal(rtn[k], gptq[k]))
    assert differ and all(k.startswith("model.embed_tokens.") for k in differ), differ
    manifest = json.loads((gptq_build["gptq"] / MANIFEST_FILE).read_text())
    assert manifest["rounding"]["method"] == "gptq"
    assert manifest["rounding"]["gptq_tensors"] == ["model.embed_tokens.weight"]
    gptq_file = gptq_build["gptq"] / WEIGHTS_FILE
    assert gptq_file.stat().st_size == (gptq_build["rtn"] / WEIGHTS_FILE).stat().st_size
    # Deterministic: a second pack with an empty cache writes the same bytes.
    assert gptq_file.read_bytes() == (gptq_build["again"] / WEIGHTS_FILE).read_bytes()


@pytest.mark.e2e
def test_gptq_head_has_less_output_error_on_test_tokens(gptq_build: dict[str, Any], corpus_dir: Path) -> None:
    """The head's output error on hidden states of the *test* split (never calibrated on), GPTQ vs RTN."""
    from mintbuild.calibration.windows import load_tokenizer

    from .synth import load_model

    model_dir = Path(gptq_build["params"].equalize.out)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    ids = tok((corpus_dir / "test.txt").read_text(encoding="utf-8")[:20_000])["input_ids"][:1024]
    with torch.inference_mode():
        x = model(input_ids=torch.tensor(ids)[None], output_hidden_states=True).hidden_states[-1][0].double()
    h = x.T @ x
    w = model.model.embed_tokens.weight.detach()
    errs = {}
    for kind in ("rtn", "gptq"):
        state = dequantized_state(gptq_build[kind], read_config(gptq_build[kind]))
        errs[kind] = output_error(w.to(torch.bfloat16), state["model.embed_tokens.weight"], h)
    # Measured: 0.40 of round-to-nearest's output error (1,024 test tokens; Hessian from 8 x 256 train tokens).
    assert errs["gptq"] < 0.6 * errs["rtn"], errs


@pytest.mark.e2e
def test_pack_refuses_missing_or_foreign_hessian(gptq_build: dict[str, Any], tmp_path: Path) -> None:
    params = gptq_build["params"]
    saved = params.importance.out
    params.pack.rounding = "gptq"
    try:
        params.importance.out = str(tmp_path / "nothing")
        with pytest.raises(MintError, match="no importance artifact"):
            pack_target(params, "lo", out_root=tmp_path / "pack", progress=False)
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        doc = json.loads((Path(saved) / "importance.json").read_text())
        doc["provenance"]["model_fingerprint"] = "0" * 32
        (foreign / "importance.json").write_text(json.dumps(doc))
        (foreign / HESSIAN_FILE).write_bytes(gptq_build["hessian"].read_bytes())
        params.importance.out = str(foreign)
        with pytest.raises(MintError, match="measured on another model"):
            pack_target(params, "lo", out_root=tmp_path / "pack", progress=False)
        doc.pop("hessian")
        (foreign / "importance.json").write_text(json.dumps(doc))
        with pytest.raises(MintError, match="no input Hessians"):
            pack_target(params, "lo", out_root=tmp_path / "pack", progress=False)
        shutil.copy(Path(saved) / "importance.json", foreign / "importance.json")
        (foreign / HESSIAN_FILE).write_bytes(b"not a hessian")
        with pytest.raises(MintError, match=r"not the file importance\.json recorded"):
            pack_target(params, "lo", out_root=tmp_path / "pack", progress=False)
        params.pack.rounding = "nearest"
        with pytest.raises(MintError, match="choose gptq or rtn"):
            pack_target(params, "lo", out_root=tmp_path / "pack", progress=False)
    finally:
        params.importance.out, params.pack.rounding = saved, "rtn"
    assert not (tmp_path / "pack").exists()


@pytest.mark.e2e
def test_fisher_allocation_prices_the_head_as_packed(gptq_build: dict[str, Any], tmp_path: Path) -> None:
    """With pack.rounding gptq, the fisher cost of the head is its round-to-nearest cost x the held-out GPTQ
    gain of each option; every other cost is unchanged, and the allocation stays within budget and optimal."""
    from dataclasses import replace

    from mintbuild.artifacts.profile import load_profile
    from mintbuild.knapsack import build_problem, load_importance, rounding_gains
    from mintbuild.solve import solve_mckp
    from mintbuild.stages.allocate import run as allocate_run

    base = gptq_build["params"]
    importance = Path(base.importance.out) / "importance.json"
    params = replace(base, pack=replace(base.pack, rounding="gptq"),
                     solver=replace(base.solver, objective="fisher", importance=str(importance)))  # fmt: skip
    profile = load_profile(gptq_build["root"] / "profile")
    gains = rounding_gains(params, profile)
    head = "model.embed_tokens.weight"
    # Measured: 0.45-0.62 per option (fitted on 4 windows of 256 tokens, measured on the other 4).
    assert list(gains) == [head] and all(0.2 < r < 0.8 for r in gains[head].values()), gains
    alpha = load_importance(importance, profile)
    priced, plain = (
        build_problem(profile, params.solver, alpha, gains),
        build_problem(profile, params.solver, alpha),
    )
    j = [d["name"] for d in priced.decisions].index(head)
    factor = np.array([gains[head].get(o.name, 1.0) for o in priced.options])
    np.testing.assert_allclose(priced.costs[j], plain.costs[j] * factor, rtol=1e-12)
    others = np.arange(len(priced.decisions)) != j
    assert np.array_equal(priced.costs[others], plain.costs[others])
    doc = allocate_run(params, ["lo"], gptq_build["root"] / "profile", tmp_path, Path(base.equalize.out))[
        "lo"
    ]
    tot = doc["totals"]
    assert tot["bytes"] <= tot["budget"] and tot["optimal"]
    dp = solve_mckp(priced.sizes, priced.costs, tot["budget"] - priced.header_bytes, method="dp")
    assert tot["objective"] == pytest.approx(dp.objective, rel=1e-9)
    assert (
        next(d for d in doc["decisions"] if d["name"] == head)["rounding_gain"].keys() == gains[head].keys()
    )


@pytest.mark.e2e
def test_where_gptq_overfits_pack_rounds_to_nearest_and_prices_it(
    gptq_build: dict[str, Any], tmp_path: Path
) -> None:
    """An option whose held-out gain is not below 1 (GPTQ fitted the calibration windows but does worse on the
    others) is packed to nearest and priced at round-to-nearest's cost: with every head option's gain set to
    1.25 the pack is byte-identical to the round-to-nearest pack, and the knapsack equals the unpriced one."""
    from mintbuild.artifacts.profile import load_profile
    from mintbuild.knapsack import build_problem, load_importance, rounding_gains

    base = gptq_build["params"]
    folder = tmp_path / "importance"
    shutil.copytree(base.importance.out, folder)
    doc = json.loads((folder / "importance.json").read_text())
    head = "model.embed_tokens.weight"
    measured = doc["rounding_gain"]["tensors"][head]
    doc["rounding_gain"]["tensors"][head] = {o: 1.25 for o in measured}
    (folder / "importance.json").write_text(json.dumps(doc))
    params = replace(
        base, pack=replace(base.pack, rounding="gptq"), importance=replace(base.importance, out=str(folder))
    )
    out = pack_target(
        params, "lo", out_root=tmp_path / "pack", progress=False, cache_dir=tmp_path / "cache"
    ).out
    assert (out / WEIGHTS_FILE).read_bytes() == (gptq_build["rtn"] / WEIGHTS_FILE).read_bytes()
    rounding = json.loads((out / MANIFEST_FILE).read_text())["rounding"]
    assert rounding["rtn_where_gptq_overfits"] == {head: sorted(measured)}
    profile = load_profile(gptq_build["root"] / "profile")
    alpha = load_importance(folder / "importance.json", profile)
    fisher = replace(base.solver, objective="fisher", importance=str(folder / "importance.json"))
    priced = build_problem(profile, fisher, alpha, rounding_gains(params, profile))
    np.testing.assert_array_equal(priced.costs, build_problem(profile, fisher, alpha).costs)
    # ... while the measured gains (all below 1 here) do lower them.
    assert all(r < 1 for r in measured.values()), measured
    lowered = build_problem(profile, fisher, alpha, {head: measured}).costs
    assert not np.array_equal(lowered, priced.costs)


@pytest.mark.e2e
def test_gain_rows_and_gain_veto_reach_every_gain(tmp_path: Path, corpus_dir: Path) -> None:
    """importance.gain_rows: 0 measures every row (the same gains as a sample as large as the widest tensor), a
    small sample other gains; importance.gain_veto_sqnr_db measures exactly the options the veto leaves (the
    others 1.0) and gives the unvetoed run's gains for those."""
    from mintbuild.calibration.hessians import pickable_options
    from mintbuild.formats import parse_option
    from mintbuild.hf.checkpoint import open_checkpoint
    from tests.synth import tiny_llama

    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")[:200_000]
    model_dir = tiny_llama(tmp_path / "model", text)
    ckpt = open_checkpoint(model_dir)
    widest = max(t.shape[0] for t in ckpt.tensors.values())

    def gains(**kw: Any) -> dict[str, dict[str, float]]:
        return compute_hessians(model_dir, corpus_dir, replace(TINY, **kw), PackConfig(), False, None)[2]

    every = gains(gain_rows=0)
    assert every == gains(gain_rows=widest)
    assert every != gains(gain_rows=8)  # a sample of 8 rows is another estimate
    veto = 16.0
    sampled = gains()  # the default sample
    picked = gains(gain_veto_sqnr_db=veto)
    skipped = 0
    for n, by_option in picked.items():
        options = [parse_option(k) for k in by_option]
        kept = {o.name for o in pickable_options(ckpt.read(n), options, veto)}
        for name, g in by_option.items():
            assert g == (sampled[n][name] if name in kept else 1.0), (n, name)
        skipped += len(by_option) - len(kept)
    assert 0 < skipped < sum(map(len, picked.values())), skipped  # some options skipped, not all
