"""Small Numba intrinsics the fast kernels need: a stack buffer for register blocking, wide vectors, a prefetch
hint, and a 16-entry table lookup held in a register.

Numba's ``np.empty`` allocates on the heap, and LLVM cannot keep heap memory in registers: a micro-kernel whose
accumulator tile lives in such an array loads and stores it on every multiply-add. :func:`stack_tile_f32`
returns a function that allocates a fixed number of float32 slots on the *stack* (an LLVM ``alloca``). LLVM
knows that stack memory aliases nothing else, so after the loops over the tile are unrolled the whole tile is
promoted to vector registers.

:func:`prefer_wide_vectors` marks the calling function with ``"prefer-vector-width"="512"``. LLVM's tuning for
Intel server cores (Skylake-X and later) prefers 256-bit vectors even on AVX-512 machines; the micro-kernels of
:mod:`lora_ref.kernels.matmul` and :mod:`lora_ref.quant.kernels` run about 1.5x faster with 512-bit registers. On a CPU
without AVX-512 the attribute changes nothing. With ``NUMBA_DISABLE_JIT=1`` both helpers have plain Python
fallbacks (a NumPy array and a no-op), so the kernels still run as ordinary Python. :func:`prefetch` asks for a
cache line ahead of use (``llvm.prefetch``); the one-row 4-bit GEMVs name their codes :data:`PREFETCH_AHEAD` bytes on.

:func:`lut16_decode16` decodes packed 4-bit codes through a table kept in one AVX-512 register (``vpermps``)
instead of a gather from memory (with AVX2, byte shuffles of the table's four byte planes); the 4-bit GEMV of
:mod:`lora_ref.quant.kernels` uses it when :data:`HAS_LUT16` is true and a gather loop otherwise.
:func:`lut16_fma16` decodes the same way and adds the
products with a vector x straight into two accumulator registers, for a single input row (decoding).
:func:`lut16_block_dot` is the AVX2 form of that single-row step (:data:`BLOCK_DOT`): a whole quantization block
of unscaled codes dotted with x, its partial sums multiplied by the block's scale once; :func:`block_fma` is the
one-row step both 4-bit GEMVs share. :func:`rank16` runs the other way, encoding: the 4-bit code of 16 values at
once by binary search over the 15 sorted thresholds held in one AVX-512 register (the NF4 encoders).

:func:`outer_product_f32` writes one step of the matmul's micro-kernel, ``acc[i, :] += a[i] · b[:]`` for a
register tile, as explicit 8-float vectors. LLVM vectorizes the plain loops of
:func:`lora_ref.kernels.matmul.micro_kernel` well for the AVX-512 tile (6 × 64), but for the AVX2 tile (6 × 16)
it unrolls the 16-column row completely before its loop vectorizer runs and then emits scalar code (measured on
an AMD Zen 3: 275-300 ms for a 1024³ product, against about 20 ms with this step); so on CPUs with AVX2 and no
AVX-512 the micro-kernel calls this step instead (:data:`lora_ref.kernels.matmul.EXPLICIT_VECTORS`).

Numba's on-disk cache (``cache=True``) checks only the source stamp of the file that defines a cached function, and
the kernels of :mod:`lora_ref.quant.kernels` and :mod:`lora_ref.kernels.decode` inline these intrinsics and
helpers: on its own, an edit to this file would leave them running their old machine code. Importing this module
installs :mod:`lora_ref.kernels.cache`, which adds a hash of the whole package's source to every cached kernel's
stamp, so after an edit here (or anywhere in the package) everything compiles afresh.
"""

from __future__ import annotations

import numpy as np
from numba import carray, config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from lora_ref.kernels import cache

cache.install()  # before any kernel is defined: every module with cached kernels imports this one first

__all__ = ["FAST_MATH", "stack_tile_f32", "prefer_wide_vectors", "prefetch", "prefetch_codes", "PREFETCH_AHEAD",
           "HAS_AVX512", "HAS_AVX2", "HAS_LUT16", "lut16_decode16", "lut16_fma16", "BLOCK_DOT", "BLOCK_DOT_ORDER",
           "lut16_block_dot", "block_fma", "sum32", "rank16", "rank_table", "RANK_PAD", "outer_product_f32"]

FAST_MATH = {"reassoc", "contract"}
"""The fast-math flags of every compiled product and sum (``njit(fastmath=FAST_MATH)``): LLVM may reorder float32
sums (vectorized reductions) and fuse multiply-adds, nothing else. With all of its flags (``fastmath=True``) the
one-row 4-bit product loaded from Numba's on-disk cache gave other bits than the same kernel compiled in the
process (:mod:`lora_ref.quant.kernels`). A set, as Numba requires; not to be changed in place."""


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


