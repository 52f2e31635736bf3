"""Thread pools that behave on a busy machine: wait policies set before the pools start, and one thread count.

lora_ref's compute runs in two thread pools that take turns: Numba's parallel loops (``parallel=True`` kernels,
run by Numba's OpenMP threading layer, i.e. GNU libgomp) and the BLAS behind NumPy's matrix products (OpenBLAS
with its own pthreads). A transformer step alternates between them hundreds of times a second: a BLAS product, a
Numba RMSNorm, a BLAS product, a Numba softmax...

Both pools, by default, keep their threads *spinning* for a while after a parallel region ends, betting that the
next region of the same pool comes soon. libgomp spins up to ``GOMP_SPINCOUNT`` iterations (300,000 with
``OMP_WAIT_POLICY`` unset, see the libgomp manual), OpenBLAS for 2^``OPENBLAS_THREAD_TIMEOUT`` cycles (2^28 by
default, yielding the core while it waits; OpenBLAS ``driver/others/blas_server.c``). When the *other* pool
runs next, spinning OpenMP threads sit on the cores the BLAS threads need: on 2 cores, greedy decoding of
SmolLM2-135M ran at 1.2 tokens/s.

:func:`apply_defaults` (run when ``lora_ref`` is imported, before Numba's pool starts) sets, unless the user
already set them:

- ``OMP_WAIT_POLICY=PASSIVE``: an idle OpenMP thread sleeps at once (libgomp's spin count becomes 0);
- ``KMP_BLOCKTIME=0``: the same for Intel's and LLVM's OpenMP runtimes, should Numba load one of those.

OpenBLAS keeps its default: its waiting threads yield the core, and making them sleep at once
(``OPENBLAS_THREAD_TIMEOUT=4``) was measured slower, quiet and loaded (a SmolLM2 forward 0.45-0.57 s against
0.31-0.34 s quiet), because every one of the ~200 matrix products of a forward then pays a wake-up.

The pools never nest: no Numba parallel kernel calls the BLAS, and BLAS calls are made from Python between
kernels, so at any moment at most one pool's threads are busy and the thread count is each pool's own
(``numba.set_num_threads`` and ``threadpoolctl`` for the BLAS; :func:`set_threads` sets both, which is what
every compute command's ``--threads N`` does). Decoding runs its one-token steps on one thread
(:func:`limited`).

Measured on 2 cores shared with other work (best of 4, 2 threads; "busy" = one competing ``while True: pass``
process), before these defaults → after:

- SmolLM2-135M forward, 1 × 256 tokens: quiet 1.42-1.47 s → 0.35 s; busy 1.74-2.33 s → 0.74-0.83 s;
- a training step of the tutorial model: quiet 0.54-0.68 s → 0.31-0.36 s; busy 0.79-0.80 s → 0.55-0.69 s;
- greedy decoding of SmolLM2-135M: quiet 1.2 → 23 tokens/s; busy 0.6 → 18-23 tokens/s.

A busy neighbour still costs about 2x: it takes part of a core from two threads that split every product
evenly, so each product waits for the slower thread. With ``--threads 1`` one neighbour costs nothing (forward
0.60 s quiet and busy, training step 0.41 / 0.43 s), at the price of the quiet machine's second core.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["DEFAULTS", "apply_defaults", "limited", "set_threads", "thread_info"]

#: Environment variables :func:`apply_defaults` sets when they are unset.
DEFAULTS: dict[str, str] = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "KMP_BLOCKTIME": "0",
}


def apply_defaults() -> dict[str, str]:
    """Set each of :data:`DEFAULTS` that is not already in the environment; return the ones this call set.

    They are read when the OpenMP runtime starts, which is when Numba's first parallel region runs, so
    ``import lora_ref`` (which calls this) is early enough even in a script that imported NumPy or Numba first.
    """
    changed = {}
    for key, value in DEFAULTS.items():
        if os.environ.get(key, "").strip() == "":
            os.environ[key] = value
            changed[key] = value
    return changed


def set_threads(n: int | None) -> dict:
    """Use ``n`` threads in Numba's parallel loops and in the BLAS (``None``: leave both as they are).

    ``n`` above Numba's pool size (``NUMBA_NUM_THREADS``, the CPU count by default) is refused with
    ``ValueError``: the pool is sized when Numba starts and cannot grow. Returns :func:`thread_info`.
    """
    if n is not None:
        import numba
        from threadpoolctl import threadpool_limits

        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be a positive integer, got {n!r}")
        if n > numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"threads must be at most {numba.config.NUMBA_NUM_THREADS} (the CPUs Numba may use; "
                             f"set NUMBA_NUM_THREADS to change it), got {n}")
        numba.set_num_threads(n)
        threadpool_limits(limits=n, user_api="blas")
    return thread_info()


def thread_info() -> dict:
    """The thread counts in force: Numba's, the BLAS's, and the wait-policy variables."""
    import numba
    from threadpoolctl import threadpool_info

    blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
    return {
        "numba_threads": numba.get_num_threads(),
        "blas_threads": blas[0].get("num_threads") if blas else None,
        **{k: os.environ.get(k) for k in DEFAULTS},
    }


@contextlib.contextmanager
def limited(n: int | None):
    """Run the block with at most ``n`` threads in Numba's kernels and in the BLAS (``None``: unchanged).

    The decode loop of :mod:`lora_ref.modeling.generate` runs its one-token steps under ``limited(1)``: a step is
    ~200 matrix-vector products and ~250 small kernels on one row each, too small for a second thread to pay
    for its wake-up (measured on 2 cores, SmolLM2-135M: 16-22 tokens/s on one thread against 6-11 on two).
    Numba's setting is per calling thread and restored on exit, as is the BLAS limit (``threadpoolctl``).
    """
    if n is None:
        yield
        return
    import numba

    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(n, prev)))
    try:
        with _controller().limit(limits=n, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(prev)


_CONTROLLER = None


def _controller():
    """One ``threadpoolctl.ThreadpoolController`` (scanning the loaded libraries costs ~0.5 ms; reuse it)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER
