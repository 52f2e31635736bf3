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
``np.matmul``: the results are the same bits (tested, also against the number of threads). The thread count is the
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

__all__ = ["matmul", "batched_matmul", "matmul_reference", "run_parallel", "MIN_WORK", "CHUNKS_PER_THREAD",
           "blas_threads"]

MIN_WORK = 1 << 22  # multiply-adds (~0.1-0.2 ms on one core) below which a product runs on one thread
CHUNKS_PER_THREAD = 2
MIN_CHUNK = 32  # rows (or columns) of the output per chunk, at least

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def matmul_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The readable twin: ``a @ b``."""
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
    ``np.matmul``. ``threads``: how many threads take chunks (default: the BLAS's thread count)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul needs 2-D operands (M, K) and (K, N), got {a.shape} and {b.shape}")
    M, K = a.shape
    N = b.shape[1]
    n = blas_threads() if threads is None else int(threads)
    if n <= 1 or M * N * K < MIN_WORK or max(M, N) < 2 * MIN_CHUNK:
        if n <= 1 or M * N * K >= MIN_WORK:
            return np.matmul(a, b)
        with one_blas_thread():
            return np.matmul(a, b)
    out = np.empty((M, N), dtype=np.result_type(a, b))
    by_rows = M >= N
    length = M if by_rows else N
    step = max(MIN_CHUNK, -(-length // (n * CHUNKS_PER_THREAD)))
    if by_rows:
        tasks = [(a[s:s + step], b, out[s:s + step]) for s in range(0, length, step)]
    else:
        tasks = [(a, b[:, s:s + step], out[:, s:s + step]) for s in range(0, length, step)]
    _run(tasks, n)
    return out


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
    else:  # few products: row chunks of each
        step = max(MIN_CHUNK, -(-M // -(-chunks // L)))
        tasks = [(a3[i, s:s + step], b3[i], out[i, s:s + step]) for i in range(L) for s in range(0, M, step)]
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
