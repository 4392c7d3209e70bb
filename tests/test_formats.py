"""The single table of sizes: formula, MLX's real arrays, availability, option names."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from mintbuild.errors import MintError
from mintbuild.formats import OPTION_SETS, PASSTHROUGH, Option, header_allowance, option_set, parse_option

QUANT_OPTIONS = [o for o in OPTION_SETS["default"] if not o.passthrough]


def test_option_sets() -> None:
    assert len(OPTION_SETS["default"]) == 19 and len(OPTION_SETS["seed"]) == 8
    assert PASSTHROUGH in OPTION_SETS["default"] and PASSTHROUGH in OPTION_SETS["seed"]
    assert [o.name for o in OPTION_SETS["seed"]] == [
        "q2g32",
        "q3g64",
        "q4g32",
        "q4g64",
        "q4g128",
        "q8g64",
        "q8g128",
        "f16",
    ]
    assert option_set(["q4g64", "q8g64"]) == (Option(4, 64), Option(8, 64), PASSTHROUGH)


@pytest.mark.parametrize("opt", QUANT_OPTIONS, ids=str)
@pytest.mark.parametrize("shape", [(576, 1536), (3, 64, 256), (49152, 576)])
def test_nbytes_formula(opt: Option, shape: tuple[int, ...]) -> None:
    n = math.prod(shape)
    if not opt.available(shape):
        assert shape[-1] % opt.group
        with pytest.raises(MintError, match=f"not a multiple of group {opt.group}"):
            opt.nbytes(shape)
        return
    assert opt.nbytes(shape) == math.ceil(n * opt.bits / 8) + (n // opt.group) * 4


@pytest.mark.parametrize("opt", QUANT_OPTIONS, ids=str)
def test_nbytes_equals_mlx_arrays(opt: Option) -> None:
    shape = (8, 2, 384) if opt.group != 128 else (8, 2, 512)
    w = mx.array(np.random.default_rng(0).standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)
    q, s, b = mx.quantize(w, group_size=opt.group, bits=opt.bits)
    assert opt.nbytes(shape) == q.nbytes + s.nbytes + b.nbytes
    wshape, sshape = opt.packed_shape(shape)
    assert tuple(q.shape) == wshape and tuple(s.shape) == sshape == tuple(b.shape)


def test_availability_and_passthrough() -> None:
    assert not Option(4, 128).available((1536, 576))  # SmolLM2: hidden 576 is not a multiple of 128
    assert Option(4, 64).available((1536, 576))
    assert not Option(4, 32).available((576,))
    assert PASSTHROUGH.nbytes((576,)) == 1152 and PASSTHROUGH.available((7,))


@pytest.mark.parametrize("bad", ["q7g64", "q4g48", "int4", "", "q4"])
def test_parse_option_refuses(bad: str) -> None:
    with pytest.raises(MintError):
        parse_option(bad)


def test_parse_option_names() -> None:
    assert parse_option("Q4G64") == Option(4, 64)
    assert parse_option("f16") == parse_option("bf16") == PASSTHROUGH


def test_header_allowance_grows_with_names() -> None:
    a = header_allowance(["x.weight"])
    assert header_allowance(["x.weight", "x.scales", "x.biases"]) > a > 0
