"""The family matrix: a tiny random-weight checkpoint of every supported family (transformers config classes, no
hub) runs the whole default pipeline (local model -> equalize -> profile -> importance -> allocate -> pack ->
evaluate); equalization is exact at 16 bits; the packed folder loads in mlx-lm, which runs exactly the weights
our evaluator dequantizes and agrees with its logits."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.config import EqualizeConfig, EvalConfig, ImportanceConfig, Params, TargetConfig
from mintbuild.stages import allocate, equalize, evaluate, importance, model, pack, profile

from .synth import FAMILIES, tiny_family

pytestmark = pytest.mark.e2e

#: Families whose tokenizer adds BOS in the tests (Gemma's and Llama's real ones do; Qwen's do not).
BOS = {"llama", "gemma2", "gemma3_text", "mistral"}
PROMPT = list(range(5, 45))


def _params(root: Path, model_dir: Path, corpus_dir: Path) -> Params:
    p = Params(targets={"t": TargetConfig(bits_per_weight=5.0)})
    p.model.source, p.model.path, p.model.out = "local", str(model_dir), str(root / "model")
    p.corpus.out = str(corpus_dir)
    p.equalize = EqualizeConfig(n_windows=2, window=64, samples=128, rank=16, grid=4, out=str(root / "eq"))
    p.profile.out = str(root / "profile")
    # 3 Hessian windows: 64 held-out tokens, fewer than the widest inputs (both held-out paths of the gains run)
    p.importance = ImportanceConfig(n_windows=2, window=64, hessian_windows=3, out=str(root / "imp"))
    p.solver.importance = str(root / "imp" / "importance.json")
    p.eval = EvalConfig(window=64, n_windows=2)
    p.allocate_out, p.pack_out, p.eval_out = str(root / "alloc"), str(root / "pack"), str(root / "eval")
    return p


def build(family: str, root: Path, corpus_dir: Path) -> dict[str, Any]:
    text = (corpus_dir / "train.txt").read_text(encoding="utf-8")[:60_000]
    src = tiny_family(root / "src", family, text, bos=family in BOS)
    p = _params(root, src, corpus_dir)
    model.import_model(p.model, Path(p.model.out))
    record = equalize.run(
        resolve_weights_dir(Path(p.model.out)), corpus_dir, p.equalize, Path(p.equalize.out), False
    )
    weights = resolve_weights_dir(Path(p.equalize.out))
    profile.run(weights, p.profile, Path(p.profile.out), progress=False)
    importance.run(weights, corpus_dir, p.importance, Path(p.importance.out), False, p.pack)
    alloc = allocate.run(p, None, Path(p.profile.out), Path(p.allocate_out), weights)["t"]
    packed = pack.pack_target(p, "t", progress=False, cache_dir=root / "cache")
    evaluate.run_baseline(p, progress=False)
    metrics = evaluate.run_target(p, "t", progress=False)
    return {
        "src": src,
        "params": p,
        "record": record,
        "alloc": alloc,
        "folder": packed.out,
        "metrics": metrics,
    }


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def built(request, corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    family = request.param
    return family, build(family, tmp_path_factory.mktemp(family), corpus_dir)


def _logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        return m(input_ids=torch.tensor([ids])).logits[0].numpy()


def test_the_default_pipeline_builds_and_equalizes_exactly(built: tuple[str, dict[str, Any]]) -> None:
    family, b = built
    rec = b["record"]
    groups = rec.get("groups", [])
    # Every family has its attention equalized; MoE MLPs are skipped with the reason recorded.
    assert {g["group"] for g in groups} >= {"qkv", "o"}, rec.get("skipped")
    if family.endswith("_moe"):
        assert any("MoE" in s["reason"] for s in rec["skipped"])
    else:
        assert {g["group"] for g in groups} == {"qkv", "o", "gate_up", "down"}
    if family.startswith("gemma"):
        assert all(g.get("fold_kind") == "offset" for g in groups if g["group"] in ("qkv", "gate_up"))
    # Exact: the 16-bit equalized model computes bit for bit what the original does.
    eq = resolve_weights_dir(Path(b["params"].equalize.out))
    assert np.array_equal(_logits(b["src"], PROMPT), _logits(eq, PROMPT)), family
    t = b["alloc"]["totals"]
    assert t["bytes"] <= t["budget"] and t["optimal"]
    assert np.isfinite(b["metrics"]["ppl_mean"])


def test_every_linear_layer_is_rounded_by_gptq(built: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    """The default rounds every quantized linear layer (fused, expert and router ones included) by GPTQ against
    its own input Hessian, unless GPTQ's held-out gain at its option is not below 1: against a round-to-nearest
    pack of the same allocation, the codes of (almost) every other one of them differ, and nothing else does."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from mintbuild.artifacts.importance import load_importance
    from mintbuild.mlx.folder import WEIGHTS_FILE
    from mintbuild.rounding import gptq_helps

    family, b = built
    p = b["params"]
    rtn = replace(p, pack=replace(p.pack, rounding="rtn"), pack_out=str(tmp_path / "rtn"))
    folder = pack.pack_target(rtn, "t", progress=False, cache_dir=tmp_path / "cache").out
    a, r = load_file(str(b["folder"] / WEIGHTS_FILE)), load_file(str(folder / WEIGHTS_FILE))
    doc = load_importance(Path(p.importance.out))
    hessians, gains = doc["hessian"]["tensors"], doc["rounding_gain"]["tensors"]
    decisions = [d for d in b["alloc"]["decisions"] if d["bits"] != 16]
    quantized = {d["name"] for d in decisions}
    # Where GPTQ's held-out gain at the chosen option is not below 1, pack rounds to nearest.
    overfit = {d["name"] for d in decisions if not gptq_helps(gains.get(d["name"], {}).get(d["option"], 0.0))}
    differ = {k.removesuffix(".weight") for k in a if k.endswith(".weight") and not torch.equal(a[k], r[k])}
    want = {n.removesuffix(".weight") for n in (quantized & set(hessians)) - overfit}
    assert differ <= want, sorted(differ - want)
    assert len(differ) >= 0.9 * len(want), (family, len(differ), len(want), len(overfit))
    # Not linear layers, so rounded to nearest: an untied input embedding, a MoE's stacked experts and router.
    linear = {n for n in quantized if not re.search(r"embed_tokens|\.experts\.|mlp\.gate\.weight$", n)}
    assert linear <= set(hessians), sorted(linear - set(hessians))


