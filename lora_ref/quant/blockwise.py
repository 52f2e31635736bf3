"""Blockwise absmax quantization to 4 bits (NF4, FP4) and 8 bits (the dynamic map), as bitsandbytes does it.

A tensor x of any shape is flattened (row-major) and cut into blocks of ``blocksize`` consecutive elements; a block
may span two rows. Each block b keeps one float32 scale, its absolute maximum, and each element keeps the index of
the nearest entry of a code table after normalisation [QLoRA §2, §3]::

    absmax_b = max_{i in b} |x_i|                     # float32[nblocks]
    code_i   = nearest(code, x_i / absmax_b)          # 4-bit index
    x̂_i      = code[code_i] * absmax_b                # float32 product, then cast to x's dtype

Two 4-bit codes share a byte, the first element in the high nibble. *Double quantization* quantizes the
float32 scales again: their mean (``offset``) is subtracted and the rest is quantized blockwise to 8 bits with
the dynamic map, blocksize 256 (:func:`quantize_blockwise`).

"Nearest" is where implementations differ, and this module reproduces two of them bit for bit
(``rounding=``):

- ``"cuda"`` — bitsandbytes' CUDA kernels (``kQuantizeBlockwise``, ``dQuantizeNF4``, ``dQuantizeFP4``,
  ``dQuantize``): s = x · (1/absmax), codes from decimal-literal thresholds with strict ``>``, an all-zero block
  gives NaN scales and code 0 (NF4: −1 · 0 = −0.0 after dequantization); 8 bits by a 7-step binary search.
- ``"cpu"`` — bitsandbytes' CPU path (``backends/default/ops.py`` for 4 bits, ``csrc/cpu_ops.cpp`` for 8
  bits): s = clamp(x · (1/max(absmax, 1e-38)), −1, 1) but true division x / absmax in a trailing partial block,
  codes by ``bucketize`` against the float32 midpoints (a value on a midpoint goes to the lower code), FP4
  through the sorted table; 8 bits through a 65,536-bin lookup table.

The readable low-level steps are functions on plain arrays in :mod:`lora_ref.quant.steps` (:func:`absmax_blocks`,
:func:`encode_4bit`, :func:`pack_nibbles`, :func:`unpack_nibbles`, :func:`decode_4bit`, :func:`encode_8bit`,
:func:`decode_8bit`, re-exported here). ``lora_ref.quant.kernels`` holds Numba twins with the same names and
signatures, and its chooser ``pick`` runs one or the other: the public functions pass it their
``impl="numpy" | "numba" | "auto"`` (the contract: :mod:`lora_ref.kernels.switch`).

Taught in ``notebooks/05_nf4.ipynb``. References: [QLoRA] Dettmers et al. 2023, arXiv 2305.14314;
bitsandbytes 0.50.2 ``functional.py`` (``quantize_4bit``, ``dequantize_4bit``, ``quantize_blockwise``,
``QuantState``), ``csrc/kernels.cu``, ``backends/default/ops.py``, ``csrc/cpu_ops.cpp``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import ml_dtypes
import numpy as np

from lora_ref.quant import kernels, nf4
from lora_ref.quant.steps import (
    absmax_blocks,
    decode_4bit,
    decode_8bit,
    encode_4bit,
    encode_8bit,
    pack_nibbles,
    unpack_nibbles,
)

__all__ = [
    "ALLOWED_BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES",
    "ROUNDINGS",
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "absmax_blocks",
    "encode_4bit",
    "pack_nibbles",
    "unpack_nibbles",
    "decode_4bit",
    "encode_8bit",
    "decode_8bit",
    "bits_per_parameter",
    "storage_bytes",
    "NF4_CODE_TABLE_BYTES",
    "NESTED_CODE_TABLE_BYTES",
    "cpu_mean_f32",
]

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Blocksizes bitsandbytes accepts for 4-bit and 8-bit blockwise quantization."""
NESTED_BLOCKSIZE = 256
"""Blocksize of the second level of double quantization ([QLoRA] §3: "8-bit Floats with a blocksize of 256")."""
NF4_CODE_TABLE_BYTES = nf4.NF4_CODE.nbytes
"""Bytes of a 4-bit state's code table (``QuantState.code``: 16 float32 values; FP4's is the same size)."""
NESTED_CODE_TABLE_BYTES = nf4.DYNAMIC_MAP.nbytes
"""Bytes of the nested state's table with double quantization (``state2.code``: the 8-bit dynamic map, 256 float32)."""
QUANT_TYPES = ("nf4", "fp4")
ROUNDINGS = ("cuda", "cpu")
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16)

