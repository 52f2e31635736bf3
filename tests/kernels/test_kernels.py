"""The Numba kernels equal their NumPy twins: bit for bit on codes, bytes and decoded floats; within the float32
rounding bound on matmuls. The same tests run with NUMBA_DISABLE_JIT=1 (tests/kernels/test_kernels_nojit.py)."""

import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.kernels import matmul as mm
from lora_ref.kernels.jit import HAS_AVX2, HAS_AVX512, HAS_LUT16
from lora_ref.quant import blockwise as ref
from lora_ref.quant import fused, kernels, nf4

NO_JIT = numba.config.DISABLE_JIT
# Pure-Python loops (NUMBA_DISABLE_JIT=1) are ~1000x slower: the same properties on smaller shapes.
MAX_N = 300 if NO_JIT else 2000
MAX_DIM = 20 if NO_JIT else 150

F32_EPS = float(np.finfo(np.float32).eps)
BLOCKSIZES = (32, 64, 128, 256, 4096)
LOWLEVEL = ("absmax_blocks", "encode_4bit", "pack_nibbles", "unpack_nibbles", "decode_4bit", "encode_8bit",
            "decode_8bit")


def bits(a: np.ndarray) -> np.ndarray:
    """float32 bit patterns: equality of these is equality including the sign of zero."""
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def matmul_bound(a_abs_b_abs: np.ndarray, k: int) -> np.ndarray:
    """Two float32 sums of k products, in different orders, differ by at most 2·k·eps·Σ|a||b| (+ rounding)."""
    return 2 * (k + 2) * F32_EPS * a_abs_b_abs + 1e-30


@pytest.fixture(scope="session", autouse=True)
def warm_kernels():
    """Compile (or load from cache) every kernel once, so no hypothesis example pays for compilation."""
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    for qt in ("nf4", "fp4"):
        for rounding in ("cuda", "cpu"):
            p, s = ref.quantize_4bit(x, blocksize=32, quant_type=qt, rounding=rounding, double_quant=True,
                                     impl="numba")
            ref.dequantize_4bit(p, s, impl="numba")
    w = np.ones((9, 64), np.float32)
    p, s = ref.quantize_4bit(w, blocksize=32, impl="numba")
    for m in (1, 9):
        kernels.matmul_4bit(np.ones((m, 64), np.float32), p, s)
        kernels.matmul_4bit_t(np.ones((m, 9), np.float32), p, s)
    p, s = ref.quantize_4bit(np.ones((9, 33), np.float32), blocksize=32, impl="numba")
    kernels.matmul_4bit(np.ones((1, 33), np.float32), p, s)
    mm.matmul(np.ones((7, 3), np.float32), np.ones((3, 5), np.float32))


@st.composite
def flat_blocks(draw, max_n=MAX_N):
    """(flat float32 vector, blocksize): odd and even n, partial tail blocks, some all-zero blocks, an outlier;
    independent normal entries from a drawn seed, so every non-zero block holds many distinct values."""
    blocksize = draw(st.sampled_from(BLOCKSIZES))
    n = draw(st.integers(1, max_n))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(n).astype(np.float32)
    if draw(st.booleans()) and n > blocksize:
        x[:blocksize] = 0.0                                          # a zero block
    if draw(st.booleans()):
        x[rng.integers(n)] = np.float32(rng.uniform(10, 50))         # an outlier
    scale = draw(st.sampled_from([1e-3, 1.0, 37.0, 1e3]))
    return (x * np.float32(scale)).astype(np.float32), blocksize


def test_twins_are_distinct_functions_with_the_same_signature():
    import inspect
    for name in LOWLEVEL:
        fast, slow = getattr(kernels, name), getattr(ref, name)
        assert fast is not slow
        assert list(inspect.signature(fast).parameters) == list(inspect.signature(slow).parameters), name


@given(flat_blocks())
def test_absmax_blocks(case):
    x, bs = case
    assert np.array_equal(bits(kernels.absmax_blocks(x, bs)), bits(ref.absmax_blocks(x, bs)))