@intrinsic
def _prefetch(typingctx, arr, index):
    if not isinstance(arr, types.Array) or arr.layout != "C" or not isinstance(index, types.Integer):
        return None
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        i32, i64 = ir.IntType(32), ir.IntType(64)
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        itemsize = context.get_abi_sizeof(context.get_data_type(signature.args[0].dtype))
        index64 = context.cast(builder, args[1], signature.args[1], types.int64)
        offset = builder.mul(index64, ir.Constant(i64, itemsize))
        # integer arithmetic, not a getelementptr: the address may lie past the array's end, which a prefetch may
        # name (it never faults) but an in-bounds pointer may not
        address = builder.inttoptr(builder.add(builder.ptrtoint(data, i64), offset), ir.IntType(8).as_pointer())
        # llvmlite names the intrinsic for its own pointer type (p0i8; LLVM renames it for opaque pointers)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [address.type],
                                              ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]))
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])  # read, keep, data
        return context.get_dummy_value()

    return sig, codegen


def _prefetch_python(arr, index):
    return None


prefetch = _prefetch_python if config.DISABLE_JIT else _prefetch
"""``prefetch(arr, i)``: ask the CPU to start loading the cache line that holds element ``i`` of the C-contiguous
array ``arr`` (counted flat, in elements) into its caches, and go on without waiting (``llvm.prefetch``: on x86
``prefetcht0``). It changes no value and never faults, so ``i`` may lie past the end of ``arr``. Under
``NUMBA_DISABLE_JIT=1`` it does nothing.

The one-row 4-bit GEMVs (:mod:`lora_ref.quant.kernels`, :mod:`lora_ref.kernels.decode`) name the packed codes
:data:`PREFETCH_AHEAD` bytes ahead of the block they decode: one hint per block, or per 64 bytes of a block longer
than that (so at blocksize 64 two hints per cache line; a hint for a line already on its way costs little). Their
loop does more work per byte than a plain read, and on an Intel Xeon with AVX-512 (a 2-CPU virtual machine) the
hardware prefetchers alone did not keep the data coming while it worked: reading and decoding took turns (the 4096²
product took 0.56 ms with its codes in cache, and a plain read of its 8 MiB there takes about 0.5 ms; from memory it
took 1.15-1.32 ms, about the sum). Measured there, 2 threads, alternating processes with and without the hint
(figures from one session of runs; the host's speed moved by 15-30 % between sessions, so other docstrings give
other absolute times for the same code): the NF4 decode step of SmolLM2-135M (median of 64 steps, best of 5 runs)
15.3-17.0 ms without, 10.9-12.4 ms with (1024, 2048 and 4096 bytes ahead alike, 512 gave 14.4-14.6); one row times a
4096 × 4096 NF4 weight read from memory (best of 15 batches of 20 calls) 1.15-1.32 ms without, 0.75-1.17 ms with.
The same hint on the float32 rows (a whole row ahead, one per 16 floats) did not measurably change the float32
decode step (28-31 ms either way); what held those rows back was their own loop
(:func:`lora_ref.kernels.decode._dot_f32`). Not measured on an AVX2-only CPU, where the one-row GEMV was
compute-bound (:func:`lut16_block_dot`)."""

PREFETCH_AHEAD = 2048
"""Bytes ahead of the current block at which the one-row 4-bit GEMVs prefetch their packed codes (see
:func:`prefetch`)."""


@njit(inline="always")
def prefetch_codes(packed, byte0, nbytes):
    """Prefetch the packed codes :data:`PREFETCH_AHEAD` bytes past the ``nbytes`` bytes from ``byte0`` that a GEMV
    is about to decode: one hint per 64 bytes, at least one."""
    for j in range(0, nbytes, 64):
        prefetch(packed, byte0 + j + PREFETCH_AHEAD)


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

HAS_AVX2 = _host_has("avx2") and _host_has("fma")
"""Whether this host has AVX2 and FMA (default Numba target, JIT on): 8-float vectors and fused multiply-adds."""

HAS_LUT16 = HAS_AVX512 or HAS_AVX2
"""Whether :func:`lut16_decode16` and :func:`lut16_fma16` may be compiled here: with AVX-512F (one ``vpermps`` of
16 entries) or AVX2 (``vpshufb`` on the table's byte planes, e.g. AMD Zen 3); the values are the same."""


def _contiguous(t, dtype) -> bool:
    """Whether Numba type ``t`` is a C-contiguous array of ``dtype`` (the vector loads and stores assume both)."""
    return isinstance(t, types.Array) and t.dtype == dtype and t.layout == "C"


