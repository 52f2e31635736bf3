"""The 4-bit and 8-bit code tables of QLoRA and bitsandbytes, built from first principles.

A *code* (bitsandbytes' word) is a sorted list of float32 values in [-1, 1]; a quantized element stores the index
of one of them, and the block's ``absmax`` scales it back. This module builds each table the way the paper
describes it and the way bitsandbytes actually computes it, and keeps the exact float32 tables bitsandbytes ships:

- **NF4** (NormalFloat, [QLoRA] §3, Eq. 4): quantiles of N(0, 1). bitsandbytes' ``create_normal_map`` takes
  8 positive probabilities from ``torch.linspace(0.9677083, 0.5, 9)[:-1]`` and 7 negative ones from
  ``torch.linspace(0.9677083, 0.5, 8)[:-1]``, applies the normal quantile function, adds one 0, sorts and
  divides by the largest value. Reproducing its 16 float32 values bit for bit needs three details: our own
  inverse normal CDF (:func:`ndtri`; no scipy here), torch's float32 ``linspace`` arithmetic
  (:func:`torch_linspace_f32`), and the float32 rounding of each quantile *before* the float32 division.
  A float64 path, or ``numpy.linspace``, lands 1–2 ulp away on some entries (:func:`nf4_code`).
- **The offset** 0.9677083 matches, to its 7 digits, the mean of the outermost symmetric quantile positions for
  15 and 16 bins, ((1 − 1/30) + (1 − 1/32)) / 2 = 0.9677083333… (:func:`nf4_offset`); bitsandbytes calls it
  "empirically optimized" and documents no derivation.
- **FP4** (1 sign, 2 exponent, 1 mantissa bit): bitsandbytes' table in bit-pattern order, divided by 12.
- **The 8-bit dynamic map** used by double quantization (``create_dynamic_map``): 7 decades 10^(−6+i), each
  holding 2^i linearly spaced means, with both signs, plus 0 and 1. Its float32 values depend on whether torch's
  CPU ``linspace`` uses fused multiply-adds (its AVX2/AVX512 builds do), so the table bitsandbytes generates there is
  hard-coded here (:data:`DYNAMIC_MAP`, md5 82b0fdea5e1a26dc1f5214bbab7360f9 of its float32 bytes), and
  :func:`dynamic_map` rebuilds it bit for bit once ``linspace`` is computed with fused multiply-adds, as torch's
  AVX2/AVX512 kernels do.
- **The CUDA kernel's thresholds**: the NF4 and FP4 encoders on the GPU compare against decimal literals in
  ``csrc/kernels.cu`` (``dQuantizeNF4``, ``dQuantizeFP4``), not against float32 midpoints. Four of the fifteen
  NF4 literals round to a float32 one ulp away from the midpoint of their two codes
  (:func:`cuda_nf4_thresholds`).

Taught in ``notebooks/05_nf4.ipynb``.

References: [QLoRA] Dettmers et al. 2023, arXiv 2305.14314, §3 and Eq. 4; bitsandbytes 0.50.2
``functional.py`` (``create_normal_map``, ``create_dynamic_map``, ``get_4bit_type``), ``csrc/kernels.cu``,
``backends/default/ops.py``; Wichura 1988, "Algorithm AS 241: The percentage points of the normal
distribution", Applied Statistics 37(3).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

__all__ = [
    "ndtri",
    "nf4_offset",
    "torch_linspace_f32",
    "nf4_paper_code",
    "nf4_code",
    "NF4_CODE",
    "FP4_CODE",
    "get_4bit_type",
    "FP4_KERNEL_LUT",
    "kernel_lut",
    "FP4_SORTED_ORDER",
    "dynamic_map",
    "DYNAMIC_MAP",
    "decimal_to_float32",
    "CUDA_NF4_THRESHOLD_LITERALS",
    "CUDA_FP4_THRESHOLD_LITERALS",
    "CUDA_FP4_MAGNITUDE_CODES",
    "cuda_nf4_thresholds",
    "cuda_fp4_thresholds",
    "midpoints_f32",
    "CPU_MIN_ABSMAX",
    "CUDA_NF4_T",
    "CUDA_FP4_T",
    "CPU_NF4_T",
    "CPU_FP4_T",
    "LUT_SIZE_8BIT",
    "cpu_lut_8bit",
]

F32 = np.float32

# ---------------------------------------------------------------------------------------------------------------
# The inverse normal CDF (the quantile function Q_X of [QLoRA] Eq. 4)
# ---------------------------------------------------------------------------------------------------------------

# Wichura's AS 241 (PPND16): rational approximations good to about 1e-16 relative error in float64.
_AS241_CENTRAL_NUM = (3.3871328727963666080e0, 1.3314166789178437745e2, 1.9715909503065514427e3,
                      1.3731693765509461125e4, 4.5921953931549871457e4, 6.7265770927008700853e4,
                      3.3430575583588128105e4, 2.5090809287301226727e3)
_AS241_CENTRAL_DEN = (1.0, 4.2313330701600911252e1, 6.8718700749205790830e2, 5.3941960214247511077e3,
                      2.1213794301586595867e4, 3.9307895800092710610e4, 2.8729085735721942674e4,
                      5.2264952788528545610e3)
_AS241_NEAR_NUM = (1.42343711074968357734e0, 4.63033784615654529590e0, 5.76949722146069140550e0,
                   3.64784832476320460504e0, 1.27045825245236838258e0, 2.41780725177450611770e-1,
                   2.27238449892691845833e-2, 7.74545014278341407640e-4)
_AS241_NEAR_DEN = (1.0, 2.05319162663775882187e0, 1.67638483018380384940e0, 6.89767334985100004550e-1,
                   1.48103976427480074590e-1, 1.51986665636164571966e-2, 5.47593808499534494600e-4,
                   1.05075007164441684324e-9)
_AS241_FAR_NUM = (6.65790464350110377720e0, 5.46378491116411436990e0, 1.78482653991729133580e0,
                  2.96560571828504891230e-1, 2.65321895265761230930e-2, 1.24266094738807843860e-3,
                  2.71155556874348757815e-5, 2.01033439929228813265e-7)
_AS241_FAR_DEN = (1.0, 5.99832206555887937690e-1, 1.36929880922735805310e-1, 1.48753612908506148525e-2,
                  7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7,
                  2.04426310338993978564e-15)


def _poly(coeffs: tuple[float, ...], r: float) -> float:
    """Horner evaluation of sum_k coeffs[k] * r**k."""
    acc = 0.0
    for c in reversed(coeffs):
        acc = acc * r + c
    return acc


def _ndtri_scalar(p: float) -> float:
    if not 0.0 < p < 1.0:
        if p == 0.0:
            return -math.inf
        if p == 1.0:
            return math.inf
        raise ValueError(f"ndtri: probability must lie in [0, 1], got {p!r}")
    q = p - 0.5
    if abs(q) <= 0.425:  # central region
        r = 0.180625 - q * q
        x = q * _poly(_AS241_CENTRAL_NUM, r) / _poly(_AS241_CENTRAL_DEN, r)
    else:  # tails
        r = math.sqrt(-math.log(p if q < 0 else 1.0 - p))
        if r <= 5.0:
            r -= 1.6
            x = _poly(_AS241_NEAR_NUM, r) / _poly(_AS241_NEAR_DEN, r)
        else:
            r -= 5.0
            x = _poly(_AS241_FAR_NUM, r) / _poly(_AS241_FAR_DEN, r)
        x = -x if q < 0 else x
    # One Newton step on Phi(x) = p with the library erfc polishes the last bit.
    phi_x = 0.5 * math.erfc(-x / math.sqrt(2.0))
    density = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    if density > 0.0:
        x -= (phi_x - p) / density
    return x


def ndtri(p) -> np.ndarray:
    """The standard normal quantile function Q(p) = Phi^{-1}(p), in float64.

    Parameters
    ----------
    p : array_like of float, values in [0, 1]

    Returns
    -------
    float64 array of p's shape: x with Phi(x) = p; -inf at 0 and +inf at 1.

    Notes
    -----
    Wichura's AS 241 rational approximation (relative error about 1e-16), then one Newton step on
    Phi(x) = 0.5 * erfc(-x / sqrt(2)). This is what ``scipy.stats.norm.ppf`` computes (scipy uses the cephes
    ``ndtri``); the two agree to a few float64 ulp, far below the float32 resolution the codes are kept in.
    """
    arr = np.asarray(p, dtype=np.float64)
    if np.isnan(arr).any():
        raise ValueError("ndtri: probabilities contain NaN")
    out = np.array([_ndtri_scalar(float(v)) for v in arr.ravel()], dtype=np.float64)
    return out.reshape(arr.shape)


# ---------------------------------------------------------------------------------------------------------------
# NF4
# ---------------------------------------------------------------------------------------------------------------


def nf4_offset(as_fraction: bool = False):
    """The mean of 1 − 1/30 and 1 − 1/32, i.e. 0.96770833…, which matches NF4's outermost probability.

    With 15 equal-mass bins the outermost symmetric quantile position is 1 − 1/(2·15), with 16 bins it is
    1 − 1/(2·16). Their mean agrees to all 7 digits with the literal ``offset=0.9677083`` of bitsandbytes'
    ``create_normal_map`` (``bitsandbytes/functional.py``), whose docstring calls the value "empirically
    optimized" and gives no derivation: the agreement is a match, not bitsandbytes' documented construction.
    """
    exact = (Fraction(29, 30) + Fraction(31, 32)) / 2
    return exact if as_fraction else float(exact)


def _nearest_f32(exact: Fraction) -> np.float32:
    """The float32 nearest to an exact rational (ties to the even mantissa): one correct rounding."""
    guess = F32(float(exact))
    best = None
    for cand in (np.nextafter(guess, F32(-np.inf)), guess, np.nextafter(guess, F32(np.inf))):
        key = (abs(Fraction(float(cand)) - exact), int(cand.view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, cand)
    return F32(best[1])


def _fma_f32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """a·b + c rounded once to float32, as a fused multiply-add instruction computes it."""
    return _nearest_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


def torch_linspace_f32(start: float, end: float, steps: int, fma: bool = True) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32, element by element as torch's CPU kernel computes it.

    step = (end − start) / (steps − 1) in float32; the first half is ``start + step · i``, the second half is
    ``end − step · (steps − 1 − i)``. torch's AVX2 and AVX512 builds contract each of these into a fused
    multiply-add (one rounding, ``fma=True``, the default here); its portable build
    (``ATEN_CPU_CAPABILITY=default``) rounds the product and the sum separately (``fma=False``). Both were
    checked against torch 2.13 for 8 … 1000 steps. ``numpy.linspace`` computes in float64 and rounds once at the
    end, which is neither.
    """
    if steps < 2:
        raise ValueError(f"torch_linspace_f32 needs at least 2 steps, got {steps}")
    s, e = F32(start), F32(end)
    step = F32(F32(e - s) / F32(steps - 1))
    out = np.empty(steps, dtype=np.float32)
    half = steps // 2
    for i in range(steps):
        k, base, sgn = (i, s, step) if i < half else (steps - 1 - i, e, -step)
        out[i] = _fma_f32(sgn, F32(k), base) if fma else F32(base + F32(sgn * F32(k)))
    return out


