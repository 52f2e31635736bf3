"""Numba twins of the blockwise 4-bit and 8-bit steps, and the fused 4-bit matmuls of QLoRA.

Each twin here has the same name, signature and result as its readable NumPy version (the contract:
:mod:`lora_ref.kernels.switch`): the steps ``absmax_blocks``, ``encode_4bit``, ``pack_nibbles``, ``unpack_nibbles``,
``decode_4bit``, ``encode_8bit``, ``decode_8bit`` of :mod:`lora_ref.quant.steps`, and the products ``matmul_4bit``,
``matmul_4bit_t`` of :mod:`lora_ref.quant.dequant_matmul`. The chooser :func:`pick` at the end of this module is the
one place that decides which runs: ``quantize_4bit(..., impl="numba")`` asks it and runs the same algorithm
through compiled loops. (``pair_table`` and ``decode_4bit_into`` are helpers of the kernels, not twins.) Integer outputs (codes, packed bytes) are bit for bit equal to the reference,
and so are the float32 results of the decoders: every element is the one float32 product ``code[c] · absmax``.
The quantization and dequantization kernels use strict IEEE float32 arithmetic (no ``fastmath``), because a
fused or reordered multiply would move values that sit on a decision threshold; the matmuls allow LLVM only to
reorder their sums and fuse multiply-adds (:data:`lora_ref.kernels.jit.FAST_MATH`). With all of its fast-math flags
(``fastmath=True``, as they had before) the one-row product loaded from Numba's on-disk cache gave other bits
(about 60 % of the outputs of a 256 × 576 case, by at most 2 ulp of the largest) than the same kernel compiled in
the process, on an Intel Xeon with AVX-512, so a fresh clone's first run and its later runs disagreed;
``tests/kernels/test_kernels.py`` compiles, reloads and compares. On AVX-512 CPUs the NF4 encoders find each
code, the number of thresholds below the scaled value, by a four-step binary search over the sorted thresholds held
in one register (:func:`lora_ref.kernels.jit.rank16`), 16 values at a time: the same count as fifteen comparisons.

The fused products (:func:`matmul_4bit`, :func:`matmul_4bit_t`) never materialise the dequantized weight:

- a **row kernel** for a few input rows (decoding, generation: x is (1, K)): each thread decodes one weight
  row at a time into a float32 buffer in L1 and takes its dot products with the inputs. On AVX-512 CPUs the
  16-entry table, multiplied by the block's absmax, sits in one register and ``vpermps`` decodes 16 codes per
  instruction (:func:`lora_ref.kernels.jit.lut16_decode16`; on AVX2 CPUs ``vpshufb`` looks the codes up in the
  table's four byte planes), and for a single input row the decoded weights go
  straight into 32 running sums instead of the buffer (:func:`lora_ref.kernels.jit.lut16_fma16`: no store and
  reload per 16 weights; one row times a 4096 × 4096 NF4 weight, 2 threads, interleaved with the buffered
  version in one process, five runs: best 9-25 % lower, median 12-24 % lower, e.g. 0.87 → 0.66 ms best), and
  the codes :data:`lora_ref.kernels.jit.PREFETCH_AHEAD` bytes ahead are prefetched
  (:func:`lora_ref.kernels.jit.prefetch`: with the hardware prefetchers alone, reading and decoding took turns). On
  AVX2 CPUs without AVX-512 a single input row goes through :func:`lora_ref.kernels.jit.lut16_block_dot`
  instead: each block's unscaled codes dotted with x, the partial sum multiplied by the absmax once, as the
  gather path does; elsewhere a pair-table gather decodes and each block's partial sum is multiplied by its
  absmax. The weight streams from memory at half a byte per element, 8× fewer bytes than float32;
- the **dequantizer** reads a 256-entry table of *pairs* ``(code[b >> 4], code[b & 15])``, so one 64-bit load
  decodes a whole byte (two elements, high nibble first), then multiplies each block by its absmax;
- a **tiled kernel** for many rows (training): the register-blocked matmul of :mod:`lora_ref.kernels.matmul`, whose
  B micro-panels are dequantized from the packed weight instead of copied.

Taught in ``notebooks/06_kernels.ipynb``; measured by ``lora-ref bench`` (rows ``nf4_dequantize``,
``nf4_gemv_4096``, ``nf4_quantize``). References: bitsandbytes 0.50.2 ``csrc/kernels.cu`` (``kQuantizeBlockwise``,
``kDequantizeBlockwise``, ``dQuantizeNF4``, ``dQuantizeFP4``, ``dQuantize``), ``csrc/cpu_ops.cpp``,
``backends/default/ops.py``; [QLoRA] Dettmers et al. 2023, arXiv 2305.14314, Eq. 5–6.
"""

from __future__ import annotations

import sys

import numpy as np
from numba import njit, prange

from lora_ref.kernels import switch
from lora_ref.kernels.jit import (
    BLOCK_DOT,
    FAST_MATH,
    HAS_AVX512,
    HAS_LUT16,
    block_fma,
    lut16_decode16,
    prefer_wide_vectors,
    rank16,
    rank_table,
    stack_tile_f32,
    sum32,
)
from lora_ref.kernels.matmul import KC, MR, NR, micro_kernel, pack_a, store_tile
from lora_ref.quant import dequant_matmul, nf4, steps

