"""Two small Numba intrinsics the fast kernels need: a stack buffer for register blocking, and wide vectors.

Numba's ``np.empty`` allocates on the heap, and LLVM cannot keep heap memory in registers: a micro-kernel whose
accumulator tile lives in such an array loads and stores it on every multiply-add. :func:`stack_tile_f32`
returns a function that allocates a fixed number of float32 slots on the *stack* (an LLVM ``alloca``). LLVM
knows that stack memory aliases nothing else, so after the loops over the tile are unrolled the whole tile is
promoted to vector registers.

:func:`prefer_wide_vectors` marks the calling function with ``"prefer-vector-width"="512"``. LLVM's tuning for
Intel server cores (Skylake-X and later) prefers 256-bit vectors even on AVX-512 machines; the micro-kernels of
:mod:`lora_ref.matmul` and :mod:`lora_ref.quant.kernels` run about 1.5x faster with 512-bit registers. On a CPU
without AVX-512 the attribute changes nothing. With ``NUMBA_DISABLE_JIT=1`` both helpers have plain Python
fallbacks (a NumPy array and a no-op), so the kernels still run as ordinary Python.
"""

from __future__ import annotations

import numpy as np
from numba import carray, config, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["stack_tile_f32", "prefer_wide_vectors"]


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
