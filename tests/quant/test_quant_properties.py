"""Properties of blockwise 4-bit quantization that hold for every input (hypothesis).

Packing round trip, idempotence (quantizing the dequantized tensor returns the same codes), the per-element
error bound absmax · (half the widest gap of the code), zero blocks, odd element counts, and the extra error of
double quantization.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lora_ref.quant import (
    ALLOWED_BLOCKSIZES,
    DYNAMIC_MAP,
    dequantize_4bit,
    dequantize_blockwise,
    get_4bit_type,
    quantize_4bit,
    quantize_blockwise,
)
from lora_ref.quant.blockwise import pack_nibbles, unpack_nibbles
from lora_ref.testing import quant_tensors

DTYPES = [np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)]
# relative rounding of the output dtype (half an ulp at 1)
DTYPE_EPS = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float16): 2.0**-11, np.dtype(ml_dtypes.bfloat16): 2.0**-8}
# Below the normal range rounding is absolute, not relative: a result is off by up to half the smallest subnormal.
DTYPE_TINY = {np.dtype(np.float32): 2.0**-149, np.dtype(np.float16): 2.0**-24, np.dtype(ml_dtypes.bfloat16): 2.0**-133}
SMALL_BLOCKS = [32, 64, 128, 256]


def half_widest_gap(quant_type: str) -> float:
    code = np.sort(get_4bit_type(quant_type).astype(np.float64))
    return float(np.max(np.diff(code))) / 2


# (x, blocksize): float32/float16/bfloat16 tensors of 1-3 dims whose blocks hold many distinct values, with zero
# blocks and outliers drawn on purpose (lora_ref.testing.quant_tensors states and tests the guarantees)
settings_args = dict(
    case=quant_tensors(SMALL_BLOCKS),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    rounding=st.sampled_from(["cuda", "cpu"]),
)


@given(codes=hnp.arrays(np.uint8, st.integers(1, 301), elements=st.integers(0, 15), fill=st.nothing()))
def test_pack_unpack_round_trip(codes):
    packed = pack_nibbles(codes)
    assert packed.shape == ((codes.size + 1) // 2,)
    assert np.array_equal(unpack_nibbles(packed, codes.size), codes)
    assert np.array_equal(packed[: codes.size // 2] >> 4, codes[0:2 * (codes.size // 2):2])  # first → high nibble


@given(**settings_args)
def test_quantize_of_dequantize_returns_the_same_codes(case, quant_type, rounding):
    x, blocksize = case
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, rounding=rounding)
    x_hat = dequantize_4bit(packed, state)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    packed2, state2 = quantize_4bit(x_hat, blocksize=blocksize, quant_type=quant_type, rounding=rounding)
    n = x.size
    c1, c2 = unpack_nibbles(packed, n), unpack_nibbles(packed2, n)
    if quant_type == "fp4":
        # FP4 has two zeros, +0 (code 0) and -0 (code 8): a zero may come back under the other one
        both_zero = np.isin(c1, (0, 8)) & np.isin(c2, (0, 8))
        c1, c2 = np.where(both_zero, 0, c1), np.where(both_zero, 0, c2)
    assert np.array_equal(c2, c1)
    assert np.array_equal(state2.absmax, state.absmax)
    assert np.array_equal(dequantize_4bit(packed2, state2), x_hat)


@given(**settings_args)
def test_error_at_most_half_the_widest_gap(case, quant_type, rounding):
    x, blocksize = case
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, rounding=rounding)
    x_hat = dequantize_4bit(packed, state).astype(np.float64).reshape(-1)
    flat = x.astype(np.float64).reshape(-1)
    absmax = np.repeat(state.absmax.astype(np.float64), blocksize)[: flat.size]
    eps = DTYPE_EPS[x.dtype]
    bound = absmax * half_widest_gap(quant_type) * (1 + 2.0**-20) + np.abs(x_hat) * eps + absmax * 2.0**-23
    assert np.all(np.abs(flat - x_hat) <= bound)


@given(**settings_args, data=st.data())
def test_zero_blocks(case, quant_type, rounding, data):
    x, blocksize = case
    flat = x.reshape(-1).copy()
    nblocks = -(-flat.size // blocksize)
    zeroed = data.draw(st.lists(st.integers(0, nblocks - 1), min_size=1, max_size=nblocks, unique=True))
    for b in zeroed:
        flat[b * blocksize:(b + 1) * blocksize] = 0
    packed, state = quantize_4bit(flat.reshape(x.shape), blocksize=blocksize, quant_type=quant_type,
                                  rounding=rounding)
    codes = unpack_nibbles(packed, flat.size)
    deq = dequantize_4bit(packed, state).reshape(-1)
    expected_code = 7 if (quant_type == "nf4" and rounding == "cpu") else 0  # 0x77 on CPU NF4, else 0x00
    for b in zeroed:
        sl = slice(b * blocksize, min((b + 1) * blocksize, flat.size))
        assert np.all(codes[sl] == expected_code)
        assert np.all(deq[sl] == 0)
        assert np.all(np.signbit(deq[sl]) == (quant_type == "nf4" and rounding == "cuda"))  # -1·0 = -0.0


@given(**settings_args)
def test_odd_element_count_pads_with_the_code_of_zero(case, quant_type, rounding):
    x, blocksize = case
    flat = x.reshape(-1)
    if flat.size % 2 == 0:
        flat = flat[:-1]  # an even size is at least 2, so one element stays
    packed, state = quantize_4bit(flat, blocksize=blocksize, quant_type=quant_type, rounding=rounding)
    n = flat.size
    assert n % 2 == 1 and packed.shape == ((n + 1) // 2,)
    pad = int(packed[-1] & 0x0F)
    if quant_type == "fp4":
        assert pad == 0
    elif rounding == "cuda" and state.absmax[-1] == 0:
        assert pad == 0  # 0 · (1/0) = NaN → code 0
    else:
        assert pad == 7
    assert dequantize_4bit(packed, state).shape == (n,)


@given(case=quant_tensors((32, 64), max_side=60), quant_type=st.sampled_from(["nf4", "fp4"]),
       rounding=st.sampled_from(["cuda", "cpu"]))
def test_double_quant_extra_error_bound(case, quant_type, rounding):
    """Codes are unchanged; each scale moves by at most absmax2 · (half the widest dynamic-map gap + LUT bin)."""
    x, blocksize = case
    packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, rounding=rounding)
    packed_dq, state_dq = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, rounding=rounding,
                                        double_quant=True)
    assert np.array_equal(packed_dq, packed)
    assert state_dq.absmax.dtype == np.uint8 and isinstance(state_dq.offset, float)
    assert state_dq.state2.blocksize == 256 and np.array_equal(state_dq.state2.code, DYNAMIC_MAP)
    scales = state.absmax.astype(np.float64)
    scales_dq = state_dq.block_absmax().astype(np.float64)
    gap = float(np.max(np.diff(DYNAMIC_MAP.astype(np.float64)))) / 2 + (2 / 65535 if rounding == "cpu" else 0)
    absmax2 = np.repeat(state_dq.state2.absmax.astype(np.float64), 256)[: scales.size]
    rounding_slack = (np.abs(scales) + abs(state_dq.offset) + absmax2) * 2.0**-22  # float32 steps of the decode
    assert np.all(np.abs(scales_dq - scales) <= absmax2 * gap * (1 + 1e-6) + rounding_slack)
    # and the weights move by at most |code| times that
    x1 = dequantize_4bit(packed, state).astype(np.float64).reshape(-1)
    x2 = dequantize_4bit(packed_dq, state_dq).astype(np.float64).reshape(-1)
    ds = np.repeat(np.abs(scales_dq - scales), blocksize)[: x1.size]
    eps = DTYPE_EPS[x.dtype]
    # two roundings to x's dtype, each within eps relative or half a subnormal step absolute
    assert np.all(np.abs(x2 - x1) <= ds + (np.abs(x1) + np.abs(x2)) * eps + DTYPE_TINY[x.dtype] + 1e-30)


@given(case=quant_tensors(ALLOWED_BLOCKSIZES), rounding=st.sampled_from(["cuda", "cpu"]))
def test_blockwise_8bit_error_bound(case, rounding):
    x, blocksize = case
    codes, state = quantize_blockwise(x, blocksize=blocksize, rounding=rounding)
    assert codes.shape == x.shape and codes.dtype == np.uint8
    back = dequantize_blockwise(codes, state)
    assert back.shape == x.shape and back.dtype == x.dtype
    absmax = np.repeat(state.absmax.astype(np.float64), blocksize)[: x.size]
    gap = float(np.max(np.diff(DYNAMIC_MAP.astype(np.float64)))) / 2 + (2 / 65535 if rounding == "cpu" else 0)
    err = np.abs(back.astype(np.float64) - x.astype(np.float64)).reshape(-1)
    assert np.all(err <= absmax * gap * (1 + 1e-6) + np.abs(back.astype(np.float64)).reshape(-1) * DTYPE_EPS[x.dtype])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codebooks_sorted_with_minus_one_zero_one(quant_type):
    code = np.sort(get_4bit_type(quant_type))
    assert np.all(np.diff(code) >= 0)
    assert {-1.0, 0.0, 1.0} <= set(code.tolist())


def test_bits_per_parameter_matches_the_paper():
    from lora_ref.quant import bits_per_parameter

    x = np.random.default_rng(0).standard_normal((256, 1024)).astype(np.float32)
    _, s = quantize_4bit(x, blocksize=64)
    assert bits_per_parameter(s) == 4.5  # 4 + 32/64
    _, s = quantize_4bit(x, blocksize=64, double_quant=True)
    # 4 + 8/64 + 32/(64·256) + one float32 offset for the whole tensor
    assert abs(bits_per_parameter(s) - (4 + 8 / 64 + 32 / (64 * 256) + 32 / x.size)) < 1e-12
