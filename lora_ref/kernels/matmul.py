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
   ``acc[i, :] += ap[i, p] · bp[p, :]``. The tile ``acc`` lives in registers (6 × 64 floats = 24 AVX-512
   registers): per step p it loads 4 vectors of B, broadcasts 6 numbers of A and issues 24 fused multiply-adds,
   so arithmetic, not memory, sets the pace. See :mod:`lora_ref.kernels.jit` for the stack buffer that lets LLVM keep
   ``acc`` in registers.

Partial tiles at the edges are handled by zero padding in the packed copies; only the valid part of ``acc`` is
written back. Threads split the columns of C (one B micro-panel each), so they never write the same element.

The NumPy twin :func:`matmul_reference` runs the same tiling with ``np.matmul`` per tile; the two differ only
by the order of float32 additions. Taught in ``notebooks/06_kernels.ipynb``; benchmarked by
``lora-ref bench`` (row ``sgemm_1024``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from lora_ref.kernels.jit import prefer_wide_vectors, stack_tile_f32

__all__ = ["MR", "NR", "KC", "matmul", "matmul_reference", "pack_a", "micro_kernel"]

MR = 6     # rows of the register tile
NR = 64    # columns of the register tile (4 AVX-512 vectors of float32)
KC = 1024  # length of a K chunk: a B micro-panel is KC·NR·4 bytes = 256 KiB, kept in the L2 cache

_acc_tile = stack_tile_f32(MR, NR)


def _check_operands(a: np.ndarray, b: np.ndarray) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, np.ndarray) or t.dtype != np.float32 or t.ndim != 2:
            raise ValueError(f"matmul: {name} must be a 2-D float32 array, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} with shape {getattr(t, 'shape', None)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: inner dimensions differ: a {a.shape} @ b {b.shape}")


def matmul_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C = A @ B computed tile by tile with NumPy: the readable twin of :func:`matmul`.

    Parameters: ``a`` (M, K) float32, ``b`` (K, N) float32. Returns (M, N) float32.
    The loops are the kernel's loops (K chunks of ``KC``, column panels of ``NR``, row panels of ``MR``);
    each tile product is one ``np.matmul``.
    """
    _check_operands(a, b)
    M, K = a.shape
    N = b.shape[1]
    c = np.zeros((M, N), np.float32)                                # (M, N)
    for k0 in range(0, K, KC):
        for j0 in range(0, N, NR):
            bp = b[k0:k0 + KC, j0:j0 + NR]                          # (kc, nr) micro-panel of B
            for i0 in range(0, M, MR):
                ap = a[i0:i0 + MR, k0:k0 + KC]                      # (mr, kc) micro-panel of A
                c[i0:i0 + MR, j0:j0 + NR] += ap @ bp                # (mr, nr) tile
    return c


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


@njit(cache=True, inline="always", fastmath=True)
def micro_kernel(ap, bp, kc, acc):
    """acc (MR, NR) = ap[:, :kc] @ bp[:kc, :] as kc outer products; ap (MR, KC), bp (KC, NR)."""
    for i in range(MR):
        for j in range(NR):
            acc[i, j] = 0.0
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


@njit(cache=True, parallel=True, fastmath=True)
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
    """C = A @ B for float32 matrices with the tiled, parallel Numba kernel; twin of :func:`matmul_reference`.

    Parameters: ``a`` (M, K) float32, ``b`` (K, N) float32 (any strides). Returns (M, N) float32.
    Uses ``numba.get_num_threads()`` threads. Raises ``ValueError`` for other dtypes or mismatched shapes.
    """
    _check_operands(a, b)
    c = np.empty((a.shape[0], b.shape[1]), np.float32)              # (M, N)
    _matmul_kernel(a, b, c)
    return c