__all__ = [
    "absmax_blocks",
    "encode_4bit",
    "pack_nibbles",
    "unpack_nibbles",
    "decode_4bit",
    "decode_4bit_into",
    "encode_8bit",
    "decode_8bit",
    "pair_table",
    "matmul_4bit",
    "matmul_4bit_t",
    "AUTO_DEQUANTIZE_ROWS",
    "pick",
    "PICK",
]

F32 = np.float32
U64 = np.uint64
"""Hot loops index with unsigned integers: Numba wraps a negative signed index (``a[-1]``), and that check stops
LLVM from vectorizing the loop. An unsigned index cannot be negative, so the check disappears."""
_NO_CODES = np.empty(0, np.uint8)  # NF4 in _encode_cuda_kernel: no sign bit, no magnitude table
_NO_ORDER = np.empty(0, np.int32)
_FP4_ORDER = np.asarray(nf4.FP4_SORTED_ORDER, np.int32)             # int32: a 32-bit table lookup vectorizes
_CPU_MIN_ABSMAX = nf4.CPU_MIN_ABSMAX

# ---------------------------------------------------------------------------------------------------------------
# Block scales
# ---------------------------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _block_range(b, blocksize, n):
    """(first, stop) unsigned flat indices of block b."""
    return U64(b * blocksize), U64(min(n, (b + 1) * blocksize))


@njit(cache=True, parallel=True)
def _absmax_kernel(bits, blocksize, out_bits):
    """Block maxima of |x| on the float32 bit patterns: clearing the sign bit gives |x|, and for non-negative
    floats the unsigned-integer order is the float order (a NaN's pattern is above inf's, so NaN propagates
    as in ``np.max``). An integer maximum vectorizes; a float one would need fast-math flags."""
    n = bits.shape[0]
    for b in prange(out_bits.shape[0]):
        prefer_wide_vectors()
        first, stop = _block_range(b, blocksize, n)
        m = np.uint32(0)
        for i in range(first, stop):
            m = max(m, bits[i] & np.uint32(0x7FFFFFFF))
        out_bits[b] = m


