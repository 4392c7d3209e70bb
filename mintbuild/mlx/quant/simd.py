"""A small SIMD layer for numba: an 8 x float32 vector type and an 8 x uint32 type with explicit LLVM
operations, and the 8-row transposed block layout the profile's error kernels and the packer's word kernel share.

Numba has no vector type, and LLVM keeps divisions scalar on this CPU (znver1), so the types below are defined
with explicit LLVM operations. Every vector instruction carries an explicit fast-math flag (`nsz`, harmless
here): numba's fastmath pass only adds its flags to instructions that have none, so a caller compiled with
fastmath can never reassociate the bf16 split or contract it into an FMA. bf16 rounding is done in three float
operations (Veltkamp's split: c = 65537 * v; v16 = c - (c - v)), which rounds to 8 significant bits with ties to
even for every normal float32 below 2^73 in magnitude (checked exhaustively over all float32 values).
`mlx_scale_bias` / `vmlx_scale_bias` are MLX's derivation of a group's scale and bias, scalar and lane by lane.

One job: the SIMD layer (types, intrinsics and the shared 8-row layout); the kernels live beside it.
"""

from __future__ import annotations

import operator

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic, models, overload, register_model

_EPS = np.float32(1e-7)
_ZERO = np.float32(0.0)


@njit(inline="always")
def mlx_scale_bias(w_min: np.float32, w_max: np.float32, n_bins: np.float32) -> tuple[np.float32, np.float32]:
    """MLX's float32 (scale, bias) of one group from its min and max (before 16-bit rounding): the edge with
    the larger magnitude maps to an integer code exactly; the profile's scalar path and the packer share it."""
    mask = abs(w_min) > abs(w_max)
    scale = max((w_max - w_min) / n_bins, _EPS)
    if not mask:
        scale = -scale
    edge = w_min if mask else w_max
    q0 = np.rint(edge / scale)
    if q0 != 0:
        return edge / q0, edge
    return scale, _ZERO


#: Veltkamp's splitting constant for float32 -> 8 significant bits: 2^(24 - 8) + 1.
_GAMMA = np.float32(65537.0)
#: Rows whose values reach this magnitude take the scalar path (the split overflows above ~2^73).
_BIG = np.float32(2.0**60)
#: Lanes per vector (AVX2: 8 float32) and the block width: every group size must be a multiple of CHUNK.
W = 8
CHUNK = 32
#: Parameter slots per group in the scratch table (see `_group_params`).
_NPAR = 8

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_V = ir.VectorType(_F32, W)
_VI = ir.VectorType(_I32, W)
_FLAGS = ("nsz",)


# --- an 8 x float32 vector type for numba -----------------------------------------------------------------


class F32x8(types.Type):
    """Eight float32 lanes held in one LLVM vector register; only the intrinsics below operate on it."""

    def __init__(self) -> None:
        super().__init__(name="f32x8")


f32x8 = F32x8()


@register_model(F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _V)


def _vec_fn(builder: ir.IRBuilder, name: str, n_args: int) -> ir.Function:
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V, [_V] * n_args), name)


def _is_f32_array(a) -> bool:
    # The vector loads address elements by flat index: C-contiguous arrays only.
    return isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C"


def _elem_ptr(context, builder, sig, args) -> ir.Value:
    """Pointer to element `args[1]` (a flat index) of the C-contiguous float32 array `args[0]`, as <8 x float>*."""
    a = context.make_array(sig.args[0])(context, builder, args[0])
    ptr = builder.gep(a.data, [context.cast(builder, args[1], sig.args[1], types.intp)])
    return builder.bitcast(ptr, _V.as_pointer())


@intrinsic
def vload(typingctx, arr, i):
    """Eight consecutive float32 of `arr` (C-contiguous) from flat index `i`."""
    if not (_is_f32_array(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_elem_ptr(context, builder, sig, args), align=4)

    return f32x8(arr, i), codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    if not (_is_f32_array(arr) and isinstance(i, types.Integer) and v is f32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _elem_ptr(context, builder, sig, args[:2]), align=4)
        return context.get_dummy_value()

    return types.none(arr, i, v), codegen


@intrinsic
def vsplat(typingctx, s):
    """All lanes set to the scalar `s`."""
    if not isinstance(s, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[0], sig.args[0], types.float32)
        v = builder.insert_element(ir.Constant(_V, ir.Undefined), s, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, ir.Constant(_V, ir.Undefined), ir.Constant(_VI, [0] * W))

    return f32x8(s), codegen


def _binop(op: str):
    @intrinsic
    def impl(typingctx, a, b):
        if not (a is f32x8 and b is f32x8):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1], flags=_FLAGS)

        return f32x8(a, b), codegen

    return impl