def nf4_paper_code(k: int = 4, offset: float | None = None) -> np.ndarray:
    """The NF4 idea from [QLoRA] §3 in float64: equal-mass quantiles of N(0, 1), asymmetric so 0 is exact.

    2^(k-1) values on the negative side and 2^(k-1) + 1 on the positive side (both including 0) are estimated as
    quantiles at evenly spaced probabilities between ``offset`` and 1/2; the two sets are joined, the duplicate
    zero removed, and the result divided by its maximum. Eq. 4 taken literally (probabilities i/(2^k + 1) with
    i = 0 … 2^k) hits Q(0) = −inf, so the extreme probability is pulled in to ``offset`` (default: the value
    bitsandbytes uses). Returns 2^k sorted float64 values with −1, 0 and 1 among them.
    """
    if offset is None:
        offset = 0.9677083
    n_pos, n_neg = 2 ** (k - 1) + 1, 2 ** (k - 1)
    pos = ndtri(np.linspace(offset, 0.5, n_pos)[:-1])  # 2^(k-1) positive quantiles
    neg = -ndtri(np.linspace(offset, 0.5, n_neg)[:-1])  # 2^(k-1) - 1 negative quantiles
    values = np.sort(np.concatenate([neg, [0.0], pos]))
    return values / values.max()