F32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# Quantization state
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class QuantState:
    """Everything needed to dequantize, with bitsandbytes' ``QuantState`` field names.

    Attributes
    ----------
    absmax : float32[nblocks] block scales; with double quantization uint8[nblocks] nested codes.
    shape : the original tensor's shape.
    dtype : the original dtype (float32, float16 or ml_dtypes.bfloat16); dequantization returns it.
    blocksize : elements per block.
    quant_type : "nf4" or "fp4" for 4-bit states; None for an 8-bit (``quantize_blockwise``) state.
    code : float32[16] (4-bit) or float32[256] (8-bit) code table, index = stored code.
    offset : with double quantization, the mean of the float32 scales that was subtracted (a Python float).
    state2 : with double quantization, the 8-bit state of the scales (absmax float32[ceil(nblocks/256)],
        code = the dynamic map, blocksize 256).
    """

    absmax: np.ndarray
    shape: tuple
    dtype: np.dtype
    blocksize: int
    quant_type: Optional[str]
    code: np.ndarray
    offset: Optional[float] = None
    state2: Optional["QuantState"] = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    def block_absmax(self, impl: str = "numpy") -> np.ndarray:
        """float32[nblocks]: the scales, dequantized from the nested state when double-quantized.

        absmax = code2[q] · absmax2[i // 256] + offset, each step in float32 (bitsandbytes' order).
        """
        if not self.nested:
            return np.asarray(self.absmax, dtype=np.float32)
        s2 = self.state2
        scales = _impl("decode_8bit", impl)(np.asarray(self.absmax, dtype=np.uint8), s2.absmax, s2.code, s2.blocksize)
        return (scales + F32(self.offset)).astype(np.float32)

    def check_packed(self, packed) -> np.ndarray:
        """Validate packed 4-bit data against this state; return it as flat uint8[ceil(n/2)] (``ValueError``
        naming the mismatch otherwise)."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"state.quant_type is {self.quant_type!r}; expected 'nf4' or 'fp4'")
        _check_blocksize(self.blocksize)
        if np.dtype(self.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"state.dtype is {self.dtype}; expected float32, float16 or bfloat16")
        packed = np.asarray(packed)
        if packed.dtype != np.uint8:
            raise ValueError(f"packed 4-bit data must be uint8, got {packed.dtype}")
        n = self.numel
        if n == 0:
            raise ValueError(f"state.shape {self.shape} holds no elements")
        if packed.size != (n + 1) // 2:
            raise ValueError(f"packed data holds {packed.size} bytes but the state's shape {tuple(self.shape)} "
                             f"({n} elements) needs {(n + 1) // 2}")
        nblocks = -(-n // self.blocksize)
        if np.shape(self.absmax) != (nblocks,):
            raise ValueError(f"state.absmax has shape {np.shape(self.absmax)}; {n} elements at blocksize "
                             f"{self.blocksize} need ({nblocks},)")
        if np.shape(self.code) != (16,):
            raise ValueError(f"state.code has shape {np.shape(self.code)}; a 4-bit code has 16 entries")
        if self.nested:
            if np.asarray(self.absmax).dtype != np.uint8:
                raise ValueError("a double-quantized state needs uint8 absmax codes")
            if self.offset is None:
                raise ValueError("a double-quantized state needs an offset")
            n2 = -(-nblocks // self.state2.blocksize)
            if np.shape(self.state2.absmax) != (n2,) or np.shape(self.state2.code) != (256,):
                raise ValueError(f"state.state2 does not fit: absmax {np.shape(self.state2.absmax)} (need ({n2},)), "
                                 f"code {np.shape(self.state2.code)} (need (256,))")
        elif np.asarray(self.absmax).dtype != np.float32:
            raise ValueError(f"state.absmax must be float32 without double quantization, got {self.absmax.dtype}")
        return packed.reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# The double-quantization offset: a float32 mean, reduced in torch's order
# ---------------------------------------------------------------------------------------------------------------


def _ceil_log2(x: int) -> int:
    return 1 if x <= 2 else int(x - 1).bit_length()


def _cascade_rows(rows: np.ndarray) -> np.ndarray:
    """torch's ``multi_row_sum`` (ATen SumKernel.cpp): sum the (size, …) rows with 4 levels of float32 accumulators.

    Level 0 adds 2^p consecutive rows (p = max(4, ceil(log2 size) / 4)), then is carried into level 1, and so on,
    which keeps the rounding error of long sums small.
    """
    size = rows.shape[0]
    levels = 4
    power = max(4, _ceil_log2(size) // levels)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((levels,) + rows.shape[1:], dtype=np.float32)
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] = acc[0] + rows[i]
            i += 1
        for j in range(1, levels):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = 0
            if i & (mask << (j * power)):
                break
    for k in range(i, size):
        acc[0] = acc[0] + rows[k]
    for j in range(1, levels):
        acc[0] = acc[0] + acc[j]
    return acc[0]


def _row_sum(x: np.ndarray) -> np.ndarray:
    """torch's ``row_sum``: 4 interleaved accumulators (instruction-level parallelism), then combined."""
    m = x.shape[0]
    m4 = m // 4
    partial = _cascade_rows(x[: 4 * m4].reshape((m4, 4) + x.shape[1:]))  # (4, …)
    for i in range(4 * m4, m):
        partial[0] = partial[0] + x[i]
    for k in range(1, 4):
        partial[0] = partial[0] + partial[k]
    return partial[0]


