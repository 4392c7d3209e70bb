"""A 4 x float64 vector type for numba with explicit LLVM operations (simd.py's float32 layer, for float64 sums).

Numba's auto-vectoriser leaves a loop of independent float64 sums scalar when they live in registers; these
intrinsics keep several such sums in vector registers. Every instruction is a plain IEEE operation carrying only
`nsz` (which changes no result of a sum of products here), never contracted into an FMA and never reassociated,
so a lane computes exactly what a scalar loop `acc = acc + h * x` computes.

One job: the float64 vector type and the operations the clip search needs.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic, models, register_model

from mintbuild.mlx.quant.simd import f32x8

#: Lanes per vector (AVX2: 4 float64).
W64 = 4

_F64 = ir.DoubleType()
_I32 = ir.IntType(32)
_V = ir.VectorType(_F64, W64)
_FLAGS = ("nsz",)


class F64x4(types.Type):
    """Four float64 lanes held in one LLVM vector register; only the intrinsics below operate on it."""

    def __init__(self) -> None:
        super().__init__(name="f64x4")


f64x4 = F64x4()


@register_model(F64x4)
class _F64x4Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type) -> None:
        super().__init__(dmm, fe_type, _V)


def _is_f64_array(a) -> bool:
    # The vector loads address elements by flat index: C-contiguous arrays only.
    return isinstance(a, types.Array) and a.dtype == types.float64 and a.layout == "C"


def _elem_ptr(context, builder, sig, args) -> ir.Value:
    a = context.make_array(sig.args[0])(context, builder, args[0])
    ptr = builder.gep(a.data, [context.cast(builder, args[1], sig.args[1], types.intp)])
    return builder.bitcast(ptr, _V.as_pointer())


@intrinsic
def dload(typingctx, arr, i):
    """Four consecutive float64 of `arr` (C-contiguous) from flat index `i`."""
    if not (_is_f64_array(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_elem_ptr(context, builder, sig, args), align=8)

    return f64x4(arr, i), codegen


@intrinsic
def dstore(typingctx, arr, i, v):
    """Store the four lanes of `v` at flat index `i` of `arr` (C-contiguous float64)."""
    if not (_is_f64_array(arr) and isinstance(i, types.Integer) and v is f64x4):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _elem_ptr(context, builder, sig, args[:2]), align=8)
        return context.get_dummy_value()

    return types.none(arr, i, v), codegen


@intrinsic
def dzero(typingctx):
    """All four lanes 0.0."""

    def codegen(context, builder, sig, args):
        return ir.Constant(_V, [0.0] * W64)

    return f64x4(), codegen


@intrinsic
def dmuladd(typingctx, acc, h, x):
    """acc + h * x lane by lane for the scalar float64 `h`: the product rounded, then the sum (two roundings)."""
    if not (acc is f64x4 and isinstance(h, types.Float) and x is f64x4):
        return None

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[1], sig.args[1], types.float64)
        v = builder.insert_element(ir.Constant(_V, ir.Undefined), s, ir.Constant(_I32, 0))
        hv = builder.shuffle_vector(
            v, ir.Constant(_V, ir.Undefined), ir.Constant(ir.VectorType(_I32, W64), [0] * W64)
        )
        return builder.fadd(args[0], builder.fmul(hv, args[2], flags=_FLAGS), flags=_FLAGS)

    return f64x4(acc, h, x), codegen


@intrinsic
def dstore_diff(typingctx, arr, i, a, b):
    """arr[i : i + 8] = float64(a) - float64(b) lane by lane, for two 8 x float32 vectors (exact widening, then
    one float64 difference per lane, as a scalar `np.float64(a) - np.float64(b)`)."""
    if not (_is_f64_array(arr) and isinstance(i, types.Integer) and a is f32x8 and b is f32x8):
        return None

    def codegen(context, builder, sig, args):
        wide = ir.VectorType(_F64, 8)
        d = builder.fsub(builder.fpext(args[2], wide), builder.fpext(args[3], wide), flags=_FLAGS)
        ptr = builder.bitcast(_elem_ptr(context, builder, sig, args[:2]), wide.as_pointer())
        builder.store(d, ptr, align=8)
        return context.get_dummy_value()

    return types.none(arr, i, a, b), codegen