def nf4_code(offset: float = 0.9677083, linspace: str = "torch", precision: str = "float32") -> np.ndarray:
    """bitsandbytes' ``create_normal_map(offset, use_extra_value=True)``, the 16 NF4 values (sorted, float32).

    Parameters
    ----------
    offset : the outermost probability (0.9677083 in bitsandbytes).
    linspace : "torch" (float32 with fused multiply-adds, torch on AVX2/AVX512), "torch-portable" (float32,
        separate roundings, ``ATEN_CPU_CAPABILITY=default``) — both give the same NF4 table — or "numpy"
        (``np.linspace`` in float32).
    precision : "float32" rounds every quantile to float32 and divides in float32, as
        ``torch.Tensor(list_of_floats) / max`` does; "float64" divides in float64 and rounds once at the end.

    Returns
    -------
    float32[16]. With the defaults the result equals :data:`NF4_CODE` bit for bit; the other paths do not
    (see ``notebooks/05_nf4.ipynb`` for the ulp distances).
    """
    if linspace in ("torch", "torch-portable"):
        fma = linspace == "torch"
        lin9, lin8 = torch_linspace_f32(offset, 0.5, 9, fma=fma), torch_linspace_f32(offset, 0.5, 8, fma=fma)
    elif linspace == "numpy":
        lin9 = np.linspace(offset, 0.5, 9, dtype=np.float32)
        lin8 = np.linspace(offset, 0.5, 8, dtype=np.float32)
    else:
        raise ValueError(f"linspace must be 'torch', 'torch-portable' or 'numpy', got {linspace!r}")
    pos = ndtri(lin9[:-1].astype(np.float64))  # 8 positive quantiles (float64, like scipy)
    neg = -ndtri(lin8[:-1].astype(np.float64))  # 7 negative quantiles
    values = np.sort(np.concatenate([neg, [0.0], pos]))
    if precision == "float32":
        v32 = values.astype(np.float32)  # torch.Tensor(list) rounds each quantile to float32
        return (v32 / v32.max()).astype(np.float32)
    if precision == "float64":
        return (values / values.max()).astype(np.float32)
    raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")


NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
"""The NF4 table as bitsandbytes hard-codes it (``get_4bit_type("nf4")``, ``nf4_dequantization_lut``). Index = code."""
NF4_CODE.flags.writeable = False

FP4_CODE = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32) / F32(12)
).astype(np.float32)
"""bitsandbytes' FP4 table (``get_4bit_type("fp4")``), in bit-pattern order: bit 3 is the sign, bits 2..0 the
magnitude 0b000 → 0, 0b001 → 0.0625, 0b110 → 2, 0b111 → 3, 0b100 → 4, 0b101 → 6, 0b010 → 8, 0b011 → 12, all
over 12. Code 8 holds +0.0 (Python's ``-0`` is the integer 0); the CUDA kernel's sign multiply gives −0.0 there."""
FP4_CODE.flags.writeable = False

FP4_SORTED_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)
"""``torch.argsort(FP4_CODE)`` as bitsandbytes' CPU path computes it: code indices in increasing value. The two
zeros (codes 0 and 8) keep their index order, so the CPU encoder maps 0.0 to code 0 and tiny positive values
to code 8."""
FP4_SORTED_ORDER.flags.writeable = False


FP4_KERNEL_LUT = FP4_CODE.copy()
FP4_KERNEL_LUT[8] = -0.0
"""The FP4 values as bitsandbytes' CUDA kernel decodes them (``dDequantizeFP4Tree``): magnitude ``lut[c & 7]`` times
the sign ``1 − 2·(c >> 3)``, so code 8 gives −0.0 where :data:`FP4_CODE` holds +0.0. bitsandbytes' CPU paths disagree
among themselves (measured with 0.50.2 on an AVX512 CPU: +0.0 when the last dimension is a multiple of the blocksize
or odd, −0.0 otherwise)."""
FP4_KERNEL_LUT.flags.writeable = False


