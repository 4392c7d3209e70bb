"""The importance stage: deterministic alpha, calibration text disjoint from the evaluation text, alpha that
tracks loss sensitivity (tiny random Llama), and the real model on a small setting."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mintbuild.artifacts.importance import FILENAME, load_importance
from mintbuild.calibration.fisher import _g2, _head_g2, compute_importance, fisher_pass
from mintbuild.calibration.hessians import InputHessians, measure
from mintbuild.calibration.windows import choose_windows, load_tokenizer
from mintbuild.cli import main as cli_main
from mintbuild.config import ImportanceConfig
from mintbuild.errors import MintError
from mintbuild.hf.checkpoint import PASSTHROUGH_ROLES, compile_rules, open_checkpoint, tensor_role
from mintbuild.hf.streaming import CheckpointSource, StreamedModel
from mintbuild.io import canonical_json
from mintbuild.stages.importance import run
from tests.synth import tiny_llama

TINY = ImportanceConfig(n_windows=3, window=64, seed=0, threads=1)
#: Streamed and whole-model Fisher / Hessian agree to float rounding (the same kernels on the same values;
#: measured bitwise equal on SmolLM2 and the tiny model with one thread).
STREAM_RTOL = 1e-4


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_model(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random-init Llama (tied embeddings) with a small BPE tokenizer trained on the train split."""
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")[:200_000]
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "model", text)


def quantizable(model_dir: Path) -> list[str]:
    ckpt, rules = open_checkpoint(model_dir), compile_rules()
    return [
        n
        for n in ckpt.names
        if len(ckpt.tensors[n].shape) >= 2
        and tensor_role(n, len(ckpt.tensors[n].shape), rules) not in PASSTHROUGH_ROLES
    ]


def assert_train_only(result: dict, corpus_dir: Path) -> None:
    """Every window is a character range of train.txt, windows are disjoint, and no window's text occurs in
    the evaluation split."""
    train = (corpus_dir / "train.txt").read_text(encoding="utf-8")
    test = (corpus_dir / "test.txt").read_text(encoding="utf-8")
    assert result["provenance"]["corpus_split"] == "train"
    spans = sorted((w["char_start"], w["char_end"]) for w in result["windows"])
    for (_, e), (s2, _) in itertools.pairwise(spans):
        assert e <= s2
    for s, e in spans:
        assert 0 <= s < e <= len(train)
        assert train[s:e] not in test


# ---------------------------------------------------------------- tiny model