@intrinsic
def lut16_decode16(typingctx, packed, byte0, table, scale, out, out0):
    """Decode 16 packed bytes with a 16-entry float32 table held in vector registers (AVX-512 or AVX2).

    ``out[out0 + j] = table[packed[byte0 + j] >> 4] · scale`` and
    ``out[out0 + 16 + j] = table[packed[byte0 + j] & 15] · scale`` for j < 16: the 16 high nibbles (elements
    2j), then the 16 low nibbles (elements 2j + 1). Interleaving them back into element order would cost two
    more shuffles per call; a caller multiplying by a vector x reorders x once instead. Each value is one IEEE
    float32 product ``code[c] · absmax``, the NumPy decoder's (AVX-512: the table is scaled, then permuted; AVX2: the
    looked-up values are scaled), so the values are bit for bit the dequantized ones. The table must not be
    written anywhere in the compiled function that calls this (the AVX2 path's load of it is marked
    ``invariant.load``; the kernels pass read-only code tables).

    LLVM turns ``table[code]`` in a loop into a *gather*, one memory load per element. Sixteen float32 values
    fit in one AVX-512 register, and ``vpermps`` (``llvm.x86.avx512.permvar.sf.512``) picks 16 of them by
    index in one instruction. No Numba expression produces it, so this intrinsic writes the LLVM IR directly:
    load 16 bytes, widen to 32-bit, split the nibbles, scale the table, permute twice and store.
    With AVX2 only (:data:`HAS_AVX512` false) each code is looked up in the four byte planes of the unscaled table
    with ``vpshufb`` and the bytes unpacked into floats, which are then scaled (:func:`_lut16_values_avx2`); the
    same values. Callers check :data:`HAS_LUT16` and use a
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


def _splat(builder, value, width: int):
    """An LLVM vector of ``width`` copies of the float ``value`` (a broadcast)."""
    from llvmlite import ir

    vec, idx = ir.VectorType(value.type, width), ir.VectorType(ir.IntType(32), width)
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), ir.Constant(idx, [0] * width))


def _lut16_values(builder, context, signature, packed_v, byte0_v, table_v, scale_v):
    """The two 16-float vectors of :func:`lut16_decode16` (high nibbles, low nibbles), as LLVM values."""
    from llvmlite import ir

    packed_arr = context.make_array(signature.args[0])(context, builder, packed_v)
    table_arr = context.make_array(signature.args[2])(context, builder, table_v)
    i32 = ir.IntType(32)
    v16i8, v16i32 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(i32, 16)
    v16f = ir.VectorType(ir.FloatType(), 16)
    if not HAS_AVX512:
        return _lut16_values_avx2(builder, packed_arr.data, byte0_v, table_arr.data, scale_v)
    src = builder.bitcast(builder.gep(packed_arr.data, [byte0_v]), v16i8.as_pointer())
    codes = builder.zext(builder.load(src, align=1), v16i32)                      # 16 bytes as int32
    high = builder.lshr(codes, ir.Constant(v16i32, [4] * 16))                     # first elements
    low = builder.and_(codes, ir.Constant(v16i32, [15] * 16))                     # second elements
    table16 = builder.load(builder.bitcast(table_arr.data, v16f.as_pointer()), align=4)
    splat = _splat(builder, scale_v, 16)
    table16 = builder.fmul(table16, splat)                                        # 16 exact products
    permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16i32]),
                                             "llvm.x86.avx512.permvar.sf.512")
    return builder.call(permute, [table16, high]), builder.call(permute, [table16, low])


def _lut16_values_avx2(builder, packed_ptr, byte0_v, table_ptr, scale_v):
    """The two 16-float vectors of :func:`lut16_decode16` with AVX2 byte shuffles (``vpshufb``).

    AVX2 has no 16-entry float permute, and its 8-entry one (``vpermps``, across the two 128-bit halves of a
    register) is slow on AMD's Zen cores. ``vpshufb`` looks up 16-entry tables of *bytes*, within each 128-bit
    half, at two per cycle. So the (unscaled) table is cut into 4 byte planes (byte q of each of the 16 float32
    values, q = 0 … 3, little-endian), each code is looked up in all four, and the bytes are interleaved back into
    floats by unpacking (``vpunpcklbw``/``hbw`` then ``wd``/``hwd``). Unpacking works within each half, so the
    32 code indices are first put in the order that makes the result come out in the split order: half 0 holds
    the high nibbles of bytes 0-3 and 8-11 then the low nibbles of the same bytes, half 1 those of bytes 4-7 and
    12-15. Then each value is multiplied by the scale: the same float32 products ``code[c] · s`` as the
    AVX-512 path, so the same values, bit for bit. Per 16 bytes: about 15 shuffles and unpacks, 4 products.
    It replaced a version with the table in two 8-entry halves (``vpermps`` in both, a blend by the code's bit 3:
    8 permutes and 4 blends per 16 bytes): one row times a 4096 × 4096 NF4 weight on one thread of an AMD Zen 3,
    2.69 ms against 3.38 ms.
    """
    from llvmlite import ir

    v16i8, v32i8 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(8), 32)
    planes = _avx2_byte_planes(builder, table_ptr)
    # 16 packed bytes, copied into the two halves in the order above, then split into nibbles
    raw = builder.load(builder.bitcast(builder.gep(packed_ptr, [byte0_v]), v16i8.as_pointer()), align=1)
    half0, half1 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    both = _shuffle(builder, raw, None, half0 * 2 + half1 * 2)                                # (32,) bytes
    high = builder.lshr(both, ir.Constant(v32i8, [4] * 32))
    low = builder.and_(both, ir.Constant(v32i8, [15] * 32))
    idx = _shuffle(builder, high, low, [*range(8), *range(40, 48), *range(16, 24), *range(56, 64)])
    floats = _avx2_lookup(builder, planes, idx)                                             # 4 × 8 floats
    splat8 = _splat(builder, scale_v, 8)
    floats = [builder.fmul(f, splat8) for f in floats]                                         # code[c] · s
    return (_shuffle(builder, floats[0], floats[1], list(range(16))),
            _shuffle(builder, floats[2], floats[3], list(range(16))))


def _shuffle(builder, a, b, order):
    """LLVM ``shufflevector``: the elements of a (then b) picked by ``order``; b None means a alone."""
    from llvmlite import ir

    return builder.shuffle_vector(a, b if b is not None else ir.Constant(a.type, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), len(order)), order))


def _avx2_byte_planes(builder, table_ptr):
    """The 16-float table at ``table_ptr`` as 4 byte planes (``<32 x i8>``: byte q of each of the 16 values,
    little-endian, repeated in both 128-bit halves), the tables ``vpshufb`` looks codes up in. The load is marked
    invariant (nothing in the compiled caller writes the table: the kernels pass read-only code tables), so LLVM
    may hoist it and the planes out of the caller's loop even when the loop stores to memory that could alias the
    table (``lut16_decode16``'s ``out``)."""
    from llvmlite import ir

    v64i8 = ir.VectorType(ir.IntType(8), 64)
    table_bytes = builder.load(builder.bitcast(table_ptr, v64i8.as_pointer()), align=4)        # 16 floats
    table_bytes.set_metadata("invariant.load", builder.module.add_metadata([]))
    return [_shuffle(builder, table_bytes, None, [4 * c + q for c in range(16)] * 2) for q in range(4)]


def _avx2_lookup(builder, planes, idx):
    """The table values of 32 codes (``idx``, ``<32 x i8>``, each 0-15) as 4 vectors of 8 floats, unscaled: byte q
    of each value from plane q (``vpshufb``), then the bytes interleaved into floats by unpacking
    (``vpunpcklbw``/``hbw``, then ``wd``/``hwd``), which works within each 128-bit half. Float m of vector i is
    the value of code ``idx[16 · (m // 4) + 4 · i + m % 4]``: 4 shuffles and 8 unpacks per 32 codes."""
    from llvmlite import ir

    pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(idx.type, [idx.type, idx.type]),
                                            "llvm.x86.avx2.pshuf.b")
    p = [builder.call(pshufb, [plane, idx]) for plane in planes]                              # byte q of each value

    def unpack(a, b, lanes, hi):                   # interleave a and b within each 128-bit half, low or high part
        per_half = lanes // 2
        first = per_half // 2 if hi else 0
        order = []
        for h in (0, per_half):
            for k in range(first, first + per_half // 2):
                order += [h + k, lanes + h + k]
        return _shuffle(builder, a, b, order)

    v16i16, v8f = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.FloatType(), 8)
    b01 = [builder.bitcast(unpack(p[0], p[1], 32, hi), v16i16) for hi in (False, True)]    # bytes 0,1 paired
    b23 = [builder.bitcast(unpack(p[2], p[3], 32, hi), v16i16) for hi in (False, True)]    # bytes 2,3 paired
    return [builder.bitcast(unpack(b01[k], b23[k], 16, hi), v8f) for k in (0, 1) for hi in (False, True)]


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
    even then 16 odd ones) and float32, like ``acc``. As for :func:`lut16_decode16`, the table must not be
    written anywhere in the compiled function that calls this.
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