@given(flat_blocks(), st.sampled_from(["nf4", "fp4"]), st.sampled_from(["cuda", "cpu"]))
def test_encode_4bit(case, quant_type, rounding):
    x, bs = case
    absmax = ref.absmax_blocks(x, bs)
    expected = ref.encode_4bit(x, absmax, bs, quant_type, rounding)
    got = kernels.encode_4bit(x, absmax, bs, quant_type, rounding)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("blocksize, n", [(32, 2 * 16384 + 3 * 32 + 17), (64, 16384 + 1), (4096, 5 * 4096 + 1),
                                          (4096, 3 * 4096), (256, 16384)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("rounding", ["cuda", "cpu"])
def test_encode_4bit_across_work_items(blocksize, n, quant_type, rounding):
    """The encoders split the blocks into work items of 16384 elements (or one block): several items, a short last
    item, a partial last block, a zero block, and the same input at scales 1e-3 and 1e3."""
    assert kernels._ENCODE_CHUNK == 16384
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[blocksize:2 * blocksize] = 0.0
    for scale in (1e-3, 1e3):
        xs = (x * np.float32(scale)).astype(np.float32)
        absmax = ref.absmax_blocks(xs, blocksize)
        np.testing.assert_array_equal(kernels.encode_4bit(xs, absmax, blocksize, quant_type, rounding),
                                      ref.encode_4bit(xs, absmax, blocksize, quant_type, rounding))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_encode_4bit_cpu_tail_block_divides(quant_type):
    """bitsandbytes' CPU path multiplies by 1/absmax but divides in a partial last block. Probes x whose x · (1/a)
    and x / a fall on different sides of a midpoint, in a full block and again in a tail block: the readable twin
    gives them different codes there, and the kernel must agree in both blocks."""
    mids = nf4.midpoints_f32(nf4.NF4_CODE if quant_type == "nf4" else np.sort(nf4.FP4_CODE))
    a = np.float32(3.0)
    probes = []
    for m in mids:
        for direction in (np.float32(-np.inf), np.float32(np.inf)):
            x = np.float32(m * a)
            for _ in range(8):                                   # m · a and its float32 neighbours
                if (np.float32(x * (np.float32(1) / a)) > m) != (np.float32(x / a) > m):
                    probes.append(x)
                x = np.nextafter(x, direction)
    probes = list(np.unique(np.array(probes, np.float32)))
    assert len(probes) >= 5
    body = np.array(probes + [a], np.float32)                    # a is each block's absmax
    flat = np.concatenate([body, np.zeros(64 - body.size, np.float32), body])   # a full block, then a tail block
    absmax = ref.absmax_blocks(flat, 64)
    expected = ref.encode_4bit(flat, absmax, 64, quant_type, "cpu")
    assert np.any(expected[:len(probes)] != expected[64:64 + len(probes)])     # the probes tell x·(1/a) from x/a
    np.testing.assert_array_equal(kernels.encode_4bit(flat, absmax, 64, quant_type, "cpu"), expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("rounding", ["cuda", "cpu"])
def test_encode_4bit_threshold_probes(quant_type, rounding):
    """Values on, and one ulp either side of, every decision threshold and ±1, ±0, in a block with absmax 1."""
    t = np.concatenate([nf4.cuda_nf4_thresholds(), nf4.cuda_fp4_thresholds(), -nf4.cuda_fp4_thresholds(),
                        nf4.midpoints_f32(nf4.NF4_CODE), nf4.midpoints_f32(np.sort(nf4.FP4_CODE))])
    probes = np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2)),
                             np.array([1, -1, 0, -0.0], np.float32)]).astype(np.float32)
    probes = np.concatenate([probes, np.zeros(-probes.size % 63, np.float32)]).reshape(-1, 63)
    x = np.concatenate([probes, np.ones((probes.shape[0], 1), np.float32)], axis=1).reshape(-1)  # a 1 per block
    absmax = ref.absmax_blocks(x, 64)
    assert np.all(absmax == 1)
    np.testing.assert_array_equal(kernels.encode_4bit(x, absmax, 64, quant_type, rounding),
                                  ref.encode_4bit(x, absmax, 64, quant_type, rounding))


@pytest.mark.parametrize("blocksize", [64, 40])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("rounding", ["cuda", "cpu"])
def test_encode_4bit_blocks_holding_nan_or_inf_match_the_twin(blocksize, quant_type, rounding):
    """A NaN makes its block's absmax NaN. bitsandbytes' CPU path then ranks every value of the block after the last
    midpoint (torch.bucketize sorts NaN last: every code 15 for NF4, bytes 0xFF); its CUDA path compares, and NaN
    compares false (code 0). An inf makes the absmax inf: the other values scale to 0, the inf itself to inf · 0 =
    NaN (or inf / inf in the tail). The kernels must give the twin's codes in full blocks, in the partial tail block
    and in clean blocks beside them; blocksize 64 takes the binary search on AVX-512 CPUs, 40 the plain loop."""
    rng = np.random.default_rng(9)
    bs = blocksize
    x = rng.standard_normal(bs * 4 + 24).astype(np.float32)      # four full blocks and a tail of 24
    x[bs + 6] = np.nan                                           # block 1
    x[3 * bs + 2] = -np.inf                                      # block 3
    x[4 * bs + 5] = np.nan                                       # the tail block
    x[4 * bs + 7] = np.inf
    absmax = ref.absmax_blocks(x, bs)
    assert np.isnan(absmax[[1, 4]]).all() and np.isinf(absmax[3]) and np.isfinite(absmax[[0, 2]]).all()
    expected = ref.encode_4bit(x, absmax, bs, quant_type, rounding)
    np.testing.assert_array_equal(kernels.encode_4bit(x, absmax, bs, quant_type, rounding), expected)
    if rounding == "cpu" and quant_type == "nf4":
        assert (expected[bs:2 * bs] == 15).all() and (expected[4 * bs:] == 15).all() and expected[3 * bs + 2] == 15


@pytest.mark.skipif(not HAS_AVX512, reason="rank16 is an AVX-512 instruction sequence; this CPU or mode has none")
@pytest.mark.parametrize("thresholds", [nf4.CPU_NF4_T, nf4.CUDA_NF4_T], ids=["cpu-midpoints", "cuda-thresholds"])
def test_rank16_counts_the_thresholds_below(thresholds):
    """rank16's binary search gives #{t : s > t} over the 15 thresholds (counted here one comparison at a time),
    s = x · scale, clamped to [-1, 1] or not: on values at, and one ulp either side of, every threshold, on ±1 and
    beyond, ±0, ±inf and NaN (15 when clamped, as torch.bucketize ranks it; 0 otherwise), at scales 1, 0.5 and 3.
    The NF4 encoders use it on AVX-512 CPUs."""
    from numba import njit

    from lora_ref.kernels.jit import rank16, rank_table

    @njit
    def clamped(x, scale, table, out):
        for i in range(0, x.shape[0], 16):
            rank16(x, i, scale, True, table, out, i)

    @njit
    def unclamped(x, scale, table, out):
        for i in range(0, x.shape[0], 16):
            rank16(x, i, scale, False, table, out, i)

    t = np.asarray(thresholds, np.float32)
    specials = np.array([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2)), specials])
    x = np.concatenate([x, np.zeros(-x.size % 16, np.float32)]).astype(np.float32)
    table = rank_table(t)
    assert kernels._nf4_codes is kernels._nf4_codes_rank16
    for scale in (np.float32(1), np.float32(0.5), np.float32(3)):
        for clamp, fn in ((True, clamped), (False, unclamped)):
            s = x * scale
            if clamp:
                s = np.where(s > 1, np.float32(1), np.where(s < -1, np.float32(-1), s))
            expected = np.array([15 if clamp and np.isnan(v) else sum(1 for tk in t if v > tk) for v in s],
                                np.int32)
            got = np.full(x.size, -1, np.int32)
            fn(x, scale, table, got)
            np.testing.assert_array_equal(got, expected, err_msg=f"scale {scale}, clamp {clamp}")