def _register_operator(op, impl) -> None:
    def typer(a, b):
        if a is f32x8 and b is f32x8:
            return lambda a, b: impl(a, b)
        return None

    overload(op)(typer)


for _op, _name in (
    (operator.add, "fadd"),
    (operator.sub, "fsub"),
    (operator.mul, "fmul"),
    (operator.truediv, "fdiv"),
):
    _register_operator(_op, _binop(_name))


def _select(cmp: str):
    @intrinsic
    def impl(typingctx, a, b, x, y):
        if not all(t is f32x8 for t in (a, b, x, y)):
            return None

        def codegen(context, builder, sig, args):
            return builder.select(builder.fcmp_ordered(cmp, args[0], args[1], flags=_FLAGS), args[2], args[3])

        return f32x8(a, b, x, y), codegen

    return impl


#: where_gt(a, b, x, y) = a > b ? x : y, lane by lane (and likewise for < and !=).
where_gt = _select(">")
where_lt = _select("<")
where_ne = _select("!=")


@njit(inline="always")
def vmin(a, b):
    return where_lt(a, b, a, b)


@njit(inline="always")
def vmax(a, b):
    return where_gt(a, b, a, b)


def _unary(name: str):
    @intrinsic
    def impl(typingctx, a):
        if a is not f32x8:
            return None

        def codegen(context, builder, sig, args):
            return builder.call(_vec_fn(builder, name, 1), [args[0]])

        return f32x8(a), codegen

    return impl


#: Round to the nearest integer, ties to even (the default rounding mode), and absolute value.
vrint = _unary("llvm.rint.v8f32")
vabs = _unary("llvm.fabs.v8f32")


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c rounded once (only used to accumulate squared errors, never inside the quantizer)."""
    if not all(t is f32x8 for t in (a, b, c)):
        return None

    def codegen(context, builder, sig, args):
        return builder.call(_vec_fn(builder, "llvm.fma.v8f32", 3), list(args))

    return f32x8(a, b, c), codegen


@intrinsic
def vsplit(typingctx, c, v):
    """c - (c - v): with c = fl(65537 * v) this is v rounded to bf16 (8 significant bits, ties to even)."""
    if not (c is f32x8 and v is f32x8):
        return None

    def codegen(context, builder, sig, args):
        c, v = args
        return builder.fsub(c, builder.fsub(c, v, flags=_FLAGS), flags=_FLAGS)

    return f32x8(c, v), codegen


def _bf16_bits(builder: ir.IRBuilder, u: ir.Value, const) -> ir.Value:
    """Round float32 bit patterns to bf16, ties to even: u + 0x7FFF + (bit 16 of u), low half cleared."""
    lsb = builder.and_(builder.lshr(u, const(16)), const(1))
    return builder.and_(builder.add(builder.add(u, const(0x7FFF)), lsb), const(0xFFFF0000 - (1 << 32)))


@intrinsic
def vbf16(typingctx, a):
    """Round every lane to bf16 (integer method: exact for all finite values, used for scale and bias)."""
    if a is not f32x8:
        return None

    def codegen(context, builder, sig, args):
        u = _bf16_bits(builder, builder.bitcast(args[0], _VI), lambda k: ir.Constant(_VI, [k] * W))
        return builder.bitcast(u, _V)

    return f32x8(a), codegen


@intrinsic
def bf16(typingctx, x):
    """Scalar float32 rounded to bf16 (ties to even)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        u = _bf16_bits(builder, builder.bitcast(args[0], _I32), lambda k: ir.Constant(_I32, k))
        return builder.bitcast(u, _F32)

    return types.float32(x), codegen


# --- 8 x uint32 lanes: the packer's codes and words ---------------------------------------------------------