def test_mlx_lm_runs_the_weights_we_evaluate(built: tuple[str, dict[str, Any]]) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    from mintbuild.artifacts.pack import read_config
    from mintbuild.hf.evaluator import window_logits
    from mintbuild.mlx.folder import dequantized_state
    from mintbuild.mlx.source import load_packed

    family, b = built
    folder = b["folder"]
    mlx_model, _ = load(str(folder))
    state = dequantized_state(folder, read_config(folder))
    n = 0
    for path, mod in mlx_model.named_modules():
        if isinstance(mod, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = mx.dequantize(mod.weight, mod.scales, mod.biases, group_size=mod.group_size, bits=mod.bits)
            assert np.array_equal(np.array(w.astype(mx.float32)), state[f"{path}.weight"].float().numpy()), (
                path
            )
            n += 1
    assert n >= 8, family
    ours = window_logits(load_packed(folder)[0], PROMPT).numpy()
    dense = dequantize_model(mlx_model)
    dense.set_dtype(mx.float32)  # MLX's CPU gather matmul (MoE experts) runs float32 only
    dense = np.array(dense(mx.array(PROMPT)[None]).astype(mx.float32))[0]
    # Same weights, dense float32 layers: what is left is the two frameworks' arithmetic order.
    rel = np.sqrt(np.mean((dense - ours) ** 2)) / np.sqrt(np.mean(ours**2))
    assert rel < 0.05, (family, rel)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_passes_validation_and_a_missing_tensor_is_named(family: str, tmp_path: Path) -> None:
    """The checkpoint check accepts each family as transformers saves it (MoE experts per expert, tied heads
    left out) and names the file, the tensor and its expected shape when one tensor is gone."""
    from safetensors.torch import load_file, save_file

    from mintbuild.errors import MintError
    from mintbuild.hf.validate import validate_checkpoint

    src = tiny_family(tmp_path / "src", family, "the model fits the budget of every device " * 200)
    validate_checkpoint(src)
    path = src / "model.safetensors"
    tensors = dict(load_file(path))
    victim = sorted(n for n in tensors if n.startswith("model.layers.1."))[-1]
    shape = list(tensors.pop(victim).shape)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(
        MintError,
        match=rf"src/config\.json: tensor {re.escape(victim)} \(shape {re.escape(str(shape))}\) is missing",
    ):
        validate_checkpoint(src)
