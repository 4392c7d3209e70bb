"""Layer-streamed execution equals the whole model: logits of every supported family (tiny random models, BOS
windows), the evaluator's PPL on the real SmolLM2 in float32 and bfloat16, and a block too large for the
memory is refused before work. The whole model built by transformers is the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mintbuild.calibration.windows import load_tokenizer, sequence_prefix
from mintbuild.config import EvalConfig
from mintbuild.errors import MintError
from mintbuild.hf.evaluator import choose_windows, corpus_tokens, load_baseline, perplexity, window_logits
from mintbuild.hf.streaming import CheckpointSource, StreamedModel, check_fits, forward_hidden
from tests.synth import FAMILIES, tiny_family

#: Streamed and whole-model PPL agree to float rounding: the same kernels on the same values, block by block.
PPL_RTOL = 1e-5


@pytest.fixture(scope="module")
def text(corpus_dir: Path) -> str:
    return (corpus_dir / "train.txt").read_text(encoding="utf-8")[:100_000]


@pytest.mark.e2e
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_logits_equal_whole_model(family: str, text: str, tmp_path: Path) -> None:
    """Every family: rotary embeddings, sliding-window masks (gemma, window 32 < 64 tokens), MoE blocks, untied
    heads and logit soft-capping all come from the model's own forward."""
    folder = tiny_family(tmp_path / family, family, text, bos=True)
    tok = load_tokenizer(folder)
    prefix = sequence_prefix(tok)
    assert prefix  # the BOS windows the evaluator scores
    ids = [prefix + tok(text[s : s + 2000], add_special_tokens=False)["input_ids"][:63] for s in (0, 5000)]
    model = StreamedModel(CheckpointSource(folder), torch.float32)
    hidden, _ = forward_hidden(model, ids)
    whole = load_baseline(folder)
    for i, h in zip(ids, hidden, strict=True):
        with torch.inference_mode():
            streamed = model.head(torch.tensor(i)[None], h).logits[0].float()
        ref = window_logits(whole, i)
        torch.testing.assert_close(streamed, ref, rtol=1e-5, atol=1e-5)
    # every block's weights were dropped after use
    assert all(p.device.type == "meta" for p in model.blocks.parameters())


@pytest.mark.parametrize("family", ["llama", "phi3"])  # tied head, untied head
def test_block_walk_frees_the_embedding_and_head(family: str, text: str, tmp_path: Path) -> None:
    """While the blocks run, no outer parameter holds memory (an untied 8B's embedding and head are 4.2 GB in
    fp32); afterwards they are back with the same values, the head tied to the embedding again where it was."""
    model = StreamedModel(CheckpointSource(tiny_family(tmp_path / family, family, text)), torch.float32)
    before = {n: p.detach().clone() for n, p in model.outer_parameters()}
    tied = model.model.get_output_embeddings().weight is model.model.get_input_embeddings().weight
    assert tied == (family == "llama")
    seen: list[str] = []

    def look(_i: int, _h: list[torch.Tensor]) -> None:
        seen.extend(n for n, p in model.model.named_parameters(remove_duplicate=False)
                    if not n.startswith(model.prefix + ".") and p.device.type != "meta")  # fmt: skip

    forward_hidden(model, [[1, 5, 7, 9]], keep=look)
    assert not seen  # nothing outside the blocks was materialized during the walk
    after = dict(model.outer_parameters())
    assert after.keys() == before.keys()
    for n, p in after.items():
        assert torch.equal(p.detach(), before[n]), n
    assert (model.model.get_output_embeddings().weight is model.model.get_input_embeddings().weight) == tied


def test_a_model_without_its_head_reads_no_head(text: str, tmp_path: Path) -> None:
    """head=False (equalize): an untied head is never read, and the blocks see the same inputs."""
    folder = tiny_family(tmp_path / "phi3", "phi3", text)
    full = StreamedModel(CheckpointSource(folder), torch.float32)
    lean = StreamedModel(CheckpointSource(folder), torch.float32, head=False)
    assert lean.model.get_output_embeddings().weight.device.type == "meta"
    assert full.model.get_output_embeddings().weight.device.type == "cpu"
    ids = [[1, 5, 7, 9, 11]]
    torch.testing.assert_close(
        forward_hidden(lean, ids)[0][0], forward_hidden(full, ids)[0][0], rtol=0, atol=0
    )
    assert lean.model.get_output_embeddings().weight.device.type == "meta"  # the walk's reload reads no head


@pytest.mark.e2e
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_ppl_equals_whole_model_on_smollm2(smollm2_dir: Path, corpus_dir: Path, dtype: str) -> None:
    torch.set_num_threads(1)
    tok = load_tokenizer(smollm2_dir)
    tokens, _ = corpus_tokens(corpus_dir, "test", tok)
    cfg = EvalConfig(window=128, n_windows=3, seed=0, dtype=dtype)
    windows = choose_windows(len(tokens), cfg, 8192, tuple(sequence_prefix(tok)))
    dt = getattr(torch, dtype)
    streamed, _ = perplexity(StreamedModel(CheckpointSource(smollm2_dir), dt), tokens, windows, False)
    whole, _ = perplexity(load_baseline(smollm2_dir, dt), tokens, windows, False)
    assert streamed["tokens"] == whole["tokens"] == 3 * (128 - windows.first_scored)
    rel = abs(streamed["ppl_mean"] / whole["ppl_mean"] - 1)
    assert rel < PPL_RTOL, (streamed["ppl_mean"], whole["ppl_mean"], rel)
    np.testing.assert_allclose(streamed["ppl_windows"], whole["ppl_windows"], rtol=PPL_RTOL)


def test_block_larger_than_memory_is_refused(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mintbuild.hf.streaming as streaming

    folder = tiny_family(tmp_path / "llama", "llama", text)
    model = StreamedModel(CheckpointSource(folder), torch.float32)
    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)
    with pytest.raises(MintError, match=r"one decoder block needs .* GB in float32 .* only 0\.00 GB"):
        check_fits(model, 0, "evaluate")
