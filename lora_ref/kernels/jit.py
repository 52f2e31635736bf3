"""Small Numba intrinsics the fast kernels need: a stack buffer for register blocking, wide vectors, and a
16-entry table lookup held in a register.

Numba's ``np.empty`` allocates on the heap, and LLVM cannot keep heap memory in registers: a micro-kernel whose
accumulator tile lives in such an array loads and stores it on every multiply-add. :func:`stack_tile_f32`
returns a function that allocates a fixed number of float32 slots on the *stack* (an LLVM ``alloca``). LLVM
knows that stack memory aliases nothing else, so after the loops over the tile are unrolled the whole tile is
promoted to vector registers.

:func:`prefer_wide_vectors` marks the calling function with ``"prefer-vector-width"="512"``. LLVM's tuning for
Intel server cores (Skylake-X and later) prefers 256-bit vectors even on AVX-512 machines; the micro-kernels of
:mod:`lora_ref.kernels.matmul` and :mod:`lora_ref.quant.kernels` run about 1.5x faster with 512-bit registers. On a CPU
without AVX-512 the attribute changes nothing. With ``NUMBA_DISABLE_JIT=1`` both helpers have plain Python
fallbacks (a NumPy array and a no-op), so the kernels still run as ordinary Python.

:func:`lut16_decode16` decodes packed 4-bit codes through a table kept in one AVX-512 register (``vpermps``)
instead of a gather from memory (with AVX2, two 8-entry halves of the table in two registers); the 4-bit GEMV of
:mod:`lora_ref.quant.kernels` uses it when :data:`HAS_LUT16` is true and a gather loop otherwise.
:func:`lut16_fma16` decodes the same way and adds the
products with a vector x straight into two accumulator registers, for a single input row (decoding).
"""

from __future__ import annotations

import numpy as np
from numba import carray, config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["stack_tile_f32", "prefer_wide_vectors", "HAS_AVX512", "HAS_LUT16", "lut16_decode16", "lut16_fma16"]


def stack_tile_f32(rows: int, cols: int):
    """A jit-callable ``tile() -> float32[rows, cols]`` whose memory is on the caller's stack (uninitialised).

    ``tile`` is inlined into its caller at the Numba IR level (``inline="always"``), so the ``alloca`` belongs
    to the calling kernel and lives until that kernel returns. Call it once per kernel or per ``prange``
    iteration, not inside an inner loop: each call grows the stack frame. Under ``NUMBA_DISABLE_JIT=1`` it
    returns a NumPy array of the same shape.
    """
    if config.DISABLE_JIT:
        return lambda: np.empty((rows, cols), np.float32)

    @intrinsic
    def alloc(typingctx):
        def codegen(context, builder, signature, args):
            return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=rows * cols)
        return types.CPointer(types.float32)(), codegen

    @njit(inline="always")
    def tile():
        return carray(alloc(), (rows, cols))

    return tile


@intrinsic
def _prefer_wide_vectors(typingctx):
    def codegen(context, builder, signature, args):
        # llvmlite only validates enum attributes; a string attribute is written into the IR as given.
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.none(), codegen


def _no_op():
    return None


prefer_wide_vectors = _no_op if config.DISABLE_JIT else _prefer_wide_vectors


def _host_has(feature: str) -> bool:
    """True when Numba compiles for this CPU and the CPU has ``feature`` (an LLVM feature name, e.g. ``"avx512f"``)."""
    if config.DISABLE_JIT or config.CPU_NAME not in (None, "host"):
        return False
    try:
        from llvmlite import binding
        return bool(binding.get_host_cpu_features().get(feature, False))
    except Exception:  # feature query unsupported on this platform
        return False


HAS_AVX512 = _host_has("avx512f")
"""Whether this host has AVX-512F (default Numba target, JIT on): :func:`lut16_decode16` keeps its table in one
512-bit register."""

HAS_LUT16 = HAS_AVX512 or _host_has("avx2")
"""Whether :func:`lut16_decode16` and :func:`lut16_fma16` may be compiled here: with AVX-512F (one ``vpermps`` of
16 entries) or AVX2 (two 8-entry ``vpermps`` and a blend per 8 codes, e.g. AMD Zen 3); the values are the same."""


