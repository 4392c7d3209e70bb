"""ggml's own quantizers and dequantizers, called through ctypes in the libggml-base that `mintbuild.llamacpp.build`
builds: the rounding llama-quantize does (ggml_quantize_chunk) and the values llama.cpp computes with (the type
traits' to_float), so an error measured here is llama.cpp's error.

Arrays are row-major `[rows, k]` float32 with `k` (a row, ggml's ne[0]) a multiple of the type's block; an
importance matrix is one float32 weight per column (llama.cpp's imatrix: the per-input-channel sum of x^2). ggml
aborts the process on a bad argument, so every argument is checked here first and refused with a MintError.
ctypes releases the GIL during the calls: `threads` > 1 quantizes row chunks in parallel with identical bytes.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mintbuild.errors import MintError

log = logging.getLogger(__name__)

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    """`struct ggml_type_traits` (ggml.h)."""

    _fields_ = (
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    )


@dataclass(frozen=True)
class TypeFacts:
    """What libggml itself says about one type."""

    name: str  # upper case, as GGUF tools and gguf-py name it: "Q4_K"
    type_id: int  # enum ggml_type
    block: int  # values per block (ggml_blck_size)
    type_size: int  # bytes per block (ggml_type_size)
    quantized: bool
    requires_imatrix: bool

    def row_bytes(self, k: int) -> int:
        return (k // self.block) * self.type_size


@functools.cache
def _lib() -> ctypes.CDLL:
    from mintbuild.llamacpp.build import ensure_llamacpp

    path = ensure_llamacpp().libggml_base
    lib = ctypes.CDLL(str(path))
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,  # type
        ctypes.c_void_p,  # const float * src
        ctypes.c_void_p,  # void * dst
        ctypes.c_int64,  # start
        ctypes.c_int64,  # nrows
        ctypes.c_int64,  # n_per_row
        ctypes.c_void_p,  # const float * imatrix (may be NULL)
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    log.debug("loaded %s", path)
    return lib


#: enum ggml_type has 43 slots in the pinned version (GGML_TYPE_COUNT); removed types have no name.
_TYPE_SLOTS = 43


@functools.cache
def types() -> dict[str, TypeFacts]:
    """Every type libggml knows, by upper-case name (F32, F16, BF16, Q4_0, ..., Q4_K, IQ4_XS, ...)."""
    lib = _lib()
    out: dict[str, TypeFacts] = {}
    for t in range(_TYPE_SLOTS):
        tr = lib.ggml_get_type_traits(t).contents
        if not tr.type_name or tr.blck_size <= 0:
            continue
        name = tr.type_name.decode().upper()
        out[name] = TypeFacts(
            name=name,
            type_id=t,
            block=int(lib.ggml_blck_size(t)),
            type_size=int(lib.ggml_type_size(t)),
            quantized=bool(tr.is_quantized),
            requires_imatrix=bool(lib.ggml_quantize_requires_imatrix(t)),
        )
    return out


def type_facts(type_name: str) -> TypeFacts:
    key = str(type_name).strip().upper()
    known = types()
    if key not in known:
        raise MintError(f"libggml has no type {type_name!r}: known types are {', '.join(known)}")
    return known[key]


def row_size(type_name: str, k: int) -> int:
    """Bytes of one row of `k` values, as libggml computes it (ggml_row_size)."""
    f = type_facts(type_name)
    _check_row(f, k)
    return int(_lib().ggml_row_size(f.type_id, k))


def _check_row(f: TypeFacts, k: int) -> None:
    if k <= 0 or k % f.block:
        raise MintError(f"type {f.name}: row length {k} is not a multiple of block {f.block}")


def _as_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 0:
        raise MintError("cannot quantize a scalar")
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)
    if not np.isfinite(x2).all():
        raise MintError("cannot quantize non-finite values (NaN or inf)")
    return x2


def quantize(x: np.ndarray, type_name: str, imatrix: np.ndarray | None = None, *, threads: int = 1) -> bytes:
    """ggml's bytes for `x` ([rows, k], or any shape: rows are the last dimension) in type `type_name`.

    `imatrix` ([k] float32, non-negative) weights each column's squared error as llama-quantize does with an
    importance matrix; types that need one (IQ2_XXS, IQ2_XS, IQ1_S) refuse to run without it.
    """
    f = type_facts(type_name)
    rows = _as_rows(x)
    n_rows, k = rows.shape
    _check_row(f, k)
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imat.shape != (k,):
            raise MintError(f"imatrix has {imat.size} values for rows of {k}")
        if not np.isfinite(imat).all() or (imat < 0).any():
            raise MintError("imatrix values must be finite and non-negative")
    elif f.requires_imatrix:
        raise MintError(f"type {f.name} cannot be quantized without an importance matrix")
    lib = _lib()
    rb = f.row_bytes(k)
    dst = np.empty(n_rows * rb, dtype=np.uint8)
    lib.ggml_quantize_init(f.type_id)  # thread-safe, but init once before the workers
    imat_ptr = imat.ctypes.data if imat is not None else None

    def run(r0: int, r1: int) -> None:
        got = lib.ggml_quantize_chunk(
            f.type_id, rows.ctypes.data, dst.ctypes.data, r0 * k, r1 - r0, k, imat_ptr
        )
        if got != (r1 - r0) * rb:
            raise MintError(f"ggml_quantize_chunk({f.name}) wrote {got} bytes, expected {(r1 - r0) * rb}")

    if threads <= 1 or n_rows < 2 * threads:
        run(0, n_rows)
    else:
        edges = np.linspace(0, n_rows, threads + 1).astype(int)
        with ThreadPoolExecutor(threads) as pool:
            for fut in [pool.submit(run, int(a), int(b)) for a, b in itertools.pairwise(edges)]:
                fut.result()
    return dst.tobytes()


def dequantize(
    data: bytes | bytearray | memoryview | np.ndarray, type_name: str, shape: tuple[int, ...]
) -> np.ndarray:
    """The float32 values llama.cpp reads from `data` (a tensor of `shape` in type `type_name`): to_float."""
    f = type_facts(type_name)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise MintError("cannot dequantize a scalar")
    k = shape[-1]
    _check_row(f, k)
    n = int(np.prod(shape))
    buf = (
        np.frombuffer(data, dtype=np.uint8)
        if not isinstance(data, np.ndarray)
        else data.view(np.uint8).reshape(-1)
    )
    expected = (n // k) * f.row_bytes(k)
    if buf.size != expected:
        raise MintError(f"{f.name} data of shape {list(shape)} must be {expected} bytes, got {buf.size}")
    if f.name == "F32":
        return buf.view(np.float32).reshape(shape).copy()
    buf = np.ascontiguousarray(buf)
    out = np.empty(n, dtype=np.float32)
    tr = _lib().ggml_get_type_traits(f.type_id).contents
    if not tr.to_float:
        raise MintError(f"libggml has no to_float for {f.name}")
    _TO_FLOAT(tr.to_float)(buf.ctypes.data, out.ctypes.data, n)
    return out.reshape(shape)


def roundtrip(
    x: np.ndarray, type_name: str, imatrix: np.ndarray | None = None, *, threads: int = 1
) -> np.ndarray:
    """What llama.cpp computes with after storing `x` as `type_name`: dequantize(quantize(x))."""
    x = np.asarray(x)
    return dequantize(quantize(x, type_name, imatrix, threads=threads), type_name, x.shape)