def kernel_lut(quant_type: str) -> np.ndarray:
    """float32[16]: the values bitsandbytes' dequantization kernels use for ``quant_type``.

    bitsandbytes never reads ``QuantState.code`` when it dequantizes 4-bit data: the CUDA and CPU kernels carry
    their own tables. Ours follow the CUDA kernel; they equal :func:`get_4bit_type` except for the sign of FP4's
    second zero (code 8).
    """
    if quant_type == "nf4":
        return NF4_CODE
    if quant_type == "fp4":
        return FP4_KERNEL_LUT
    raise ValueError(f"unknown quant_type {quant_type!r}; expected 'nf4' or 'fp4'")


def get_4bit_type(quant_type: str) -> np.ndarray:
    """The 16-value float32 code of ``quant_type`` ("nf4" or "fp4"), as bitsandbytes' ``get_4bit_type``."""
    if quant_type == "nf4":
        return NF4_CODE
    if quant_type == "fp4":
        return FP4_CODE
    raise ValueError(f"unknown quant_type {quant_type!r}; expected 'nf4' or 'fp4'")


# ---------------------------------------------------------------------------------------------------------------
# The 8-bit dynamic map (double quantization's code)
# ---------------------------------------------------------------------------------------------------------------


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8, fma: bool = True) -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map`` rebuilt in float32, with torch's ``linspace`` arithmetic.

    For decade i = 0 … max_exponent_bits − 1 the fraction values are the midpoints of
    ``linspace(0.1, 1, 2^i + 1)``, scaled by 10^(−(max_exponent_bits − 1) + i), with both signs; then 0 and 1.0
    are added and the list is sorted: 127 negative values, 0, 128 positive values for the signed 8-bit map.
    [Dettmers 2016, "8-Bit Approximations for Parallelism in Deep Learning", arXiv 1511.04561.]

    With ``fma=True`` (torch on AVX2/AVX512 CPUs) the result equals :data:`DYNAMIC_MAP`, the table bitsandbytes
    ships, bit for bit; with ``fma=False`` (torch's portable build) 42 entries move, by one ulp (two for entries
    89 and 165).
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                          else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        boundaries = torch_linspace_f32(0.1, 1.0, fraction_items, fma=fma)
        means = ((boundaries[:-1] + boundaries[1:]) / F32(2.0)).astype(np.float32)
        scale = F32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    if additional_items > 0:
        boundaries = torch_linspace_f32(0.1, 1.0, additional_items + 1, fma=fma)
        means = ((boundaries[:-1] + boundaries[1:]) / F32(2.0)).astype(np.float32)
        scale = F32(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"dynamic_map: {len(data)} values for {total_bits} bits; check the arguments")
    return np.sort(np.array(data, dtype=np.float32))


