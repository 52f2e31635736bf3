"""The one-token decode kernels (lora_ref.kernels.decode) equal their readable twins (lora_ref.kernels.decode_reference):
a layer, the head and a whole token, with float32 and 4-bit weights (double-quantized or not, rows on block
boundaries or not). Only the order of float32 sums differs, so the comparisons allow a few float32 roundings of the
sizes involved. The same tests run again with NUMBA_DISABLE_JIT=1 (the kernels as plain Python)."""

import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

from lora_ref.kernels import decode, decode_reference
from lora_ref.kernels.decode import readonly, weight_list
from lora_ref.quant.blockwise import dequantize_4bit, quantize_4bit

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(rtol=2e-5, atol=2e-5)


def _weight4bit(w, blocksize, nested):
    from lora_ref.modeling.decode import weight4bit

    packed, state = quantize_4bit(w, blocksize=blocksize, quant_type="nf4", double_quant=nested)
    return weight4bit(packed, state), dequantize_4bit(packed, state)


def _layer_case(rng, D=64, H=4, K=2, Dh=16, F=96, kind="fp32", blocksize=64, nested=True, cap=12, pos=7):
    shapes = [(H * Dh, D), (K * Dh, D), (K * Dh, D), (D, H * Dh), (F, D), (F, D), (D, F)]
    dense = [(0.2 * rng.standard_normal(s)).astype(np.float32) for s in shapes]
    if kind == "fp32":
        weights = [readonly(w) for w in dense]
    else:
        weights = [_weight4bit(w, blocksize, nested)[0] for w in dense]
    norms = (1 + 0.1 * rng.standard_normal((2, D))).astype(np.float32)
    ck = rng.standard_normal((K, cap, Dh)).astype(np.float32)
    cv = rng.standard_normal((K, cap, Dh)).astype(np.float32)
    x = rng.standard_normal(D).astype(np.float32)
    ang = rng.uniform(0, 6, Dh // 2).astype(np.float32)
    cos = np.cos(np.concatenate([ang, ang])).astype(np.float32)
    sin = np.sin(np.concatenate([ang, ang])).astype(np.float32)
    return x, norms, weights, ck, cv, pos, cos, sin, 1e-5, Dh ** -0.5


def _run_both(fn_name, args, mutated):
    """Run the kernel and the twin on copies of ``args``; return both copies of the ``mutated`` positions."""
    outs = []
    for mod in (decode, decode_reference):
        a = [v.copy() if isinstance(v, np.ndarray) and v.flags.writeable else v for v in args]
        getattr(mod, fn_name)(*a)
        outs.append([a[i] for i in mutated])
    return outs


@pytest.mark.parametrize("kind, blocksize, nested, D, F, H, K", [
    ("fp32", 64, True, 64, 96, 4, 2),
    ("fp32", 64, True, 48, 80, 4, 2),      # row lengths that leave a remainder after the dot's vectors
    ("nf4", 64, True, 64, 96, 4, 2),       # rows on block boundaries: the fast decoder (vpermps on AVX-512)
    ("nf4", 32, False, 64, 96, 4, 2),      # single-level scales
    ("nf4", 64, True, 48, 80, 4, 2),       # rows off block boundaries: the element-by-element decoder
    ("nf4", 64, True, 64, 128, 3, 1),      # only o_proj's rows (3 heads x 16 = 48 long) off block boundaries
], ids=["fp32", "fp32-odd", "nf4-dq", "nf4-bs32", "nf4-unaligned", "nf4-unaligned-o"])
def test_layer_step_twins(kind, blocksize, nested, D, F, H, K):
    rng = np.random.default_rng(0)
    args = _layer_case(rng, D=D, H=H, K=K, F=F, kind=kind, blocksize=blocksize, nested=nested)
    (x1, k1, v1), (x2, k2, v2) = _run_both("layer_step", args, [0, 3, 4])
    np.testing.assert_allclose(x1, x2, **TOL)
    np.testing.assert_allclose(k1, k2, **TOL)           # the rotated new key at pos, the rest untouched
    np.testing.assert_allclose(v1, v2, **TOL)
    np.testing.assert_array_equal(k1[:, :7], args[3][:, :7])
    np.testing.assert_array_equal(v1[:, 8:], args[4][:, 8:])
    assert not np.array_equal(x1, args[0])


def test_layer_step_at_position_zero_attends_to_itself_only():
    rng = np.random.default_rng(1)
    args = list(_layer_case(rng, pos=0))
    (x1,), (x2,) = _run_both("layer_step", args, [0])
    np.testing.assert_allclose(x1, x2, **TOL)


def test_layer_step_refuses_mixed_weights():
    rng = np.random.default_rng(2)
    x, norms, weights, ck, cv, pos, cos, sin, eps, scale = _layer_case(rng)
    mixed = list(weights)
    mixed[0] = _weight4bit(np.ones((64, 64), np.float32), 64, True)[0]
    with pytest.raises(ValueError, match="seven weights"):
        decode.layer_step(x, norms, mixed, ck, cv, pos, cos, sin, eps, scale)


@pytest.mark.parametrize("kind, D", [("fp32", 64), ("nf4", 64), ("nf4", 48)], ids=["fp32", "nf4", "nf4-unaligned"])
def test_head_step_twins(kind, D):
    rng = np.random.default_rng(3)
    w = (0.1 * rng.standard_normal((200, D))).astype(np.float32)
    weight = readonly(w) if kind == "fp32" else _weight4bit(w, 64, True)[0]
    x = rng.standard_normal(D).astype(np.float32)
    norm = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    (o1,), (o2,) = _run_both("head_step", [x, norm, 1e-5, weight, np.zeros(200, np.float32)], [4])
    np.testing.assert_allclose(o1, o2, **TOL)
    # an independent check of the twin: the head's product with the dequantized weight
    h = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5) * norm
    dense = w if kind == "fp32" else _weight4bit(w, 64, True)[1]
    np.testing.assert_allclose(o2, dense.astype(np.float64) @ h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K, blocksize", [(576, 64), (128, 64), (512, 128)])
@pytest.mark.parametrize("nested", [True, False])
def test_4bit_rows_past_many_nested_blocks(K, blocksize, nested):
    """The head's 4-bit rows over a weight of many second-level scale blocks (256 first-level blocks each, so 600
    rows of 576 span 22 of them): the row chunks start at every kind of place in a nested block (on its boundary,
    inside it), and the kernel carries the nested index from row to row. Rows grow in size by 4x from first to
    last, so a scale taken from the wrong nested block shows. Checked against the product with the dequantized
    weight, not the twin."""
    rng = np.random.default_rng(6)
    N = 600
    w = (rng.standard_normal((N, K)) * np.linspace(0.05, 0.2, N)[:, None]).astype(np.float32)
    weight, dense = _weight4bit(w, blocksize, nested)
    x = rng.standard_normal(K).astype(np.float32)
    out = np.zeros(N, np.float32)
    decode.head_step(x, np.ones(K, np.float32), 1e-5, weight, out)
    h = x / np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-5)
    np.testing.assert_allclose(out, dense.astype(np.float64) @ h, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nested", [True, False])
def test_the_twins_4bit_weight_is_dequantize_4bit(nested):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((6, 80)).astype(np.float32)       # 480 elements: blocks cross row boundaries
    w4, dense = _weight4bit(w, 64, nested)
    np.testing.assert_array_equal(decode_reference.dequantize_weight4bit(w4), dense)


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_decode_step_twins(kind):
    rng = np.random.default_rng(5)
    L = 2
    cases = [_layer_case(rng, kind=kind) for _ in range(L)]
    x = cases[0][0]
    norms = np.stack([c[1] for c in cases])
    weights = weight_list(w for c in cases for w in c[2])
    ck, cv = np.stack([c[3] for c in cases]), np.stack([c[4] for c in cases])
    _, _, _, _, _, pos, cos, sin, eps, scale = cases[0]
    head_w = (0.1 * rng.standard_normal((100, 64))).astype(np.float32)
    args = [x, norms, weights, ck, cv, pos, cos, sin, eps, scale, np.ones(64, np.float32), readonly(head_w),
            np.zeros(100, np.float32)]
    (x1, k1, o1), (x2, k2, o2) = _run_both("decode_step", args, [0, 3, 12])
    np.testing.assert_allclose(x1, x2, **TOL)
    np.testing.assert_allclose(k1, k2, **TOL)
    np.testing.assert_allclose(o1, o2, **TOL)


def test_the_chooser():
    x32 = np.zeros(4, np.float32)
    assert decode.pick("decode_step", x32, impl="numpy") is decode_reference
    assert decode.pick("decode_step", x32, impl="numba") is decode
    assert decode.pick("layer_step", x32.astype(np.float64)) is decode_reference


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="this process already runs without JIT")
def test_decode_kernel_tests_pass_without_jit():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "not without_jit"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.parametrize("K", [1, 3, 5, 47, 48, 577, 1536])
def test_the_float32_row_dot(K):
    """The float32 row dot (one running sum, which LLVM splits into vector accumulators) is within the float32
    bound of the exact dot, for lengths with every remainder after the vectors."""
    from numba import njit

    rng = np.random.default_rng(K)
    w = rng.standard_normal((3, K)).astype(np.float32)
    x = rng.standard_normal(K).astype(np.float32)
    exact = w.astype(np.float64) @ x
    bound = 2 * (K + 2) * np.finfo(np.float32).eps * (np.abs(w).astype(np.float64) @ np.abs(x)) + 1e-30
    rows = njit(lambda w, x: [decode._dot_f32(w, r, x) for r in range(w.shape[0])])(w, x)
    assert np.all(np.abs(np.array(rows, np.float64) - exact) <= bound)
