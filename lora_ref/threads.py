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

- ``OMP_WAIT_POLICY=PASSIVE``: an idle OpenMP thread sleeps instead of spinning for long;
- ``GOMP_SPINCOUNT=1000``, only when ``OMP_WAIT_POLICY`` is unset too (libgomp lets a spin count override the
  policy, and the user's policy wins): an idle libgomp thread checks for work 1000 times, with a ``pause``
  between checks (microseconds to tens of microseconds), before it sleeps. With a spin count of 0 (what PASSIVE
  alone means) every parallel loop wakes a sleeping thread, and back-to-back loops pay that each time: a
  compiled decode step runs five parallel loops per layer, 150 for SmolLM2-135M. On a 2-CPU virtual machine (AMD
  Zen 3, where an idle virtual CPU halts and waking it goes through the host) a loop of trivial work took
  13.7-15.4 µs with no spinning and 2.4-2.5 µs with a count of 300 to 3000; the NF4 decode step, 2 threads, in
  alternating processes, 17.0-17.7 ms with none and 14.6-15.4 ms with 1000. The window is far shorter than
  OpenBLAS's ~0.1 s of polling. One run each of ``lora-ref bench train`` and ``bench real`` without and with it:
  ``train_step`` 266.6 → 261.1 ms, ``contention`` ratio 1.58 → 1.53, ``real_lora_step`` 5.26 → 4.96 s,
  ``real_qlora_step`` 5.65 → 6.11 s (its baseline, the LoRA step inside that row, 5.64 → 6.08 s), ``real_prefill``
  1.35 → 1.06 s (this row moved 0.87-1.26 in ratio between runs of one build on this machine): no row got
  slower than its own noise. When a process runs more OpenMP threads than it has CPUs, libgomp does not spin
  under PASSIVE whatever the count (the libgomp manual, ``GOMP_SPINCOUNT``), so an oversubscribed process sleeps
  at once as before;
- ``KMP_BLOCKTIME=0``: an idle thread sleeps at once in Intel's and LLVM's OpenMP runtimes, should Numba load one
  of those.

OpenBLAS keeps its default: its waiting threads yield the core, and making them sleep at once
(``OPENBLAS_THREAD_TIMEOUT=4``) was measured slower, quiet and loaded (a SmolLM2 forward 0.45-0.57 s against
0.31-0.34 s quiet), because every one of the ~200 matrix products of a forward then pays a wake-up.

The pools never nest: BLAS calls are made from Python between kernels, or by the one Numba kernel that hands the
chunks of a product to Numba's threads (:mod:`lora_ref.kernels.blas`), which calls the BLAS with its thread count set
to one; so at any moment at most one pool's threads are busy and the thread count is each pool's own
(``numba.set_num_threads`` and ``threadpoolctl`` for the BLAS; :func:`set_threads` sets both, which is what
every compute command's ``--threads N`` does). :func:`lora_ref.modeling.generate.generate_tokens` runs its
one-token steps on one thread unless given ``decode_threads`` (:func:`limited`); the ``generate`` and ``chat``
commands give it their own thread count.

Measured on 2 cores shared with other work (best of 4, 2 threads; "busy" = one competing ``while True: pass``
process), before these defaults → after (with ``OMP_WAIT_POLICY`` and ``KMP_BLOCKTIME``, before the spin count was
added):

- SmolLM2-135M forward, 1 × 256 tokens: quiet 1.42-1.47 s → 0.35 s; busy 1.74-2.33 s → 0.74-0.83 s;
- a training step of the tutorial model: quiet 0.54-0.68 s → 0.31-0.36 s; busy 0.79-0.80 s → 0.55-0.69 s;
- greedy decoding of SmolLM2-135M: quiet 1.2 → 23 tokens/s; busy 0.6 → 18-23 tokens/s.

A busy neighbour costs two threads far more than its share: it takes part of a core from two threads that split
every product evenly, so each product waits for the slower thread (SmolLM2 forward 0.38 s quiet, 1.03 s beside one
busy loop on 2 cores: 2.7x). One thread does not wait for anyone (0.60 s quiet and busy). So the compute commands
start with :func:`default_threads`: the CPUs that are idle when the command starts (:func:`idle_cpus`, 0.1 s of
``/proc/stat``), all of them on a quiet machine, one fewer per busy neighbour; ``--threads N`` or
``LORA_REF_THREADS=N`` sets it by hand. With the fast paths on, the results do not depend on it: the kernels sum
in a fixed number of chunks, and the matrix products of the model's layers (the linear layers, attention, LoRA's
rank-r products, LoRA's ΔW = B·A of DoRA's weight norm and of merges) are made of one-thread BLAS calls that give
each output element the same bits however the product is shared out (:mod:`lora_ref.kernels.blas`;
``tests/test_threads.py`` and ``tests/kernels/test_blas.py`` check the bits). A product NumPy hands to OpenBLAS on
several threads is another matter: OpenBLAS's threaded driver can cut the inner dimension differently from its
one-thread driver, and for some shapes (32 × 449 × 70, 40 × 4481 × 40 measured here) the last bits differ.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["DEFAULTS", "apply_defaults", "default_threads", "idle_cpus", "limited", "one_blas_thread", "set_threads",
           "thread_info"]

#: Environment variables :func:`apply_defaults` sets when they are unset (``GOMP_SPINCOUNT`` only when
#: ``OMP_WAIT_POLICY`` is unset too: libgomp lets it override the policy).
DEFAULTS: dict[str, str] = {
    "OMP_WAIT_POLICY": "PASSIVE",
    "GOMP_SPINCOUNT": "1000",
    "KMP_BLOCKTIME": "0",
}


def apply_defaults() -> dict[str, str]:
    """Set each of :data:`DEFAULTS` that is not already in the environment; return the ones this call set.

    They are read when the OpenMP runtime starts, which is when Numba's first parallel region runs, so
    ``import lora_ref`` (which calls this) is early enough even in a script that imported NumPy or Numba first.
    """
    unset = {key for key in DEFAULTS if os.environ.get(key, "").strip() == ""}
    if "OMP_WAIT_POLICY" not in unset:      # the user's policy: a spin count of ours would override it
        unset.discard("GOMP_SPINCOUNT")
    changed = {}
    for key in DEFAULTS:
        if key in unset:
            os.environ[key] = DEFAULTS[key]
            changed[key] = DEFAULTS[key]
    return changed


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from the first line of ``/proc/stat`` (Linux), or None where it is missing."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in (fields[1:9] + ["0"] * 8)[:8])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def idle_cpus(probe: float = 0.1, *, times=_cpu_times) -> int:
    """How many of the CPUs this process may run on are idle, from ``/proc/stat`` read twice ``probe`` seconds apart
    (this process sleeps in between, so it counts only the others): the CPUs available to us minus the busy ones,
    rounded, at least 1. Without ``/proc/stat``: every available CPU."""
    import time

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    first = times()
    if first is None:
        return available
    time.sleep(probe)
    second = times()
    if second is None or second[1] <= first[1]:
        return available
    busy_cpus = (second[0] - first[0]) / (second[1] - first[1]) * (os.cpu_count() or available)
    return max(1, min(available, int(available - busy_cpus + 0.5)))


def default_threads() -> int:
    """The thread count a compute command starts with: ``$LORA_REF_THREADS`` if set, else :func:`idle_cpus`."""
    env = os.environ.get("LORA_REF_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"LORA_REF_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"LORA_REF_THREADS must be a positive integer, got {env!r}")
        return n
    return idle_cpus()


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

    :func:`lora_ref.modeling.generate.generate_tokens` runs its one-token steps under ``limited(1)`` unless given
    ``decode_threads``. A step is ~200 matrix-vector products and ~250 small kernels on one row each, and a second
    thread helps only when it has a CPU to itself. Measured on 2 cores shared with other work, SmolLM2-135M: 16-22
    tokens/s on one thread against 6-11 on two; with the compiled decoder (:class:`lora_ref.modeling.decode.Decoder`,
    five parallel loops per layer), alternating in one process at load average ~7: float32 76-82 ms per token on
    one thread against 75-105 on two, NF4 47-70 against 59-81 (every loop waits for the slower thread, often one
    the scheduler has parked). Re-measured with the default spin count (``GOMP_SPINCOUNT=1000``) on a 2-CPU AMD
    Zen 3, ``generate_tokens`` after a 128-token prompt, median step of 48, four alternations: on the quiet
    machine one thread took 38.8-40.9 ms per float32 token against 22.9-28.0 on two, NF4 23.5-32.0 against
    16.1-20.8; with one busy loop on the other CPU one thread took 33.4-35.9 against 41.7-43.1, NF4 23.4-25.8
    against 32.6-39.8. So the right count is the idle CPUs. ``generate_tokens`` keeps one thread by default (a
    library call cannot know what else the program runs); the command line's ``generate`` and ``chat`` decode on
    the threads they were given (``--threads``, else :func:`default_threads`, the CPUs idle at the start), and a
    program can pass ``decode_threads=idle_cpus()``. The compiled decoder gives the same bits on any thread count
    (each output row is one thread's sum).
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


@contextlib.contextmanager
def one_blas_thread():
    """Run the block's BLAS calls on one thread (the calling one); the BLAS thread counts come back after it.

    For products too small for a second thread to pay for its wake-up: a LoRA layer's rank-r products ((N, in) ·
    (in, r) with r = 16) and attention's per-head products. Measured on 2 cores with SmolLM2's shapes (N = 1024 rows,
    576 → 16): 0.4 ms on one OpenBLAS thread, 17-20 ms on two (OpenBLAS splits the 16 output columns between
    threads that must first be woken); a LoRA step on SmolLM2 makes ~1,000 such products. Unlike :func:`limited`
    this touches only the BLAS, through the library's own ``get/set_num_threads`` (a C call each; no
    ``threadpoolctl`` bookkeeping), so it may wrap every product of a layer. OpenBLAS gives each output element to
    one thread, so the results do not change.
    """
    libs = _blas_libraries()
    prev = [lc.get_num_threads() for lc in libs]
    changed = [(lc, n) for lc, n in zip(libs, prev) if n != 1]
    for lc, _ in changed:
        lc.set_num_threads(1)
    try:
        yield
    finally:
        for lc, n in changed:
            lc.set_num_threads(n)


_BLAS_LIBS = None


def _blas_libraries() -> list:
    """threadpoolctl's controllers of the loaded BLAS libraries (found once)."""
    global _BLAS_LIBS
    if _BLAS_LIBS is None:
        _BLAS_LIBS = [lc for lc in _controller().lib_controllers if lc.user_api == "blas"]
    return _BLAS_LIBS


_CONTROLLER = None


def _controller():
    """One ``threadpoolctl.ThreadpoolController`` (scanning the loaded libraries costs ~0.5 ms; reuse it)."""
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER
