"""Timing helpers shared by every benchmark: ours and the baseline measured alternately in one run."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def time_pair(ours: Callable[[], object], baseline: Callable[[], object], *, repeats: int = 7,
              warmup: int = 2) -> tuple[float, float]:
    """Median wall-clock seconds of ``ours()`` and ``baseline()``, run alternately after ``warmup`` calls each.

    Alternating the two means that a slow phase of the machine (another process, a frequency change) costs both
    sides alike, so their ratio is steadier than either time. Each of the ``repeats`` rounds runs the pair in both
    orders (ours, baseline, baseline, ours): whichever runs right after the other pays for the caches and memory the
    other left behind, and with plain alternation an odd number of repeats puts one side first more often (with
    ``--quick``'s former 3 repeats, ours ran first in 2 of 3). So each side gets ``2 · repeats`` samples, half of
    them first in their round, whatever ``repeats`` is.
    """
    for _ in range(warmup):
        ours()
        baseline()
    t_ours, t_base = [], []
    for _ in range(repeats):
        for fn, acc in ((ours, t_ours), (baseline, t_base), (baseline, t_base), (ours, t_ours)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_base)


def time_pair_min(ours: Callable[[], object], baseline: Callable[[], object], *, rounds: int = 15, warmup: int = 2,
                  min_seconds: float = 0.05, settle: float = 0.0) -> tuple[float, float]:
    """Seconds per call of ``ours()`` and ``baseline()``: the minimum over ``rounds`` alternating rounds, each round
    timing a batch of calls that lasts at least ``min_seconds``.

    For short calls (a GEMV takes about a millisecond) the median of single calls moves with every wake-up of a
    thread and every neighbour's burst, so a run of 3 and a run of 11 disagree. Here the ``warmup`` calls compile
    and warm the caches and also measure one call of each side, which fixes each side's batch (the same in a quick
    and a full run); another process can only add time to a batch, so the fastest batch is the repeatable figure,
    and more rounds only make it likelier that one round ran undisturbed.

    ``settle``: seconds of idling before each batch, so that the thread pool the other side's batch left spinning
    has gone to sleep. OpenBLAS's idle threads keep polling for new work for 2^28 cycles (about 0.1 s) after a
    call (``OPENBLAS_THREAD_TIMEOUT``, ``driver/others/blas_server.c``); a Numba kernel started inside that window
    shares its cores with them: the NF4 GEMV's batch right after a batch of OpenBLAS GEMVs ran at half speed.
    """
    fns = (ours, baseline)
    batch = []
    for fn in fns:
        single = float("inf")
        for _ in range(max(1, warmup)):
            t0 = time.perf_counter()
            fn()
            single = min(single, time.perf_counter() - t0)
        batch.append(max(1, int(min_seconds / max(single, 1e-9)) + 1))
    best = [float("inf"), float("inf")]
    for i in range(rounds):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            fn, n = fns[j], batch[j]
            if settle:
                time.sleep(settle)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[j] = min(best[j], (time.perf_counter() - t0) / n)
    return best[0], best[1]


def time_rotating(fns: dict[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median wall-clock seconds of each of ``fns``, run in turn after ``warmup`` calls each: :func:`time_pair` for
    more than two, the order rotated by one each repeat so that no function always runs first."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(repeats):
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) for n, t in times.items()}


def row(name: str, ours_s: float, baseline: str, baseline_s: float, **params) -> dict:
    """One result row of ``lora-ref bench --json``; ratio = our time / baseline time (lower is better); ``goal`` the
    ratio it should reach (:data:`lora_ref.bench.report.GOALS`; None for rows without one, e.g. memory) and ``met``
    whether it did (None without a goal)."""
    from lora_ref.bench.report import GOALS

    ratio = ours_s / baseline_s if baseline_s > 0 else float("inf")
    goal = GOALS.get(name)
    return {"name": name, "ours_s": ours_s, "baseline": baseline, "baseline_s": baseline_s, "ratio": ratio,
            "goal": goal, "met": None if goal is None else bool(ratio <= goal), "params": params}


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import numpy as np
        info["numpy"] = np.__version__
        from threadpoolctl import threadpool_info  # optional
        info["blas"] = [{k: d.get(k) for k in ("internal_api", "num_threads", "architecture")} for d in threadpool_info()]
    except Exception:
        pass
    return info