_GUARDED_ENCODE = r"""
import ctypes, mmap, numpy as np
from lora_ref.quant import blockwise as ref, kernels
libc = ctypes.CDLL(None, use_errno=True)
page = mmap.PAGESIZE
for bs in (8, 24, 40, 64):
    n = 4 * bs                                                       # whole blocks only
    buf = mmap.mmap(-1, 2 * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(ctypes.c_void_p(addr + page), ctypes.c_size_t(page), 0) == 0   # no access past here
    flat = np.frombuffer(buf, np.float32, count=n, offset=page - 4 * n)                 # ends at the guard page
    flat[:] = np.random.default_rng(bs).standard_normal(n)
    for rounding in ("cpu", "cuda"):
        absmax = ref.absmax_blocks(flat, bs)
        got = kernels.encode_4bit(flat, absmax, bs, "nf4", rounding)
        assert np.array_equal(got, ref.encode_4bit(flat, absmax, bs, "nf4", rounding)), (bs, rounding)
print("ok")
"""


@pytest.mark.skipif(not hasattr(__import__("mmap"), "PROT_READ"), reason="needs POSIX mmap protections")
def test_encode_4bit_never_reads_past_the_input_whatever_the_blocksize():
    """The twins take any block size, not only quantize_4bit's: the NF4 encoders must not read (or write) past a
    block whose size is no multiple of 16 (the binary search takes 16 values at a time). The input ends where a
    page with no access begins, so a read past it kills the process; blocksizes 8, 24, 40 and 64, both roundings."""
    run = subprocess.run([sys.executable, "-c", _GUARDED_ENCODE], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[2])
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_rank_table_wants_15_ascending_thresholds():
    from lora_ref.kernels.jit import rank_table

    assert rank_table(nf4.CPU_NF4_T)[-1] == np.inf and rank_table(nf4.CPU_NF4_T).dtype == np.float32
    with pytest.raises(ValueError, match="15 ascending"):
        rank_table(nf4.CPU_NF4_T[::-1])
    with pytest.raises(ValueError, match="15 ascending"):
        rank_table(nf4.CPU_NF4_T[:14])


@given(st.integers(1, MAX_N), st.data())
def test_pack_and_unpack_nibbles(n, data):
    codes = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).integers(0, 16, n, dtype=np.uint8)
    packed = kernels.pack_nibbles(codes)
    np.testing.assert_array_equal(packed, ref.pack_nibbles(codes))
    np.testing.assert_array_equal(kernels.unpack_nibbles(packed, n), ref.unpack_nibbles(packed, n))
    np.testing.assert_array_equal(kernels.unpack_nibbles(packed, n), codes)


@given(flat_blocks(), st.sampled_from(["nf4", "fp4"]))
def test_decode_4bit(case, quant_type):
    x, bs = case
    n = x.size
    absmax = ref.absmax_blocks(x, bs)
    packed = ref.pack_nibbles(ref.encode_4bit(x, absmax, bs, quant_type, "cuda"))
    code = nf4.kernel_lut(quant_type)
    expected = ref.decode_4bit(packed, absmax, code, bs, n)
    got = kernels.decode_4bit(packed, absmax, code, bs, n)
    assert got.dtype == np.float32 and got.shape == (n,)
    np.testing.assert_array_equal(bits(got), bits(expected))


def test_decode_4bit_into_rejects_a_wrong_buffer():
    packed = np.zeros(2, np.uint8)
    with pytest.raises(ValueError, match="out must be"):
        kernels.decode_4bit_into(packed, np.ones(1, np.float32), nf4.NF4_CODE, 64, 4, np.empty(3, np.float32))


@given(flat_blocks(), st.sampled_from(["cuda", "cpu"]))
def test_encode_and_decode_8bit(case, rounding):
    x, bs = case
    absmax = ref.absmax_blocks(x, bs)
    codes = ref.encode_8bit(x, absmax, bs, nf4.DYNAMIC_MAP, rounding)
    np.testing.assert_array_equal(kernels.encode_8bit(x, absmax, bs, nf4.DYNAMIC_MAP, rounding), codes)
    np.testing.assert_array_equal(bits(kernels.decode_8bit(codes, absmax, nf4.DYNAMIC_MAP, bs)),
                                  bits(ref.decode_8bit(codes, absmax, nf4.DYNAMIC_MAP, bs)))


@given(flat_blocks(), st.sampled_from(["nf4", "fp4"]), st.sampled_from(["cuda", "cpu"]), st.booleans())
def test_public_api_with_numba_equals_numpy(case, quant_type, rounding, double_quant):
    x, bs = case
    kw = dict(blocksize=bs, quant_type=quant_type, rounding=rounding, double_quant=double_quant)
    p0, s0 = ref.quantize_4bit(x, impl="numpy", **kw)
    p1, s1 = ref.quantize_4bit(x, impl="numba", **kw)
    np.testing.assert_array_equal(p1, p0)
    np.testing.assert_array_equal(np.asarray(s1.absmax), np.asarray(s0.absmax))
    assert s1.offset == s0.offset
    np.testing.assert_array_equal(bits(ref.dequantize_4bit(p0, s0, impl="numba")),
                                  bits(ref.dequantize_4bit(p0, s0, impl="numpy")))