# fmt: off
DYNAMIC_MAP = np.array([
    -0.992968738079071, -0.9789062738418579, -0.96484375, -0.9507812261581421,  # 0
    -0.936718761920929, -0.922656238079071, -0.9085937738418579, -0.89453125,  # 4
    -0.8804687261581421, -0.866406261920929, -0.852343738079071, -0.8382812738418579,  # 8
    -0.82421875, -0.8101562261581421, -0.796093761920929, -0.782031238079071,  # 12
    -0.7679687738418579, -0.75390625, -0.7398437261581421, -0.725781261920929,  # 16
    -0.7117187976837158, -0.6976562738418579, -0.68359375, -0.6695312261581421,  # 20
    -0.655468761920929, -0.6414062976837158, -0.6273437738418579, -0.61328125,  # 24
    -0.5992187261581421, -0.585156261920929, -0.5710937976837158, -0.5570312738418579,  # 28
    -0.54296875, -0.5289062261581421, -0.5148437023162842, -0.500781238079071,  # 32
    -0.48671871423721313, -0.47265625, -0.4585937261581421, -0.44453126192092896,  # 36
    -0.43046873807907104, -0.4164062440395355, -0.40234375, -0.3882812261581421,  # 40
    -0.37421876192092896, -0.36015623807907104, -0.3460937440395355, -0.33203125,  # 44
    -0.3179687261581421, -0.30390626192092896, -0.28984373807907104, -0.2757812738418579,  # 48
    -0.26171875, -0.24765624105930328, -0.23359374701976776, -0.21953125298023224,  # 52
    -0.20546874403953552, -0.19140625, -0.17734375596046448, -0.16328124701976776,  # 56
    -0.14921875298023224, -0.13515624403953552, -0.12109375, -0.10703125596046448,  # 60
    -0.09859374910593033, -0.09578125923871994, -0.09296875447034836, -0.09015624970197678,  # 64
    -0.08734375238418579, -0.08453124761581421, -0.08171875774860382, -0.07890625298023224,  # 68
    -0.07609374821186066, -0.07328125089406967, -0.07046874612569809, -0.0676562562584877,  # 72
    -0.06484375149011612, -0.062031250447034836, -0.05921875312924385, -0.05640624836087227,  # 76
    -0.053593751043081284, -0.05078125, -0.047968748956918716, -0.04515625163912773,  # 80
    -0.04234374687075615, -0.039531249552965164, -0.03671875223517418, -0.033906251192092896,  # 84
    -0.031093750149011612, -0.028281250968575478, -0.025468749925494194, -0.02265625074505806,  # 88
    -0.019843751564621925, -0.017031250521540642, -0.014218750409781933, -0.011406250298023224,  # 92
    -0.009718749672174454, -0.009156249463558197, -0.008593750186264515, -0.008031249977648258,  # 96
    -0.0074687497690320015, -0.006906250026077032, -0.006343749817460775, -0.005781250074505806,  # 100
    -0.0052187503315508366, -0.0046562496572732925, -0.004093749914318323, -0.0035312497057020664,  # 104
    -0.002968749962747097, -0.002406249986961484, -0.001843750011175871, -0.001281249918974936,  # 108
    -0.0009437500848434865, -0.0008312499849125743, -0.0007187500596046448, -0.0006062500760890543,  # 112
    -0.000493750034365803, -0.0003812500217463821, -0.0002687500382307917, -0.00015625001105945557,  # 116
    -8.874999912222847e-05, -6.625000241911039e-05, -4.374999844003469e-05, -2.1249998098937795e-05,  # 120
    -7.749999895168003e-06, -3.250000190746505e-06, -5.500000384017767e-07, 0.0,  # 124
    5.500000384017767e-07, 3.250000190746505e-06, 7.749999895168003e-06, 2.1249998098937795e-05,  # 128
    4.374999844003469e-05, 6.625000241911039e-05, 8.874999912222847e-05, 0.00015625001105945557,  # 132
    0.0002687500382307917, 0.0003812500217463821, 0.000493750034365803, 0.0006062500760890543,  # 136
    0.0007187500596046448, 0.0008312499849125743, 0.0009437500848434865, 0.001281249918974936,  # 140
    0.001843750011175871, 0.002406249986961484, 0.002968749962747097, 0.0035312497057020664,  # 144
    0.004093749914318323, 0.0046562496572732925, 0.0052187503315508366, 0.005781250074505806,  # 148
    0.006343749817460775, 0.006906250026077032, 0.0074687497690320015, 0.008031249977648258,  # 152
    0.008593750186264515, 0.009156249463558197, 0.009718749672174454, 0.011406250298023224,  # 156
    0.014218750409781933, 0.017031250521540642, 0.019843751564621925, 0.02265625074505806,  # 160
    0.025468749925494194, 0.028281250968575478, 0.031093750149011612, 0.033906251192092896,  # 164
    0.03671875223517418, 0.039531249552965164, 0.04234374687075615, 0.04515625163912773,  # 168
    0.047968748956918716, 0.05078125, 0.053593751043081284, 0.05640624836087227,  # 172
    0.05921875312924385, 0.062031250447034836, 0.06484375149011612, 0.0676562562584877,  # 176
    0.07046874612569809, 0.07328125089406967, 0.07609374821186066, 0.07890625298023224,  # 180
    0.08171875774860382, 0.08453124761581421, 0.08734375238418579, 0.09015624970197678,  # 184
    0.09296875447034836, 0.09578125923871994, 0.09859374910593033, 0.10703125596046448,  # 188
    0.12109375, 0.13515624403953552, 0.14921875298023224, 0.16328124701976776,  # 192
    0.17734375596046448, 0.19140625, 0.20546874403953552, 0.21953125298023224,  # 196
    0.23359374701976776, 0.24765624105930328, 0.26171875, 0.2757812738418579,  # 200
    0.28984373807907104, 0.30390626192092896, 0.3179687261581421, 0.33203125,  # 204
    0.3460937440395355, 0.36015623807907104, 0.37421876192092896, 0.3882812261581421,  # 208
    0.40234375, 0.4164062440395355, 0.43046873807907104, 0.44453126192092896,  # 212
    0.4585937261581421, 0.47265625, 0.48671871423721313, 0.500781238079071,  # 216
    0.5148437023162842, 0.5289062261581421, 0.54296875, 0.5570312738418579,  # 220
    0.5710937976837158, 0.585156261920929, 0.5992187261581421, 0.61328125,  # 224
    0.6273437738418579, 0.6414062976837158, 0.655468761920929, 0.6695312261581421,  # 228
    0.68359375, 0.6976562738418579, 0.7117187976837158, 0.725781261920929,  # 232
    0.7398437261581421, 0.75390625, 0.7679687738418579, 0.782031238079071,  # 236
    0.796093761920929, 0.8101562261581421, 0.82421875, 0.8382812738418579,  # 240
    0.852343738079071, 0.866406261920929, 0.8804687261581421, 0.89453125,  # 244
    0.9085937738418579, 0.922656238079071, 0.936718761920929, 0.9507812261581421,  # 248
    0.96484375, 0.9789062738418579, 0.992968738079071, 1.0,  # 252
], dtype=np.float32)
# fmt: on
"""bitsandbytes' 8-bit dynamic map as ``create_dynamic_map()`` returns it with torch on AVX2/AVX512 CPUs
(md5 of the float32 bytes 82b0fdea5e1a26dc1f5214bbab7360f9). code[0] = −0.99296875, code[127] = 0, code[255] = 1."""
DYNAMIC_MAP.flags.writeable = False


