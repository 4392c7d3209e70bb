"""benchmarks/quality.py's GGUF rows on a tiny convertible Llama (SmolLM2's tokenizer): llama.cpp's converter on
the original model, the real llama-quantize making the stock mixes with the build's imatrix and without, mintbuild
allocated at each stock file's bytes and packed, every file scored by our evaluator and by llama-perplexity."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from mintbuild.errors import MintError
from mintbuild.llamacpp.perplexity import TOLERANCE

from .dvcrepo import ROOT, make_repo, sh, tiny_params, write_text
from .gguf_synth import smollm2_tokenizer, tiny_convertible

sys.path.insert(0, str(ROOT / "benchmarks"))  # a folder of scripts, not a package
import quality_gguf


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC repo of a tiny model llama.cpp converts, built up to the GGUF profile (the benchmark's inputs)."""
    root = tmp_path_factory.mktemp("quality_gguf")
    text = write_text(root / "text.txt", docs=12, words=400)
    model = tiny_convertible(root / "model", smollm2_tokenizer(root / "tokenizer"))
    params = tiny_params(model, text, {"a": {"bits_per_weight": 8.0}})  # not built here
    params["convert"]["enabled"] = True
    # the GGUF rows under test: the cheapest MLX profile (the benchmark reads its parameter count), no GPTQ head
    params["profile"]["option_list"] = ["q8g64"]
    params["profile"]["gguf_option_list"] = ["Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
    params["importance"]["hessian_windows"] = 0
    params["pack"]["rounding"] = "rtn"
    repo = make_repo(root / "repo", params)
    sh(repo, "dvc", "repro", "profile", "importance", "convert", "profile_gguf")
    return repo


@pytest.mark.e2e
def test_quality_benchmark_gguf_rows(repo: Path) -> None:
    """Stock Q4_K_M with and without the imatrix, mintbuild at each file's bytes (never more), finite
    PPLs, llama-perplexity's within the module's tolerance of ours on its chunks, the goal figures computed."""
    script = ROOT / "benchmarks" / "quality.py"
    sh(repo, sys.executable, str(script), "--refs", "none", "--methods", "fisher", "--windows", "2",
       "--peers", "none", "--gguf", "Q4_K_M", "--out", "artifacts/quality_gguf")  # fmt: skip
    doc = json.loads((repo / "artifacts/quality_gguf/quality.json").read_text())
    rows = [r for r in doc["rows"] if r["format"] == "gguf"]
    stock = {r["label"]: r for r in rows if r["series"] in quality_gguf.STOCK_SERIES.values()}
    assert set(stock) == {"Q4_K_M + imatrix", "Q4_K_M"}
    ours = {r["ref"]: r for r in rows if r["series"] == quality_gguf.OURS_SERIES}
    assert set(ours) == set(stock)
    for label, s in stock.items():
        o = ours[label]
        assert 0 < o["bytes"] <= s["bytes"], (label, o["bytes"], s["bytes"])
        assert s["extra"]["imatrix"] == label.endswith("imatrix")
        for r in (s, o):
            assert math.isfinite(r["ppl_mean"]) and r["ppl_mean"] > 1 and math.isfinite(r["llama_ppl"])
            lp = r["extra"]["llama_perplexity"]
            assert lp["chunks"] == 2 and lp["ctx"] == 64 and lp["ppl"] == r["llama_ppl"]
            assert abs(lp["ours_same_chunks"] / lp["ppl"] - 1) <= TOLERANCE
        # the mixes are llama.cpp's own: k-quants for the 256-wide rows, Q6_K for the tied head
        assert {"Q6_K"} <= set(s["extra"]["tensor_types"]), s["extra"]["tensor_types"]
    # the imatrix changes the stock files' values, not their types
    assert stock["Q4_K_M"]["extra"]["tensor_types"] == stock["Q4_K_M + imatrix"]["extra"]["tensor_types"]
    assert stock["Q4_K_M"]["extra"]["sha256"] != stock["Q4_K_M + imatrix"]["extra"]["sha256"]
    goals = {g["stock"]: g for g in doc["gguf_goals"]}
    assert set(goals) == set(stock)
    base = next(r for r in doc["rows"] if r["series"] == "16-bit")["ppl_mean"]
    st = doc["settings"]["gguf"]
    l16 = st["llama_perplexity_16bit"]
    assert l16["chunks"] == 2 and math.isfinite(l16["ppl"])
    for label, g in goals.items():
        o, s = ours[label], stock[label]
        want = 100 * (o["ppl_mean"] / s["ppl_mean"] - 1)
        assert g["ppl_change_pct"] == pytest.approx(want, abs=0.01)
        for key, a, b, ref in (("share_removed", "ppl_mean", "ppl_mean", base),
                               ("share_removed_llama", "llama_ppl", "llama_ppl", l16["ppl"])):  # fmt: skip
            share = (s[a] - o[b]) / (s[a] - ref) if s[a] > ref else None
            assert (g[key] is None) if share is None else g[key] == pytest.approx(share, abs=1e-4), (key, g)
    assert "original" in st["stock_source"] and st["llama_perplexity_chunks"] == 2
    carried = st["imatrix"]["original"]  # the imatrix in the original model's coordinates: every entry
    assert carried["tensors"] == 2 * 7 + 1 and carried["chunk_size"] == 64  # 7 linears per block, tied head
    md = (repo / "artifacts/quality_gguf/quality.md").read_text()
    assert "## GGUF (llama.cpp)" in md and "| Q4_K_M + imatrix |" in md and "At Q4_K_M" in md
    assert "share of the stock loss removed" in md

    # llama-perplexity alone (the scorer for 1B+ models), no 16-bit row scored, the stock mix with the imatrix
    # only: the same files, the same numbers
    sh(repo, sys.executable, str(script), "--refs", "none", "--methods", "fisher", "--windows", "2", "--peers",
       "none", "--gguf", "Q4_K_M", "--gguf-scorer", "llama", "--no-baseline", "--no-gguf-without-imatrix",
       "--out", "artifacts/q_llama")  # fmt: skip
    fast = json.loads((repo / "artifacts/q_llama/quality.json").read_text())
    assert fast["settings"]["gguf"]["scorer"] == "llama"
    fast_stock = [r["label"] for r in fast["rows"] if r["series"] in quality_gguf.STOCK_SERIES.values()]
    assert fast_stock == ["Q4_K_M + imatrix"]  # the stock mix made with the imatrix only
    assert fast["settings"]["gguf"]["llama_perplexity_16bit"] == l16
    for r in fast["rows"]:
        assert r["ppl_mean"] is None  # NaN in the JSON: our evaluator ran on nothing
        if r["format"] == "gguf":
            both = next(x for x in rows if (x["series"], x["label"]) == (r["series"], r["label"]))
            assert r["bytes"] == both["bytes"] and r["llama_ppl"] == both["llama_ppl"], r["label"]


def test_imatrix_carried_to_the_original_by_exact_power_of_two_scales() -> None:
    """channel_scales reads s_c off an exactly rescaled tensor (per matrix of a 3-D one) and refuses anything
    that is not a power-of-two column scaling."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 8, 6)).astype(np.float32)
    w[0, :, 3] = 0  # a column that is zero in both models: scale 1
    s = np.array([[1, 2, 0.5, 1, 4, 0.25], [8, 1, 1, 2, 0.5, 1]], np.float32)
    assert np.array_equal(quality_gguf.channel_scales(w * s[:, None, :], w, "t"), s)
    assert np.array_equal(quality_gguf.channel_scales(w[0] * s[0], w[0], "t"), s[:1])
    with pytest.raises(MintError, match="powers of two"):
        quality_gguf.channel_scales(w * 3, w, "t")
    bad = w * s[:, None, :]
    bad[1, 2, 0] *= 1.001  # one entry off the column's scale
    with pytest.raises(MintError, match="powers of two"):
        quality_gguf.channel_scales(bad, w, "t")