def _torch_sum_f32(v: np.ndarray) -> np.float32:
    """One thread's float32 sum of a contiguous vector, in torch's order (``vectorized_inner_sum``)."""
    n, lanes = v.shape[0], 8
    if n < lanes:
        return F32(_row_sum(v.reshape(n, 1))[0])
    vec = _row_sum(v[: (n // lanes) * lanes].reshape(-1, lanes))  # (8,) one partial sum per lane
    total = F32(0)
    for k in range((n // lanes) * lanes, n):
        total = F32(total + v[k])
    for k in range(lanes):
        total = F32(total + vec[k])
    return total


_TORCH_GRAIN_SIZE = 32768


def cpu_mean_f32(v: np.ndarray, threads: int = 1) -> np.float32:
    """``torch.mean`` of a contiguous float32 vector on the CPU, bit for bit: a cascade sum in float32, then / n.

    torch (``sum_out(...).div_(n)``; ATen ``cascade_sum``, ``vectorized_inner_sum``) reads the vector as rows of
    8 float32 lanes, sums those rows with :func:`_row_sum`, adds the leftover elements and then the 8 lanes in
    order. With ``threads`` > 1 and more than 32,768 elements (torch's grain size) it first splits the vector into
    equal chunks, one per thread, and sums the per-thread results. Checked against torch 2.13 with 1 and 2 threads
    and ``ATEN_CPU_CAPABILITY`` default, avx2 and avx512.

    bitsandbytes' CPU double quantization takes its ``offset`` from this mean; a float64 mean rounded to float32
    differs from it in about half of all cases. :func:`quantize_4bit` models a single-threaded torch.
    """
    v = np.ascontiguousarray(v, dtype=np.float32)
    n = v.shape[0]
    if threads <= 1 or n < _TORCH_GRAIN_SIZE:
        total = _torch_sum_f32(v)
    else:
        used = min(threads, -(-n // _TORCH_GRAIN_SIZE))
        chunk = -(-n // used)
        partial = np.zeros(threads, dtype=np.float32)  # one slot per thread, idle threads keep 0
        for t in range(used):
            partial[t] = _torch_sum_f32(v[t * chunk:(t + 1) * chunk])
        total = _torch_sum_f32(partial)
    return F32(total / F32(n))


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------


def _impl(name: str, impl: str):
    """The low-level step ``name`` as the chooser :func:`lora_ref.quant.kernels.pick` picks it for ``impl``:
    "numpy" the readable step (:mod:`lora_ref.quant.steps`), "numba" its Numba twin, "auto" the twin when the
    fast-path switch is on (the two agree bit for bit)."""
    return getattr(kernels.pick(name, impl=impl), name)


def _check_blocksize(blocksize, allowed=ALLOWED_BLOCKSIZES) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)) or int(blocksize) not in allowed:
        raise ValueError(f"blocksize {blocksize!r} is not allowed; expected one of {', '.join(map(str, allowed))}")
    return int(blocksize)


def _check_rounding(rounding) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; expected 'cuda' or 'cpu'")
    return rounding


def _as_flat_f32(x, what: str = "x") -> tuple[np.ndarray, tuple, np.dtype]:
    """Validate a float32/float16/bfloat16 array and return its exact float32 flattening, shape and dtype.

    Finiteness is checked by :func:`_require_finite` on the block maxima, which every quantizer computes anyway:
    a separate scan of the input took as long as the whole 4-bit encoding (4096 × 4096 float32, about 6 ms)."""
    arr = np.asarray(x)
    if arr.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{what} has dtype {arr.dtype}; expected float32, float16 or bfloat16 (ml_dtypes.bfloat16)"
        )
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape}); nothing to quantize")
    flat = np.ascontiguousarray(arr, dtype=np.float32).reshape(-1)  # exact: fp16/bf16 ⊂ fp32
    return flat, tuple(int(d) for d in arr.shape), arr.dtype


def _require_finite(flat: np.ndarray, absmax: np.ndarray, what: str = "x") -> None:
    """Raise ValueError if ``flat`` holds a NaN or an infinity. A block's maximum |x| is non-finite exactly when
    the block holds one (both twins of ``absmax_blocks`` propagate NaN, as ``np.max`` does), so only the small
    array of maxima is scanned unless the error has to be reported."""
    if np.isfinite(absmax).all():
        return
    bad = ~np.isfinite(flat)
    i = int(np.argmax(bad))
    kind = "NaN" if np.isnan(flat[i]) else "inf"
    raise ValueError(f"{what} contains {kind} (first at flat index {i}, {int(bad.sum())} non-finite in total)")


def quantize_blockwise(
    x,
    blocksize: int = 4096,
    code: Optional[np.ndarray] = None,
    rounding: str = "cuda",
    impl: str = "numpy",
) -> tuple[np.ndarray, QuantState]:
    """8-bit blockwise quantization, bitsandbytes' ``quantize_blockwise`` (used for double quantization).

    Parameters
    ----------
    x : float32 / float16 / bfloat16 array, any shape, finite
    blocksize : one of :data:`ALLOWED_BLOCKSIZES` (bitsandbytes' default 4096; double quantization uses 256)
    code : float32[256] sorted code; default :data:`lora_ref.quant.nf4.DYNAMIC_MAP`
    rounding : "cuda" (binary search, exact) or "cpu" (bitsandbytes' lookup-table approximation)
    impl : "numpy", "numba" or "auto" (see :func:`lora_ref.quant.kernels.pick`)

    Returns
    -------
    codes : uint8 array of x's shape
    state : QuantState with absmax float32[ceil(n / blocksize)], code, blocksize, dtype, quant_type None
    """
    blocksize = _check_blocksize(blocksize)
    rounding = _check_rounding(rounding)
    flat, shape, dtype = _as_flat_f32(x)
    code = nf4.DYNAMIC_MAP if code is None else np.asarray(code, dtype=np.float32)
    if code.shape != (256,) or not np.all(np.diff(code) >= 0):
        raise ValueError(f"code must be a sorted float32 table of 256 entries, got shape {code.shape}")
    absmax = _impl("absmax_blocks", impl)(flat, blocksize)
    _require_finite(flat, absmax)
    codes = _impl("encode_8bit", impl)(flat, absmax, blocksize, code, rounding)
    state = QuantState(absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=None, code=code.copy())
    return codes.reshape(shape), state


def dequantize_blockwise(codes, state: QuantState, impl: str = "numpy") -> np.ndarray:
    """Inverse of :func:`quantize_blockwise`: code[c] · absmax in float32, cast to ``state.dtype``, ``state.shape``."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise ValueError(f"8-bit codes must be uint8, got {codes.dtype}")
    n = state.numel
    if codes.size != n:
        raise ValueError(f"8-bit codes hold {codes.size} elements but the state's shape {state.shape} needs {n}")
    nblocks = -(-n // state.blocksize)
    if np.shape(state.absmax) != (nblocks,):
        raise ValueError(f"state.absmax has shape {np.shape(state.absmax)}; {n} elements at blocksize "
                         f"{state.blocksize} need ({nblocks},)")
    out = _impl("decode_8bit", impl)(codes.reshape(-1), np.asarray(state.absmax, np.float32), state.code,
                                     state.blocksize)
    return out.astype(state.dtype).reshape(state.shape)


def quantize_4bit(
    x,
    blocksize: int = 64,
    quant_type: str = "nf4",
    double_quant: bool = False,
    rounding: str = "cuda",
    impl: str = "numpy",
) -> tuple[np.ndarray, QuantState]:
    """Blockwise 4-bit quantization, bit for bit as bitsandbytes' ``quantize_4bit``.

    Parameters
    ----------
    x : float32, float16 or bfloat16 (ml_dtypes) array of any shape, finite. Blocks run over ``x.reshape(-1)``.
    blocksize : 32, 64, …, 4096 (powers of two)
    quant_type : "nf4" or "fp4". (bitsandbytes' own default is "fp4"; QLoRA uses "nf4".)
    double_quant : also quantize the float32 block scales (bitsandbytes' ``compress_statistics``): subtract their
        mean, then :func:`quantize_blockwise` with the dynamic map and blocksize 256.
    rounding : "cuda" or "cpu", the bitsandbytes implementation to reproduce (module docstring).
    impl : "numpy" (the readable steps of ``lora_ref.quant.steps``), "numba" (their twins in
        ``lora_ref.quant.kernels``) or "auto" (the twins when the fast-path switch is on).

    Returns
    -------
    packed : uint8[ceil(n / 2)], two codes per byte, the first element in the high nibble. For odd n the last low
        nibble is the code of a 0.0 in the last block (both kernels pad with zero).
    state : :class:`QuantState`. Without double quantization ``state.absmax`` is float32[ceil(n / blocksize)];
        with it, uint8 nested codes, ``state.offset`` a Python float and ``state.state2`` the 8-bit state.

    Notes
    -----
    The CUDA path computes the reciprocal 1/absmax correctly rounded; the kernel is built with ``--use_fast_math``,
    whose approximate reciprocal flips a few FP4 codes that sit within an ulp of a threshold (NF4 is exact).
    The double-quantization offset is torch's float32 mean of the scales: reproduced bit for bit for
    ``rounding="cpu"`` (:func:`cpu_mean_f32`); for ``"cuda"`` the float64 mean rounded to float32, which can differ
    from the GPU's reduction by an ulp.
    """
    blocksize = _check_blocksize(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown quant_type {quant_type!r}; expected 'nf4' or 'fp4'")
    rounding = _check_rounding(rounding)
    flat, shape, dtype = _as_flat_f32(x)
    n = flat.shape[0]

    absmax = _impl("absmax_blocks", impl)(flat, blocksize)  # (nblocks,)
    _require_finite(flat, absmax)
    codes = _impl("encode_4bit", impl)(flat, absmax, blocksize, quant_type, rounding)  # (n,)
    if n % 2:  # the padding nibble: a 0.0 in the last block, encoded like every other element
        pad = _impl("encode_4bit", impl)(np.zeros(1, np.float32), absmax[-1:], blocksize, quant_type, rounding)
        codes = np.concatenate([codes, pad])
    packed = _impl("pack_nibbles", impl)(codes)  # (ceil(n/2),)
    if rounding == "cpu" and n % blocksize:
        absmax = absmax.copy()
        absmax[-1] = max(absmax[-1], nf4.CPU_MIN_ABSMAX)  # the CPU path stores the clamped tail scale

    code = nf4.get_4bit_type(quant_type).copy()
    if not double_quant:
        return packed, QuantState(absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize,
                                  quant_type=quant_type, code=code)
    # offset: torch's float32 mean on the CPU (reproduced); on CUDA a float64 mean rounded to float32, which matched
    # torch's GPU reduction on the reference outputs but is not guaranteed to (about one ulp apart otherwise)
    offset = cpu_mean_f32(absmax) if rounding == "cpu" else F32(np.mean(absmax, dtype=np.float64))
    centred = (absmax - offset).astype(np.float32)  # (nblocks,)
    qabsmax, state2 = quantize_blockwise(centred, blocksize=NESTED_BLOCKSIZE, rounding=rounding, impl=impl)
    return packed, QuantState(absmax=qabsmax, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                              code=code, offset=float(offset), state2=state2)


def _check_state_4bit(packed: np.ndarray, state: QuantState) -> np.ndarray:
    if not isinstance(state, QuantState):
        raise ValueError(f"state must be a QuantState, got {type(state).__name__}")
    return state.check_packed(packed)


def dequantize_4bit(packed, state: QuantState, impl: str = "numpy") -> np.ndarray:
    """Inverse of :func:`quantize_4bit`: an array of ``state.shape`` in ``state.dtype``.

    x̂_i = code[c_i] · absmax_{i // blocksize} in float32 (absmax first dequantized from the nested state with
    double quantization), then rounded to the output dtype (round to nearest even). ``packed`` may be flat or
    bitsandbytes' (ceil(n/2), 1) column.

    Like bitsandbytes' kernels, this uses the built-in table of ``state.quant_type``
    (:func:`lora_ref.quant.nf4.kernel_lut`), not ``state.code``: FP4 code 8 decodes to −0.0 as on CUDA.
    (bitsandbytes' CPU paths give +0.0 or −0.0 there depending on the shape; every other value is the same.)
    """
    flat_packed = _check_state_4bit(packed, state)
    absmax = state.block_absmax(impl)
    code = nf4.kernel_lut(state.quant_type)  # the kernels' own table; FP4 code 8 decodes to -0.0
    out = _impl("decode_4bit", impl)(flat_packed, absmax, code, state.blocksize, state.numel)
    return out.astype(state.dtype).reshape(state.shape)


def storage_bytes(n: int, blocksize: int, double_quant: bool,
                  nested_blocksize: int = NESTED_BLOCKSIZE) -> dict[str, int]:
    """Bytes bitsandbytes stores for one 4-bit tensor of ``n`` elements, by part — the one home of the bit accounting.

    - ``codes``: ⌈n/2⌉ bytes, two 4-bit codes a byte;
    - ``scales``: one float32 absmax per block of ``blocksize`` (⌈n/blocksize⌉ · 4 B), or with double quantization
      one uint8 code per block plus one float32 second-level absmax per ``nested_blocksize`` blocks;
    - ``offset``: with double quantization, the float32 mean subtracted from the scales (4 B, once per tensor);
    - ``tables``: the 16-entry code table, and with double quantization the 256-entry dynamic map
      (:data:`NF4_CODE_TABLE_BYTES`, :data:`NESTED_CODE_TABLE_BYTES`), stored with every tensor.

    :func:`bits_per_parameter` (one tensor, exact) and :func:`lora_ref.analysis.memory.bits_per_quantized_param`
    (the paper's per-parameter figure) are both read from it.
    """
    nblocks = -(-n // blocksize)
    if double_quant:
        scales = nblocks * 1 + (-(-nblocks // nested_blocksize)) * 4  # uint8 codes, float32 second-level absmax
        return {"codes": (n + 1) // 2, "scales": scales, "offset": 4,
                "tables": NF4_CODE_TABLE_BYTES + NESTED_CODE_TABLE_BYTES}
    return {"codes": (n + 1) // 2, "scales": nblocks * 4, "offset": 0, "tables": NF4_CODE_TABLE_BYTES}


def bits_per_parameter(state: QuantState) -> float:
    """Storage per quantized element: 4 bits + scales (+ nested scales and the offset), code tables excluded.

    Without double quantization 4 + 32/blocksize (4.5 at 64); with it 4 + 8/blocksize + (32·nblocks2 + 32)/n
    (≈ 4.127 at 64, [QLoRA] §3). Counted by :func:`storage_bytes`.
    """
    n = state.numel
    nested = state.state2.blocksize if state.nested else NESTED_BLOCKSIZE
    b = storage_bytes(n, state.blocksize, state.nested, nested)
    return 8 * (b["codes"] + b["scales"] + b["offset"]) / n