@pytest.mark.e2e
def test_alpha_is_deterministic(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    a = run(tiny_model, corpus_dir, TINY, tmp_path / "a", progress=False)
    b = run(tiny_model, corpus_dir, TINY, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / FILENAME).read_bytes() == (tmp_path / "b" / FILENAME).read_bytes()
    assert canonical_json(a) == canonical_json(b)
    assert load_importance(tmp_path / "a")["alpha"] == a["alpha"]
    other = compute_importance(
        tiny_model, corpus_dir, ImportanceConfig(n_windows=3, window=64, seed=1, threads=1), False
    )
    assert other["windows"] != a["windows"]
    # Every checkpoint tensor has an alpha; the tied lm_head is recorded under the embedding.
    assert set(a["alpha"]) == set(open_checkpoint(tiny_model).names)
    assert a["tied"] == {"lm_head.weight": "model.embed_tokens.weight"} and not a["estimated"]
    assert a["provenance"]["tokens"] == 3 * 64 and a["provenance"]["windows"] == 3
    assert_train_only(a, corpus_dir)


def _loss(model: torch.nn.Module, windows: list[list[int]]) -> float:
    with torch.no_grad():
        return sum(
            float(model(input_ids=torch.tensor(ids)[None], labels=torch.tensor(ids)[None]).loss)
            for ids in windows
        ) / len(windows)


@pytest.mark.e2e
def test_alpha_tracks_loss_sensitivity(tiny_model: Path, corpus_dir: Path) -> None:
    """The same relative noise on each tensor moves the loss by ~|g.delta| ~ sqrt(alpha * SSE): the measured
    loss change ranks the tensors as alpha*SSE does."""
    from scipy.stats import spearmanr
    from transformers import AutoModelForCausalLM

    from mintbuild.calibration.windows import read_train_text

    res = compute_importance(tiny_model, corpus_dir, TINY, progress=False)
    text, _ = read_train_text(corpus_dir)
    windows = [w.ids for w in choose_windows(text, load_tokenizer(tiny_model), 3, 64, 0)]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    base = _loss(model, windows)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    predicted, measured = [], []
    for name in quantizable(tiny_model):
        w = params[name]
        deltas = []
        for _ in range(4):
            noise = torch.randn(w.shape, generator=g) * 0.05 * w.detach().pow(2).mean().sqrt()
            with torch.no_grad():
                w.add_(noise)
            deltas.append(abs(_loss(model, windows) - base))
            with torch.no_grad():
                w.sub_(noise)
        sse = float((0.05**2) * w.detach().pow(2).sum())
        predicted.append(res["alpha"][name] * sse)
        measured.append(float(np.mean(deltas)))
    rho = spearmanr(predicted, measured).statistic
    assert rho > 0.8, (rho, predicted, measured)


def test_scaling_down_a_path_lowers_its_alpha(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    """o_proj scaled by c scales the gradient reaching layer 0's v_proj by c (alpha by c^2): v_proj then
    matters less to the loss, and its alpha falls accordingly, while o_proj's own input is unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.mul_(0.01)
    scaled = tmp_path / "scaled"
    model.save_pretrained(scaled)
    AutoTokenizer.from_pretrained(str(tiny_model)).save_pretrained(scaled)
    a = compute_importance(tiny_model, corpus_dir, TINY, progress=False)["alpha"]
    b = compute_importance(scaled, corpus_dir, TINY, progress=False)["alpha"]
    v = "model.layers.0.self_attn.v_proj.weight"
    assert b[v] < 1e-3 * a[v]
    assert b["model.layers.1.self_attn.v_proj.weight"] > 1e-2 * a["model.layers.1.self_attn.v_proj.weight"]


# ---------------------------------------------------------------- streamed == whole model


def whole_model_fisher(model_dir: Path, windows: list) -> tuple[dict[str, list[float]], list[float]]:
    """The oracle: the whole fp32 model, one backward pass per window (the stage's previous implementation)."""
    from .synth import load_model

    model = load_model(model_dir)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per: dict[str, list[float]] = {n: [] for n, _ in params}
    losses = []
    for w in windows:
        x = torch.tensor(w.ids)[None]
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        losses.append(float(loss.detach()))
        for n, p in params:
            per[n].append(float(p.grad.double().square().mean()) if p.grad is not None else 0.0)
    return per, losses


def whole_model_hessians(model_dir: Path, windows: list) -> dict[str, torch.Tensor]:
    """{weight name: sum over the windows' tokens of x x^T (float64)} of every nn.Linear's input x (the head's
    under the embedding's name when tied), from the whole unstreamed model."""
    from .synth import load_model

    model = load_model(model_dir)
    names = {id(p): n for n, p in model.named_parameters()}  # the tied head's weight is the embedding's
    acc: dict[str, torch.Tensor] = {}

    def hook(m: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        n = names[id(m.weight)]
        acc[n] = acc.get(n, 0) + x.T @ x

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode():
        for w in windows:
            model(input_ids=torch.tensor(w.ids)[None], use_cache=False)
    for h in handles:
        h.remove()
    return acc


def assert_streamed_equals_whole(model_dir: Path, corpus_dir: Path, n: int, length: int) -> None:
    from mintbuild.calibration.windows import calibration_windows, torch_settings

    _, windows, _ = calibration_windows(model_dir, corpus_dir, n, length, 0)
    with torch_settings(1, 0):
        streamed, losses = fisher_pass(
            StreamedModel(CheckpointSource(model_dir), torch.float32, grad=True), windows, False
        )
        whole, whole_losses = whole_model_fisher(model_dir, windows)
        hs = InputHessians(set(open_checkpoint(model_dir).names), lambda *_: None)
        measure(StreamedModel(CheckpointSource(model_dir), torch.float32), windows, hs, True, False)
        h_whole = whole_model_hessians(model_dir, windows)
    assert set(streamed) == set(whole)
    np.testing.assert_allclose(losses, whole_losses, rtol=STREAM_RTOL)
    for k in whole:
        np.testing.assert_allclose(streamed[k], whole[k], rtol=STREAM_RTOL, atol=0, err_msg=k)
    assert set(hs.key_of) == set(h_whole)
    for n, k in hs.key_of.items():
        h = hs.kept[k].double()
        assert float((h - h_whole[n]).abs().max()) <= STREAM_RTOL * float(h_whole[n].abs().max()), n


def test_streamed_fisher_and_hessian_equal_whole_model_tiny(tiny_model: Path, corpus_dir: Path) -> None:
    assert_streamed_equals_whole(tiny_model, corpus_dir, 3, 64)


def test_streamed_fisher_equals_whole_model_untied_bos(corpus_dir: Path, tmp_path: Path) -> None:
    """An untied head and BOS windows: the head's and the embedding's gradients are separate parameters."""
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")[:200_000]
    folder = tiny_llama(tmp_path / "untied", text, tie=False, bos=True)
    from mintbuild.calibration.windows import calibration_windows, torch_settings

    _, windows, _ = calibration_windows(folder, corpus_dir, 2, 48, 0)
    assert windows[0].ids[0] == 1  # <s>
    with torch_settings(1, 0):
        streamed, _ = fisher_pass(
            StreamedModel(CheckpointSource(folder), torch.float32, grad=True), windows, False
        )
        whole, _ = whole_model_fisher(folder, windows)
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(streamed)
    for k in whole:
        np.testing.assert_allclose(streamed[k], whole[k], rtol=STREAM_RTOL, err_msg=k)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("held_tokens", [0, 96])
@pytest.mark.parametrize("inference", [False, True], ids=["grad", "inference"])
def test_wide_input_hessians_by_row_blocks_are_the_whole_products(
    threads: int, held_tokens: int, inference: bool
) -> None:
    """An input wider than PRODUCT_ROWS (a 14,336-wide down_proj's, scaled down) accumulates x^T x a block of
    rows at a time, the lower block triangle only, mirrored at the end; what is kept (all windows), the even
    windows' H and the held-out tokens' H (all minus even) equal the sums of the whole products, bit for bit,
    on 1 and 2 threads. With fewer held-out tokens than inputs, the held-out tokens are their inputs instead.
    The windows may run in inference mode (the output head's pass does) and be finished outside it."""
    from mintbuild.calibration.hessians import PRODUCT_ROWS
    from mintbuild.mlx.gptq import HeldOutInputs

    k = PRODUCT_ROWS + PRODUCT_ROWS // 2 + 7  # one full block and a partial one
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 96, k, generator=gen) * torch.rand(k, generator=gen) for _ in range(3)]
    seen: dict[str, tuple[torch.Tensor, Any]] = {}
    hs = InputHessians({"w"}, lambda names, even, held: seen.update({names[0]: (even.clone(), held)}), None,
                       held_tokens)  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode(inference):
            for i, x in enumerate(xs):
                hs.window(i)
                hs.add("w", x)
        hs.finish()
        products = [(x[0].T @ x[0]).double() for x in xs]
    finally:
        torch.set_num_threads(before)
    even, held = seen["w"]
    full = products[0] + products[1] + products[2]
    assert torch.equal(hs.kept["w"], full.float())
    assert torch.equal(even, products[0] + products[2])
    if held_tokens:
        assert isinstance(held, HeldOutInputs) and torch.equal(held.x, xs[1][0])
    else:
        assert torch.equal(held, full - (products[0] + products[2]))


@pytest.mark.parametrize("hidden", [96, 100])
def test_head_gradient_by_row_blocks_equals_the_whole_gradient(hidden: int) -> None:
    """The head's weight gradient formed a block of vocabulary rows at a time (with the tied embedding's sparse
    rows, a repeated token among them) gives autograd's whole-gradient mean(grad^2): bit for bit when the
    blocks align with the sum's chunks (hidden 96: 8 blocks of 128 rows), to float rounding otherwise."""
    g = torch.Generator().manual_seed(0)
    vocab, tokens, chunk = 1000, 37, 4096
    x = torch.randn(1, tokens, hidden, generator=g)
    dy = torch.randn(1, tokens, vocab, generator=g)
    w = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g))
    rows = torch.tensor([[5, 999, 5, 130, 0]])
    d_emb = torch.randn(1, 5, hidden, generator=g)
    # the whole model's .grad: the dense head gradient, then the embedding's sparse one accumulated into it
    torch.nn.functional.linear(x, w).backward(dy)
    torch.nn.functional.embedding(rows, w, sparse=True).backward(d_emb)
    # the embedding's sparse gradient alone, as the streamed pass has it
    emb_only = torch.nn.Parameter(w.detach().clone())
    torch.nn.functional.embedding(rows, emb_only, sparse=True).backward(d_emb)
    whole = _g2(w, chunk)
    blocked = _head_g2(x[0], dy[0], emb_only.grad, chunk)
    if math.lcm(chunk, hidden) // hidden * hidden <= 16 * chunk:
        assert blocked == whole
    else:
        assert blocked == pytest.approx(whole, rel=1e-12)
    assert blocked != _head_g2(x[0], dy[0], None, chunk)  # the embedding's rows count