def absmax_blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """float32[ceil(n / blocksize)]: max |flat_i| per block of a flat float32 vector (twin of blockwise's)."""
    out = np.empty(-(-flat.shape[0] // blocksize), np.float32)
    _absmax_kernel(np.ascontiguousarray(flat, np.float32).view(np.uint32), blocksize, out.view(np.uint32))
    return out


# ---------------------------------------------------------------------------------------------------------------
# 4-bit encoders: code = number of thresholds strictly below the scaled value
# ---------------------------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _count_below(s, thresholds, count):
    """Number of thresholds[:count] strictly below s (the code), as an int32. ``count`` is a constant at each call
    site, so LLVM unrolls this loop and vectorizes the loop over elements around it: on AVX2, one compare and one
    32-bit subtraction of the mask per threshold and 8 elements (seen in the assembly on a Zen 3)."""
    c = np.int32(0)
    for t in range(count):
        c += np.int32(s > thresholds[t])
    return c


_ENCODE_CHUNK = 1 << 14
"""Elements per parallel work item of the 4-bit encoders (whole blocks, at least one)."""


@njit(cache=True, inline="always")
def _chunk_blocks(blocksize, nblocks):
    """(blocks per work item, work items) of the 4-bit encoders."""
    per = max(1, _ENCODE_CHUNK // blocksize)
    return per, (nblocks + per - 1) // per


@njit(cache=True, inline="always")
def _chunk_range(w, per, blocksize, nblocks, n):
    """(first block, stop block, first element, stop element) of work item w."""
    b0, b1 = w * per, min(nblocks, (w + 1) * per)
    return b0, b1, U64(b0 * blocksize), U64(min(n, b1 * blocksize))


@njit(cache=True, inline="always")
def _narrow(counts, first, stop, out):
    """out[first:stop] = the int32 codes of one work item as uint8.

    The encoders count into an int32 buffer and narrow here, in a loop of their own. Written straight into the
    uint8 output, the counts let LLVM shrink the whole count to bytes, and it then packs every comparison's 8-lane
    mask to bytes before adding it (5 instructions per threshold instead of 2; 4096 × 4096 NF4 codes, 2 threads,
    Zen 3: 10.4 ms that way, 6.0 ms this way)."""
    for i in range(first, stop):
        out[i] = np.uint8(counts[i - first])


@njit(cache=True, inline="always")
def _nf4_codes_plain(flat, first, stop, inv, clamp, thresholds, ranks, counts, item0):
    """counts[i − item0] = #{t : s > t} over the 15 thresholds for i in [first, stop), s = flat[i] · inv; with
    ``clamp`` (CPU rounding) s is clamped to [−1, 1] and a NaN counts 15 (:func:`_count_below_cpu`), else 0."""
    if clamp:
        for i in range(first, stop):
            counts[i - item0] = _count_below_cpu(flat[i] * inv, thresholds)
    else:
        for i in range(first, stop):
            counts[i - item0] = _count_below(flat[i] * inv, thresholds, 15)


@njit(cache=True, inline="always")
def _nf4_codes_rank16(flat, first, stop, inv, clamp, thresholds, ranks, counts, item0):
    """The same counts, 16 at a time by binary search (:func:`lora_ref.kernels.jit.rank16`, AVX-512; ``ranks`` the
    thresholds' :func:`lora_ref.kernels.jit.rank_table`). ``stop − first`` must be a multiple of 16 (a whole block
    of a block size that is one; the encoders take the plain loop for other sizes, which the twins accept)."""
    if clamp:
        for i in range(first, stop, 16):
            rank16(flat, i, inv, True, ranks, counts, i - item0)
    else:
        for i in range(first, stop, 16):
            rank16(flat, i, inv, False, ranks, counts, i - item0)


_nf4_codes = _nf4_codes_rank16 if HAS_AVX512 else _nf4_codes_plain
_CPU_NF4_RANKS = rank_table(nf4.CPU_NF4_T)
_CUDA_NF4_RANKS = rank_table(nf4.CUDA_NF4_T)
_NO_RANKS = np.zeros(16, np.float32)  # FP4 in both encoders: its codes are not plain ranks, no binary search


@njit(cache=True, parallel=True, error_model="numpy")
def _encode_cuda_kernel(flat, absmax, blocksize, thresholds, ranks, magnitude_codes, out):
    """CUDA rounding, s = x · (1/absmax). NF4 (``magnitude_codes`` empty): code = #{t : s > t} over 15
    thresholds (``ranks`` their :func:`lora_ref.kernels.jit.rank_table`, for :func:`_nf4_codes` on full blocks);
    a zero block gives 1/0 = inf, 0 · inf = NaN, and NaN compares false: code 0. FP4: sign bit 0b1000
    if s < 0 (not for −0.0 or NaN), then the magnitude code of |s| from 7 thresholds."""
    n = flat.shape[0]
    fp4 = magnitude_codes.shape[0] > 0
    per, items = _chunk_blocks(blocksize, absmax.shape[0])
    for w in prange(items):
        prefer_wide_vectors()
        counts = np.empty(min(per * blocksize, n), np.int32)      # one item's codes (fewer if n is)
        b0, b1, item0, item1 = _chunk_range(w, per, blocksize, absmax.shape[0], n)
        for b in range(b0, b1):
            first, stop = _block_range(b, blocksize, n)
            inv = F32(1.0) / absmax[b]
            if fp4:
                for i in range(first, stop):
                    s = flat[i] * inv
                    sign = np.int32(8) if s < 0 else np.int32(0)
                    counts[i - item0] = np.int32(magnitude_codes[_count_below(abs(s), thresholds, 7)]) | sign
            elif stop - first == blocksize and blocksize % 16 == 0:
                _nf4_codes(flat, first, stop, inv, False, thresholds, ranks, counts, item0)
            else:
                _nf4_codes_plain(flat, first, stop, inv, False, thresholds, ranks, counts, item0)
        _narrow(counts, item0, item1, out)


@njit(cache=True, inline="always")
def _count_below_cpu(s, midpoints):
    """The CPU rounding's code of a scaled value s: clamped to [−1, 1], then #{m : s > m} over the 15 midpoints,
    and 15 for a NaN (``torch.bucketize``, which bitsandbytes' CPU path calls, sorts NaN after every boundary; a NaN
    anywhere in a block makes its absmax, and so the whole block, NaN)."""
    if s != s:
        return np.int32(15)
    return _count_below(_clamp1(s), midpoints, 15)


@njit(cache=True, inline="always")
def _clamp1(s):
    if s > F32(1.0):
        return F32(1.0)
    if s < F32(-1.0):
        return F32(-1.0)
    return s


@njit(cache=True, parallel=True, error_model="numpy")
def _encode_cpu_kernel(flat, absmax, blocksize, midpoints, ranks, order, out):
    """CPU rounding: s = clamp(x · (1/max(absmax, 1e-38)), −1, 1), but x / absmax in a trailing partial block;
    rank = #{m : s > m} over the 15 midpoints of the sorted table, 15 for a NaN (``torch.bucketize``). NF4's table is in code order (``order`` is
    empty, code = rank; full blocks through :func:`_nf4_codes`, ``ranks`` the midpoints'
    :func:`lora_ref.kernels.jit.rank_table`); for FP4 ``order`` (int32[16]) maps a rank to its code."""
    n = flat.shape[0]
    per, items = _chunk_blocks(blocksize, absmax.shape[0])
    for w in prange(items):
        prefer_wide_vectors()
        counts = np.empty(min(per * blocksize, n), np.int32)      # one item's codes (fewer if n is)
        b0, b1, item0, item1 = _chunk_range(w, per, blocksize, absmax.shape[0], n)
        for b in range(b0, b1):
            first, stop = _block_range(b, blocksize, n)
            # max(absmax, 1e-38) as np.maximum: a NaN absmax stays NaN (Python's max would depend on the order)
            safe = _CPU_MIN_ABSMAX if absmax[b] < _CPU_MIN_ABSMAX else absmax[b]
            inv = F32(1.0) / safe
            tail = stop - first < blocksize                        # the partial tail block divides
            if order.shape[0] == 0:
                if tail:
                    for i in range(first, stop):
                        counts[i - item0] = _count_below_cpu(flat[i] / safe, midpoints)
                elif blocksize % 16 == 0:
                    _nf4_codes(flat, first, stop, inv, True, midpoints, ranks, counts, item0)
                else:
                    _nf4_codes_plain(flat, first, stop, inv, True, midpoints, ranks, counts, item0)
            else:
                for i in range(first, stop):
                    s = flat[i] / safe if tail else flat[i] * inv
                    counts[i - item0] = order[_count_below_cpu(s, midpoints)]
        _narrow(counts, item0, item1, out)


def encode_4bit(flat: np.ndarray, absmax: np.ndarray, blocksize: int, quant_type: str, rounding: str) -> np.ndarray:
    """uint8[n] 4-bit codes of a flat float32 vector given its block scales (twin of blockwise's).

    ``quant_type`` "nf4" / "fp4"; ``rounding`` "cuda" (decimal-literal thresholds, strict >, NaN → 0) or "cpu"
    (float32 midpoints of the sorted table, clamping, true division in the tail block).
    """
    flat = np.ascontiguousarray(flat, np.float32)
    absmax = np.ascontiguousarray(absmax, np.float32)
    out = np.empty(flat.shape[0], np.uint8)
    if rounding == "cuda":
        if quant_type == "nf4":
            _encode_cuda_kernel(flat, absmax, blocksize, nf4.CUDA_NF4_T, _CUDA_NF4_RANKS, _NO_CODES, out)
        else:
            _encode_cuda_kernel(flat, absmax, blocksize, nf4.CUDA_FP4_T, _NO_RANKS,
                                np.asarray(nf4.CUDA_FP4_MAGNITUDE_CODES, np.uint8), out)
    elif quant_type == "nf4":
        _encode_cpu_kernel(flat, absmax, blocksize, nf4.CPU_NF4_T, _CPU_NF4_RANKS, _NO_ORDER, out)
    else:
        _encode_cpu_kernel(flat, absmax, blocksize, nf4.CPU_FP4_T, _NO_RANKS, _FP4_ORDER, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Nibble packing
# ---------------------------------------------------------------------------------------------------------------


_CHUNK = 1 << 16  # bytes per parallel work item of the byte-wise kernels


@njit(cache=True, parallel=True)
def _pack_kernel(codes, out):
    n = codes.shape[0]
    full = U64(n // 2)                                             # bytes with two codes
    for c in prange((n // 2 + _CHUNK - 1) // _CHUNK):
        prefer_wide_vectors()
        for j in range(U64(c * _CHUNK), min(full, U64((c + 1) * _CHUNK))):
            out[j] = (codes[U64(2) * j] << np.uint8(4)) | codes[U64(2) * j + U64(1)]
    if n % 2:
        out[n // 2] = codes[n - 1] << np.uint8(4)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8[ceil(n/2)]: byte j = (codes[2j] << 4) | codes[2j+1], first element high; last low nibble 0 if n odd."""
    codes = np.ascontiguousarray(codes, np.uint8)
    out = np.empty((codes.shape[0] + 1) // 2, np.uint8)
    _pack_kernel(codes, out)
    return out


@njit(cache=True, parallel=True)
def _unpack_kernel(packed, out):
    n = out.shape[0]
    full = U64(n // 2)
    for c in prange((n // 2 + _CHUNK - 1) // _CHUNK):
        prefer_wide_vectors()
        for j in range(U64(c * _CHUNK), min(full, U64((c + 1) * _CHUNK))):
            byte = packed[j]
            out[U64(2) * j] = byte >> np.uint8(4)
            out[U64(2) * j + U64(1)] = byte & np.uint8(15)
    if n % 2:
        out[n - 1] = packed[n // 2] >> np.uint8(4)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8[n] codes from uint8[ceil(n/2)] packed bytes, high nibble first (inverse of :func:`pack_nibbles`)."""
    out = np.empty(n, np.uint8)
    _unpack_kernel(np.ascontiguousarray(packed, np.uint8), out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# 4-bit decoder: one 64-bit table load per byte
# ---------------------------------------------------------------------------------------------------------------


def pair_table(code: np.ndarray) -> np.ndarray:
    """float32[256, 2]: row b = (code[b >> 4], code[b & 15]), the two values a packed byte stands for."""
    code = np.asarray(code, np.float32)
    b = np.arange(256)
    return np.ascontiguousarray(np.stack([code[b >> 4], code[b & 15]], axis=1))  # (256, 2)


@njit(cache=True, inline="always")
def _decode_bytes(packed, byte0, nbytes, pairs64, dst64, dst0):
    """dst64[dst0 + j] = pairs64[packed[byte0 + j]] for j < nbytes: two float32 codes per 64-bit copy."""
    src, dst = U64(byte0), U64(dst0)
    for j in range(U64(nbytes)):
        dst64[dst + j] = pairs64[packed[src + j]]


@njit(cache=True, inline="always")
def _scale(dst, start, count, s):
    """dst[start:start + count] *= s (float32: the same product code[c] · absmax as the reference)."""
    for k in range(U64(start), U64(start + count)):
        dst[k] = dst[k] * s


@njit(cache=True, parallel=True)
def _decode_kernel(packed, absmax, pairs, blocksize, out, out64):
    """out[i] = code[c_i] · absmax[i // blocksize]; each block is two passes over L1: decode, then scale.
    ``out64`` is ``out[:n - n % 2]`` viewed as uint64 (the decoder writes two float32 per store)."""
    n = out.shape[0]
    n_even = n - n % 2
    pairs64 = pairs.reshape(-1).view(np.uint64)                    # (256,) two float32 per entry
    half = blocksize // 2
    for b in prange(absmax.shape[0]):
        prefer_wide_vectors()
        start = b * blocksize
        count = min(blocksize, n_even - start)
        if count > 0:
            _decode_bytes(packed, b * half, count // 2, pairs64, out64, b * half)
            _scale(out, start, count, absmax[b])
    if n % 2:
        out[n - 1] = pairs[packed[n // 2], 0] * absmax[(n - 1) // blocksize]


def decode_4bit_into(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, n: int,
                     out: np.ndarray) -> np.ndarray:
    """:func:`decode_4bit` writing into ``out`` (float32[n], C-contiguous), for callers that reuse a buffer."""
    if out.dtype != np.float32 or out.shape != (n,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape ({n},), got {out.dtype} {out.shape}")
    _decode_kernel(np.ascontiguousarray(packed, np.uint8), np.ascontiguousarray(absmax, np.float32),
                   pair_table(code), blocksize, out, out[:n - n % 2].view(np.uint64))
    return out


def decode_4bit(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, n: int) -> np.ndarray:
    """float32[n]: x̂_i = code[c_i] · absmax_{i // blocksize} (twin of blockwise's). packed uint8[ceil(n/2)]."""
    return decode_4bit_into(packed, absmax, code, blocksize, n, np.empty(n, np.float32))


# ---------------------------------------------------------------------------------------------------------------
# 8-bit encoder and decoder (double quantization)
# ---------------------------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _cuda_search_8bit(s, code):
    """The CUDA kernel's ``dQuantize<0>`` for one value: 7-step binary search over a sorted 256-entry code."""
    pivot = 127
    upper_pivot = 255
    lower_pivot = 0
    lower = F32(-1.0)
    upper = F32(1.0)
    val = code[pivot]
    step = 64
    while step > 0:
        if s > val:
            lower_pivot = pivot
            lower = val
            pivot += step
        else:
            upper_pivot = pivot
            upper = val
            pivot -= step
        val = code[pivot]
        step //= 2
    if upper_pivot == 255:
        upper = code[255]
    if lower_pivot == 0:
        lower = code[0]
    if s > val:
        return upper_pivot if s > (upper + val) * F32(0.5) else pivot
    return lower_pivot if s < (lower + val) * F32(0.5) else pivot


@njit(cache=True, parallel=True, error_model="numpy")
def _encode_8bit_cuda_kernel(flat, absmax, blocksize, code, out):
    n = flat.shape[0]
    for b in prange(absmax.shape[0]):
        inv = F32(1.0) / absmax[b]
        for i in range(b * blocksize, min(n, (b + 1) * blocksize)):
            out[i] = _cuda_search_8bit(flat[i] * inv, code)


@njit(cache=True, parallel=True, error_model="numpy")
def _encode_8bit_cpu_kernel(flat, absmax, blocksize, lut, out):
    """bitsandbytes' CPU 8-bit path: bin = trunc(((clamp(s, −1, 1) + 1) · 0.5) · 65535 + 0.5), code = lut[bin];
    an all-zero block gives code 0."""
    n = flat.shape[0]
    for b in prange(absmax.shape[0]):
        zero_block = absmax[b] == 0
        inv = F32(1.0) / absmax[b]
        for i in range(b * blocksize, min(n, (b + 1) * blocksize)):
            if zero_block:
                out[i] = 0
            else:
                v = min(max(flat[i] * inv, F32(-1.0)), F32(1.0))
                t = ((v + F32(1.0)) * F32(0.5)) * F32(65535.0) + F32(0.5)
                out[i] = lut[np.int64(t)]


def encode_8bit(flat: np.ndarray, absmax: np.ndarray, blocksize: int, code: np.ndarray, rounding: str) -> np.ndarray:
    """uint8[n] 8-bit codes with a sorted 256-entry code (twin of blockwise's): "cuda" binary search or
    "cpu" 65,536-bin lookup table."""
    flat = np.ascontiguousarray(flat, np.float32)
    absmax = np.ascontiguousarray(absmax, np.float32)
    code = np.ascontiguousarray(code, np.float32)
    out = np.empty(flat.shape[0], np.uint8)
    if rounding == "cuda":
        _encode_8bit_cuda_kernel(flat, absmax, blocksize, code, out)
    else:
        _encode_8bit_cpu_kernel(flat, absmax, blocksize, nf4.cpu_lut_8bit(code), out)
    return out


@njit(cache=True, parallel=True)
def _decode_8bit_kernel(codes, absmax, code, blocksize, out):
    n = codes.shape[0]
    for b in prange(absmax.shape[0]):
        s = absmax[b]
        for i in range(b * blocksize, min(n, (b + 1) * blocksize)):
            out[i] = code[codes[i]] * s


def decode_8bit(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int) -> np.ndarray:
    """float32[n]: code[c_i] · absmax_{i // blocksize} (twin of blockwise's)."""
    codes = np.ascontiguousarray(codes, np.uint8)
    out = np.empty(codes.shape[0], np.float32)
    _decode_8bit_kernel(codes, np.ascontiguousarray(absmax, np.float32), np.ascontiguousarray(code, np.float32),
                        blocksize, out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Fused 4-bit matmuls: y = x · dequant(W)ᵀ and dx = dy · dequant(W), W (N, K) never materialised
# ---------------------------------------------------------------------------------------------------------------

ROW_KERNEL_MAX_M = 8
"""Up to this many input rows, :func:`matmul_4bit` decodes W row by row (memory-bound); above, it tiles."""


@njit(cache=True, inline="always")
def _decode_run(packed, absmax, code, blocksize, start, dst):
    """dst[p] = W_flat[start + p] for p < len(dst), any start (odd starts begin in a low nibble)."""
    for p in range(dst.shape[0]):
        i = start + p
        byte = packed[i >> 1]
        c = (byte >> np.uint8(4)) if (i & 1) == 0 else (byte & np.uint8(15))
        dst[p] = code[c] * absmax[i // blocksize]


@njit(cache=True, inline="always")
def _dot_rows_gather(x, packed, absmax, pairs64, code, blocksize, r, K, w64, w, sums, y):
    """y[:, r] for a row starting on a block boundary: decode the unscaled codes with one 64-bit pair-table
    load per byte, then y = Σ_b absmax_b · Σ_{k in b} code[c_k] · x_k (the scale multiplies partial sums).
    ``sums`` is unused (the permute version's running sums: the two versions share a signature)."""
    nb = K // blocksize
    _decode_bytes(packed, r * (K // 2), K // 2, pairs64, w64, 0)
    for m in range(x.shape[0]):
        xm = x[m]
        acc = F32(0.0)
        for b in range(nb):
            o = U64(b * blocksize)
            part = F32(0.0)
            for k in range(U64(blocksize)):
                part += w[o + k] * xm[o + k]
            acc += absmax[r * nb + b] * part
        y[m, r] = acc


@njit(cache=True, inline="always")
def _dot_decoded_row(x, w, K, r, y):
    """y[m, r] = Σ_k x[m, k] · w[k] for every row m of x: the products with one decoded weight row w."""
    for m in range(x.shape[0]):
        xm = x[m]
        acc = F32(0.0)
        for k in range(U64(K)):
            acc += xm[k] * w[k]
        y[m, r] = acc


@njit(cache=True, inline="always")
def _dot_rows_permute(x, packed, absmax, pairs64, code, blocksize, r, K, w64, w, acc, y):
    """The same with the table in registers (:func:`lora_ref.kernels.jit.lut16_decode16`: ``vpermps`` with
    AVX-512, ``vpshufb`` on the table's byte planes with AVX2; 16 bytes per step, scaled per block), ``x``
    in the decoder's order (each group of 32 elements as 16 even-indexed then 16 odd-indexed ones,
    :func:`_evens_then_odds` with groups of 32; for one row on AVX2 without AVX-512, groups of 8). One input row
    (decoding): the decoded weights go straight into 32 running sums (:func:`lora_ref.kernels.jit.lut16_fma16`,
    ``acc``), added up at the end (:func:`lora_ref.kernels.jit.sum32`); on AVX2 CPUs without AVX-512 each
    block's codes are dotted with x unscaled and the partial sums scaled once per block
    (:func:`lora_ref.kernels.jit.lut16_block_dot`, x in groups of 8); both through
    :func:`lora_ref.kernels.jit.block_fma`, with the block size a literal for blocksize 64. Several rows: the
    buffer ``w`` holds the dequantized row and each row's dot product is one long vectorized sum."""
    nb = K // blocksize
    half = blocksize // 2                                          # bytes per block, a multiple of 16
    byte0 = r * (K // 2)
    if x.shape[0] == 1:
        x0 = x[0]
        for lane in range(32):
            acc[lane] = F32(0.0)
        if half == 32:              # blocksize 64 (QLoRA's) as a literal: each block straight-line code
            for b in range(nb):
                block_fma(packed, byte0 + 32 * b, 32, code, absmax[r * nb + b], x0, 64 * b, acc)
        else:
            for b in range(nb):
                block_fma(packed, byte0 + half * b, half, code, absmax[r * nb + b], x0, blocksize * b, acc)
        y[0, r] = sum32(acc)
        return
    if half == 32:  # blocksize 64 (QLoRA's): the block's two 16-byte steps written out, no inner loop
        for b in range(nb):
            s = absmax[r * nb + b]
            j = b * 32
            lut16_decode16(packed, byte0 + j, code, s, w, 2 * j)
            lut16_decode16(packed, byte0 + j + 16, code, s, w, 2 * j + 32)
    else:
        for b in range(nb):
            s = absmax[r * nb + b]
            for j in range(b * half, (b + 1) * half, 16):
                lut16_decode16(packed, byte0 + j, code, s, w, 2 * j)
    _dot_decoded_row(x, w, K, r, y)


_dot_rows = _dot_rows_permute if HAS_LUT16 else _dot_rows_gather
_acc32 = stack_tile_f32(1, 32)


def _evens_then_odds(x: np.ndarray, group: int) -> np.ndarray:
    """x (M, K), K a multiple of ``group``, with each group of columns reordered as its even-indexed then its
    odd-indexed ones: groups of 32 are the order in which :func:`lora_ref.kernels.jit.lut16_decode16` writes a
    decoded weight row (and :func:`lora_ref.kernels.jit.lut16_fma16` reads x), groups of 8 the order in which
    :func:`lora_ref.kernels.jit.lut16_block_dot` reads x (``BLOCK_DOT_ORDER``)."""
    M, K = x.shape
    return np.ascontiguousarray(x.reshape(M, K // group, group // 2, 2).transpose(0, 1, 3, 2).reshape(M, K))


@njit(cache=True, parallel=True, fastmath=FAST_MATH)
def _rows_kernel(x, packed, absmax, pairs, code, blocksize, N, K, y):
    """y[m, r] = Σ_k x[m, k] · W[r, k] for few rows m: decode W row r into an L1 buffer, then dot products (on
    AVX-512 and AVX2 CPUs with one row m: decoded into running sums instead, :func:`_dot_rows_permute`).

    Rows that start on a block boundary (K a multiple of blocksize) take the fast path (:func:`_dot_rows_permute`
    on AVX-512 and AVX2 CPUs, :func:`_dot_rows_gather` elsewhere); otherwise the row is decoded element by element with
    its scales."""
    pairs64 = pairs.reshape(-1).view(np.uint64)                    # (256,)
    aligned = K % blocksize == 0                                   # rows start on a block (and byte) boundary
    nchunks = min(N, 256)                                          # one row buffer per chunk of rows
    for c in prange(nchunks):
        prefer_wide_vectors()
        # one decoded row, allocated as uint64 pairs (a view in the other direction stops vectorization)
        w64 = np.empty(K // 2 + 1, np.uint64)
        w = w64.view(np.float32)                                   # (>= K,) the same memory
        acc = _acc32()[0]                                          # (32,) running sums, on the stack
        for r in range(c * N // nchunks, (c + 1) * N // nchunks):
            if aligned:
                _dot_rows(x, packed, absmax, pairs64, code, blocksize, r, K, w64, w, acc, y)
            else:
                _decode_run(packed, absmax, code, blocksize, r * K, w[:K])
                _dot_decoded_row(x, w, K, r, y)


_acc_tile = stack_tile_f32(MR, NR)


@njit(cache=True, parallel=True, fastmath=FAST_MATH)
def _tiled_kernel(x, packed, absmax, code, blocksize, _N_w, K_w, transpose, y):
    """y = x · Wᵀ (transpose=False: x (M, K_w), y (M, N_w)) or y = x · W (transpose=True: x (M, N_w),
    y (M, K_w)) with the register-blocked matmul; each B micro-panel is decoded straight from ``packed``."""
    K_in = x.shape[1]
    N_out = y.shape[1]
    if K_in == 0:
        y[:, :] = 0.0
    ap = pack_a(x)                                                 # (K chunks, row panels, MR, KC)
    n_col_panels = (N_out + NR - 1) // NR
    for jb in prange(n_col_panels):
        prefer_wide_vectors()
        acc = _acc_tile()                                          # (MR, NR) in registers
        bp = np.zeros((KC, NR), np.float32)                        # (KC, NR) panel of dequantized weights
        j0 = jb * NR
        nr = min(NR, N_out - j0)
        for kb in range(ap.shape[0]):
            k0 = kb * KC
            kc = min(KC, K_in - k0)
            if transpose:   # B = W: bp[p, j] = W[k0 + p, j0 + j], a run along a row of W
                for p in range(kc):
                    _decode_run(packed, absmax, code, blocksize, (k0 + p) * K_w + j0, bp[p, :nr])
            else:           # B = Wᵀ: bp[p, j] = W[j0 + j, k0 + p], a run along row j0 + j of W
                for j in range(nr):
                    _decode_run(packed, absmax, code, blocksize, (j0 + j) * K_w + k0, bp[:kc, j])
            for ib in range(ap.shape[1]):
                micro_kernel(ap[kb, ib], bp, kc, acc)
                store_tile(acc, y, ib * MR, j0, kb > 0)


def _weight_operands(packed, state):
    """(flat packed bytes, float32 block scales, the kernels' 16-value table, N, K) of a 2-D 4-bit weight."""
    flat_packed = dequant_matmul.check_weight(packed, state)
    absmax = state.block_absmax("numba")                            # double quant: dequantized first (small)
    code = np.ascontiguousarray(nf4.kernel_lut(state.quant_type), np.float32)
    N, K = (int(d) for d in state.shape)
    return flat_packed, np.ascontiguousarray(absmax, np.float32), code, N, K


def matmul_4bit(x: np.ndarray, packed: np.ndarray, state) -> np.ndarray:
    """y = x · dequant(W)ᵀ without materialising W: QLoRA's frozen-weight forward ([QLoRA] Eq. 5).

    Parameters
    ----------
    x : float32 (M, K)
    packed, state : a 4-bit weight W of shape (N, K) from ``quantize_4bit`` (any blocksize, NF4 or FP4, with
        or without double quantization).

    Returns
    -------
    float32 (M, N). W's elements are the float32 products code[c] · absmax of :func:`decode_4bit` (the values
    ``dequantize_4bit`` returns for a float32 state, before any cast to a 16-bit ``state.dtype``). The result
    equals the NumPy twin :func:`lora_ref.quant.dequant_matmul.matmul_4bit` within the float32 rounding bound of
    a dot product: the float32 additions come in another order, and two paths never form the weight but multiply
    each block's partial sum by its absmax (the gather path of CPUs without AVX2, and the one-row path of AVX2
    CPUs without AVX-512, :func:`lora_ref.kernels.jit.lut16_block_dot`).
    """
    flat_packed, absmax, code, N, K = _weight_operands(packed, state)
    x = np.ascontiguousarray(dequant_matmul.check_activation(x, "x", K, state.shape))
    y = np.empty((x.shape[0], N), np.float32)                      # (M, N)
    if x.shape[0] <= ROW_KERNEL_MAX_M:
        if HAS_LUT16 and K % state.blocksize == 0:                 # the table decoder's element order
            x = _evens_then_odds(x, 8 if BLOCK_DOT and x.shape[0] == 1 else 32)
        _rows_kernel(x, flat_packed, absmax, pair_table(code), code, state.blocksize, N, K, y)
    else:
        _tiled_kernel(x, flat_packed, absmax, code, state.blocksize, N, K, False, y)
    return y


def matmul_4bit_t(dy: np.ndarray, packed: np.ndarray, state) -> np.ndarray:
    """dx = dy · dequant(W) without materialising W: the input gradient of :func:`matmul_4bit`.

    Parameters: ``dy`` float32 (M, N); ``packed``, ``state`` a 4-bit weight W (N, K). Returns float32 (M, K).
    """
    flat_packed, absmax, code, N, K = _weight_operands(packed, state)
    dy = np.ascontiguousarray(dequant_matmul.check_activation(dy, "dy", N, state.shape))
    dx = np.empty((dy.shape[0], K), np.float32)                    # (M, K)
    _tiled_kernel(dy, flat_packed, absmax, code, state.blocksize, N, K, True, dx)
    return dx


# ---------------------------------------------------------------------------------------------------------------
# The chooser
# ---------------------------------------------------------------------------------------------------------------

AUTO_DEQUANTIZE_ROWS = 256
"""With ``impl="auto"``, 4-bit products with at least this many input rows (training batches) dequantize the layer
and call BLAS (:mod:`lora_ref.quant.dequant_matmul`); fewer rows (generation, small batches) use the fused kernel.
Measured on the development machine: at 1024 rows the dequantize-then-BLAS path was about 2× faster than the fused
kernel; for a single row the fused kernel reads 8× fewer bytes. The dequantize path holds one layer's float32
weight while the product runs."""


def _switch_on(*args) -> bool:
    """The blockwise steps' rule for "auto": the fast-path switch (the twins agree bit for bit)."""
    return switch.enabled()


def _few_rows(x) -> bool:
    """The 4-bit products' rule for "auto": the fused kernel below :data:`AUTO_DEQUANTIZE_ROWS` input rows."""
    return x.shape[0] < AUTO_DEQUANTIZE_ROWS


PICK = switch.Twins(sys.modules[__name__], {
    **{name: switch.Operation((name,), steps, _switch_on) for name in steps.__all__},
    "matmul_4bit": switch.Operation(("matmul_4bit", "matmul_4bit_t"), dequant_matmul, _few_rows),
})
pick = PICK.pick
dequant_matmul.FAST_STEPS["decode_4bit"] = decode_4bit  # its dequantize-then-matmul path decodes with this twin
"""``pick(operation, *args, impl)``: this module or the readable one (:mod:`lora_ref.quant.steps`,
:mod:`lora_ref.quant.dequant_matmul`) whose function runs ``operation`` — a step ("absmax_blocks", "encode_4bit",
…, "decode_8bit") or "matmul_4bit" (its functions ``matmul_4bit`` and ``matmul_4bit_t``, rule "auto" by the rows of
``x``). See :class:`lora_ref.kernels.switch.Twins`."""