class U32x8(types.Type):
    """Eight uint32 lanes in one LLVM vector register (codes being packed into words, one row per lane)."""

    def __init__(self) -> None:
        super().__init__(name="u32x8")


u32x8 = U32x8()


@register_model(U32x8)
class _U32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _VI)


@intrinsic
def ucodes(typingctx, q):
    """Float lanes holding integers in [0, 2^31) as uint32 lanes."""
    if q is not f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fptosi(args[0], _VI)

    return u32x8(q), codegen


@intrinsic
def uzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VI, [0] * W)

    return u32x8(), codegen


def _ushift(op: str):
    @intrinsic
    def impl(typingctx, u, n):
        if not (u is u32x8 and isinstance(n, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            n32 = context.cast(builder, args[1], sig.args[1], types.uint32)
            splat = builder.shuffle_vector(
                builder.insert_element(ir.Constant(_VI, ir.Undefined), n32, ir.Constant(_I32, 0)),
                ir.Constant(_VI, ir.Undefined),
                ir.Constant(_VI, [0] * W),
            )
            return getattr(builder, op)(args[0], splat)

        return u32x8(u, n), codegen

    return impl


#: ushl(u, n) / ushr(u, n): every lane shifted left / right (logical) by n, 0 <= n < 32.
ushl = _ushift("shl")
ushr = _ushift("lshr")


@intrinsic
def uor(typingctx, a, b):
    if not (a is u32x8 and b is u32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.or_(args[0], args[1])

    return u32x8(a, b), codegen


@intrinsic
def ustore(typingctx, arr, i, u):
    """arr[i:i + 8] = u for a C-contiguous uint32 array."""
    ok = isinstance(arr, types.Array) and arr.dtype == types.uint32 and arr.layout == "C"
    if not (ok and isinstance(i, types.Integer) and u is u32x8):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        builder.store(args[2], builder.bitcast(ptr, _VI.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(arr, i, u), codegen


@intrinsic
def ubf16(typingctx, a):
    """bf16 bit patterns (in the low 16 bits of each lane) of float32 lanes, rounded to nearest even."""
    if a is not f32x8:
        return None

    def codegen(context, builder, sig, args):
        u = _bf16_bits(builder, builder.bitcast(args[0], _VI), lambda k: ir.Constant(_VI, [k] * W))
        return builder.lshr(u, ir.Constant(_VI, [16] * W))

    return u32x8(a), codegen


@intrinsic
def vany_gt(typingctx, a, b):
    """True if a > b in any lane."""
    if not (a is f32x8 and b is f32x8):
        return None

    def codegen(context, builder, sig, args):
        mask = builder.bitcast(builder.fcmp_ordered(">", args[0], args[1], flags=_FLAGS), ir.IntType(W))
        return builder.icmp_unsigned("!=", mask, ir.Constant(ir.IntType(W), 0))

    return types.boolean(a, b), codegen


@intrinsic
def vadd_f64(typingctx, arr, v):
    """arr[0:8] += v, widened to float64 (arr: C-contiguous float64, at least 8 long)."""
    ok = isinstance(arr, types.Array) and arr.dtype == types.float64 and arr.layout == "C"
    if not (ok and v is f32x8):
        return None

    def codegen(context, builder, sig, args):
        vd = ir.VectorType(ir.DoubleType(), W)
        ptr = builder.bitcast(
            context.make_array(sig.args[0])(context, builder, args[0]).data, vd.as_pointer()
        )
        total = builder.fadd(builder.load(ptr, align=8), builder.fpext(args[1], vd), flags=_FLAGS)
        builder.store(total, ptr, align=8)
        return context.get_dummy_value()

    return types.none(arr, v), codegen


def _is_bf16_bits_array(a) -> bool:
    return isinstance(a, types.Array) and a.dtype in (types.int16, types.uint16) and a.layout == "C"


def _bf16_bits_to_f32(builder: ir.IRBuilder, bits16: ir.Value, ty: ir.Type) -> ir.Value:
    """bf16 bit patterns (i16 or <8 x i16>) -> float32: the pattern is the upper half of the float32."""
    wide = builder.shl(
        builder.zext(bits16, ty), ir.Constant(ty, 16) if ty is _I32 else ir.Constant(ty, [16] * W)
    )
    return builder.bitcast(wide, _F32 if ty is _I32 else _V)


@intrinsic
def as_f32(typingctx, v):
    """A value as float32: float32 unchanged, int16/uint16 read as bf16 bit patterns."""
    if v == types.float32:

        def codegen(context, builder, sig, args):
            return args[0]

    elif v in (types.int16, types.uint16):

        def codegen(context, builder, sig, args):
            return _bf16_bits_to_f32(builder, args[0], _I32)

    else:
        return None
    return types.float32(v), codegen


@intrinsic
def transpose8(typingctx, src, s0, stride, dst, d0):
    """dst[d0 + 8*i + l] = src[s0 + stride*l + i] for i, l < 8: an 8x8 transpose in registers. `src` is a
    C-contiguous float32 array or int16/uint16 bf16 bit patterns (widened to float32 on the way)."""
    if not ((_is_f32_array(src) or _is_bf16_bits_array(src)) and _is_f32_array(dst)):
        return None
    if not all(isinstance(t, types.Integer) for t in (s0, stride, d0)):
        return None
    narrow = _is_bf16_bits_array(src)

    def codegen(context, builder, sig, args):
        src_a = context.make_array(sig.args[0])(context, builder, args[0])
        dst_a = context.make_array(sig.args[3])(context, builder, args[3])
        s0, stride, d0 = (context.cast(builder, args[k], sig.args[k], types.intp) for k in (1, 2, 4))
        rows = []
        for lane in range(W):
            ptr = builder.gep(src_a.data, [builder.add(s0, builder.mul(stride, ir.Constant(s0.type, lane)))])
            if narrow:
                v16 = builder.load(
                    builder.bitcast(ptr, ir.VectorType(ir.IntType(16), W).as_pointer()), align=2
                )
                rows.append(_bf16_bits_to_f32(builder, v16, _VI))
            else:
                rows.append(builder.load(builder.bitcast(ptr, _V.as_pointer()), align=4))
        # Swap the off-diagonal blocks of 4, then 2, then 1: rows a and a + step exchange every other
        # block of `step` lanes ([A B; C D] -> [A C; B D] at each scale), which transposes the 8 x 8.
        for step in (4, 2, 1):
            nxt = list(rows)
            for a in range(W):
                if a & step:
                    continue
                b = a | step
                keep = [i if not i & step else W + i - step for i in range(W)]
                swap = [i + step if not i & step else W + i for i in range(W)]
                nxt[a] = builder.shuffle_vector(rows[a], rows[b], ir.Constant(_VI, keep))
                nxt[b] = builder.shuffle_vector(rows[a], rows[b], ir.Constant(_VI, swap))
            rows = nxt
        for i in range(W):
            ptr = builder.gep(dst_a.data, [builder.add(d0, ir.Constant(d0.type, W * i))])
            builder.store(rows[i], builder.bitcast(ptr, _V.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.none(src, s0, stride, dst, d0), codegen


@njit(inline="always")
def transpose_rows(src: np.ndarray, r0: int, dst: np.ndarray) -> None:
    """dst[c, l] = src[r0 + l, c] for a C-contiguous src [R, K] (K a multiple of 8) and dst [K, 8]."""
    k = src.shape[1]
    for c in range(0, k, W):
        transpose8(src, r0 * k + c, k, dst, c * W)


@njit(inline="always")
def vmlx_scale_bias(lo, hi, nb):
    """`mlx_scale_bias` lane by lane: float32 (scale, bias) of 8 groups from their min `lo` and max `hi` (nb =
    2^bits - 1); the edge of larger magnitude maps exactly to an integer code q0 (MLX's rule)."""
    zero = vsplat(0.0)
    scale = vmax((hi - lo) / nb, vsplat(_EPS))
    alo = vabs(lo)
    ahi = vabs(hi)
    scale = where_gt(alo, ahi, scale, zero - scale)
    edge = where_gt(alo, ahi, lo, hi)
    q0 = vrint(edge / scale)
    scale = where_ne(q0, zero, edge / where_ne(q0, zero, q0, vsplat(1.0)), scale)
    return scale, where_ne(q0, zero, edge, zero)
