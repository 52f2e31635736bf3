"""Benchmark rows for the kernels: each our time against a baseline doing the same work, measured in one run.

:func:`kernel_rows` returns the rows ``lora-ref bench`` prints (see :mod:`lora_ref.bench.timing` for the row format
and the alternating timer):

==================  ====================  ================================================================
name                baseline              what both sides do
==================  ====================  ================================================================
``sgemm_1024``      ``openblas``          float32 (1024, 1024) @ (1024, 1024): :func:`lora_ref.kernels.matmul.matmul`
                                          vs ``np.matmul`` (OpenBLAS)
``nf4_dequantize``  ``memcpy``            write 2^26 float32 values into a preallocated array: NF4 decode
                                          (``decode_4bit_into``) vs ``np.copyto`` of a float32 array
``nf4_gemv_4096``   ``openblas_sgemv``    (1, 4096) times a 4096 × 4096 weight: fused NF4
                                          (``kernels.matmul_4bit``) vs float32 ``np.dot`` (OpenBLAS sgemv)
``nf4_quantize``    ``bitsandbytes_cpu``  NF4-quantize a float32 4096 × 4096 tensor, blocksize 64, CPU
                                          rounding: ``quantize_4bit(impl="numba")`` vs bitsandbytes'
                                          ``quantize_4bit`` on a CPU torch tensor
==================  ====================  ================================================================

Thread counts are equal on both sides: Numba, OpenBLAS (through ``threadpoolctl`` when installed, else the
``openblas_set_num_threads`` symbol of NumPy's bundled OpenBLAS) and torch are all set to the same number,
which each row's ``params`` states. ``quick=True`` takes fewer repeats, never smaller shapes.
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

from lora_ref.bench.timing import row, time_pair_min

__all__ = ["set_threads", "kernel_rows", "sgemm_row", "dequantize_row", "gemv_row", "quantize_row"]


def _openblas_lib():
    """NumPy's bundled OpenBLAS as a ctypes library, or None (other BLAS builds)."""
    libs_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "libscipy_openblas*.so*"))
                       + glob.glob(os.path.join(libs_dir, "libopenblas*.so*"))):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _openblas_fn(lib, stem: str):
    for name in (f"scipy_openblas_{stem}64_", f"scipy_openblas_{stem}", f"openblas_{stem}"):
        fn = getattr(lib, name, None) if lib is not None else None
        if fn is not None:
            return fn
    return None


def set_threads(n: int | None = None) -> dict:
    """Use ``n`` threads (default: all CPUs) in Numba, the BLAS and torch; return what each now uses."""
    import numba

    n = int(n or os.cpu_count() or 1)
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    info = {"threads": n, "numba_threads": numba.get_num_threads(), "numba_threading_layer": None}
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        threadpool_limits(n)
        blas = [d for d in threadpool_info() if d.get("user_api") == "blas"]
        info["blas"] = ", ".join(f"{d.get('internal_api')} {d.get('version')} ({d.get('num_threads')} threads)"
                                 for d in blas) or "unknown"
        info["blas_threads"] = blas[0].get("num_threads") if blas else None
    except ImportError:
        lib = _openblas_lib()
        set_fn, get_fn, core_fn = (_openblas_fn(lib, s) for s in ("set_num_threads", "get_num_threads",
                                                                    "get_corename"))
        if set_fn is not None:
            set_fn(n)
        info["blas_threads"] = get_fn() if get_fn is not None else None
        core = ""
        if core_fn is not None:
            core_fn.restype = ctypes.c_char_p
            core = f", kernel {core_fn().decode()}"
        info["blas"] = f"NumPy's bundled OpenBLAS{core}" if lib is not None else "unknown BLAS (threads not set)"
    try:
        import torch
        torch.set_num_threads(n)
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def _threading_layer() -> str | None:
    import numba
    try:
        return numba.threading_layer()
    except ValueError:  # no parallel region has run yet
        return None


SETTLE = 0.25
"""Seconds idled before each timed batch: longer than OpenBLAS's idle threads poll after a call (about 0.1 s),
so neither side's batch shares the cores with the other side's spinning pool (see ``time_pair_min``)."""


def _repeats(quick: bool) -> dict:
    """Rounds of :func:`lora_ref.bench.timing.time_pair_min`: the same batches in both modes, fewer rounds when
    quick (a median of 3 single calls against a median of 11 gave nf4_gemv_4096 ratios from 0.66 to 2.68)."""
    return {"rounds": 9, "warmup": 2, "settle": SETTLE} if quick else {"rounds": 25, "warmup": 2, "settle": SETTLE}


def sgemm_row(quick: bool, threads: dict) -> dict:
    """``sgemm_1024``: the Numba matmul against OpenBLAS ``np.matmul``, float32 1024³."""
    from lora_ref.kernels.matmul import matmul

    rng = np.random.default_rng(0)
    a = rng.standard_normal((1024, 1024), dtype=np.float32)
    b = rng.standard_normal((1024, 1024), dtype=np.float32)
    ours, base = time_pair_min(lambda: matmul(a, b), lambda: np.matmul(a, b), **_repeats(quick))
    return row("sgemm_1024", ours, "openblas", base, shape="(1024, 1024) @ (1024, 1024)", dtype="float32",
               gflops_ours=2 * 1024 ** 3 / ours / 1e9, gflops_baseline=2 * 1024 ** 3 / base / 1e9,
               **threads, timing=_repeats(quick), numba_threading_layer=_threading_layer())