@pytest.mark.e2e
def test_streamed_fisher_and_hessian_equal_whole_model_smollm2(smollm2_dir: Path, corpus_dir: Path) -> None:
    assert_streamed_equals_whole(smollm2_dir, corpus_dir, 2, 64)


# ---------------------------------------------------------------- bad input


def test_bad_inputs(tiny_model: Path, corpus_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MintError, match="no calibration split") as e:
        compute_importance(tiny_model, empty, TINY, progress=False)
    assert "\n" not in str(e.value)
    short = tmp_path / "short"
    short.mkdir()
    (short / "train.txt").write_text("A short line.\nAnother one.\n", encoding="utf-8")
    with pytest.raises(MintError, match="fewer than one window of 64"):
        compute_importance(tiny_model, short, TINY, progress=False)
    with pytest.raises(MintError, match="no such file or folder"):
        compute_importance(tmp_path / "missing", corpus_dir, TINY, progress=False)
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes())
    with pytest.raises(MintError, match=r"no tokenizer|no config\.json"):
        compute_importance(weights_only, corpus_dir, TINY, progress=False)
    # The CLI turns it into one line and exit code 2.
    args = ["--params", str(tmp_path / "none.yaml"), "--model", str(tiny_model), "--corpus", str(empty)]
    rc = cli_main(["importance", *args, "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the real model


@pytest.mark.e2e
def test_windows_of_the_real_corpus_avoid_the_test_split(smollm2_dir: Path, corpus_dir: Path) -> None:
    from mintbuild.calibration.windows import read_train_text

    text, _ = read_train_text(corpus_dir)
    tok = load_tokenizer(smollm2_dir)
    windows = choose_windows(text, tok, 32, 512, 0)
    assert len(windows) == 32 and all(len(w.ids) == 512 for w in windows)
    fake = {"provenance": {"corpus_split": "train"}, "windows": [vars(w) for w in windows]}
    assert_train_only(fake, corpus_dir)
    # The recorded character range re-tokenises to the window's tokens.
    w = windows[0]
    assert tok(text[w.char_start : w.char_end], add_special_tokens=False)["input_ids"] == w.ids


@pytest.mark.e2e
def test_real_smollm2_small_calibration(smollm2_dir: Path, corpus_dir: Path, tmp_path: Path) -> None:
    from mintbuild.hf.checkpoint import fingerprint

    # One thread: on a busy 2-core machine two OpenMP threads spin-wait and run several times slower. The head's
    # Hessian only: every linear layer's Hessians and gains run on every family's checkpoint (test_families.py).
    cfg = ImportanceConfig(n_windows=2, window=128, seed=0, threads=1, hessian_windows=2, hessians="head")
    res = run(smollm2_dir, corpus_dir, cfg, tmp_path / "imp", progress=False)
    saved = json.loads((tmp_path / "imp" / FILENAME).read_text(encoding="utf-8"))
    assert saved == res
    q = quantizable(smollm2_dir)
    assert len(q) == 211 and len(res["alpha"]) == 272
    assert all(math.isfinite(res["alpha"][n]) and res["alpha"][n] > 0 for n in q)
    prov = res["provenance"]
    assert prov["model_fingerprint"] == fingerprint(open_checkpoint(smollm2_dir))
    meta = json.loads((corpus_dir / "meta.json").read_text(encoding="utf-8"))
    assert prov["corpus_train_sha256"] == meta["splits"]["train"]["sha256"]
    assert prov["tokens"] == 256 and res["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert {"attn_q", "attn_v", "mlp_down", "embedding"} <= set(res["summary"])
    assert_train_only(res, corpus_dir)
