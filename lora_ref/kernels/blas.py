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
found by this module's tests and fixed). OpenBLAS's *threaded* driver can also cut the inner dimension K
differently from its one-thread driver (measured here: a 32 × 449 × 70 product on two OpenBLAS threads differs in
the last bits from the same product on one; K = 576, 256, 100, 4096 did not), so every call this module makes runs
on one BLAS thread, chunked or not: its results are those of ``np.matmul`` on one BLAS thread, for every thread
count. The thread count is the
BLAS's (what ``--threads`` / :func:`lora_ref.threads.set_threads` set); small products (below ``MIN_WORK``
multiply-adds) run as one call on one thread, where waking a second thread costs more than it saves.

:func:`batched_matmul` does the same for stacks of products (attention's per-head products). The readable twin is
``np.matmul`` itself (:func:`matmul_reference`).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numba
import numpy as np

from lora_ref.threads import _blas_libraries, one_blas_thread

__all__ = ["matmul", "matmuls", "batched_matmul", "matmul_reference", "run_parallel", "regular_product", "MIN_WORK",
           "CHUNKS_PER_THREAD", "SMALL_PRODUCT", "SMALL_KERNEL_CORES", "blas_core", "blas_threads"]

MIN_WORK = 1 << 22  # multiply-adds (~0.1-0.2 ms on one core) below which a product runs on one thread
CHUNKS_PER_THREAD = 2
MIN_CHUNK = 32  # rows (or columns) of the output per chunk, at least
SMALL_PRODUCT = 100**3  # multiply-adds at or below which OpenBLAS (x86-64) runs its small-matrix kernels


#: OpenBLAS cores (threadpoolctl's "architecture") that have the x86-64 small-matrix kernels: the AVX-512 ones
SMALL_KERNEL_CORES = ("SkylakeX", "Cooperlake", "SapphireRapids")


def blas_core() -> str | None:
    """The kernel set OpenBLAS picked for this CPU (``"SkylakeX"`` on this project's machines), or None."""
    libs = [lc for lc in _blas_libraries() if lc.internal_api == "openblas"]
    return getattr(libs[0], "architecture", None) if libs else None


def regular_product(m: int, n: int, k: int) -> bool:
    """Whether an (m × k) · (k × n) product takes the BLAS's regular road: more than :data:`SMALL_PRODUCT`
    multiply-adds and at least 2 rows and 2 columns (module docstring). Two products on the regular road give every
    output element the same bits (the sum over k in the same blocks), whatever their other rows and columns. On a
    core without the small-matrix kernels (not in :data:`SMALL_KERNEL_CORES`) more products are regular than this
    says; the rule stays on the safe side there."""
    return m >= 2 and n >= 2 and m * n * k > SMALL_PRODUCT


def _chunk_edges(length: int, other: int, k: int, n: int) -> list[int] | None:
    """Edges of up to ``n · CHUNKS_PER_THREAD`` nearly equal chunks of ``length`` rows (or columns), each at least
    ``MIN_CHUNK`` long and a :func:`regular_product` with the ``other`` dimension and ``k``; ``None`` for fewer than 2."""
    chunks = min(n * CHUNKS_PER_THREAD, length // MIN_CHUNK)
    while chunks >= 2 and not regular_product(length // chunks, other, k):
        chunks -= 1
    if chunks < 2:
        return None
    return [length * i // chunks for i in range(chunks + 1)]

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
        edges = None
        if n > 1 and M * N * K >= MIN_WORK:
            edges = _chunk_edges(M, N, K, n) if M >= N else _chunk_edges(N, M, K, n)
        plans.append(edges)
    if all(e is None for e in plans):  # nothing worth a second thread: each one call, on one BLAS thread
        with one_blas_thread():
            return [np.matmul(a, b) for a, b in pairs]
    outs, tasks = [], []
    for (a, b), edges in zip(pairs, plans):  # the chunks of every product; one too small to cut is one task
        M, K = a.shape
        N = b.shape[1]
        by_rows = M >= N
        out = np.empty((M, N), dtype=np.result_type(a, b))
        edges = edges if edges is not None else [0, M if by_rows else N]
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
        edges = _chunk_edges(M, N, K, -(-per // CHUNKS_PER_THREAD)) if regular_product(M, N, K) else None
        edges = edges if edges is not None else [0, M]
        tasks = [(a3[i, s:e], b3[i], out[i, s:e]) for i in range(L) for s, e in zip(edges, edges[1:])]
    _run(tasks, n)
    return out.reshape(lead + (M, N))


def _run(tasks: list, n: int) -> None:
    """Run ``np.matmul(a, b, out=o)`` for every (a, b, o) of ``tasks`` (:func:`run_parallel`)."""
    run_parallel([partial(np.matmul, a, b, out=o) for a, b, o in tasks], n)


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