@njit(inline="always")
def sum32(acc):
    """The sum of the 32 running sums ``acc`` of :func:`lut16_fma16` / :func:`lut16_block_dot`, added pairwise: lanes
    l and l + 16, then l and l + 8, then l and l + 4, then the last four as (0 + 2) + (1 + 3). ``acc`` is spent (the
    halves are added in place). That is the order without ``fastmath``; a caller compiled with ``reassoc`` (this is
    inlined and takes the caller's flags) lets LLVM reorder it. Adding the 32 lanes one after another is a chain
    of 31 dependent additions, a visible share of a decode step's short rows (576 weights: 18 steps of 32): the
    NF4 decode step of SmolLM2-135M on an AMD Zen 3, 2 threads, three alternating runs of each, 14.8-15.9 ms with
    the chain, 13.2-14.6 ms pairwise."""
    for lane in range(16):
        acc[lane] += acc[lane + 16]
    for lane in range(8):
        acc[lane] += acc[lane + 8]
    for lane in range(4):
        acc[lane] += acc[lane + 4]
    return (acc[0] + acc[2]) + (acc[1] + acc[3])


BLOCK_DOT = HAS_AVX2 and not HAS_AVX512
"""Whether the one-row 4-bit GEMVs use :func:`lut16_block_dot` (AVX2 without AVX-512, e.g. AMD Zen 3) instead of
:func:`lut16_fma16`."""

