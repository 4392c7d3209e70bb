"""The GGUF build path on tiny models: convert (llama.cpp's converter), the imatrix (against a plain transformers
forward), llama-quantize accepting it, the GGUF profile (against ggml's round trip recomputed here and the
bytes of real files), allocate and pack (types and bytes as planned, byte-identical twice), and the refusals
(an unknown architecture, a type llama-quantize changes, a failing llama-quantize)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from mintbuild.artifacts.allocation import ALLOCATION_FILE
from mintbuild.artifacts.convert import CONVERT_FILE, GGUF_FILE
from mintbuild.artifacts.importance import IMATRIX_FILE, load_input_squares
from mintbuild.artifacts.model import write_local_manifest
from mintbuild.artifacts.pack import MANIFEST_FILE, verify_manifest
from mintbuild.artifacts.profile import load_profile
from mintbuild.calibration.windows import calibration_windows
from mintbuild.cli import main as cli_main
from mintbuild.config import (
    ConvertConfig,
    ImportanceConfig,
    ProfileConfig,
    TargetConfig,
    expand_formats,
    load_params,
)
from mintbuild.errors import MintError
from mintbuild.formats import GGUF_OPTION_SETS, gguf_option_set, gguf_padded, parse_gguf_option
from mintbuild.io import sha256_file
from mintbuild.llamacpp import ggml
from mintbuild.llamacpp import profile as gguf_profile
from mintbuild.llamacpp.build import run_tool
from mintbuild.llamacpp.imatrix import IMATRIX_GGUF, gguf_entries, read_imatrix, write_imatrix
from mintbuild.llamacpp.pack import make_plan, quantize, verify
from mintbuild.stages import allocate, importance, pack_gguf, profile_gguf
from mintbuild.stages.convert import convert
from tests.dvcrepo import write_text
from tests.gguf_synth import smollm2_tokenizer, tiny_convertible

CAL = ImportanceConfig(n_windows=2, window=64, seed=0, threads=1, hessian_windows=0)
#: Types the fixture's profile measures (a k-quant of each family, a legacy block type, Q8_0; BF16 is added).
OPTIONS = ["Q3_K", "Q4_K", "Q5_0", "Q8_0"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with SmolLM2's tokenizer: converted, calibrated (imatrix), profiled as a GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    tok = smollm2_tokenizer(root / "tokenizer")
    model = tiny_convertible(root / "model", tok)
    corpus = root / "corpus"
    corpus.mkdir()
    write_text(corpus / "train.txt", docs=12, words=400)
    convert(model, ConvertConfig(), root / "convert")
    importance.run(model, corpus, CAL, root / "importance", progress=False)
    cfg = ProfileConfig(gguf_option_list=OPTIONS)
    profile_gguf.run(root / "convert", model, root / "importance", cfg, root / "profile_gguf", progress=False)
    write_local_manifest(model, root / "equalize")
    return {
        "root": root,
        "tokenizer": tok,
        "model": model,
        "corpus": corpus,
        "convert": root / "convert",
        "importance": root / "importance",
        "profile": root / "profile_gguf",
        "equalize": root / "equalize",
    }


def _params(b: dict[str, Path], targets: dict[str, TargetConfig]):
    p = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    p.equalize.out = str(b["equalize"])
    p.convert.out = str(b["convert"])
    p.profile.gguf_out = str(b["profile"])
    p.importance.out = str(b["importance"])
    p.solver.importance = str(b["importance"] / "importance.json")
    p.allocate_out = str(b["root"] / "allocate")
    p.pack_out = str(b["root"] / "pack")
    p.targets = targets
    return p


def _reader_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(s) for s in reversed(t.shape)) for t in gguf.GGUFReader(str(path)).tensors}


# ---------------------------------------------------------------- format facts


def test_gguf_option_bytes_are_libggml_row_sizes() -> None:
    """Every option of the gguf set: bytes = rows x ggml_row_size (libggml's own figure), unavailable rows
    named with the numbers, files padded to 32 bytes; BF16 is the passthrough, last."""
    opts = gguf_option_set("gguf")
    assert [o.name for o in opts][-1] == "BF16" and {o.name for o in opts} == set(GGUF_OPTION_SETS["gguf"])
    for o in opts:
        for shape in [(3, 256), (7, 512), (2, 4, 768)]:
            rows = int(np.prod(shape[:-1]))
            assert o.nbytes(shape) == rows * ggml.row_size(o.name, shape[-1])
    assert (
        parse_gguf_option("Q4_K").unavailable_reason((8, 576))
        == "row length 576 is not a multiple of block 256"
    )
    assert parse_gguf_option("Q4_0").available((8, 576))
    assert gguf_padded(33) == 64 and gguf_padded(64) == 64


def test_compose_writes_one_target_per_format() -> None:
    got = expand_formats({"bpw4": {"bits_per_weight": 4.0, "formats": ["mlx", "gguf"]}, "b": {"size": "1GB"}})
    assert got == {
        "bpw4": {"bits_per_weight": 4.0, "formats": ["mlx"]},
        "bpw4-gguf": {"bits_per_weight": 4.0, "formats": ["gguf"]},
        "b": {"size": "1GB"},
    }
    assert expand_formats({"g": {"formats": ["gguf"]}}) == {"g": {"formats": ["gguf"]}}
    with pytest.raises(MintError, match="already exists"):
        expand_formats({"a": {"formats": ["mlx", "gguf"]}, "a-gguf": {}})
    with pytest.raises(MintError, match="onnx"):
        expand_formats({"a": {"formats": ["onnx"]}})


# ---------------------------------------------------------------- convert


@pytest.mark.e2e
def test_convert_records_the_file_and_is_reproducible(built: dict[str, Path], tmp_path: Path) -> None:
    doc = json.loads((built["convert"] / CONVERT_FILE).read_text())
    path = built["convert"] / GGUF_FILE
    assert doc["gguf"]["sha256"] == sha256_file(path) and doc["gguf"]["bytes"] == path.stat().st_size
    assert doc["architecture"] == "LlamaForCausalLM" and doc["gguf"]["architecture"] == "llama"
    r = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in r.tensors if len(t.shape) == 2} == {"BF16"}
    assert {t.tensor_type.name for t in r.tensors if len(t.shape) == 1} == {"F32"}
    # the converter's output is a function of its input: convert again, same bytes
    again = convert(built["model"], ConvertConfig(), tmp_path / "convert")
    assert again["gguf"]["sha256"] == doc["gguf"]["sha256"]


@pytest.mark.e2e
def test_unknown_architecture_is_not_converted_before_work(built: dict[str, Path], tmp_path: Path) -> None:
    """An architecture llama.cpp's converter does not know: no conversion is attempted, the convert stage exits 0
    with its out a one-line note naming the architecture (the GGUF targets are then not built; the MLX ones are)."""
    from mintbuild.artifacts.convert import failure_note

    model = tmp_path / "foo"
    shutil.copytree(built["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(architectures=["FooForCausalLM"], model_type="foo")
    (model / "config.json").write_text(json.dumps(cfg))
    assert cli_main(["convert", "--model", str(model), "--out", str(tmp_path / "out")]) == 0
    note = failure_note(tmp_path / "out")
    assert note is not None and "FooForCausalLM" in note and "\n" not in note
    assert not list((tmp_path / "out").glob("*.gguf"))


# ---------------------------------------------------------------- the imatrix


@pytest.mark.e2e
def test_imatrix_is_the_sum_of_x2_of_a_plain_forward(built: dict[str, Path]) -> None:
    """Oracle: transformers' whole model in fp32 on the same windows, hooks on every nn.Linear; the stored
    sums (6 significant digits) and the GGUF imatrix file (float32) hold the same numbers and token counts."""
    from transformers import AutoModelForCausalLM

    _, windows, _ = calibration_windows(built["model"], built["corpus"], CAL.n_windows, CAL.window, CAL.seed)
    model = AutoModelForCausalLM.from_pretrained(built["model"], dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        x = inp[0].reshape(-1, inp[0].shape[-1]).double()
        key = names[mod] + ".weight"
        if mod is model.lm_head:
            key = "model.embed_tokens.weight"  # tied: the head's weight is the embedding
        sums[key] = sums.get(key, 0) + x.square().sum(0)
        counts[key] = counts.get(key, 0) + x.shape[0]

    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(hook)
    with torch.no_grad():
        for w in windows:
            model(torch.tensor(w.ids)[None])
    stored = load_input_squares(built["importance"])
    assert set(stored.sums) == set(sums)
    for name, want in sums.items():
        np.testing.assert_allclose(stored.sums[name], want.numpy(), rtol=2e-5)
        assert stored.counts[name] == counts[name] == sum(len(w.ids) for w in windows)
    im = read_imatrix(built["profile"] / IMATRIX_GGUF)
    want_q = sums["model.layers.1.self_attn.q_proj.weight"].numpy()
    np.testing.assert_allclose(im.sums["blk.1.attn_q.weight"][0], want_q, rtol=2e-5)
    np.testing.assert_allclose(
        im.sums["token_embd.weight"][0], sums["model.embed_tokens.weight"].numpy(), rtol=2e-5
    )
    assert im.counts["blk.1.attn_q.weight"][0] == counts["model.layers.1.self_attn.q_proj.weight"]
    assert (built["importance"] / IMATRIX_FILE).is_file()


@pytest.mark.e2e
def test_llama_quantize_uses_the_imatrix(built: dict[str, Path], tmp_path: Path) -> None:
    """llama-quantize accepts the file; its Q4_K bytes of a tensor are ggml's quantization of that tensor with
    in_sum2 / counts (read here from the file with gguf-py) as weights, and differ from those without."""
    src = built["convert"] / GGUF_FILE
    shutil.copyfile(built["profile"] / IMATRIX_GGUF, tmp_path / "im.gguf")
    run_tool("llama-quantize", ["--imatrix", "im.gguf", src, tmp_path / "with.gguf", "Q4_K"], cwd=tmp_path)
    run_tool("llama-quantize", ["--pure", src, tmp_path / "pure.gguf", "Q4_K"])
    run_tool(
        "llama-quantize",
        ["--pure", "--imatrix", "im.gguf", src, tmp_path / "pure_im.gguf", "Q4_K"],
        cwd=tmp_path,
    )
    assert sha256_file(tmp_path / "pure.gguf") != sha256_file(tmp_path / "pure_im.gguf")
    raw = gguf.GGUFReader(str(tmp_path / "im.gguf"))
    entry = {t.name: np.array(t.data, dtype=np.float32) for t in raw.tensors}
    weights = entry["blk.0.ffn_down.weight.in_sum2"].reshape(-1) / entry["blk.0.ffn_down.weight.counts"][0]
    x = gguf_profile.gguf_values(
        next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "blk.0.ffn_down.weight")
    )
    q = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "pure_im.gguf")).tensors}["blk.0.ffn_down.weight"]
    assert q.tensor_type.name == "Q4_K"
    assert bytes(np.asarray(q.data).tobytes()) == ggml.quantize(x, "Q4_K", weights)
    assert bytes(np.asarray(q.data).tobytes()) != ggml.quantize(x, "Q4_K")


# ---------------------------------------------------------------- the GGUF profile


@pytest.mark.e2e
def test_profile_errors_are_ggml_round_trips_with_the_imatrix(built: dict[str, Path]) -> None:
    prof = load_profile(built["profile"])
    assert prof.format == "gguf" and [o.name for o in prof.options] == [
        "Q3_K",
        "Q4_K",
        "Q5_0",
        "Q8_0",
        "BF16",
    ]
    src = {t.name: t for t in gguf.GGUFReader(str(built["convert"] / GGUF_FILE)).tensors}
    im = {
        t.name: np.array(t.data, dtype=np.float32)
        for t in gguf.GGUFReader(str(built["profile"] / IMATRIX_GGUF)).tensors
    }
    index = {m["name"]: i for i, m in enumerate(prof.tensors)}
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"):
        x = gguf_profile.gguf_values(src[name]).astype(np.float64)
        w = (im[f"{name}.in_sum2"] / im[f"{name}.counts"][0]).reshape(-1)
        i = index[name]
        sampled = prof["sampled_elements"][i] < prof["elements"][i]
        assert sampled == (name == "token_embd.weight")  # 12.6M values > profile.sample_above
        for k, o in enumerate(prof.options[:-1]):
            y = ggml.roundtrip(x.astype(np.float32), o.name, w.astype(np.float32))
            exact = float(np.sum((y - x) ** 2))
            rse = prof["nrmse_rse"][i, k]
            if rse > 0:  # sampled: the estimate's NRMSE within the bound its standard error promises
                assert 3 * rse <= 0.005
                assert abs(math.sqrt(prof["sse"][i, k] / exact) - 1) <= 3 * rse, o.name
            else:
                assert prof["sse"][i, k] == pytest.approx(exact, rel=1e-12), (name, o.name)
            assert prof["bytes"][i, k] == gguf_padded(o.nbytes(x.shape))
        assert prof["sse"][i, -1] == 0 and prof["bytes"][i, -1] == int(src[name].n_bytes)
    norm = prof.tensors[index["blk.0.attn_norm.weight"]]
    assert not norm["quantizable"] and "F32" in norm["unavailable"]["Q4_K"]
    assert prof.tensors[index["token_embd.weight"]]["hf_name"] == "model.embed_tokens.weight"


@pytest.mark.e2e
def test_profile_bytes_add_up_to_the_files(built: dict[str, Path], tmp_path: Path) -> None:
    """Header + every tensor's passthrough bytes = the bf16 file; the profile's header is the data offset
    llama-quantize writes with the imatrix."""
    prof = load_profile(built["profile"])
    src = built["convert"] / GGUF_FILE
    assert prof.summary["source_header_bytes"] + int(prof["bytes"][:, -1].sum()) == src.stat().st_size
    shutil.copyfile(built["profile"] / IMATRIX_GGUF, tmp_path / IMATRIX_GGUF)
    run_tool("llama-quantize", ["--imatrix", IMATRIX_GGUF, src, tmp_path / "q.gguf", "Q8_0"], cwd=tmp_path)
    assert gguf.GGUFReader(str(tmp_path / "q.gguf")).data_offset == prof.summary["header_bytes"]


# ---------------------------------------------------------------- allocate and pack


@pytest.mark.e2e
def test_pack_matches_the_plan_and_repeats_byte_for_byte(
    built: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = _params(built, {"g": TargetConfig(bits_per_weight=4.5, formats=["gguf"])})
    docs = allocate.run(params, None, tmp_path / "no-mlx-profile", Path(params.allocate_out), built["model"])
    alloc = docs["g"]
    assert alloc["format"] == "gguf" and alloc["imatrix"] is True
    caplog.set_level(logging.INFO, logger="mintbuild.progress")
    first = pack_gguf.run(params, ["g"])[0]
    said = [r.getMessage() for r in caplog.records if r.name == "mintbuild.progress"]
    out = Path(params.pack_out) / "g"
    path = out / "model.gguf"
    t = alloc["totals"]
    assert path.stat().st_size == t["bytes"] == first.manifest["weights_bytes"] <= t["budget"]
    # every tensor's type, read back independently, is the allocation's (the source type where it stays 16-bit)
    types = {x.name: x.tensor_type.name for x in gguf.GGUFReader(str(path)).tensors}
    # llama-quantize's tensors counted as it writes them (a log line under DVC), to the last one
    n = len(types)
    assert said and said[-1].startswith(f"pack g: llama-quantize {n}/{n} tensor (100%)"), (n, said)
    for d in alloc["decisions"]:
        want = d["gguf_type"] if d["option"] == "BF16" else d["option"]
        assert types[d["members"][0]] == want, d["name"]
    assert len({d["option"] for d in alloc["decisions"] if d["quantizable"]}) > 1  # a real mix
    manifest = verify_manifest(out)
    assert manifest["format"] == "gguf" and {"config.json", "tokenizer.json", "model.gguf"} <= set(
        manifest["files"]
    )
    sha = sha256_file(path)
    pack_gguf.run(params, ["g"])
    assert sha256_file(path) == sha
    assert (out / MANIFEST_FILE).read_text() == json.dumps(first.manifest, indent=2, sort_keys=True) + "\n"


@pytest.mark.e2e
def test_a_type_llama_quantize_does_not_store_is_refused(built: dict[str, Path], tmp_path: Path) -> None:
    """A plan asking llama-quantize for a type it does not apply (it never quantizes a 1-D norm) is caught
    by the read-back, with the tensor named; the real tool ran."""
    params = _params(built, {"h": TargetConfig(bits_per_weight=5.0, formats=["gguf"])})
    alloc = allocate.run(params, None, tmp_path / "x", Path(params.allocate_out), built["model"])["h"]
    for d in alloc["decisions"]:
        if d["name"] == "blk.0.attn_norm.weight":
            d.update(option="Q8_0", quantizable=True)
    plan = make_plan(alloc)
    work = tmp_path / "work"
    work.mkdir()
    quantize(plan, built["convert"] / GGUF_FILE, built["profile"] / IMATRIX_GGUF, work / "m.gguf", work)
    with pytest.raises(MintError, match=r"stored blk\.0\.attn_norm\.weight as F32, not the planned Q8_0"):
        verify(plan, work / "m.gguf")


@pytest.mark.e2e
def test_a_failing_llama_quantize_is_one_line_and_leaves_nothing(
    built: dict[str, Path], tmp_path: Path
) -> None:
    params = _params(built, {"f": TargetConfig(bits_per_weight=5.0, formats=["gguf"])})
    allocate.run(params, None, tmp_path / "x", Path(params.allocate_out), built["model"])
    # a truncated bf16 GGUF that convert.json and the allocation agree on: only llama-quantize can object
    bad = tmp_path / "convert"
    shutil.copytree(built["convert"], bad)
    data = (bad / GGUF_FILE).read_bytes()
    (bad / GGUF_FILE).write_bytes(data[: len(data) // 2])
    doc = json.loads((bad / CONVERT_FILE).read_text())
    doc["gguf"].update(bytes=len(data) // 2, sha256=sha256_file(bad / GGUF_FILE))
    (bad / CONVERT_FILE).write_text(json.dumps(doc))
    alloc_path = Path(params.allocate_out) / "f" / ALLOCATION_FILE
    alloc = json.loads(alloc_path.read_text())
    alloc["provenance"]["checkpoint_hash"] = doc["gguf"]["sha256"]
    alloc_path.write_text(json.dumps(alloc))
    params.convert.out = str(bad)
    with pytest.raises(MintError, match=r"^llama-quantize failed \(exit \d+\): ") as e:
        pack_gguf.run(params, ["f"])
    assert "\n" not in str(e.value)
    assert not (Path(params.pack_out) / "f").exists()
    assert not [p for p in Path(params.pack_out).glob(".f.*")] if Path(params.pack_out).exists() else True


# ---------------------------------------------------------------- another family


@pytest.mark.e2e
@pytest.mark.parametrize(("family", "arch"), [("gemma3_text", "gemma3")])
def test_another_family_converts_and_quantizes_with_its_imatrix(
    family: str, arch: str, built: dict[str, Path], tmp_path: Path
) -> None:
    """(qwen2 is not here: transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer, whose pre-tokenizer
    is Qwen's whatever tokenizer.json says, and the converter's tokenizer check rejects that for SmolLM2's.)"""
    model = tiny_convertible(tmp_path / "model", built["tokenizer"], family)
    doc = convert(model, ConvertConfig(), tmp_path / "convert")
    assert doc["gguf"]["architecture"] == arch
    importance.run(model, built["corpus"], CAL, tmp_path / "importance", progress=False)
    src = tmp_path / "convert" / GGUF_FILE
    shapes = _reader_shapes(src)
    entries = gguf_entries(
        load_input_squares(tmp_path / "importance"), arch, doc["gguf"]["block_count"], shapes
    )
    linear = {n for n, s in shapes.items() if len(s) == 2 and n.startswith("blk.")}
    assert linear <= set(entries) and "token_embd.weight" in entries  # every block linear, and the tied head
    write_imatrix(tmp_path / "im.gguf", entries, 2, 64, ["test"])
    run_tool("llama-quantize", ["--imatrix", "im.gguf", src, tmp_path / "q.gguf", "Q4_K"], cwd=tmp_path)
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert got["blk.0.attn_q.weight"] != "BF16"


@pytest.mark.e2e
def test_a_build_without_gguf_targets_converts_nothing(tmp_path: Path) -> None:
    """convert.enabled false (an MLX-only build, e.g. of a model llama.cpp cannot convert): both GGUF stages
    write a note, and a GGUF target meeting it is told what to set."""
    doc = convert(tmp_path / "no-model", ConvertConfig(enabled=False), tmp_path / "convert")
    assert doc["enabled"] is False and not (tmp_path / "convert" / GGUF_FILE).exists()
    assert (
        profile_gguf.run(tmp_path / "convert", tmp_path / "no-model", None, ProfileConfig(), tmp_path / "pg")
        is None
    )
    with pytest.raises(MintError, match=r"convert\.enabled is false"):
        load_profile(tmp_path / "pg")


@pytest.mark.e2e
def test_merged_experts_get_one_entry_per_expert(tmp_path: Path) -> None:
    """Experts the converter merges into one [experts, out, in] tensor: their sums stacked in expert order, each
    with its own token count (0 for an expert no token reached: llama-quantize then uses ones), as llama.cpp's
    imatrix stores a merged tensor; written and read back."""
    from mintbuild.artifacts.importance import InputSquares
    from mintbuild.llamacpp.imatrix import quantize_weights

    rng = np.random.default_rng(0)
    names = [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(3)]
    sums = {n: rng.random(8) for n in names}
    sums["model.layers.0.self_attn.q_proj.weight"] = rng.random(16)
    counts = {names[0]: 5, names[1]: 0, names[2]: 7, "model.layers.0.self_attn.q_proj.weight": 12}
    shapes = {"blk.0.ffn_down_exps.weight": (3, 16, 8), "blk.0.attn_q.weight": (16, 16)}
    entries = gguf_entries(InputSquares(sums, counts, 4, "x"), "qwen2moe", 1, shapes)
    e = entries["blk.0.ffn_down_exps.weight"]
    np.testing.assert_array_equal(e.sums, np.stack([sums[n] for n in names]))
    np.testing.assert_array_equal(e.counts, [5, 0, 7])
    write_imatrix(tmp_path / "im.gguf", entries, 3, 4, ["t"])
    w = quantize_weights(read_imatrix(tmp_path / "im.gguf"), "blk.0.ffn_down_exps.weight")
    np.testing.assert_allclose(w[0], (sums[names[0]] / 5).astype(np.float32), rtol=1e-6)
    np.testing.assert_array_equal(w[1], np.ones(8, np.float32))