# ------------------------------------------------------------------------------------------------------------
# Matmuls
# ------------------------------------------------------------------------------------------------------------


@given(st.integers(0, MAX_DIM), st.integers(0, 2 * MAX_DIM), st.integers(0, MAX_DIM), st.integers(0, 2**32 - 1))
def test_matmul_equals_its_twin(m, k, n, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    got = mm.matmul(a, b)
    expected = mm.matmul_reference(a, b)
    assert got.dtype == np.float32 and got.shape == (m, n)
    bound = matmul_bound(np.abs(a).astype(np.float64) @ np.abs(b), k)
    assert np.all(np.abs(got.astype(np.float64) - expected) <= bound)
    exact = a.astype(np.float64) @ b
    assert np.all(np.abs(got - exact) <= bound)


def test_matmul_accepts_strided_operands():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 70), dtype=np.float32)[:, ::2]      # (40, 35), non-contiguous
    b = rng.standard_normal((35, 90), dtype=np.float32).T.copy().T   # Fortran order
    bound = matmul_bound(np.abs(a).astype(np.float64) @ np.abs(b), 35)
    assert np.all(np.abs(mm.matmul(a, b) - a.astype(np.float64) @ b) <= bound)


@pytest.mark.parametrize("a, b, match", [
    (np.ones((2, 3), np.float64), np.ones((3, 2), np.float32), "float32"),
    (np.ones((2, 3), np.float32), np.ones((4, 2), np.float32), "inner dimensions"),
    (np.ones(3, np.float32), np.ones((3, 2), np.float32), "2-D"),
])
def test_matmul_rejects_bad_operands(a, b, match):
    with pytest.raises(ValueError, match=match):
        mm.matmul(a, b)
    with pytest.raises(ValueError, match=match):
        mm.matmul_reference(a, b)


@st.composite
def weights_4bit(draw):
    """A quantized 2-D weight (N, K) and its settings; K sometimes not a multiple of the blocksize (blocks then
    span rows and rows start in the middle of a byte)."""
    bs = draw(st.sampled_from((32, 64, 128)))
    n = draw(st.integers(1, MAX_DIM))
    k = draw(st.one_of(st.integers(1, 2 * MAX_DIM), st.integers(1, 4).map(lambda q: q * bs)))
    seed = draw(st.integers(0, 2**32 - 1))
    quant_type = draw(st.sampled_from(["nf4", "fp4"]))
    double_quant = draw(st.booleans())
    w = (0.02 * np.random.default_rng(seed).standard_normal((n, k))).astype(np.float32)
    packed, state = ref.quantize_4bit(w, blocksize=bs, quant_type=quant_type, double_quant=double_quant)
    return packed, state, seed


@given(weights_4bit(), st.one_of(st.integers(0, 8), st.integers(9, MAX_DIM)))
def test_matmul_4bit_equals_dequantize_then_matmul(weight, m):
    packed, state, seed = weight
    n, k = state.shape
    x = np.random.default_rng(seed + 1).standard_normal((m, k), dtype=np.float32)
    w = fused.dequantize_weight(packed, state)                        # (N, K)
    got = kernels.matmul_4bit(x, packed, state)
    expected = fused.matmul_4bit(x, packed, state)
    assert got.dtype == np.float32 and got.shape == (m, n)
    bound = matmul_bound(np.abs(x).astype(np.float64) @ np.abs(w).T, k)
    assert np.all(np.abs(got.astype(np.float64) - expected) <= bound)


@given(weights_4bit(), st.one_of(st.integers(0, 8), st.integers(9, MAX_DIM)))
def test_matmul_4bit_t_equals_dequantize_then_matmul(weight, m):
    packed, state, seed = weight
    n, k = state.shape
    dy = np.random.default_rng(seed + 2).standard_normal((m, n), dtype=np.float32)
    w = fused.dequantize_weight(packed, state)
    got = kernels.matmul_4bit_t(dy, packed, state)
    expected = fused.matmul_4bit_t(dy, packed, state)
    assert got.dtype == np.float32 and got.shape == (m, k)
    bound = matmul_bound(np.abs(dy).astype(np.float64) @ np.abs(w), n)
    assert np.all(np.abs(got.astype(np.float64) - expected) <= bound)


def test_fused_weight_is_the_float32_dequantized_weight():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 96), dtype=np.float32)
    packed, state = ref.quantize_4bit(w, blocksize=32, double_quant=True)
    np.testing.assert_array_equal(bits(fused.dequantize_weight(packed, state)),
                                  bits(ref.dequantize_4bit(packed, state)))
    x = np.eye(96, dtype=np.float32)[:3]                               # picks columns 0..2 of W
    np.testing.assert_array_equal(kernels.matmul_4bit(x, packed, state), ref.dequantize_4bit(packed, state)[:, :3].T)