# ---------------------------------------------------------------------------------------------------------------
# Decision thresholds
# ---------------------------------------------------------------------------------------------------------------


def decimal_to_float32(literal: str) -> np.float32:
    """The float32 nearest to the decimal ``literal`` (ties to even), as a C compiler reads ``0.123f``.

    ``np.float32(float(literal))`` rounds twice (decimal → float64 → float32) and can land one ulp away when the
    decimal sits near the midpoint of two float32 values; here the decimal is compared exactly, as a fraction,
    with the two float32 candidates around it.
    """
    return _nearest_f32(Fraction(literal))


CUDA_NF4_THRESHOLD_LITERALS = (
    "-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
    "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
    "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
    "0.5016634166240692", "0.6427869200706482", "0.8614784181118011",
)
"""The 15 decimal literals of ``dQuantizeNF4`` in bitsandbytes' ``csrc/kernels.cu``; entry i separates codes i
and i + 1. The kernel picks the code ``sum(s > t)``: strict comparisons, so a value on a threshold goes down."""

CUDA_FP4_THRESHOLD_LITERALS = (
    "0.00260417", "0.0859375", "0.20833333", "0.29166667", "0.4166667", "0.583333", "0.8333333",
)
"""The 7 magnitude literals of ``dQuantizeFP4`` (``csrc/kernels.cu``), increasing. 0.583333 is not 7/12."""

