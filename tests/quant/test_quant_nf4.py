"""Code tables: NF4 derived bit for bit, the CUDA thresholds, FP4, the 8-bit dynamic map, our inverse normal CDF.

Expected bit patterns are transcribed from bitsandbytes 0.50.2's source (``get_4bit_type``, ``csrc/kernels.cu``)
and from the fixture files it wrote, never computed by the code under test.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors.numpy import load_file

from lora_ref.quant import nf4

DATA = Path(__file__).parents[1] / "data" / "bnb"

# bitsandbytes' NF4 table as float32 bit patterns (functional.py get_4bit_type, kernels.cu nf4_dequantization_lut)
NF4_BITS = [0xBF800000, 0xBF3239B1, 0xBF066B30, 0xBECA32A0, 0xBE91A24D, 0xBE3D353F, 0xBDBA7871, 0x00000000,
            0x3DA2FAFF, 0x3E24CAE3, 0x3E7C04DD, 0x3EAD033A, 0x3EE1A4B8, 0x3F1007AB, 0x3F3913B3, 0x3F800000]


def bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def ulps(a, b) -> np.ndarray:
    """Signed distance in float32 ulps (valid for values of equal sign)."""
    return np.asarray(a, np.float32).view(np.int32).astype(np.int64) - np.asarray(b, np.float32).view(np.int32)


def test_nf4_table_is_bitsandbytes_table():
    assert bits(nf4.NF4_CODE).tolist() == NF4_BITS
    fixture = load_file(str(DATA / "nf4_fp4_cuda.safetensors"))
    assert np.array_equal(bits(fixture["nf4_code"]), bits(nf4.NF4_CODE))


def test_nf4_construction_reproduces_table_bit_for_bit():
    for linspace in ("torch", "torch-portable"):
        assert bits(nf4.nf4_code(linspace=linspace)).tolist() == NF4_BITS


def test_float64_and_numpy_linspace_paths_land_ulps_away():
    d64 = ulps(nf4.nf4_code(precision="float64"), nf4.NF4_CODE)
    assert np.count_nonzero(d64) >= 1 and np.abs(d64).max() == 1  # one rounding instead of two: ±1 ulp
    dnp = ulps(nf4.nf4_code(linspace="numpy"), nf4.NF4_CODE)
    assert np.count_nonzero(dnp) >= 1 and 1 <= np.abs(dnp).max() <= 4  # float64 linspace, rounded once


def test_nf4_offset_is_mean_of_15_and_16_bin_quantile_positions():
    exact = nf4.nf4_offset(as_fraction=True)
    assert exact == (Fraction(29, 30) + Fraction(31, 32)) / 2
    assert f"{float(exact):.7f}" == "0.9677083"
    assert math.isclose(float(nf4.ndtri(0.9677083)), 1.84813, abs_tol=5e-6)


def test_paper_construction_is_close_to_table_with_exact_zero_and_ends():
    paper = nf4.nf4_paper_code()
    assert paper.shape == (16,) and paper[0] == -1.0 and paper[7] == 0.0 and paper[15] == 1.0
    assert np.abs(paper - nf4.NF4_CODE).max() < 1e-6  # same idea, float64 all the way


@given(st.floats(min_value=1e-300, max_value=1 - 1e-16))
def test_ndtri_inverts_the_normal_cdf(p):
    x = float(nf4.ndtri(p))
    phi = 0.5 * math.erfc(-x / math.sqrt(2.0))
    density = math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    # |Phi(x) - p| is within a few ulps of p, or (deep tails) x is within 1e-12 of the root
    assert abs(phi - p) <= 8 * math.ulp(p) + 1e-12 * density


def test_ndtri_known_values():
    assert float(nf4.ndtri(0.5)) == 0.0
    assert math.isclose(float(nf4.ndtri(0.975)), 1.959963984540054, rel_tol=1e-15)
    assert math.isclose(float(nf4.ndtri(1e-10)), -6.361340902404056, rel_tol=1e-14)
    assert nf4.ndtri(0.0) == -np.inf and nf4.ndtri(1.0) == np.inf
    with pytest.raises(ValueError, match="probabilit"):
        nf4.ndtri(1.5)


@pytest.mark.interop
def test_ndtri_matches_torch_special_ndtri():
    import torch

    p = np.random.default_rng(0).uniform(1e-12, 1 - 1e-12, 2000)
    ref = torch.special.ndtri(torch.tensor(p, dtype=torch.float64)).numpy()
    assert np.allclose(nf4.ndtri(p), ref, rtol=1e-14, atol=1e-15)


@given(st.floats(min_value=0.6, max_value=0.995))
def test_nf4_construction_sorted_with_minus_one_zero_one(offset):
    code = nf4.nf4_code(offset=offset)
    assert code.dtype == np.float32 and code.shape == (16,)
    assert np.all(np.diff(code) > 0)
    assert code[0] == -1.0 and code[7] == 0.0 and code[15] == 1.0


@given(st.integers(min_value=2, max_value=7))
def test_paper_codebook_any_bit_width(k):
    code = nf4.nf4_paper_code(k)
    assert code.shape == (2**k,) and np.all(np.diff(code) > 0)
    assert code.min() == -1.0 and code.max() == 1.0 and 0.0 in code


def test_cuda_thresholds_four_are_one_ulp_off_the_midpoints():
    t = nf4.cuda_nf4_thresholds()
    mid = nf4.midpoints_f32(nf4.NF4_CODE)
    d = ulps(t, mid)
    assert np.flatnonzero(d).tolist() == [0, 8, 12, 14] and np.abs(d).max() == 1
    assert [hex(int(bits(t)[i])) for i in (0, 8, 12, 14)] == ["0xbf591cd9", "0x3df64863", "0x3f006d03", "0x3f5c89d9"]


def test_decimal_literal_needs_single_rounding():
    lit = "0.8614784181118011"
    assert int(bits(nf4.decimal_to_float32(lit))) == 0x3F5C89D9
    assert int(bits(np.float32(float(lit)))) == 0x3F5C89DA  # decimal → float64 → float32 rounds twice


@given(st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, width=64))
def test_decimal_to_float32_is_nearest(v):
    lit = repr(v)
    f = nf4.decimal_to_float32(lit)
    exact = Fraction(lit)
    for other in (np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf))):
        if np.isfinite(other):
            assert abs(Fraction(float(f)) - exact) <= abs(Fraction(float(other)) - exact)


def test_fp4_table():
    expected = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
    assert np.array_equal(nf4.FP4_CODE, expected.astype(np.float32))
    fixture = load_file(str(DATA / "nf4_fp4_cuda.safetensors"))
    assert np.array_equal(bits(fixture["fp4_code"]), bits(nf4.FP4_CODE))
    assert np.all(np.diff(nf4.FP4_CODE[nf4.FP4_SORTED_ORDER]) >= 0)
    assert sorted(nf4.FP4_SORTED_ORDER.tolist()) == list(range(16))
    assert np.signbit(nf4.FP4_KERNEL_LUT[8]) and not np.signbit(nf4.FP4_CODE[8])


def test_cuda_fp4_literals():
    t = nf4.cuda_fp4_thresholds()
    assert np.all(np.diff(t) > 0)
    assert ulps(t[5], np.float32(7 / 12)) == -5  # 0.583333 is 5 ulps below 7/12
    mags = nf4.FP4_CODE[nf4.CUDA_FP4_MAGNITUDE_CODES]
    assert np.all(np.diff(mags) > 0)  # leaves in increasing magnitude


def test_dynamic_map_shipped_table():
    m = nf4.DYNAMIC_MAP
    assert hashlib.md5(m.tobytes()).hexdigest() == "82b0fdea5e1a26dc1f5214bbab7360f9"
    for name in ("nf4_fp4_cuda.safetensors", "nf4_fp4_cpu.safetensors"):
        assert np.array_equal(bits(load_file(str(DATA / name))["dynamic_map"]), bits(m))
    assert m.shape == (256,) and np.all(np.diff(m) > 0)
    assert m[0] == np.float32(-0.99296875) and m[127] == 0 and m[255] == 1
    assert (m < 0).sum() == 127 and (m > 0).sum() == 128


def test_dynamic_map_construction_with_fma_is_the_shipped_table():
    assert np.array_equal(bits(nf4.dynamic_map(fma=True)), bits(nf4.DYNAMIC_MAP))


def test_dynamic_map_without_fma_moves_the_42_entries_torch_portable_build_moves():
    # indices measured with torch built for ATEN_CPU_CAPABILITY=default, where the map is computed without FMA
    expected = [18, 20, 23, 25, 28, 30, 34, 39, 41, 46, 51, 58, 72, 80, 83, 87, 89, 92, 102, 116, 117, 137, 138,
                152, 162, 165, 167, 171, 174, 182, 196, 203, 208, 213, 215, 220, 224, 226, 229, 231, 234, 236]
    d = ulps(nf4.dynamic_map(fma=False), nf4.DYNAMIC_MAP)
    assert np.flatnonzero(d).tolist() == expected
    assert np.abs(d).max() == 2 and np.count_nonzero(np.abs(d) == 2) == 2  # entries 89 and 165 move by 2 ulps


@pytest.mark.interop
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_torch_linspace_emulation_matches_torch(capability):
    """torch's portable build rounds twice, its AVX2 build uses FMA; run each in a fresh interpreter."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch; print(json.dumps([torch.linspace(a, b, n).numpy().view('uint32').tolist() "
            "for a, b, n in [(0.1, 1.0, 65), (0.9677083, 0.5, 9), (-3.0, 7.3, 1000)]]))")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    fma = capability != "default"
    for (a, b, n), ref in zip([(0.1, 1.0, 65), (0.9677083, 0.5, 9), (-3.0, 7.3, 1000)], got):
        assert bits(nf4.torch_linspace_f32(a, b, n, fma=fma)).tolist() == ref


@pytest.mark.interop
def test_dynamic_map_equals_bitsandbytes_on_this_cpu():
    import bitsandbytes.functional as F
    import torch

    ref = F.create_dynamic_map().numpy()
    fma = torch.backends.cpu.get_cpu_capability() != "DEFAULT"
    assert np.array_equal(bits(ref), bits(nf4.dynamic_map(fma=fma)))
    assert np.array_equal(bits(F.get_4bit_type("nf4", device="cpu").numpy()), bits(nf4.NF4_CODE))
    assert np.array_equal(bits(F.get_4bit_type("fp4", device="cpu").numpy()), bits(nf4.FP4_CODE))


def test_get_4bit_type_rejects_unknown():
    with pytest.raises(ValueError, match="quant_type"):
        nf4.get_4bit_type("int4")