@pytest.mark.parametrize("twin", [fused, kernels], ids=["numpy", "numba"])
def test_fused_matmuls_reject_bad_shapes(twin):
    packed, state = ref.quantize_4bit(np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match=r"x has shape \(2, 63\)"):
        twin.matmul_4bit(np.ones((2, 63), np.float32), packed, state)
    with pytest.raises(ValueError, match="float32"):
        twin.matmul_4bit(np.ones((2, 64), np.float64), packed, state)
    with pytest.raises(ValueError, match=r"dy has shape \(2, 5\)"):
        twin.matmul_4bit_t(np.ones((2, 5), np.float32), packed, state)
    with pytest.raises(ValueError, match="bytes"):
        twin.matmul_4bit(np.ones((2, 64), np.float32), packed[:-1], state)
    with pytest.raises(ValueError, match="must be a QuantState"):
        twin.matmul_4bit(np.ones((2, 64), np.float32), packed, {"absmax": state.absmax})
    p1, s1 = ref.quantize_4bit(np.ones(64, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        twin.matmul_4bit(np.ones((2, 64), np.float32), p1, s1)


def test_the_4bit_chooser():
    """``impl`` forces a twin; "auto" picks the fused kernel below AUTO_DEQUANTIZE_ROWS rows; anything else is an error."""
    few, many = np.ones((3, 64), np.float32), np.ones((kernels.AUTO_DEQUANTIZE_ROWS, 64), np.float32)
    assert kernels.pick("matmul_4bit", many, impl="numba") is kernels
    assert kernels.pick("matmul_4bit", few, impl="numpy") is fused
    assert kernels.pick("matmul_4bit", few) is kernels and kernels.pick("matmul_4bit", many) is fused
    with pytest.raises(ValueError, match="unknown impl 'cuda'"):
        kernels.pick("matmul_4bit", few, impl="cuda")
    with pytest.raises(ValueError, match="no operation 'matmul_8bit'"):
        kernels.pick("matmul_8bit", few)


def _round_to_float32(v):
    """The float32 nearest the exact rational v, ties to the even one."""
    from fractions import Fraction

    f = np.float32(float(v))  # within one float32 step of the answer
    near = [np.nextafter(f, np.float32(-np.inf)), f, np.nextafter(f, np.float32(np.inf))]
    dist = [abs(Fraction(float(c)) - v) for c in near]
    best = min(dist)
    ties = [c for c, d in zip(near, dist) if d == best]
    return ties[0] if len(ties) == 1 else next(c for c in ties if int(c.view(np.uint32)) % 2 == 0)


@pytest.mark.skipif(not HAS_LUT16,
                    reason="lut16_fma16 is an AVX-512 or AVX2 instruction sequence; this CPU or mode has neither")
def test_lut16_fma16_adds_each_lanes_products_in_order():
    """The fused decode-and-multiply-add: lane j of the 32 running sums is the chain acc ← fma(code[c] · s, x, acc)
    over the calls (the weight one float32 product, then one rounding per multiply-add), c the high nibble of
    byte j (lanes 0-15) or its low nibble (lanes 16-31), with x in the decoder's split order; the same whether the
    caller compiles with fastmath or not. Expected values computed here exactly (fractions), each multiply-add
    rounded once to the nearest float32, ties to even."""
    from fractions import Fraction

    from numba import njit

    from lora_ref.kernels.jit import lut16_fma16, stack_tile_f32

    tile = stack_tile_f32(1, 32)

    def run(packed, code, scales, x):
        acc = tile()[0]
        acc[:] = np.float32(0.0)
        for b in range(scales.shape[0]):
            lut16_fma16(packed, 16 * b, code, scales[b], x, 32 * b, acc)
        return acc.copy()

    rng = np.random.default_rng(4)
    blocks = 9
    packed = rng.integers(0, 256, 16 * blocks).astype(np.uint8)
    code = rng.standard_normal(16).astype(np.float32)
    scales = rng.uniform(0.01, 2.0, blocks).astype(np.float32)
    x = rng.standard_normal(32 * blocks).astype(np.float32)
    expected = np.zeros(32, np.float32)
    for b in range(blocks):
        byte = packed[16 * b:16 * (b + 1)]
        w = np.concatenate([code[byte >> 4] * scales[b], code[byte & 15] * scales[b]])  # float32 products
        expected = np.array([_round_to_float32(Fraction(float(wi)) * Fraction(float(xi)) + Fraction(float(ai)))
                             for wi, xi, ai in zip(w, x[32 * b:32 * (b + 1)], expected)], np.float32)
    for flags in (set(), {"contract", "reassoc"}, True):  # no fastmath, the decode step's flags, all of them
        got = njit(fastmath=flags)(run)(packed, code, scales, x)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    # the vector loads read contiguous float32 memory: another table dtype or a strided x is refused when compiling
    for bad in ((packed, code.astype(np.float64), scales, x), (packed, code, scales, np.repeat(x, 2)[::2])):
        with pytest.raises(numba.TypingError):
            njit(run)(*bad)


@pytest.mark.skipif(not HAS_LUT16,
                    reason="lut16_decode16 is an AVX-512 or AVX2 instruction sequence; this CPU or mode has neither")
def test_lut16_decode16_decodes_every_byte_value():
    """All 256 byte values, at an offset, with tables that use every bit of a float32 (random values, a negative
    zero, a subnormal, infinities): out[j] = table[byte_j >> 4] · s and out[16 + j] = table[byte_j & 15] · s, each
    one float32 product, bit for bit (the AVX2 path assembles each value from its four bytes)."""
    from numba import njit

    from lora_ref.kernels.jit import lut16_decode16

    @njit
    def run(packed, table, scales):
        out = np.empty(32 * (packed.shape[0] // 16), np.float32)
        for g in range(packed.shape[0] // 16):
            lut16_decode16(packed, 16 * g, table, scales[g], out, 32 * g)
        return out

    rng = np.random.default_rng(6)
    packed = np.concatenate([np.arange(256), rng.permutation(256)]).astype(np.uint8)   # every byte value, twice
    tables = [nf4.NF4_CODE.astype(np.float32), rng.standard_normal(16).astype(np.float32),
              np.array([-0.0, 1e-40, np.inf, -np.inf] + list(rng.uniform(-1e30, 1e30, 12)), np.float32)]
    for table in tables:
        scales = rng.uniform(0.01, 2.0, packed.size // 16).astype(np.float32)
        got = run(packed, table, scales).reshape(-1, 2, 16)
        groups = packed.reshape(-1, 16)
        expected = np.stack([table[groups >> 4] * scales[:, None], table[groups & 15] * scales[:, None]], axis=1)
        np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))


@pytest.mark.skipif(not HAS_AVX2, reason="lut16_block_dot is an AVX2 instruction sequence; this CPU or mode has none")
@pytest.mark.parametrize("nbytes", [16, 32, 64])     # blocksizes 32 (one step, the loop), 64 (straight-line), 128
def test_lut16_block_dot_scales_each_blocks_partial_sums(nbytes):
    """The AVX2 one-row GEMV step: per block, lane l's partial sum is code[c] · x for the first 32 codes (one float32
    product), then fma(code[c], x, part) for each further 32, c the code of element BLOCK_DOT_ORDER[l] of that
    group (element 2j the high nibble of byte j, 2j + 1 the low one); then acc[l] = fma(part, s, acc[l]). The
    same whether the caller compiles with fastmath or not. Expected values computed here exactly (fractions), each
    operation rounded once to the nearest float32, ties to even."""
    from fractions import Fraction

    from numba import njit

    from lora_ref.kernels.jit import BLOCK_DOT_ORDER, lut16_block_dot, stack_tile_f32

    # lane l: elements 8(l // 8) + 0, 2, 4, 6 then 1, 3, 5, 7 of its group of eight
    assert BLOCK_DOT_ORDER.tolist()[:16] == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    assert sorted(BLOCK_DOT_ORDER.tolist()) == list(range(32))
    tile = stack_tile_f32(1, 32)

    def run(packed, code, scales, x, nbytes):
        acc = tile()[0]
        acc[:] = np.float32(0.0)
        for b in range(scales.shape[0]):
            lut16_block_dot(packed, 3 + nbytes * b, nbytes, code, scales[b], x, 2 * nbytes * b, acc)
        return acc.copy()

    rng = np.random.default_rng(5)
    blocks = 4
    packed = rng.integers(0, 256, 3 + nbytes * blocks).astype(np.uint8)          # 3 leading bytes: an offset
    code = rng.standard_normal(16).astype(np.float32)
    scales = rng.uniform(0.01, 2.0, blocks).astype(np.float32)
    x = rng.standard_normal(2 * nbytes * blocks).astype(np.float32)
    expected = [Fraction(0)] * 32
    for b in range(blocks):
        part = None
        for t in range(nbytes // 16):
            byte = packed[3 + nbytes * b + 16 * t:][:16].astype(np.int64)
            codes = np.stack([byte >> 4, byte & 15], axis=1).reshape(32)         # element order
            w = code[codes[BLOCK_DOT_ORDER]]
            xt = x[2 * nbytes * b + 32 * t:][:32]
            prods = [Fraction(float(wi)) * Fraction(float(xi)) for wi, xi in zip(w, xt)]
            if part is None:
                part = [_round_to_float32(pr) for pr in prods]
            else:
                part = [_round_to_float32(pr + Fraction(float(pa))) for pr, pa in zip(prods, part)]
        expected = [_round_to_float32(Fraction(float(pa)) * Fraction(float(scales[b])) + Fraction(float(ac)))
                    for pa, ac in zip(part, expected)]
    expected = np.array(expected, np.float32)
    for flags in (set(), {"contract", "reassoc"}, True):  # no fastmath, the decode step's flags, all of them
        got = njit(fastmath=flags)(run)(packed, code, scales, x, nbytes)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_the_x_reorderings_are_the_lane_orders():
    """The one-row GEMV's and the decode step's reorderings of x put element BLOCK_DOT_ORDER[l] of each group of 32
    at position l (lut16_block_dot's lanes), or the 16 even then the 16 odd elements (lut16_fma16's split order)."""
    from lora_ref.kernels import decode
    from lora_ref.kernels.jit import BLOCK_DOT, BLOCK_DOT_ORDER

    split = np.r_[0:32:2, 1:32:2]
    x = np.random.default_rng(9).standard_normal(96).astype(np.float32)
    for order, group in ((BLOCK_DOT_ORDER, 8), (split, 32)):
        in_order = np.concatenate([g[order] for g in x.reshape(3, 32)])
        np.testing.assert_array_equal(kernels._evens_then_odds(x[None, :], group)[0], in_order)
        xs = np.empty(96, np.float32)
        decode._evens_then_odds(x, xs, group)
        np.testing.assert_array_equal(xs, in_order)
    assert decode.LANE_GROUP == (8 if BLOCK_DOT else 32)


@pytest.mark.parametrize("bs", [32, 64, 128, 256, 4096])
def test_matmul_4bit_one_row_on_block_boundaries(bs):
    """One input row and K a whole number of blocks: the path decoding takes (lut16_block_dot on AVX2 CPUs without
    AVX-512, lut16_fma16 with AVX-512, the gather elsewhere), against the twin within the float32 bound; random x,
    so that a wrongly ordered x or a wrong block offset shows."""
    rng = np.random.default_rng(bs)
    for blocks in (1, 2, 3):
        k = blocks * bs
        for quant_type, double_quant in (("nf4", False), ("nf4", True), ("fp4", True)):
            w = (0.02 * rng.standard_normal((7, k))).astype(np.float32)
            packed, state = ref.quantize_4bit(w, blocksize=bs, quant_type=quant_type, double_quant=double_quant)
            x = rng.standard_normal((1, k), dtype=np.float32)
            got = kernels.matmul_4bit(x, packed, state)
            expected = fused.matmul_4bit(x, packed, state)
            wd = fused.dequantize_weight(packed, state)
            bound = matmul_bound(np.abs(x).astype(np.float64) @ np.abs(wd).T, k)
            assert np.all(np.abs(got.astype(np.float64) - expected) <= bound), (k, quant_type, double_quant)


def test_sum32_adds_the_lanes_pairwise():
    """The 32 running sums are added as halves: l + (l + 16), then + 8, + 4, then (0 + 2) + (1 + 3), each a float32
    addition; values chosen so that the one-after-another order gives another answer."""
    from numba import njit

    from lora_ref.kernels.jit import sum32

    rng = np.random.default_rng(8)
    acc = (rng.standard_normal(32) * 10.0 ** rng.integers(-4, 8, 32)).astype(np.float32)
    h = acc.copy()
    for width in (16, 8, 4):
        h = h[:width] + h[width:2 * width]                                  # float32 additions
    expected = (h[0] + h[2]) + (h[1] + h[3])
    chain = np.float32(0)
    for a in acc:
        chain = np.float32(chain + a)
    assert chain != expected                                                # the order matters for these values
    got = njit(lambda a: sum32(a))(acc.copy())
    assert np.float32(got).view(np.uint32) == np.float32(expected).view(np.uint32)


def test_prefetch_changes_nothing_even_past_the_end():
    """prefetch is a hint: it returns nothing, writes nothing, and may name elements far outside the array (a
    prefetch never faults), as the GEMVs do near the end of their codes."""
    from numba import njit

    from lora_ref.kernels.jit import prefetch

    @njit
    def touch(a, i):
        prefetch(a, i)
        prefetch(a, i + 10 ** 12)
        prefetch(a, -i - 10 ** 9)
        return a.sum()

    for dtype in (np.uint8, np.float32):
        a = np.arange(64, dtype=dtype)
        before = a.copy()
        assert touch(a, 63) == before.sum() and touch(a, 1 << 20) == before.sum()
        np.testing.assert_array_equal(a, before)


@pytest.mark.skipif(NO_JIT, reason="machine code exists only with the JIT")
def test_the_one_row_4bit_gemvs_prefetch_their_codes(monkeypatch):
    """Both one-row 4-bit GEMVs (matmul_4bit's row kernel on CPUs with AVX2 or AVX-512, and the decode step's rows
    on every CPU) issue prefetches in their machine code: removing the hint changes no value, so only the code can
    show it is there. Each is compiled afresh from its Python source with its own options (a function loaded from
    Numba's cache keeps no assembly)."""
    import platform

    from numba import njit

    from lora_ref.kernels import decode
    from lora_ref.modeling.decode import weight4bit

    def fresh(fn):
        return njit(**{k: v for k, v in fn.targetoptions.items() if k != "cache"})(fn.py_func)

    def asm(fn):
        return "\n".join(fn.inspect_asm().values())

    mnemonic = "prefetcht0" if platform.machine() in ("x86_64", "AMD64") else "prfm"
    rng = np.random.default_rng(3)
    w = rng.standard_normal((32, 128)).astype(np.float32)
    packed, state = ref.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    expected = kernels.matmul_4bit(x, packed, state)

    rows_kernel = fresh(kernels._rows_kernel)
    monkeypatch.setattr(kernels, "_rows_kernel", rows_kernel)
    np.testing.assert_array_equal(kernels.matmul_4bit(x, packed, state), expected)
    if HAS_LUT16:  # the table-lookup paths prefetch; CPUs without AVX2 take the gather path, which does not
        assert mnemonic in asm(rows_kernel)

    dot_rows = fresh(decode._dot_rows_4bit)
    xs = np.empty_like(x[0])
    decode._prepare(x[0], xs)
    dst = np.empty(32, np.float32)
    dot_rows(weight4bit(packed, state), 0, 32, x[0], xs, np.empty(128, np.float32), dst)
    np.testing.assert_allclose(dst, expected[0], rtol=1e-5, atol=1e-5)
    assert mnemonic in asm(dot_rows)


_COMPILE_THEN_LOAD = """
import hashlib, json, numpy as np
from lora_ref.kernels import matmul
from lora_ref.quant import kernels
from lora_ref.quant.blockwise import quantize_4bit
rng = np.random.default_rng(5)
w = rng.standard_normal((256, 576)).astype(np.float32)
packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
outs = [kernels.matmul_4bit(rng.standard_normal((m, 576)).astype(np.float32), packed, state) for m in (1, 3)]
outs.append(kernels.matmul_4bit(rng.standard_normal((40, 576)).astype(np.float32), packed, state))
outs.append(kernels.matmul_4bit_t(rng.standard_normal((2, 256)).astype(np.float32), packed, state))
outs.append(matmul.matmul(rng.standard_normal((50, 300)).astype(np.float32),
                          rng.standard_normal((300, 70)).astype(np.float32)))
hits = {f.__name__: sum(f.stats.cache_hits.values()) for f in (kernels._rows_kernel, kernels._tiled_kernel,
                                                                 matmul._matmul_kernel)}
print(json.dumps({"bits": [hashlib.sha1(o.tobytes()).hexdigest() for o in outs], "cache_hits": hits}))
"""


@pytest.mark.skipif(NO_JIT, reason="Numba's cache exists only with the JIT")
def test_kernels_compiled_here_and_loaded_from_numbas_cache_give_the_same_bits(tmp_path):
    """The fused 4-bit products and the matmul give the same bits in the process that compiles them and in one
    that loads them from Numba's cache (a fresh clone's first run and every later run). With ``fastmath=True``
    (all of LLVM's fast-math flags) the one-row 4-bit product did not, on an Intel Xeon with AVX-512: about 60 % of
    these outputs differed, by at most 2 ulp of the largest one, though the cached and the fresh machine code had
    the same vector instructions; with only ``reassoc`` and ``contract``, which is all the kernels mean to allow,
    they agree. (The other kernels gave the same bits either way there; they are compared too.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _COMPILE_THEN_LOAD], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert all(n == 0 for n in runs[0]["cache_hits"].values()), runs[0]      # the first run compiled them
    assert all(n > 0 for n in runs[1]["cache_hits"].values()), runs[1]       # the second loaded them
    assert runs[0]["bits"] == runs[1]["bits"]


@pytest.mark.skipif(NO_JIT, reason="outer_product_f32 is LLVM IR; without JIT the micro-kernel runs its plain loops")
def test_outer_product_step_is_a_chain_of_fmas_per_element():
    """The AVX2 micro-kernel's step: after steps p = 0 … kc−1, acc[i, j] is the chain acc ← fma(a[i, p], b[p, j], acc)
    (one rounding per step), the same whether the caller compiles with fastmath or not. Expected values computed
    here exactly (fractions), each multiply-add rounded once to the nearest float32, ties to even."""
    from fractions import Fraction

    from numba import njit

    from lora_ref.kernels.jit import outer_product_f32, stack_tile_f32

    rows, cols, stride, kc = 3, 16, 20, 11
    step, tile = outer_product_f32(rows, cols, stride), stack_tile_f32(rows, cols)

    def run(ap, bp, kc):
        acc = tile()
        for i in range(rows):
            for j in range(cols):
                acc[i, j] = np.float32(0.0)
        for p in range(kc):
            step(ap, bp, p, acc)
        out = np.empty((rows, cols), np.float32)
        for i in range(rows):
            for j in range(cols):
                out[i, j] = acc[i, j]
        return out

    rng = np.random.default_rng(5)
    ap = rng.standard_normal((rows, stride)).astype(np.float32)   # rows `stride` floats apart; only p < kc read
    bp = rng.standard_normal((kc, cols)).astype(np.float32)
    expected = np.zeros((rows, cols), np.float32)
    for p in range(kc):
        expected = np.array([[_round_to_float32(Fraction(float(ap[i, p])) * Fraction(float(bp[p, j]))
                                                + Fraction(float(expected[i, j]))) for j in range(cols)]
                             for i in range(rows)], np.float32)
    plain = np.zeros((rows, cols), np.float32)                      # the unfused chain, for contrast
    for p in range(kc):
        plain += ap[:, p:p + 1] * bp[p]
    assert not np.array_equal(plain, expected)                      # so the check below can tell fused from not
    for flags in (set(), {"contract", "reassoc"}, True):
        got = njit(fastmath=flags)(run)(ap, bp, kc)
        np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    with pytest.raises(numba.TypingError):                          # float32, C-contiguous operands only
        njit(run)(ap.astype(np.float64), bp, kc)
    with pytest.raises(ValueError, match="multiple of the vector width"):
        outer_product_f32(2, 12, 8)


def test_micro_kernel_tile():
    """The micro-kernel as the matmul calls it (a packed A micro-panel, rows KC floats apart; a B panel of NR
    columns; a partial K chunk): with the explicit AVX2 step (:data:`mm.EXPLICIT_VECTORS`) every element is the
    exact chain acc ← fma(a[i, p], b[p, j], acc) over p, bit for bit; with the plain loops (AVX-512, or no JIT),
    whose fusing and order are LLVM's, within the float32 bound of the exact product."""
    from fractions import Fraction

    rng = np.random.default_rng(7)
    kc = 13
    a = rng.standard_normal((mm.MR, kc)).astype(np.float32)
    b = rng.standard_normal((kc, mm.NR)).astype(np.float32)
    ap = mm.pack_a(a)[0, 0]                                           # (MR, KC), zero past column kc
    bp = np.full((mm.KC, mm.NR), np.nan, np.float32)                 # NaN past kc: reading there would show
    bp[:kc] = b
    acc = np.empty((mm.MR, mm.NR), np.float32)
    # inlined into a caller with _matmul_kernel's fast-math flags (an inlined function takes its caller's flags)
    numba.njit(fastmath={"reassoc", "contract"})(lambda ap, bp, kc, acc: mm.micro_kernel(ap, bp, kc, acc))(
        ap, bp, kc, acc)
    if mm.EXPLICIT_VECTORS:
        expected = np.zeros((mm.MR, mm.NR), np.float32)
        for p in range(kc):
            expected = np.array([[_round_to_float32(Fraction(float(a[i, p])) * Fraction(float(b[p, j]))
                                                    + Fraction(float(expected[i, j]))) for j in range(mm.NR)]
                                 for i in range(mm.MR)], np.float32)
        np.testing.assert_array_equal(acc.view(np.uint32), expected.view(np.uint32))
    else:
        bound = matmul_bound(np.abs(a).astype(np.float64) @ np.abs(b), kc)
        assert np.all(np.abs(acc - a.astype(np.float64) @ b) <= bound)


def test_the_tile_fits_the_vector_registers():
    """The register tile, the B vectors of one step and the broadcast A value fit in the CPU's vector registers, and
    the tile is the one this kind of CPU (or no JIT: NR = 16, plain loops) is documented to use."""
    vectors = mm.NR // mm.VECTOR_FLOATS
    assert mm.NR % mm.VECTOR_FLOATS == 0
    assert mm.MR * vectors + vectors + 1 <= mm.VECTOR_REGISTERS
    assert (mm.NR, mm.VECTOR_FLOATS, mm.VECTOR_REGISTERS) == ((64, 16, 32) if HAS_AVX512 else (16, 8, 16))
    assert mm.EXPLICIT_VECTORS == (HAS_AVX2 and not HAS_AVX512)  # both false without JIT
