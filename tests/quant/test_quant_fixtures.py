"""lora_ref's 4-bit quantization against bitsandbytes 0.50.2's own outputs (tests/data/bnb, see its README).

``rounding="cuda"`` against the H200 file, ``rounding="cpu"`` against the CPU file: packed codes, block scales,
double-quantization state and dequantized values, with the exceptions the README lists measured here.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from lora_ref.quant import QuantState, dequantize_4bit, quantize_4bit
from lora_ref.quant.blockwise import unpack_nibbles

DATA = Path(__file__).parents[1] / "data" / "bnb"
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _load(device: str):
    path = DATA / f"nf4_fp4_{device}.safetensors"
    with safe_open(str(path), "np") as f:
        manifest = json.loads(f.metadata()["manifest"])
    return manifest, load_file(str(path))


FILES = {dev: _load(dev) for dev in ("cuda", "cpu")}
CASES = [c["case"] for c in FILES["cuda"][0]]


def case(device: str, k: int):
    manifest, tensors = FILES[device]
    meta = next(c for c in manifest if c["case"] == k)
    prefix = f"case{k:02d}."
    t = {key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)}
    x = t["input"].astype(DTYPES[meta["dtype"]]).reshape(meta["shape"])
    assert np.array_equal(x.astype(np.float32), t["input"].reshape(meta["shape"]))  # the stored input is exact
    return meta, t, x


def run(meta, x, rounding):
    return quantize_4bit(x, blocksize=meta["blocksize"], quant_type=meta["quant_type"],
                         double_quant=meta["double_quant"], rounding=rounding)


def codes_of(packed, n):
    return unpack_nibbles(np.asarray(packed).reshape(-1), n)


def fixture_state(meta, t) -> QuantState:
    """The QuantState bitsandbytes returned, rebuilt from the fixture tensors."""
    dtype = DTYPES[meta["dtype"]]
    code = t.get("code2")
    if not meta["double_quant"]:
        return QuantState(absmax=t["absmax"], shape=tuple(meta["shape"]), dtype=dtype, blocksize=meta["blocksize"],
                          quant_type=meta["quant_type"], code=np.zeros(16, np.float32))
    nblocks = t["absmax_codes"].size
    state2 = QuantState(absmax=t["absmax2"], shape=(nblocks,), dtype=np.dtype(np.float32), blocksize=256,
                        quant_type=None, code=code)
    return QuantState(absmax=t["absmax_codes"], shape=tuple(meta["shape"]), dtype=dtype, blocksize=meta["blocksize"],
                      quant_type=meta["quant_type"], code=np.zeros(16, np.float32), offset=float(t["offset"][0]),
                      state2=state2)


def test_fixture_covers_both_types_every_dtype_and_edge_cases():
    manifest = FILES["cuda"][0]
    assert {c["quant_type"] for c in manifest} == {"nf4", "fp4"}
    assert {c["dtype"] for c in manifest} == set(DTYPES)
    assert any(c["double_quant"] for c in manifest) and any(c["distribution"] == "zero_block" for c in manifest)
    assert any(np.prod(c["shape"]) % 2 for c in manifest)  # an odd element count
    assert FILES["cpu"][0] == manifest


# --------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("k", [c["case"] for c in FILES["cuda"][0] if c["quant_type"] == "nf4"])
def test_cuda_nf4_bit_exact(k):
    meta, t, x = case("cuda", k)
    packed, state = run(meta, x, "cuda")
    assert np.array_equal(packed, t["packed"])  # every 4-bit code, padding nibble included
    if not meta["double_quant"]:
        assert np.array_equal(state.absmax.view(np.uint32), t["absmax"].view(np.uint32))
        ours = dequantize_4bit(packed, state).astype(np.float32)
        assert np.array_equal(ours.view(np.uint32), t["dequant"].view(np.uint32))  # -0.0 included
    else:
        assert np.array_equal(state.absmax, t["absmax_codes"])
        assert abs(state.offset - float(t["offset"][0])) <= 1e-6 * abs(float(t["offset"][0]))
        assert np.array_equal(state.state2.code.view(np.uint32), t["code2"].view(np.uint32))
        # dequantization of bitsandbytes' own state is exact
        ours = dequantize_4bit(t["packed"], fixture_state(meta, t)).astype(np.float32)
        assert np.array_equal(ours.view(np.uint32), t["dequant"].view(np.uint32))


def test_cuda_zero_blocks_pack_to_0x00_and_dequantize_to_negative_zero():
    meta, t, x = case("cuda", 5)
    flat = x.reshape(-1)
    zero_blocks = np.flatnonzero(np.abs(flat).reshape(-1, meta["blocksize"]).max(axis=1) == 0)
    assert zero_blocks.size > 0
    packed, state = run(meta, x, "cuda")
    deq = dequantize_4bit(packed, state).reshape(-1, meta["blocksize"])
    half = meta["blocksize"] // 2
    for b in zero_blocks:
        assert np.all(packed[b * half:(b + 1) * half] == 0x00)
        assert np.all(deq[b] == 0) and np.all(np.signbit(deq[b]))


def test_cuda_threshold_probes_exact():
    meta, t, x = case("cuda", 6)  # values one ulp either side of every NF4 threshold
    packed, _ = run(meta, x, "cuda")
    assert np.array_equal(codes_of(packed, x.size), codes_of(t["packed"], x.size))
    # and these probes are where CPU (midpoints) and CUDA (decimal literals) disagree
    cpu_packed, _ = run(meta, x, "cpu")
    assert not np.array_equal(codes_of(cpu_packed, x.size), codes_of(t["packed"], x.size))


@pytest.mark.parametrize("k", [c["case"] for c in FILES["cuda"][0] if c["quant_type"] == "fp4"])
def test_cuda_fp4_codes(k):
    meta, t, x = case("cuda", k)
    packed, state = run(meta, x, "cuda")
    n = x.size
    agree = np.mean(codes_of(packed, n) == codes_of(t["packed"], n))
    assert agree >= 0.9999  # the kernel's fast-math reciprocal flips a few codes within an ulp of a threshold
    if meta["double_quant"]:
        assert np.mean(state.absmax == t["absmax_codes"]) >= 0.999
        assert abs(state.offset - float(t["offset"][0])) <= 1e-6 * abs(float(t["offset"][0]))
        ref_state = fixture_state(meta, t)
    else:
        assert np.array_equal(state.absmax.view(np.uint32), t["absmax"].view(np.uint32))
        ref_state = fixture_state(meta, t)
    # dequantizing bitsandbytes' codes with its state reproduces its output bit for bit (FP4 code 8 → -0.0)
    ours = dequantize_4bit(t["packed"], ref_state).astype(np.float32)
    assert np.array_equal(ours.view(np.uint32), t["dequant"].view(np.uint32))


def test_cuda_fp4_mismatches_sit_within_an_ulp_of_a_threshold():
    from lora_ref.quant.nf4 import cuda_fp4_thresholds

    meta, t, x = case("cuda", 10)
    packed, state = run(meta, x, "cuda")
    n = x.size
    bad = np.flatnonzero(codes_of(packed, n) != codes_of(t["packed"], n))
    assert 0 < bad.size <= 3
    flat = x.reshape(-1).astype(np.float32)
    inv = np.float32(1) / state.absmax[bad // meta["blocksize"]]
    s = np.abs(flat[bad] * inv)
    dist = np.min(np.abs(s[:, None].view(np.int32) - cuda_fp4_thresholds()[None, :].view(np.int32)), axis=1)
    assert np.all(dist <= 1)


@pytest.mark.parametrize("literal_index", range(7))
def test_cuda_fp4_threshold_probes(literal_index):
    """FP4 probes: on a literal t the code stays low (strict >), one ulp above it goes up; both signs."""
    from lora_ref.quant.nf4 import CUDA_FP4_THRESHOLD_LITERALS, decimal_to_float32

    leaves = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011]  # dQuantizeFP4's leaves, increasing
    t = decimal_to_float32(CUDA_FP4_THRESHOLD_LITERALS[literal_index])
    up = np.nextafter(t, np.float32(2))
    x = np.array([1.0, t, up, -t, -up], dtype=np.float32)  # absmax 1: s == x exactly
    packed, _ = quantize_4bit(x, blocksize=64, quant_type="fp4", rounding="cuda")
    c = codes_of(packed, 5)
    lo, hi = leaves[literal_index], leaves[literal_index + 1]
    assert c.tolist() == [0b011, lo, hi, lo | 0b1000, hi | 0b1000]


# --------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("k", CASES)
def test_cpu_bit_exact(k):
    meta, t, x = case("cpu", k)
    packed, state = run(meta, x, "cpu")
    assert np.array_equal(packed, t["packed"])
    if not meta["double_quant"]:
        assert np.array_equal(state.absmax.view(np.uint32), t["absmax"].view(np.uint32))
    else:
        # the 8-bit lookup-table quantizer of csrc/cpu_ops.cpp is reproduced: nested codes exact too
        assert np.array_equal(state.absmax, t["absmax_codes"])
        assert np.float32(state.offset) == t["offset"][0]
        assert np.array_equal(state.state2.absmax.view(np.uint32), t["absmax2"].view(np.uint32))
    ours = dequantize_4bit(packed, state).astype(np.float32)
    ref = t["dequant"].reshape(ours.shape)
    if meta["quant_type"] == "nf4":
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    else:
        # equal values; the sign of zero of FP4 code 8 depends on which bitsandbytes CPU kernel ran
        assert np.array_equal(ours, ref)
        sign_differs = np.signbit(ours) != np.signbit(ref)
        assert np.all(codes_of(packed, x.size)[sign_differs.reshape(-1)] == 8)


def test_cpu_zero_blocks_pack_to_0x77():
    meta, t, x = case("cpu", 5)
    flat = x.reshape(-1)
    zero_blocks = np.flatnonzero(np.abs(flat).reshape(-1, meta["blocksize"]).max(axis=1) == 0)
    packed, state = run(meta, x, "cpu")
    deq = dequantize_4bit(packed, state).reshape(-1, meta["blocksize"])
    half = meta["blocksize"] // 2
    for b in zero_blocks:
        assert np.all(packed[b * half:(b + 1) * half] == 0x77)
        assert np.all(deq[b] == 0) and not np.any(np.signbit(deq[b]))


def test_cpu_and_cuda_differ_only_where_the_readme_says():
    """NF4 fp32 Gaussian cases: identical codes on both devices except within an ulp of the 4 shifted thresholds."""
    for k in (0, 1, 4):
        meta, t_cuda, x = case("cuda", k)
        _, t_cpu, _ = case("cpu", k)
        n = x.size
        cu, cp = codes_of(t_cuda["packed"], n), codes_of(t_cpu["packed"], n)
        assert np.mean(cu == cp) >= 0.9999
