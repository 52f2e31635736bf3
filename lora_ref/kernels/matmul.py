"""A float32 matrix product C = A @ B, tiled and register-blocked, in Numba; with the NumPy twin it must equal.

How a fast matmul is organised (Goto & van de Geijn 2008, "Anatomy of high-performance matrix multiplication";
the BLIS papers call the pieces by the names used here):

1. **Panels of K.** The K dimension is cut into chunks of ``KC``, and A is copied ("packed") once into
   micro-panels of ``MR`` rows per chunk, ``ap[kb, ib, i, p] = A[ib·MR + i, kb·KC + p]``, so the micro-kernel
   reads them with unit stride. A larger KC means fewer passes over C; 1024 measured best here.
2. **Micro-panels of B.** Each thread takes ``NR`` columns of B and, chunk by chunk, packs them as
   ``bp[p, j] = B[k0 + p, j0 + j]`` (KC × NR floats, L2-resident) and multiplies every A micro-panel by it,
   adding into its own columns of C.
3. **The micro-kernel** computes one MR × NR tile of C as a sum of KC outer products,
   ``acc[i, :] += ap[i, p] · bp[p, :]``. The tile ``acc`` lives in vector registers: with AVX-512, 6 × 64 floats
   are 24 of the 32 registers of 16 floats, and per step p the kernel loads 4 vectors of B, broadcasts 6 numbers
   of A and issues 24 fused multiply-adds, so arithmetic, not memory, sets the pace. A CPU with AVX2 only has 16
   registers of 8 floats: there the tile is 6 × 16 (12 registers, 2 vectors of B per step, 12 multiply-adds), and
   because LLVM's vectorizer turns the plain loops for that shape into scalar code, the step is written in
   explicit vectors (:func:`lora_ref.kernels.jit.outer_product_f32`, :data:`EXPLICIT_VECTORS`). See
   :mod:`lora_ref.kernels.jit` for the stack buffer that lets LLVM keep ``acc`` in registers.

Partial tiles at the edges are handled by zero padding in the packed copies; only the valid part of ``acc`` is
written back. Threads split the columns of C (one B micro-panel each), so they never write the same element.

The NumPy twin :func:`lora_ref.kernels.reference.matmul` (also reachable here as :func:`matmul_reference`) runs the
same tiling with ``np.matmul`` per tile; the two differ only by the order of float32 additions. The tile sizes live
with the twin, so both read the same ones. Taught in ``notebooks/06_kernels.ipynb``; benchmarked by
``lora-ref bench`` (row ``sgemm_1024``).
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit, prange

from lora_ref.kernels import reference, switch
from lora_ref.kernels.jit import FAST_MATH, HAS_AVX2, HAS_AVX512, outer_product_f32, prefer_wide_vectors, stack_tile_f32
from lora_ref.kernels.reference import KC, MR, NR
from lora_ref.kernels.reference import check_matmul_operands as _check_operands

__all__ = ["MR", "NR", "KC", "VECTOR_FLOATS", "VECTOR_REGISTERS", "EXPLICIT_VECTORS", "matmul", "matmul_reference",
           "pack_a", "micro_kernel", "pick", "PICK"]

matmul_reference = reference.matmul
"""The readable twin of :func:`matmul` (:func:`lora_ref.kernels.reference.matmul`), under its former name."""

VECTOR_FLOATS = 16 if HAS_AVX512 else 8
"""float32 lanes of one vector register the tile is counted in: 16 with AVX-512, else 8 (AVX2)."""
VECTOR_REGISTERS = 32 if HAS_AVX512 else 16
"""Vector registers the tile, B's vectors and the broadcast A value share: 32 with AVX-512, else 16 (AVX2)."""
EXPLICIT_VECTORS = HAS_AVX2 and not HAS_AVX512
"""Whether :func:`micro_kernel` runs its steps as :func:`lora_ref.kernels.jit.outer_product_f32` (AVX2 without
AVX-512) instead of the plain loops LLVM vectorizes itself. With the explicit step each element of the tile is the
chain of fused multiply-adds over p in order (``tests/kernels/test_kernels.py`` checks it bit for bit); with the
plain loops, fusing and order are LLVM's choice under :data:`lora_ref.kernels.jit.FAST_MATH` (without JIT:
separate products and sums)."""