def _contiguous(t, dtype) -> bool:
    """Whether Numba type ``t`` is a C-contiguous array of ``dtype`` (the vector loads and stores assume both)."""
    return isinstance(t, types.Array) and t.dtype == dtype and t.layout == "C"


@intrinsic
def lut16_decode16(typingctx, packed, byte0, table, scale, out, out0):
    """Decode 16 packed bytes with a 16-entry float32 table held in vector registers (AVX-512 or AVX2).

    ``out[out0 + j] = table[packed[byte0 + j] >> 4] · scale`` and
    ``out[out0 + 16 + j] = table[packed[byte0 + j] & 15] · scale`` for j < 16: the 16 high nibbles (elements
    2j), then the 16 low nibbles (elements 2j + 1). Interleaving them back into element order would cost two
    more shuffles per call; a caller multiplying by a vector x reorders x once instead. The table is scaled first (one IEEE float32 product per entry, the same
    product ``code[c] · absmax`` as the NumPy decoder), so the values are bit for bit the dequantized ones.

    LLVM turns ``table[code]`` in a loop into a *gather*, one memory load per element. Sixteen float32 values
    fit in one AVX-512 register, and ``vpermps`` (``llvm.x86.avx512.permvar.sf.512``) picks 16 of them by
    index in one instruction. No Numba expression produces it, so this intrinsic writes the LLVM IR directly:
    load 16 bytes, widen to 32-bit, split the nibbles, scale the table, permute twice and store.
    With AVX2 only (:data:`HAS_AVX512` false) the table is two 8-entry halves: each code is looked up in both
    (``llvm.x86.avx2.permps``, which reads an index's low 3 bits) and the upper half's value kept where the code is
    8 or more, four permutes and two blends per 16 codes; the same values. Callers check :data:`HAS_LUT16` and use a
    gather loop otherwise.
    """
    if scale != types.float32 or not _contiguous(table, types.float32) or not _contiguous(packed, types.uint8) \
            or not _contiguous(out, types.float32):
        return None
    sig = types.void(packed, byte0, table, scale, out, out0)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        packed_v, byte0_v, table_v, scale_v, out_v, out0_v = args
        v_high, v_low = _lut16_values(builder, context, signature, packed_v, byte0_v, table_v, scale_v)
        out_arr = context.make_array(signature.args[4])(context, builder, out_v)
        v16f = ir.VectorType(ir.FloatType(), 16)
        dst = builder.gep(out_arr.data, [out0_v])
        builder.store(v_high, builder.bitcast(dst, v16f.as_pointer()), align=4)
        dst16 = builder.gep(out_arr.data, [builder.add(out0_v, ir.Constant(out0_v.type, 16))])
        builder.store(v_low, builder.bitcast(dst16, v16f.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _lut16_values(builder, context, signature, packed_v, byte0_v, table_v, scale_v):
    """The two 16-float vectors of :func:`lut16_decode16` (high nibbles, low nibbles), as LLVM values."""
    from llvmlite import ir

    packed_arr = context.make_array(signature.args[0])(context, builder, packed_v)
    table_arr = context.make_array(signature.args[2])(context, builder, table_v)
    i32 = ir.IntType(32)
    v16i8, v16i32 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(i32, 16)
    v16f = ir.VectorType(ir.FloatType(), 16)
    src = builder.bitcast(builder.gep(packed_arr.data, [byte0_v]), v16i8.as_pointer())
    codes = builder.zext(builder.load(src, align=1), v16i32)                      # 16 bytes as int32
    high = builder.lshr(codes, ir.Constant(v16i32, [4] * 16))                     # first elements
    low = builder.and_(codes, ir.Constant(v16i32, [15] * 16))                     # second elements
    table16 = builder.load(builder.bitcast(table_arr.data, v16f.as_pointer()), align=4)
    splat = builder.insert_element(ir.Constant(v16f, ir.Undefined), scale_v, ir.Constant(i32, 0))
    splat = builder.shuffle_vector(splat, ir.Constant(v16f, ir.Undefined), ir.Constant(v16i32, [0] * 16))
    table16 = builder.fmul(table16, splat)                                        # 16 exact products
    if HAS_AVX512:
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16i32]),
                                                 "llvm.x86.avx512.permvar.sf.512")
        return builder.call(permute, [table16, high]), builder.call(permute, [table16, low])
    # AVX2: vpermps picks from 8 entries by the low 3 bits of each index; look codes up in both halves of the
    # table and keep the upper half's value where the code is 8 or more.
    v8f, v8i32 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(i32, 8)
    permute8 = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f, v8i32]),
                                              "llvm.x86.avx2.permps")

    def lanes(v, first, count):
        return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                      ir.Constant(ir.VectorType(i32, count), list(range(first, first + count))))

    lower, upper = lanes(table16, 0, 8), lanes(table16, 8, 8)

    def lookup(codes16):
        halves = []
        for first in (0, 8):
            idx = lanes(codes16, first, 8)
            big = builder.icmp_unsigned(">", idx, ir.Constant(v8i32, [7] * 8))
            high_half, low_half = builder.call(permute8, [upper, idx]), builder.call(permute8, [lower, idx])
            halves.append(builder.select(big, high_half, low_half))
        return builder.shuffle_vector(halves[0], halves[1], ir.Constant(v16i32, list(range(16))))

    return lookup(high), lookup(low)


