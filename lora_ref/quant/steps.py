"""The readable steps of blockwise quantization, on flat arrays: the NumPy twins of :mod:`lora_ref.quant.kernels`.

:func:`absmax_blocks`, :func:`encode_4bit`, :func:`pack_nibbles`, :func:`unpack_nibbles`, :func:`decode_4bit`,
:func:`encode_8bit` and :func:`decode_8bit` each have a Numba twin of the same name and signature in
:mod:`lora_ref.quant.kernels` (the contract: :mod:`lora_ref.kernels.switch`); the public functions of
:mod:`lora_ref.quant.blockwise` (which re-exports these steps) ask the chooser ``kernels.pick`` which one runs
(``impl=``). What the rounding modes ``"cuda"`` and ``"cpu"`` reproduce is told in :mod:`lora_ref.quant.blockwise`;
the decision tables come from :mod:`lora_ref.quant.nf4`. Taught in ``notebooks/05_nf4.ipynb``.
"""

from __future__ import annotations

import numpy as np

from lora_ref.quant import nf4

__all__ = ["absmax_blocks", "encode_4bit", "pack_nibbles", "unpack_nibbles", "decode_4bit", "encode_8bit",
           "decode_8bit"]

F32 = np.float32


def absmax_blocks(flat: np.ndarray, blocksize: int) -> np.ndarray:
    """Per-block absolute maximum of a flat float32 vector.

    Parameters
    ----------
    flat : float32[n]
    blocksize : elements per block; the last block holds the n % blocksize leftover elements (if any).

    Returns
    -------
    float32[ceil(n / blocksize)], absmax_b = max_{i in block b} |flat_i|.
    """
    n = flat.shape[0]
    nblocks = -(-n // blocksize)
    padded = np.zeros(nblocks * blocksize, dtype=np.float32)  # |0| never raises a maximum
    padded[:n] = np.abs(flat)
    return padded.reshape(nblocks, blocksize).max(axis=1)  # (nblocks,)


def _block_index(n: int, blocksize: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64) // blocksize  # (n,)


def _scaled(flat: np.ndarray, absmax: np.ndarray, blocksize: int, rounding: str) -> np.ndarray:
    """float32[n]: x normalised by its block's absmax, with the arithmetic of the chosen implementation."""
    n = flat.shape[0]
    blk = _block_index(n, blocksize)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if rounding == "cuda":
            inv = (F32(1.0) / absmax).astype(np.float32)  # 1/0 = inf, so a zero block gives 0·inf = NaN
            return (flat * inv[blk]).astype(np.float32)
        # cpu: reciprocal multiply, clamp to [-1, 1]; the trailing partial block uses true division
        safe = np.maximum(absmax, nf4.CPU_MIN_ABSMAX)
        inv = (F32(1.0) / safe).astype(np.float32)
        s = (flat * inv[blk]).astype(np.float32)
        rem = n % blocksize
        if rem:
            s[n - rem:] = flat[n - rem:] / safe[-1]
        return np.clip(s, F32(-1.0), F32(1.0))


def encode_4bit(flat: np.ndarray, absmax: np.ndarray, blocksize: int, quant_type: str, rounding: str) -> np.ndarray:
    """4-bit codes of a flat float32 vector, given its block scales.

    Parameters
    ----------
    flat : float32[n]
    absmax : float32[ceil(n / blocksize)] block scales (from :func:`absmax_blocks`)
    blocksize : elements per block
    quant_type : "nf4" or "fp4"
    rounding : "cuda" (decimal thresholds, strict >, NaN → 0) or "cpu" (float32 midpoints, bucketize)

    Returns
    -------
    uint8[n], values 0..15: index into ``get_4bit_type(quant_type)``.
    """
    s = _scaled(flat, absmax, blocksize, rounding)  # (n,)
    if rounding == "cuda":
        nan = np.isnan(s)
        if quant_type == "nf4":
            # code = number of thresholds t with s > t
            codes = np.searchsorted(nf4.CUDA_NF4_T, s, side="left").astype(np.uint8)
            codes[nan] = 0
            return codes
        sign = np.where(s < 0, 0b1000, 0).astype(np.uint8)  # -0.0 and NaN count as positive
        rank = np.searchsorted(nf4.CUDA_FP4_T, np.abs(s), side="left")  # number of literals below |s|
        rank[nan] = 0
        return (nf4.CUDA_FP4_MAGNITUDE_CODES[rank] + sign).astype(np.uint8)
    # cpu: torch.bucketize(s, midpoints, right=False) = number of midpoints strictly below s
    if quant_type == "nf4":
        return np.searchsorted(nf4.CPU_NF4_T, s, side="left").astype(np.uint8)
    return nf4.FP4_SORTED_ORDER[np.searchsorted(nf4.CPU_FP4_T, s, side="left")]


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pack 4-bit codes two to a byte, the first element in the high nibble.

    Parameters
    ----------
    codes : uint8[n], values 0..15. For odd n the caller appends the padding code first (see
        :func:`quantize_4bit`), or the last low nibble is 0.

    Returns
    -------
    uint8[ceil(n / 2)], byte j = (codes[2j] << 4) | codes[2j + 1].
    """
    n = codes.shape[0]
    padded = np.zeros(n + (n % 2), dtype=np.uint8)
    padded[:n] = codes
    return ((padded[0::2] << 4) | padded[1::2]).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of :func:`pack_nibbles`: uint8[ceil(n/2)] → uint8[n] codes (high nibble first)."""
    out = np.empty(2 * packed.shape[0], dtype=np.uint8)
    out[0::2] = packed >> 4
    out[1::2] = packed & 0x0F
    return out[:n]


def decode_4bit(packed: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int, n: int) -> np.ndarray:
    """Dequantize packed 4-bit codes: x̂_i = code[c_i] · absmax_{i // blocksize}, in float32.

    Parameters
    ----------
    packed : uint8[ceil(n / 2)]
    absmax : float32[ceil(n / blocksize)]
    code : float32[16] code table
    blocksize : elements per block
    n : number of elements

    Returns
    -------
    float32[n]
    """
    codes = unpack_nibbles(packed, n)  # (n,)
    return (code[codes] * absmax[_block_index(n, blocksize)]).astype(np.float32)


def _cuda_search_8bit(s: np.ndarray, code: np.ndarray) -> np.ndarray:
    """The CUDA kernel's ``dQuantize<0>``: a 7-step binary search over a sorted 256-entry code, vectorised.

    The search starts at pivot 127 with steps 64, 32, …, 1 and keeps the last code below (``lower``) and above
    (``upper``) the value, starting from −1 and +1 (code[0] / code[255] only if never updated). The final choice
    compares against the float32 midpoint of the pivot and the neighbour on s's side, strictly; ties stay on the pivot.
    """
    n = s.shape[0]
    pivot = np.full(n, 127, dtype=np.int64)
    upper_pivot = np.full(n, 255, dtype=np.int64)
    lower_pivot = np.zeros(n, dtype=np.int64)
    lower = np.full(n, -1.0, dtype=np.float32)
    upper = np.full(n, 1.0, dtype=np.float32)
    val = code[pivot]
    step = 64
    while step > 0:
        up = s > val
        lower_pivot = np.where(up, pivot, lower_pivot)
        lower = np.where(up, val, lower)
        upper_pivot = np.where(up, upper_pivot, pivot)
        upper = np.where(up, upper, val)
        pivot = np.where(up, pivot + step, pivot - step)
        val = code[pivot]
        step //= 2
    upper = np.where(upper_pivot == 255, code[255], upper)
    lower = np.where(lower_pivot == 0, code[0], lower)
    above = s > val
    mid_up = ((upper + val) * F32(0.5)).astype(np.float32)
    mid_down = ((lower + val) * F32(0.5)).astype(np.float32)
    out = np.where(above, np.where(s > mid_up, upper_pivot, pivot), np.where(s < mid_down, lower_pivot, pivot))
    return out.astype(np.uint8)


def _cpu_lut_index(s: np.ndarray) -> np.ndarray:
    """The LUT bin of a normalised value, as ``csrc/cpu_ops.cpp`` computes it in float32 steps:
    v = clamp(s, −1, 1); t = ((v + 1) · 0.5) · 65535 + 0.5; bin = trunc(t)."""
    v = np.clip(s.astype(np.float32), F32(-1.0), F32(1.0))
    t = ((v + F32(1.0)) * F32(0.5)).astype(np.float32)
    t = (t * F32(nf4.LUT_SIZE_8BIT - 1)).astype(np.float32)
    t = (t + F32(0.5)).astype(np.float32)
    return t.astype(np.int64)  # truncation toward zero; t >= 0.5


def encode_8bit(flat: np.ndarray, absmax: np.ndarray, blocksize: int, code: np.ndarray, rounding: str) -> np.ndarray:
    """8-bit codes of a flat float32 vector with a sorted 256-entry code, given its block scales.

    Parameters
    ----------
    flat : float32[n]
    absmax : float32[ceil(n / blocksize)]
    blocksize : elements per block
    code : float32[256], sorted (the dynamic map for double quantization)
    rounding : "cuda" (s = x · (1/absmax), binary search) or "cpu" (bitsandbytes' 65,536-bin lookup table)

    Returns
    -------
    uint8[n]
    """
    n = flat.shape[0]
    blk = _block_index(n, blocksize)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = (F32(1.0) / absmax).astype(np.float32)
        s = (flat * inv[blk]).astype(np.float32)  # (n,)
    if rounding == "cuda":
        return _cuda_search_8bit(s, np.asarray(code, dtype=np.float32))
    lut = nf4.cpu_lut_8bit(np.asarray(code, dtype=np.float32))
    zero_block = (absmax == 0)[blk]  # the CPU kernel writes code 0 for an all-zero block
    codes = lut[_cpu_lut_index(np.where(zero_block, F32(0.0), s))]
    codes[zero_block] = 0
    return codes


def decode_8bit(codes: np.ndarray, absmax: np.ndarray, code: np.ndarray, blocksize: int) -> np.ndarray:
    """x̂_i = code[c_i] · absmax_{i // blocksize} in float32. codes uint8[n] → float32[n]."""
    n = codes.shape[0]
    return (np.asarray(code, dtype=np.float32)[codes] * absmax[_block_index(n, blocksize)]).astype(np.float32)