def dequantize_row(quick: bool, threads: dict) -> dict:
    """``nf4_dequantize``: decode 2^26 NF4 codes into a preallocated float32 array vs copying a float32 array
    of the same size into a preallocated array (both write 256 MiB; we read 32 MiB + scales, memcpy 256 MiB)."""
    from lora_ref.quant import kernels, nf4

    n, bs = 1 << 26, 64
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, n // 2, dtype=np.uint8)          # uniformly random codes
    absmax = rng.random(n // bs, dtype=np.float32)
    code = nf4.kernel_lut("nf4")
    out = np.zeros(n, np.float32)
    src = rng.random(n, dtype=np.float32)
    dst = np.zeros(n, np.float32)
    ours, base = time_pair_min(lambda: kernels.decode_4bit_into(packed, absmax, code, bs, n, out),
                           lambda: np.copyto(dst, src), **_repeats(quick))
    return row("nf4_dequantize", ours, "memcpy", base, elements=n, blocksize=bs, dtype="float32 output",
               output="preallocated on both sides", gbps_written_ours=4 * n / ours / 1e9,
               gbps_copied_baseline=4 * n / base / 1e9, **threads, timing=_repeats(quick),
               numba_threading_layer=_threading_layer())


def gemv_row(quick: bool, threads: dict) -> dict:
    """``nf4_gemv_4096``: x (1, 4096) times an NF4 weight (4096, 4096) vs float32 ``np.dot`` (sgemv)."""
    from lora_ref.quant import kernels
    from lora_ref.quant.blockwise import quantize_4bit
    from lora_ref.quant.dequant_matmul import dequantize_weight

    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal((4096, 4096))).astype(np.float32)   # (N, K)
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", impl="numba")
    w32 = dequantize_weight(packed, state)                          # (N, K) the same weights in float32
    x = rng.standard_normal((1, 4096), dtype=np.float32)            # (1, K)
    x1 = x[0]
    # Copies of each side's weight, used in turn, so that every call reads its weight from memory: a 64 MiB
    # float32 matrix fits the last-level cache of some CPUs (300 MiB here) and then runs 3-4x faster in some
    # rounds than in others, depending on the neighbours' use of that cache; that, not the repeat count, made the
    # quick and full ratios disagree (0.07 to 0.34 on one machine within minutes).
    spill = 2 * _last_level_cache_bytes()
    ours_w = [packed.copy() for _ in range(max(1, -(-spill // packed.nbytes)))]
    base_w = [w32.copy() for _ in range(max(1, -(-spill // w32.nbytes)))]
    turn = {"ours": 0, "base": 0}

    def ours_call():
        turn["ours"] += 1
        return kernels.matmul_4bit(x, ours_w[turn["ours"] % len(ours_w)], state)

    def base_call():
        turn["base"] += 1
        return np.dot(base_w[turn["base"] % len(base_w)], x1)

    ours, base = time_pair_min(ours_call, base_call, **_repeats(quick))
    return row("nf4_gemv_4096", ours, "openblas_sgemv", base, weight="(4096, 4096)", x="(1, 4096)",
               quant_type="nf4", blocksize=64, dtype="float32 activations and output",
               weight_bytes_ours=int(packed.nbytes + state.absmax.nbytes), weight_bytes_baseline=int(w32.nbytes),
               weight_copies={"ours": len(ours_w), "baseline": len(base_w)},
               **threads, timing=_repeats(quick), numba_threading_layer=_threading_layer())


def _last_level_cache_bytes() -> int:
    """The largest CPU cache of cpu0 in bytes (Linux sysfs), or 64 MiB where it cannot be read."""
    import pathlib

    sizes = []
    for f in pathlib.Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            continue
    return max(sizes, default=64 * 2**20)


def quantize_row(quick: bool, threads: dict) -> dict:
    """``nf4_quantize``: NF4 quantization of a float32 4096 × 4096 tensor, ours (Numba, CPU rounding) vs
    bitsandbytes' CPU ``quantize_4bit`` (same blocksize, quant type, no double quantization)."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch
    from bitsandbytes import functional as bnbf

    from lora_ref.quant.blockwise import quantize_4bit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4096, 4096), dtype=np.float32)
    xt = torch.from_numpy(x.copy())
    ours, base = time_pair_min(lambda: quantize_4bit(x, blocksize=64, quant_type="nf4", rounding="cpu", impl="numba"),
                           lambda: bnbf.quantize_4bit(xt, blocksize=64, quant_type="nf4"), **_repeats(quick))
    import bitsandbytes
    return row("nf4_quantize", ours, "bitsandbytes_cpu", base, shape="(4096, 4096)", dtype="float32",
               quant_type="nf4", blocksize=64, double_quant=False, rounding="cpu",
               bitsandbytes=bitsandbytes.__version__, torch=torch.__version__, **threads,
               timing=_repeats(quick), numba_threading_layer=_threading_layer())


def kernel_rows(quick: bool, threads: int | None = None) -> list[dict]:
    """The four kernel rows, with ``threads`` threads on every side (default: all CPUs)."""
    info = set_threads(threads)
    info.pop("numba_threading_layer", None)
    return [sgemm_row(quick, info), dequantize_row(quick, info), gemv_row(quick, info), quantize_row(quick, info)]