@intrinsic
def lut16_fma16(typingctx, packed, byte0, table, scale, x, x0, acc):
    """Decode 16 packed bytes as :func:`lut16_decode16` does and add their products with x to two accumulators
    (AVX-512 or AVX2): ``acc[j] += (table[packed[byte0 + j] >> 4] · scale) · x[x0 + j]`` and
    ``acc[16 + j] += (table[packed[byte0 + j] & 15] · scale) · x[x0 + 16 + j]`` for j < 16. The weight
    ``table[c] · scale`` is one float32 product (the dequantized value, as in :func:`lut16_decode16`); the
    multiply-add is one fused multiply-add (``llvm.fma``: a single rounding), whatever the caller's fastmath
    flags, so every lane is a sequential chain of FMAs over the calls.

    A dot product of one input row with a decoded weight row needs the weight values once: writing them to a
    buffer and reading them back (as :func:`lut16_decode16`'s callers do, to reuse a row for several inputs) costs
    a store and a load per 16 weights. Here they stay in registers; ``acc`` (32 float32, e.g. a
    :func:`stack_tile_f32` row) is loaded and stored around the two sums, which LLVM keeps in registers across a
    loop when ``acc`` is stack memory. ``x`` must be in the split order (each group of 32 elements as its 16
    even then 16 odd ones) and float32, like ``acc``.
    """
    if scale != types.float32 or not _contiguous(table, types.float32) or not _contiguous(packed, types.uint8) \
            or not _contiguous(x, types.float32) or not _contiguous(acc, types.float32):
        return None
    sig = types.void(packed, byte0, table, scale, x, x0, acc)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        packed_v, byte0_v, table_v, scale_v, x_v, x0_v, acc_v = args
        v_high, v_low = _lut16_values(builder, context, signature, packed_v, byte0_v, table_v, scale_v)
        v16f = ir.VectorType(ir.FloatType(), 16)
        x_arr = context.make_array(signature.args[4])(context, builder, x_v)
        acc_arr = context.make_array(signature.args[6])(context, builder, acc_v)
        x_high = builder.bitcast(builder.gep(x_arr.data, [x0_v]), v16f.as_pointer())
        x_low = builder.bitcast(builder.gep(x_arr.data, [builder.add(x0_v, ir.Constant(x0_v.type, 16))]),
                                v16f.as_pointer())
        a_high = builder.bitcast(acc_arr.data, v16f.as_pointer())
        a_low = builder.bitcast(builder.gep(acc_arr.data, [ir.Constant(ir.IntType(64), 16)]), v16f.as_pointer())
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16f, v16f]),
                                             "llvm.fma.v16f32")
        for a, v, xp in ((a_high, v_high, x_high), (a_low, v_low, x_low)):
            builder.store(builder.call(fma, [v, builder.load(xp, align=4), builder.load(a, align=4)]), a, align=4)
        return context.get_dummy_value()

    return sig, codegen