_acc_tile = stack_tile_f32(MR, NR)
_outer_step = outer_product_f32(MR, NR, KC)


@njit(cache=True)
def pack_a(a):
    """A in micro-panels: ap[kb, ib, i, p] = a[ib·MR + i, kb·KC + p], zero past A's last row and column.

    Returns float32 (ceil(K/KC), ceil(M/MR), MR, KC), about M·K floats. Serial: a copy of A takes well under
    1% of the product's time, less than waking up a thread pool for it."""
    M, K = a.shape
    n_k_chunks = (K + KC - 1) // KC
    n_row_panels = (M + MR - 1) // MR
    ap = np.zeros((n_k_chunks, n_row_panels, MR, KC), np.float32)
    for ib in range(n_row_panels):
        for i in range(min(MR, M - ib * MR)):
            row = a[ib * MR + i]                                    # (K,)
            for kb in range(n_k_chunks):
                kc = min(KC, K - kb * KC)
                ap[kb, ib, i, :kc] = row[kb * KC:kb * KC + kc]
    return ap


@njit(cache=True, inline="always", fastmath=FAST_MATH)
def micro_kernel(ap, bp, kc, acc):
    """acc (MR, NR) = ap[:, :kc] @ bp[:kc, :] as kc outer products; ap (MR, KC), bp (KC, NR)."""
    for i in range(MR):
        for j in range(NR):
            acc[i, j] = 0.0
    if EXPLICIT_VECTORS:        # AVX2: the same step in explicit 8-float vectors (see the module docstring)
        for p in range(kc):
            _outer_step(ap, bp, p, acc)
    else:
        for p in range(kc):
            for i in range(MR):
                a_ip = ap[i, p]
                for j in range(NR):
                    acc[i, j] += a_ip * bp[p, j]


@njit(cache=True, inline="always")
def store_tile(acc, c, i0, j0, accumulate):
    """c[i0:i0+mr, j0:j0+nr] (+)= acc[:mr, :nr], clipped at c's edges."""
    mr = min(MR, c.shape[0] - i0)
    nr = min(NR, c.shape[1] - j0)
    for i in range(mr):
        if accumulate:
            for j in range(nr):
                c[i0 + i, j0 + j] += acc[i, j]
        else:
            for j in range(nr):
                c[i0 + i, j0 + j] = acc[i, j]


@njit(cache=True, parallel=True, fastmath=FAST_MATH)
def _matmul_kernel(a, b, c):
    M, K = a.shape
    N = b.shape[1]
    if K == 0:
        c[:, :] = 0.0
    ap = pack_a(a)                                                  # (K chunks, row panels, MR, KC)
    n_col_panels = (N + NR - 1) // NR
    for jb in prange(n_col_panels):                                 # each thread owns whole columns of C
        prefer_wide_vectors()
        acc = _acc_tile()                                           # (MR, NR) in registers
        bp = np.zeros((KC, NR), np.float32)                         # (KC, NR) micro-panel of B
        j0 = jb * NR
        nr = min(NR, N - j0)
        for kb in range(ap.shape[0]):
            k0 = kb * KC
            kc = min(KC, K - k0)
            for p in range(kc):
                for j in range(nr):
                    bp[p, j] = b[k0 + p, j0 + j]
            for ib in range(ap.shape[1]):
                micro_kernel(ap[kb, ib], bp, kc, acc)
                store_tile(acc, c, ib * MR, j0, kb > 0)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C = A @ B for float32 matrices with the tiled, parallel Numba kernel; twin of :func:`reference.matmul`.

    Parameters: ``a`` (M, K) float32, ``b`` (K, N) float32 (any strides). Returns (M, N) float32.
    Uses ``numba.get_num_threads()`` threads. Raises ``ValueError`` for other dtypes or mismatched shapes.
    """
    _check_operands(a, b)
    c = np.empty((a.shape[0], b.shape[1]), np.float32)              # (M, N)
    _matmul_kernel(a, b, c)
    return c


PICK = switch.Twins(sys.modules[__name__], {
    "matmul": switch.Operation(("matmul",), reference, switch.float32_arrays),
})
pick = PICK.pick
"""``pick("matmul", a, b, impl="auto")``: this module or :mod:`lora_ref.kernels.reference` (see
:class:`lora_ref.kernels.switch.Twins`)."""
