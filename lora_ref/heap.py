"""Freed memory that stays with the process: the next step's arrays without page faults.

A training step allocates its activations, gradients and temporaries afresh each time (NumPy has no caching
allocator) and frees them when the step ends. GNU libc's ``malloc`` hands large blocks back to the kernel: a
block above its *mmap threshold* (128 KB at first, raised on the fly up to 32 MB) is its own ``mmap`` and is
unmapped when freed, and free memory at the top of the heap beyond the *trim threshold* is returned with
``brk``. The next step's arrays then land on pages the kernel must map again, one page fault per 4 KB page touched
first: measured here, a step of the tutorial model made ~40,000 page faults, most of them inside the first kernel
that writes each new array, where two threads faulting at once wait on each other (SwiGLU's forward kernel in the
step, on a fresh (4096, 512) output: 6.6 ms and ~514 faults a call without the setting below, 1.2 ms and none with
it). On this project's virtual machines a fault costs several microseconds.

:func:`keep_freed_memory` (run when ``lora_ref`` is imported, unless ``LORA_REF_KEEP_MEMORY=0``) sets both
thresholds with ``mallopt`` (``man 3 mallopt``): blocks up to 1 GiB come from the heap, and the heap is trimmed only
when more than 2 GiB at its top are free. GNU libc before 2.35 refuses an mmap threshold above 32 MiB (64-bit; the
limit was lifted in 2.35); there the threshold is 32 MiB, so larger arrays (a real model's logits) are still mapped
afresh each time. :func:`settings` says what was set. The memory the main thread's step used stays mapped for the
next one: the tutorial model's training loop went from ~41,500 page faults and 265 ms a step to 7-18 faults and
184-191 ms (best of 30 steps after 5, 2 threads, the two settings in separate processes, twice each, on this
project's Sapphire Rapids machine). Other threads allocate from glibc's per-thread arenas, whose heaps are given back when wholly free
whatever these settings say; lora_ref's arrays are mostly made in the calling thread.

The cost is memory: the process keeps its peak heap until it exits or calls :func:`release`. The setting is
process-wide, so every other library in the process (PyTorch in the benchmarks' baselines included) allocates
under it too, and it replaces any ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` the environment set (set
``LORA_REF_KEEP_MEMORY=0`` to keep yours). It does nothing where the C library is not GNU libc.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory", "release", "kept", "settings"]

MMAP_THRESHOLD = 1 << 30  # bytes: blocks below this come from the heap (mallopt's M_MMAP_THRESHOLD)
OLD_GLIBC_MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # the most glibc < 2.35 accepts (32 MiB)
TRIM_THRESHOLD = (1 << 31) - 1  # bytes free at the heap's top before it is given back (M_TRIM_THRESHOLD; a C int)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)

_state: dict = {}


def _libc():
    """GNU libc, or None on another C library (asked with confstr, which answers at once; platform.libc_ver()
    scans the Python executable, ~7 ms at every import)."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name: not GNU libc
        return None
    if platform.system() != "Linux" or not version.startswith("glibc"):
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (module docstring) unless ``LORA_REF_KEEP_MEMORY`` is ``0``; True if the trim
    threshold and an mmap threshold were set (:func:`settings` says which)."""
    if os.environ.get("LORA_REF_KEEP_MEMORY", "").strip() == "0":
        return False
    libc = _libc()
    if libc is None:
        return False
    for value in (MMAP_THRESHOLD, OLD_GLIBC_MMAP_THRESHOLD):  # 1 GiB; 32 MiB where glibc is older than 2.35
        if libc.mallopt(_M_MMAP_THRESHOLD, value) == 1:
            _state["mmap_threshold"] = value
            break
    if libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
        _state["trim_threshold"] = TRIM_THRESHOLD
    return kept()


def kept() -> bool:
    """Whether :func:`keep_freed_memory` set both thresholds in this process."""
    return "mmap_threshold" in _state and "trim_threshold" in _state


def settings() -> dict:
    """The thresholds :func:`keep_freed_memory` set in this process, in bytes (empty if none)."""
    return dict(_state)


def release() -> None:
    """Give the free memory the heap keeps back to the kernel now (glibc's ``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