BLOCK_DOT_ORDER = np.array([8 * (lane // 8) + (2 * (lane % 8) if lane % 8 < 4 else 2 * (lane % 8 - 4) + 1)
                            for lane in range(32)], np.int64)
"""Lane l of :func:`lut16_block_dot` takes element ``BLOCK_DOT_ORDER[l]`` of each group of 32: each group of 8
elements as its 4 even-indexed then 4 odd-indexed ones (0, 2, 4, 6, 1, 3, 5, 7, 8, 10, …)."""


@intrinsic
def lut16_block_dot(typingctx, packed, byte0, nbytes, table, scale, x, x0, acc):
    """One quantization block of packed 4-bit codes dotted with x and added, scaled once, into 32 running sums
    (AVX2).

    For each lane l < 32 and the block's 16-byte steps t = 0 … nbytes/16 − 1 (32 codes each; element 2j of a step
    is the high nibble of its byte j, element 2j + 1 the low nibble; ``e = BLOCK_DOT_ORDER[l]``)::

        part = table[c(t = 0, e)] · x[x0 + l]                       (one float32 product)
        part = fma(table[c(t, e)], x[x0 + 32 t + l], part)          (t ≥ 1, one rounding each)
        acc[l] = fma(part, scale, acc[l])

    so ``x`` must hold each group of 32 elements in :data:`BLOCK_DOT_ORDER` (a permutation the caller applies once
    per input vector). ``nbytes`` (bytes per block: blocksize / 2) must be a positive multiple of 16. The block's
    scale multiplies the partial sum once, where :func:`lut16_fma16` multiplies every code by it (the dequantized
    weight ``code[c] · s`` is never formed): the products are those of the weights, rounded differently, as in the
    gather path of :mod:`lora_ref.quant.kernels`.

    Why: on AVX2 the lookup is the work (:func:`_avx2_lookup`, 12 shuffles per 32 codes). This form saves the
    4 products with the scale per 32 codes and the shuffles that put the indices in split order: the 16 bytes are
    loaded into both halves of a register, the high nibbles kept in the first half and the low ones in the second
    (a shift, a blend and a mask), which is why the lanes come out in :data:`BLOCK_DOT_ORDER`. On an AMD Zen 3
    with one thread, one row times a 4096 × 4096 NF4 weight took 1.84-1.86 ms against 2.32 ms with
    :func:`lut16_fma16`. The common block of 64 codes (two steps) is straight-line code; other sizes loop.
    ``acc`` (32 float32, e.g. a :func:`stack_tile_f32` row) stays in registers across the caller's loop as for
    :func:`lut16_fma16`; the table must not be written anywhere in the compiled caller (its load is invariant).
    """
    if not HAS_AVX2 or scale != types.float32 or not _contiguous(table, types.float32) \
            or not _contiguous(packed, types.uint8) or not _contiguous(x, types.float32) \
            or not _contiguous(acc, types.float32) \
            or not all(isinstance(t, types.Integer) for t in (byte0, nbytes, x0)):
        return None
    sig = types.void(packed, byte0, nbytes, table, scale, x, x0, acc)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        packed_v, byte0_v, nbytes_v, table_v, scale_v, x_v, x0_v, acc_v = args
        i64 = ir.IntType(64)
        v16i8, v32i8, v16i16 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(8), 32), \
            ir.VectorType(ir.IntType(16), 16)
        v8f = ir.VectorType(ir.FloatType(), 8)
        byte0_v, nbytes_v, x0_v = (context.cast(builder, v, t, types.int64)
                                   for v, t in zip((byte0_v, nbytes_v, x0_v), (signature.args[i] for i in (1, 2, 6))))
        packed_d = context.make_array(signature.args[0])(context, builder, packed_v).data
        table_d = context.make_array(signature.args[3])(context, builder, table_v).data
        x_d = context.make_array(signature.args[5])(context, builder, x_v).data
        acc_d = context.make_array(signature.args[7])(context, builder, acc_v).data
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f, v8f, v8f]), "llvm.fma.v8f32")
        planes = _avx2_byte_planes(builder, table_d)

        def step(t, parts):
            """The 4 partial-sum vectors after step t (an i64 value); ``parts`` None for the first step."""
            src = builder.gep(packed_d, [builder.add(byte0_v, builder.mul(t, ir.Constant(i64, 16)))])
            raw = builder.load(builder.bitcast(src, v16i8.as_pointer()), align=1)
            both = _shuffle(builder, raw, None, list(range(16)) * 2)                 # the 16 bytes in both halves
            shifted = builder.bitcast(builder.lshr(builder.bitcast(both, v16i16), ir.Constant(v16i16, [4] * 16)),
                                      v32i8)
            idx = _shuffle(builder, shifted, both, [*range(16), *range(48, 64)])   # high nibbles | low nibbles
            idx = builder.and_(idx, ir.Constant(v32i8, [15] * 32))
            values = _avx2_lookup(builder, planes, idx)
            xt = builder.add(x0_v, builder.mul(t, ir.Constant(i64, 32)))
            out = []
            for i, v in enumerate(values):
                xp = builder.bitcast(builder.gep(x_d, [builder.add(xt, ir.Constant(i64, 8 * i))]), v8f.as_pointer())
                xv = builder.load(xp, align=4)
                out.append(builder.fmul(v, xv) if parts is None else builder.call(fma, [v, xv, parts[i]]))
            return out

        slots = [cgutils.alloca_once(builder, v8f) for _ in range(4)]
        nsteps = builder.udiv(nbytes_v, ir.Constant(i64, 16))
        with builder.if_else(builder.icmp_unsigned("==", nsteps, ir.Constant(i64, 2))) as (two, other):
            with two:                                                               # blocksize 64: no loop
                for slot, v in zip(slots, step(ir.Constant(i64, 1), step(ir.Constant(i64, 0), None))):
                    builder.store(v, slot)
            with other:
                for slot, v in zip(slots, step(ir.Constant(i64, 0), None)):
                    builder.store(v, slot)
                with cgutils.for_range(builder, nsteps, start=ir.Constant(i64, 1)) as loop:
                    for slot, v in zip(slots, step(loop.index, [builder.load(sl) for sl in slots])):
                        builder.store(v, slot)
        splat = _splat(builder, scale_v, 8)
        for i, slot in enumerate(slots):
            ap = builder.bitcast(builder.gep(acc_d, [ir.Constant(i64, 8 * i)]), v8f.as_pointer())
            builder.store(builder.call(fma, [builder.load(slot), splat, builder.load(ap, align=4)]), ap, align=4)
        return context.get_dummy_value()

    return sig, codegen