CUDA_FP4_MAGNITUDE_CODES = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=np.uint8)
"""FP4 magnitude codes in increasing value (0, 0.0625, 2, 3, 4, 6, 8, 12 over 12): the leaves of dQuantizeFP4."""


def cuda_nf4_thresholds() -> np.ndarray:
    """float32[15]: the NF4 decision thresholds the CUDA kernel compares against (its literals, read as float32)."""
    return np.array([decimal_to_float32(t) for t in CUDA_NF4_THRESHOLD_LITERALS], dtype=np.float32)


def cuda_fp4_thresholds() -> np.ndarray:
    """float32[7]: the FP4 magnitude thresholds of the CUDA kernel, increasing."""
    return np.array([decimal_to_float32(t) for t in CUDA_FP4_THRESHOLD_LITERALS], dtype=np.float32)


def midpoints_f32(sorted_code: np.ndarray) -> np.ndarray:
    """float32[len − 1]: (a + b) / 2 of neighbouring entries of a sorted float32 code, in float32 arithmetic.

    These are the thresholds of bitsandbytes' CPU path (``torch.bucketize`` against the midpoints).
    """
    c = np.asarray(sorted_code, dtype=np.float32)
    return ((c[:-1] + c[1:]) / F32(2)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# The encoders' decision tables, computed once: their one home, read by the readable steps
# (lora_ref.quant.steps) and by their Numba twins (lora_ref.quant.kernels).
# ---------------------------------------------------------------------------------------------------------------

CPU_MIN_ABSMAX = np.float32(1e-38)
"""bitsandbytes' CPU path clamps block scales from below: ``absmax.clamp(min=1e-38)``."""
CUDA_NF4_T = cuda_nf4_thresholds()                          # float32[15]
CUDA_FP4_T = cuda_fp4_thresholds()                          # float32[7], magnitudes
CPU_NF4_T = midpoints_f32(NF4_CODE)                         # float32[15]
CPU_FP4_T = midpoints_f32(FP4_CODE[FP4_SORTED_ORDER])       # float32[15], of the sorted FP4 table

LUT_SIZE_8BIT = 65536
"""Bins of bitsandbytes' CPU 8-bit lookup table."""


def cpu_lut_8bit(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU 8-bit lookup table (``build_quantize_lut``, csrc/cpu_ops.cpp): uint8[65536].

    Bin i stands for v_i = −1 + 2i / 65535 (float32); its code is the first index whose float32 midpoint with
    the next entry is not below v_i.
    """
    mids = midpoints_f32(code)  # (255,)
    i = np.arange(LUT_SIZE_8BIT, dtype=np.float32)
    v = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(LUT_SIZE_8BIT - 1)).astype(np.float32)
    return np.searchsorted(mids, v, side="left").astype(np.uint8)  # number of midpoints < v

