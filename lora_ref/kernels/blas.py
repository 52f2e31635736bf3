"""Large matrix products shared out in chunks: threads that take the next chunk when done, each on one BLAS thread.

A BLAS run on n threads cuts a product into n equal parts, one per thread, and returns when the last part is done.
On a machine where other processes compete for the cores, one of our threads is often descheduled for a whole
time slice, and the product waits for it: on 2 cores shared with other work, a (1024 × 576) · (576 × 1536)
product took 59 ms on two OpenBLAS threads against 47 ms on one, and a LoRA training step of SmolLM2 on two
threads ran 2.5x slower than on one, while PyTorch's step got faster with the second thread.

:func:`matmul` cuts the product along its longer output dimension into more chunks than threads (``CHUNKS_PER_THREAD``
per thread) and lets each thread (the caller plus a pool of ``n − 1`` workers) take the next chunk when it has
finished its last: a thread that is descheduled holds up only the chunk it holds, and the others take the rest.
Each chunk is one ordinary single-threaded BLAS call (:func:`lora_ref.threads.one_blas_thread`), so the pools
never nest, and every output element is computed by one call over the whole K dimension, exactly as in one
``np.matmul``: the results are the same bits (tested, also against the number of threads) — provided every chunk
takes the same road through the BLAS as the whole product. OpenBLAS does not: on x86-64 it sends a product of at
most 100³ multiply-adds (M·N·K ≤ 10⁶) to separate small-matrix kernels (OpenBLAS
``kernel/x86_64/sgemm_small_kernel_permit_skylakex.c``), and NumPy sends a product with one row or one column to a
matrix-vector routine; both sum in another order, so a row's bits depend on the shape of the call it is in.
:func:`regular_product` is that rule, and chunks are cut so that every one stays on the regular road (a chunk of
a 97 × 446 × 97 product cut into 32-row pieces left a last piece of one row, which came back with other bits:
found by this module's tests and fixed). Where a chunk may begin is the other half of the rule, and it depends on the
kernel OpenBLAS picked for the CPU (:func:`blas_core`). The AVX-512 kernels (``SkylakeX``, ``Cooperlake``,
``SapphireRapids``) sum every output element in the same order wherever it lies, so a product may be cut anywhere.
The AVX2 kernel of ``Haswell`` and ``Zen`` (OpenBLAS ``kernel/x86_64/sgemm_kernel_8x4_haswell_2.c``) does not: the
driver (``driver/level3/level3.c``) hands it the rows of NumPy's output in panels of 12 (3 × ``SGEMM_UNROLL_N``) and
the rows left over in panels of 4, whose kernel sums the even and the odd k in two separate accumulators; and it
starts every block of NumPy's output columns with 8 columns summed that way too. So on those cores a product is cut
only by rows and only at multiples of 12 from its first row (every chunk then holds full panels, and the last one
ends in the same left-over rows as the whole product); this was found on an AMD EPYC (Zen 3) where OpenBLAS picks
``Haswell``, by this module's tests, and the rule measured there (:data:`CUT_STEPS`, :func:`cut_steps`). On any
other core nothing is cut: each product is one call on one thread.

OpenBLAS's *threaded* driver can also cut the inner dimension K
differently from its one-thread driver (measured here: a 32 × 449 × 70 product on two OpenBLAS threads differs in
the last bits from the same product on one; K = 576, 256, 100, 4096 did not), so every call this module makes runs
on one BLAS thread, chunked or not: its results are those of ``np.matmul`` on one BLAS thread, for every thread
count. The thread count is the
BLAS's (what ``--threads`` / :func:`lora_ref.threads.set_threads` set); small products (below ``MIN_WORK``
multiply-adds) run as one call on one thread, where waking a second thread costs more than it saves.

:func:`batched_matmul` does the same for stacks of products (attention's per-head products). The readable twin is
``np.matmul`` itself (:func:`matmul_reference`).

**Handing the chunks over.** A Python thread pool (:func:`run_parallel`) costs 47-69 us per hand-over here (a Future,
a queue, a sleeping thread woken, the GIL passed back and forth), and a training step of the tutorial model makes
~600 products. For float32 the chunks are therefore handed over in compiled code: each chunk becomes one row of
integers, the arguments of the ``cblas_sgemm`` call NumPy's matmul itself makes for it (NumPy's rule for the
transpose flags and leading dimensions, :func:`_blas_layout`), and the threads of Numba's pool take the next row
until none is left and call the BLAS through its address (:func:`call_sgemm`; 12-13 us per
hand-over, measured the same way: the kernel with no rows on 2 threads). The same call makes the same bits. Anything NumPy would not hand to ``cblas_sgemm`` as it is (another
dtype, a side of length 1, a matrix times its own transpose, an operand without a unit stride), a BLAS other than
the scipy-openblas64 NumPy bundles, or ``NUMBA_DISABLE_JIT=1`` takes the Python pool (``tests/kernels/test_blas.py``
runs the bit-for-bit tests through both). Both rely on the BLAS being set to one thread for the duration
(:func:`lora_ref.threads.one_blas_thread`), a process-wide setting: lora_ref's compute is meant to run in one Python
thread at a time (the serving engine has one compute thread). Two Python threads computing at once could restore the
count under each other, and OpenBLAS's threads would then be started from inside Numba's parallel region.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numba
import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.extending import intrinsic

from lora_ref.kernels import jit  # noqa: F401  (first: installs the source-keyed Numba cache, lora_ref/kernels/cache.py)
from lora_ref.threads import _blas_libraries, one_blas_thread

__all__ = ["matmul", "matmuls", "batched_matmul", "matmul_reference", "run_parallel", "regular_product", "MIN_WORK",
           "CHUNKS_PER_THREAD", "SMALL_PRODUCT", "SMALL_KERNEL_CORES", "CUT_STEPS", "cut_steps", "blas_core",
           "blas_threads"]

MIN_WORK = 1 << 22  # multiply-adds (~0.1-0.2 ms on one core) below which a product runs on one thread
CHUNKS_PER_THREAD = 2
MIN_CHUNK = 32  # rows (or columns) of the output per chunk, at least
SMALL_PRODUCT = 100**3  # multiply-adds at or below which OpenBLAS (x86-64) runs its small-matrix kernels


#: OpenBLAS cores (threadpoolctl's "architecture") that have the x86-64 small-matrix kernels: the AVX-512 ones
SMALL_KERNEL_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")

#: (row step, column step) per OpenBLAS core: a product may be cut into chunks of rows (of NumPy's output) starting at
#: multiples of the row step, or of columns at multiples of the column step, and every element keeps its bits (module
#: docstring); None: not along that side. Cores not listed are not cut at all.
CUT_STEPS: dict[str, tuple[int | None, int | None]] = {
    "SkylakeX": (1, 1), "Cooperlake": (1, 1), "SapphireRapids": (1, 1),  # the same order for every element
    "Haswell": (12, None), "Zen": (12, None),  # rows in panels of 12; column blocks begin with 8 summed otherwise
}


def blas_core() -> str | None:
    """The kernel set OpenBLAS picked for this CPU (``"SkylakeX"`` on this project's machines), or None."""
    libs = [lc for lc in _blas_libraries() if lc.internal_api == "openblas"]
    return getattr(libs[0], "architecture", None) if libs else None


def cut_steps() -> tuple[int | None, int | None]:
    """(row step, column step) of :data:`CUT_STEPS` for the BLAS in use: ``(None, None)`` (never cut) for a core not
    listed or a BLAS that is not OpenBLAS."""
    if not _steps:
        _steps.append(CUT_STEPS.get(blas_core() or "", (None, None)))
    return _steps[0]


_steps: list = []  # [cut_steps()], found once


def regular_product(m: int, n: int, k: int) -> bool:
    """Whether an (m × k) · (k × n) product takes the BLAS's regular road: more than :data:`SMALL_PRODUCT`
    multiply-adds and at least 2 rows and 2 columns (module docstring). Two products on the regular road give every
    output element the same bits (the sum over k in the same blocks), whatever their other rows and columns. On a
    core without the small-matrix kernels (not in :data:`SMALL_KERNEL_CORES`) more products are regular than this
    says; the rule stays on the safe side there."""
    return m >= 2 and n >= 2 and m * n * k > SMALL_PRODUCT


def _chunk_edges(length: int, other: int, k: int, n: int, step: int = 1) -> list[int] | None:
    """Edges of up to ``n · CHUNKS_PER_THREAD`` nearly equal chunks of ``length`` rows (or columns), each beginning at a
    multiple of ``step`` (the last one ends at ``length``), at least ``MIN_CHUNK`` long and a :func:`regular_product`
    with the ``other`` dimension and ``k``; ``None`` for fewer than 2."""
    units = length // step
    chunks = min(n * CHUNKS_PER_THREAD, length // MIN_CHUNK, units)
    while chunks >= 2:
        edges = [step * (units * i // chunks) for i in range(chunks)] + [length]
        shortest = min(j - i for i, j in zip(edges, edges[1:]))
        if shortest >= MIN_CHUNK and regular_product(shortest, other, k):
            return edges
        chunks -= 1
    return None


def _syrk(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether NumPy computes ``a @ b`` as x·xᵀ with ``syrk`` (``b`` is ``a`` transposed, one buffer). Its chunks would
    be ordinary products; they have the bits of ``syrk`` only where every element is summed in the same order
    wherever it lies (``cut_steps() == (1, 1)``; on OpenBLAS's AVX2 cores they differ, so there it is not cut)."""
    return a.ctypes.data == b.ctypes.data and a.shape == b.shape[::-1] and a.strides == b.strides[::-1]


def _plan(M: int, N: int, K: int, n: int) -> tuple[bool, list[int]] | None:
    """How :func:`matmul` cuts an (M × K) · (K × N) product for ``n`` threads: (by rows?, edges), or None (one call).
    Along the longer side of the output where :func:`cut_steps` allows it, else by rows."""
    row_step, col_step = cut_steps()
    by_rows = M >= N or col_step is None
    step = row_step if by_rows else col_step
    if step is None:
        return None
    edges = _chunk_edges(M, N, K, n, step) if by_rows else _chunk_edges(N, M, K, n, step)
    return (by_rows, edges) if edges is not None else None


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def matmul_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The readable twin: ``a @ b`` on one BLAS thread."""
    with one_blas_thread():
        return np.matmul(a, b)


def blas_threads() -> int:
    """The thread count set for the BLAS (1 without a BLAS threadpoolctl can see)."""
    libs = _blas_libraries()
    return max(1, libs[0].get_num_threads()) if libs else 1


def _workers(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lora_ref-blas")
            _pool_size = n
        return _pool


def matmul(a: np.ndarray, b: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``a @ b`` for 2-D float arrays (any strides), shared out in chunks (module docstring); the same bits as
    ``np.matmul`` on one BLAS thread. ``threads``: how many threads take chunks (default: the BLAS's thread count)."""
    return matmuls([(a, b)], threads)[0]


def matmuls(pairs: list[tuple[np.ndarray, np.ndarray]], threads: int | None = None) -> list[np.ndarray]:
    """``[a @ b for a, b in pairs]`` with one hand-over between threads for all of them: the chunks of every product
    (each cut as :func:`matmul` cuts it; a product too small to cut is one task) go to the threads together, longest
    first; when none is worth cutting, all run on the calling thread, with no hand-over. A linear layer's backward
    makes its two products (dx = g·W and dW = gᵀ·x) this way, so the threads are woken once, not twice. The same bits
    as :func:`matmul` of each pair."""
    n = blas_threads() if threads is None else int(threads)
    plans = []
    for a, b in pairs:
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"matmul needs 2-D operands (M, K) and (K, N), got {a.shape} and {b.shape}")
        M, K = a.shape
        N = b.shape[1]
        cut = n > 1 and M * N * K >= MIN_WORK and (cut_steps() == (1, 1) or not _syrk(a, b))
        plans.append(_plan(M, N, K, n) if cut else None)
    if all(p is None for p in plans):  # nothing worth a second thread: each one call, on one BLAS thread
        with one_blas_thread():
            return [np.matmul(a, b) for a, b in pairs]
    outs, tasks = [], []
    for (a, b), plan in zip(pairs, plans):  # the chunks of every product; one too small to cut is one task
        M, K = a.shape
        N = b.shape[1]
        by_rows, edges = plan if plan is not None else (True, [0, M])
        out = np.empty((M, N), dtype=np.result_type(a, b))
        if by_rows:
            tasks += [(a[i:j], b, out[i:j], (j - i) * N * K) for i, j in zip(edges, edges[1:])]
        else:
            tasks += [(a, b[:, i:j], out[:, i:j], (j - i) * M * K) for i, j in zip(edges, edges[1:])]
        outs.append(out)
    tasks.sort(key=lambda t: -t[3])  # longest first (a stable sort: equal chunks keep their order)
    _run([t[:3] for t in tasks], n)
    return outs


def batched_matmul(a: np.ndarray, b: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``np.matmul(a, b)`` for stacks of matrices with the same leading shape, (…, M, K) · (…, K, N) → (…, M, N):
    the L = prod(…) products (attention's one per batch row and key/value head) shared out in chunks as in
    :func:`matmul`: runs of whole products when there are at least as many products as chunks (one ``np.matmul`` over
    a stack per chunk: a tutorial-model batch has 64 small products per call, and one Python task each cost more
    than the products), else row chunks of each; each chunk on one BLAS thread; the same bits as ``np.matmul``."""
    if a.ndim < 3 or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"batched_matmul needs (..., M, K) and (..., K, N) with the same leading shape, got "
                         f"{a.shape} and {b.shape}")
    lead, (M, K), N = a.shape[:-2], a.shape[-2:], b.shape[-1]
    n = blas_threads() if threads is None else int(threads)
    L = int(np.prod(lead))
    if n <= 1 or L * M * N * K < MIN_WORK:
        with one_blas_thread():
            return np.matmul(a, b)
    a3, b3 = a.reshape((L, M, K)), b.reshape((L, K, N))  # views for the usual layouts; copies otherwise
    out = np.empty((L, M, N), dtype=np.result_type(a, b))
    chunks = n * CHUNKS_PER_THREAD
    if L >= chunks:  # enough products: each chunk a run of whole products (one np.matmul over a stack of them)
        edges = [L * i // chunks for i in range(chunks + 1)]
        tasks = [(a3[i:j], b3[i:j], out[i:j]) for i, j in zip(edges, edges[1:])]
    else:  # few products: row chunks of each (each a regular product, like the whole one, or the product whole)
        per = -(-chunks // L)
        row_step = cut_steps()[0]
        edges = _chunk_edges(M, N, K, -(-per // CHUNKS_PER_THREAD), row_step) \
            if row_step is not None and regular_product(M, N, K) else None
        edges = edges if edges is not None else [0, M]
        tasks = [(a3[i, s:e], b3[i], out[i, s:e]) for i in range(L) for s, e in zip(edges, edges[1:])]
    _run(tasks, n)
    return out.reshape(lead + (M, N))


def _run(tasks: list, n: int) -> None:
    """Run ``np.matmul(a, b, out=o)`` for every (a, b, o) of ``tasks`` on ``n`` threads: as the same BLAS calls
    NumPy would make, handed over in compiled code (:func:`_gemm_rows`) when every task allows it, else through
    :func:`run_parallel`."""
    address = _sgemm_address() if n > 1 else None
    rows = _gemm_rows(tasks) if address else None
    if rows is None:
        run_parallel([partial(np.matmul, a, b, out=o) for a, b, o in tasks], n)
        return
    taken = np.empty(len(rows), np.int64)
    workers = min(n, numba.config.NUMBA_NUM_THREADS, len(rows))
    prev = numba.get_num_threads()  # Numba's count is per calling thread: n for this call, then as it was
    numba.set_num_threads(max(prev, workers))
    try:
        with one_blas_thread():
            _gemm_tasks_kernel(address, rows, np.zeros(1, np.int64), workers, taken)
    finally:
        numba.set_num_threads(prev)


# ------------------------------------------------------------------------------------------ the compiled hand-over
# Handing a task to a pool thread from Python costs 47-69 us on this project's machine (measured: run_parallel of two
# empty tasks): a Future, a queue, a sleeping thread woken, the GIL passed back and forth. A training step of the
# tutorial model makes ~600 products, so the hand-overs alone cost tens of milliseconds. Numba's parallel loop hands
# over in compiled code (12-13 us: _gemm_tasks_kernel with no rows), so the products of _run are made there: each task becomes
# one row of integers (the arguments of the cblas_sgemm call NumPy itself would make for that matmul) and each
# thread takes the next row until none is left.

_NO_TRANS, _TRANS = 111, 112  # CBLAS_TRANSPOSE
_SGEMM_SYMBOL = "scipy_cblas_sgemm64_"  # NumPy's bundled OpenBLAS (scipy-openblas64: 64-bit integers)
_sgemm: list = []  # [address or None], found once


def _sgemm_address() -> int | None:
    """The address of NumPy's BLAS's ``cblas_sgemm`` (64-bit integers), or None (another BLAS, or the JIT off).
    NumPy's own copy (under ``numpy.libs``) is preferred should another library export the same symbol."""
    if not _sgemm:
        address = None
        if not config.DISABLE_JIT:
            libs = sorted(_blas_libraries(), key=lambda lc: "numpy" not in str(lc.filepath))
            for lc in libs:
                try:
                    address = ctypes.cast(getattr(ctypes.CDLL(lc.filepath), _SGEMM_SYMBOL), ctypes.c_void_p).value
                    break
                except (AttributeError, OSError):
                    continue
        _sgemm.append(address)
    return _sgemm[0]


def _blas_layout(x: np.ndarray, rows: int, cols: int) -> tuple[int, int] | None:
    """(transpose code, leading dimension) NumPy's matmul passes for a (rows × cols) float32 operand with x's
    strides, or None if NumPy would not hand it to the BLAS as it is. NumPy's rule (``is_blasable2d`` in
    ``numpy/_core/src/umath/matmul.c.src``): no transpose if the rows are contiguous and far enough apart, else
    transposed if the columns are."""
    s_r, s_c = x.strides
    if s_c == 4 and s_r % 4 == 0 and s_r // 4 >= cols:
        return _NO_TRANS, s_r // 4
    if s_r == 4 and s_c % 4 == 0 and s_c // 4 >= rows:
        return _TRANS, s_c // 4
    return None


def _gemm_rows(tasks: list) -> np.ndarray | None:
    """The cblas_sgemm arguments ``[transa, transb, m, n, k, A, lda, B, ldb, C, ldc]`` (one int64 row per 2-D
    product; a task over a stack of products gives one row per product) of ``np.matmul(a, b, out=o)`` for every
    task, or None if any of them is not a float32 product NumPy sends to ``cblas_sgemm`` as it is: a product with a
    side of length 1 (NumPy's matrix-vector and dot routines), a matrix times its own transpose (NumPy's ``syrk``),
    or an operand or output NumPy would copy or multiply itself."""
    rows = []
    for a, b, o in tasks:
        if a.dtype != np.float32 or b.dtype != np.float32 or o.dtype != np.float32:
            return None
        if not (a.ndim == b.ndim == o.ndim and a.ndim in (2, 3)) or a.size == 0 or b.size == 0:
            return None
        x, y, z = (a[0], b[0], o[0]) if a.ndim == 3 else (a, b, o)  # a stack: every product has these strides
        (m, k), n = x.shape, y.shape[1]
        if min(m, n, k) < 2:
            return None
        la, lb, lc = _blas_layout(x, m, k), _blas_layout(y, k, n), _blas_layout(z, m, n)
        if la is None or lb is None or lc is None or lc[0] != _NO_TRANS:
            return None
        pa, pb, pc = a.ctypes.data, b.ctypes.data, o.ctypes.data
        steps = (a.strides[0], b.strides[0], o.strides[0]) if a.ndim == 3 else (0, 0, 0)
        for i in range(a.shape[0] if a.ndim == 3 else 1):
            xa, xb = pa + i * steps[0], pb + i * steps[1]
            if xa == xb:
                return None
            rows.append((la[0], lb[0], m, n, k, xa, la[1], xb, lb[1], pc + i * steps[2], lc[1]))
    return np.array(rows, dtype=np.int64) if rows else None


def _int64_args(context, builder, sig_args, args) -> list:
    return [context.cast(builder, v, t, types.int64) for v, t in zip(args, sig_args)]


@intrinsic
def fetch_add(typingctx, counter):
    """``counter[0] += 1`` as one atomic instruction, returning the value before: threads that share ``counter`` (a
    writable 1-element int64 array) each get a different number, so each takes a different task. Numba has no
    atomics; this is LLVM's ``atomicrmw add`` (sequentially consistent)."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and counter.mutable):
        return None
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", arr.data, ir.Constant(ir.IntType(64), 1), "seq_cst")

    return sig, codegen


@intrinsic
def call_sgemm(typingctx, address, transa, transb, m, n, k, a, lda, b, ldb, c, ldc):
    """``cblas_sgemm(CblasRowMajor, transa, transb, m, n, k, 1, A, lda, B, ldb, 0, C, ldc)`` called through the
    function's ``address``, with the 64-bit integers of NumPy's bundled OpenBLAS (``scipy_cblas_sgemm64_``);
    ``a``, ``b``, ``c`` are the matrices' addresses. Every argument is an integer (widened to int64; the two
    transpose codes passed as the C enum's int). A Numba function that calls a ctypes function object cannot be
    cached (its address changes from run to run); passing the address as an argument keeps the caller cacheable.
    This intrinsic lives beside its one caller on purpose: Numba's cache checks the caller's file only, so an edit
    here that left the cached caller stale would call the BLAS with the old arguments."""
    sig_args = (address, transa, transb, m, n, k, a, lda, b, ldb, c, ldc)
    if not all(isinstance(t, types.Integer) for t in sig_args):
        return None
    sig = types.void(*sig_args)

    def codegen(context, builder, signature, args):
        i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
        fp = f32.as_pointer()
        fn_ty = ir.FunctionType(ir.VoidType(), [i32, i32, i32, i64, i64, i64, f32, fp, i64, fp, i64, f32, fp, i64])
        fn_, ta, tb, m_, n_, k_, a_, lda_, b_, ldb_, c_, ldc_ = _int64_args(context, builder, signature.args, args)
        builder.call(builder.inttoptr(fn_, fn_ty.as_pointer()),
                     [ir.Constant(i32, 101), builder.trunc(ta, i32), builder.trunc(tb, i32), m_, n_, k_,
                      ir.Constant(f32, 1.0), builder.inttoptr(a_, fp), lda_, builder.inttoptr(b_, fp), ldb_,
                      ir.Constant(f32, 0.0), builder.inttoptr(c_, fp), ldc_])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, parallel=True, nogil=True)
def _gemm_tasks_kernel(address, rows, counter, workers, taken):
    """``workers`` threads (one prange iteration each) take the next row of ``rows`` until none is left and make
    its cblas_sgemm call; ``counter`` (int64[1], zero) hands out the rows; ``taken[i]`` records which thread of
    the parallel region made row i's call (0 is the caller). The BLAS must be on one thread."""
    for _ in prange(workers):
        while True:
            i = fetch_add(counter)
            if i >= rows.shape[0]:
                break
            taken[i] = numba.get_thread_id()
            r = rows[i]
            call_sgemm(address, r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10])


def run_parallel(fns: list, threads: int | None = None) -> None:
    """Call every function of ``fns``: the caller and ``threads − 1`` pool threads each take the next one when done
    with their last (the order of ``fns`` is the order they are taken in: put the longest first). Every BLAS call
    inside runs on one thread, and so does every Numba parallel kernel called from a task (Numba's thread count is
    per calling thread), so the pools never nest. A task that raises re-raises here after the others finish."""
    n = blas_threads() if threads is None else int(threads)
    it = iter(fns)
    lock = threading.Lock()

    def work() -> None:
        prev = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            while True:
                with lock:
                    fn = next(it, None)
                if fn is None:
                    return
                fn()
        finally:
            numba.set_num_threads(prev)

    with one_blas_thread():
        futures = [_workers(n - 1).submit(work) for _ in range(min(n - 1, len(fns) - 1))] if n > 1 else []
        try:
            work()
        finally:
            errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e