RANK_PAD = np.float32(np.inf)
"""The 16th entry of a :func:`rank16` table of 15 thresholds: no value is above it."""


def rank_table(thresholds: np.ndarray) -> np.ndarray:
    """float32[16]: 15 thresholds in ascending order, then :data:`RANK_PAD`, the table :func:`rank16` searches.
    ValueError if there are not 15 of them or they are not in ascending order."""
    t = np.asarray(thresholds, np.float32)
    if t.shape != (15,) or not np.all(t[1:] >= t[:-1]):
        raise ValueError(f"rank_table: expected 15 ascending float32 thresholds, got shape {t.shape}"
                         + ("" if t.shape != (15,) else ", not in ascending order"))
    return np.append(t, RANK_PAD).astype(np.float32)


@intrinsic
def rank16(typingctx, x, i, scale, clamp, table, out, o):
    """Sixteen 4-bit codes by binary search in a register (AVX-512): for j < 16, with ``s = x[i + j] · scale``
    (one float32 product)::

        out[o + j] = #{k : s > table[k]}        (an int32 from 0 to 15)

    for a :func:`rank_table` (15 ascending thresholds and +inf), so +inf counts 15 and a NaN 0 (it compares false),
    as the 15 comparisons of the CUDA rounding's plain loop count them. With the literal ``clamp`` True (bitsandbytes'
    CPU rounding) s is first clamped to [−1, 1], and a NaN counts 15, as ``torch.bucketize`` ranks it.

    The plain loop compares each value with all 15 thresholds. On AVX-512, LLVM makes each comparison a compare into
    a mask register, a move of the mask into a vector and a subtraction: two of the three run only on one execution
    port of Intel's cores (port 5), so 16 codes cost about 30 cycles there. The thresholds are sorted, so four steps
    of a binary search find the same count: ``idx += step`` where ``s > table[idx + step − 1]``, for step = 8, 4, 2,
    1, each step one ``vpermps`` of the table held in a register (as :func:`lut16_decode16` looks up codes), one
    compare and one masked add: 8 instructions on port 5 per 16 codes. ``quantize_4bit`` of a 4096 × 4096 float32
    tensor (NF4, CPU rounding, blocksize 64, ``impl="numba"``; 12 inputs in turn, read from memory) on an Intel Xeon
    with AVX-512, 2 threads, alternating processes: 16.5-17.0 ms with the comparisons, 9.4-10.2 ms with the search
    (the encoding step alone, input in cache: 7.8 → 3.4 ms); the codes are the same bytes. Only where
    :data:`HAS_AVX512` is true (the encoders' :func:`lora_ref.quant.kernels._nf4_codes`); ``x`` float32, ``table``
    float32[16] and ``out`` int32, all C-contiguous.
    """
    if scale != types.float32 or not isinstance(clamp, types.BooleanLiteral) or not _contiguous(x, types.float32) \
            or not _contiguous(table, types.float32) or not _contiguous(out, types.int32) \
            or not all(isinstance(t, types.Integer) for t in (i, o)):
        return None
    do_clamp = bool(clamp.literal_value)
    sig = types.void(x, i, scale, clamp, table, out, o)

    def codegen(context, builder, signature, args):
        from llvmlite import ir

        x_v, i_v, scale_v, _, table_v, out_v, o_v = args
        i_v, o_v = (context.cast(builder, v, t, types.int64) for v, t in ((i_v, signature.args[1]),
                                                                          (o_v, signature.args[6])))
        i32 = ir.IntType(32)
        v16f, v16i = ir.VectorType(ir.FloatType(), 16), ir.VectorType(i32, 16)
        x_d = context.make_array(signature.args[0])(context, builder, x_v).data
        table_d = context.make_array(signature.args[4])(context, builder, table_v).data
        out_d = context.make_array(signature.args[5])(context, builder, out_v).data
        values = builder.load(builder.bitcast(builder.gep(x_d, [i_v]), v16f.as_pointer()), align=4)
        s = builder.fmul(values, _splat(builder, scale_v, 16))
        if do_clamp:        # s > 1 → 1, s < −1 → −1, as the plain loop's two comparisons (a NaN stays NaN)
            one = ir.Constant(v16f, [1.0] * 16)
            minus_one = ir.Constant(v16f, [-1.0] * 16)
            s = builder.select(builder.fcmp_ordered(">", s, one), one, s)
            s = builder.select(builder.fcmp_ordered("<", s, minus_one), minus_one, s)
        table16 = builder.load(builder.bitcast(table_d, v16f.as_pointer()), align=4)
        table16.set_metadata("invariant.load", builder.module.add_metadata([]))
        permute = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f, v16i]),
                                                 "llvm.x86.avx512.permvar.sf.512")
        idx = ir.Constant(v16i, [0] * 16)
        zero = ir.Constant(v16i, [0] * 16)
        for step in (8, 4, 2, 1):
            probe = builder.add(idx, ir.Constant(v16i, [step - 1] * 16))
            above = builder.fcmp_ordered(">", s, builder.call(permute, [table16, probe]))
            idx = builder.add(idx, builder.select(above, ir.Constant(v16i, [step] * 16), zero))
        if do_clamp:        # torch.bucketize puts a NaN after every boundary
            idx = builder.select(builder.fcmp_unordered("uno", s, s), ir.Constant(v16i, [15] * 16), idx)
        builder.store(idx, builder.bitcast(builder.gep(out_d, [o_v]), v16i.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def block_fma(packed, byte0, nbytes, table, scale, x, x0, acc):
    """One quantization block of ``nbytes`` packed 4-bit codes (from ``byte0``, a multiple of 16) dotted with x (from
    ``x0``, in the order the step reads it) and added into the 32 running sums ``acc``: the one-row step of both
    4-bit GEMVs (:func:`lora_ref.quant.kernels.matmul_4bit` with one input row, the decode step of
    :mod:`lora_ref.kernels.decode`). The codes :data:`PREFETCH_AHEAD` bytes on are prefetched first; then
    :func:`lut16_block_dot` on AVX2 CPUs without AVX-512 (:data:`BLOCK_DOT`), :func:`lut16_fma16` per 16 bytes
    otherwise. Only for CPUs with :data:`HAS_LUT16`.

    Callers pass ``nbytes`` as the literal 32 for QLoRA's blocksize of 64: inlined, the block is then straight-line
    code (one prefetch, two steps), where a block size known only at run time costs a loop for the prefetches, a
    loop for the steps and their branches on every block of 64 codes. One row times a 4096 × 4096 NF4 weight, AVX-512,
    2 threads, alternating processes: 0.79-0.94 ms with the run-time size, 0.67-0.74 ms with the literal (weights
    read from memory)."""
    prefetch_codes(packed, byte0, nbytes)
    if BLOCK_DOT:
        lut16_block_dot(packed, byte0, nbytes, table, scale, x, x0, acc)
    else:
        for j in range(0, nbytes, 16):
            lut16_fma16(packed, byte0 + j, table, scale, x, x0 + 2 * j, acc)


def outer_product_f32(rows: int, cols: int, a_stride: int, width: int = 8):
    """A jit-callable ``step(ap, bp, p, acc)``: one step of a register-blocked matmul, in explicit vectors.

    For i < ``rows`` and j < ``cols``: ``acc[i, j] = fma(ap[i, p], bp[p, j], acc[i, j])``, one fused multiply-add
    (``llvm.fma``, a single rounding) per element, whatever the caller's fastmath flags; called for p = 0, 1, …
    every element of ``acc`` is the chain of FMAs over p in order. ``ap`` holds A's micro-panel with rows
    ``a_stride`` floats apart (the packed (MR, KC) panel), ``bp`` B's micro-panel with rows ``cols`` floats apart
    (KC, NR), ``acc`` the (rows, cols) tile; all float32 and C-contiguous, ``cols`` a multiple of ``width``.
    The strides are the factory's arguments, not checked against the arrays: ``ap`` needs ``rows`` rows of
    ``a_stride`` floats and ``bp`` rows of exactly ``cols`` floats, as :func:`lora_ref.kernels.matmul.pack_a` and
    the kernels' B panels have.

    The step loads ``cols / width`` vectors of B's row p, broadcasts each ``ap[i, p]`` and issues
    ``rows · cols / width`` vector FMAs into ``acc``. ``acc`` is loaded and stored around each FMA; when it is a
    :func:`stack_tile_f32` tile, LLVM keeps it in registers across the caller's loop over p (checked in the
    machine code of the 6 × 16 AVX2 tile: 12 accumulators, 2 B vectors, one broadcast register, no stack
    traffic in the loop). Under ``NUMBA_DISABLE_JIT=1`` it is a Python loop (float32 products and sums, not
    fused).
    """
    if cols % width:
        raise ValueError(f"outer_product_f32: cols ({cols}) must be a multiple of the vector width ({width})")
    if config.DISABLE_JIT:
        def step_python(ap, bp, p, acc):
            for i in range(rows):
                for j in range(cols):
                    acc[i, j] += ap[i, p] * bp[p, j]
        return step_python

    @intrinsic
    def step(typingctx, ap, bp, p, acc):
        if not all(_contiguous(t, types.float32) for t in (ap, bp, acc)) or not isinstance(p, types.Integer):
            return None
        sig = types.void(ap, bp, p, acc)

        def codegen(context, builder, signature, args):
            from llvmlite import ir

            ap_v, bp_v, p_v, acc_v = args
            f32, i64 = ir.FloatType(), ir.IntType(64)
            vec = ir.VectorType(f32, width)
            a_data = context.make_array(signature.args[0])(context, builder, ap_v).data
            b_data = context.make_array(signature.args[1])(context, builder, bp_v).data
            acc_data = context.make_array(signature.args[3])(context, builder, acc_v).data
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]),
                                                 f"llvm.fma.v{width}f32")
            p64 = context.cast(builder, p_v, signature.args[2], types.int64)

            def at(data, offset):                                   # data + offset as a pointer to a vector
                return builder.bitcast(builder.gep(data, [offset]), vec.as_pointer())

            b_row = builder.mul(p64, ir.Constant(i64, cols))
            b_vecs = [builder.load(at(b_data, builder.add(b_row, ir.Constant(i64, v * width))), align=4)
                      for v in range(cols // width)]                # row p of B, cols / width vectors
            for i in range(rows):
                a_ip = builder.load(builder.gep(a_data, [builder.add(p64, ir.Constant(i64, i * a_stride))]))
                splat = _splat(builder, a_ip, width)
                for v in range(cols // width):
                    ptr = at(acc_data, ir.Constant(i64, i * cols + v * width))
                    builder.store(builder.call(fma, [splat, b_vecs[v], builder.load(ptr, align=4)]), ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return step
