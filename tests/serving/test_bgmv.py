"""bgmv: each row through its own adapter, unmerged; the readable twin and the Numba kernel against an independent
float64 oracle (row i times its own merged weight W + s·B·A), on float and NF4 bases, and against each other."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.modeling.linear4bit import Linear4bit
from lora_ref.modeling.nn import Linear
from lora_ref.serving.bgmv import StackedLora, bgmv, bgmv_kernel


def make_adapters(rng, d_in, d_out, ranks):
    return [(rng.normal(0, 0.5, (r, d_in)).astype(np.float32), rng.normal(0, 0.5, (d_out, r)).astype(np.float32),
             float(rng.uniform(0.25, 4.0))) for r in ranks]


def oracle(x, W, adapters, index):
    """Row by row in float64: x_i (W + s·B·A)ᵀ, the merged weight of the row's adapter (W alone for −1)."""
    x64, W64 = x.astype(np.float64), W.astype(np.float64)
    out = np.empty((x.shape[0], W.shape[0]))
    for i, a in enumerate(index):
        Wi = W64 if a < 0 else W64 + adapters[a][2] * (adapters[a][1].astype(np.float64) @ adapters[a][0])
        out[i] = Wi @ x64[i]
    return out


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 9), d_in=st.integers(1, 40), d_out=st.integers(1, 40),
       ranks=st.lists(st.integers(1, 9), min_size=1, max_size=4))
def test_both_twins_equal_the_merged_oracle_with_mixed_ranks(seed, n, d_in, d_out, ranks):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    W = rng.normal(size=(d_out, d_in)).astype(np.float32)
    adapters = make_adapters(rng, d_in, d_out, ranks)
    index = rng.integers(-1, len(ranks), size=n)
    want = oracle(x, W, adapters, index)
    # float32 products of length d_in (base) and r then d_in (adapter): relative error a few ulp times the length
    tol = 1e-5 * (np.abs(x).max() * np.abs(W).max() * d_in + 1) * (1 + max(ranks))
    for impl in ("numpy", "numba"):
        got = bgmv(x, W, adapters, index, impl=impl)
        assert got.dtype == np.float32 and got.shape == (n, d_out)
        np.testing.assert_allclose(got, want, atol=tol, rtol=1e-5)
    stacked = StackedLora(adapters, d_in, d_out)
    np.testing.assert_allclose(bgmv(x, W, stacked, index), bgmv(x, W, adapters, index, impl="numpy"),
                               rtol=1e-5, atol=tol)


def test_no_adapter_rows_get_exactly_the_base_product():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 12)).astype(np.float32)
    W = rng.normal(size=(7, 12)).astype(np.float32)
    adapters = make_adapters(rng, 12, 7, [3, 5])
    index = np.array([-1, 0, -1, 1, -1])
    base = x @ W.T
    for impl in ("numpy", "numba"):
        y = bgmv(x, W, adapters, index, impl=impl)
        assert np.array_equal(y[index < 0], base[index < 0])
        assert not np.allclose(y[index >= 0], base[index >= 0])  # the adapters did change their rows


def test_readable_twin_is_the_unmerged_lora_layer_bit_for_bit():
    """A batch all on one adapter: exactly LoraLinear's forward (same products in the same order)."""
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.nn import Module

    rng = np.random.default_rng(3)

    class One(Module):
        def __init__(self):
            super().__init__()
            self.q_proj = Linear(16, 24, rng=rng, std=0.3)

        def forward(self, x):
            return self.q_proj(x)

    net = inject_lora(One(), LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"], init_lora_weights=False),
                      rng=rng)
    layer = net.q_proj
    x = rng.normal(size=(6, 16)).astype(np.float32)
    with no_grad():
        want = net(x).data
    A, B, s = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data, layer.scaling["default"]
    got = bgmv(x, layer.base_layer.weight.data, [(A, B, s)], np.zeros(6, int), impl="numpy")
    assert np.array_equal(got, want)


def test_kernel_rows_do_not_depend_on_the_batch():
    """The kernel computes each row on its own: a row alone and in any batch gives the same bits."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 33)).astype(np.float32)
    stacked = StackedLora(make_adapters(rng, 33, 21, [2, 7, 4]), 33, 21)
    index = np.array([0, 1, 2, -1, 1, 0, 2, 1])
    together = bgmv_kernel(np.zeros((8, 21), np.float32), x, stacked, index)
    for i in range(8):
        alone = bgmv_kernel(np.zeros((1, 21), np.float32), x[i:i + 1], stacked, index[i:i + 1])
        assert np.array_equal(alone[0], together[i])
    perm = rng.permutation(8)
    shuffled = bgmv_kernel(np.zeros((8, 21), np.float32), x[perm], stacked, index[perm])
    assert np.array_equal(shuffled, together[perm])


@pytest.mark.parametrize("impl", ["numpy", "numba"])
def test_nf4_base_and_linear_with_bias(impl):
    rng = np.random.default_rng(2)
    W = rng.normal(0, 0.2, size=(64, 128)).astype(np.float32)
    b = rng.normal(size=64).astype(np.float32)
    x = rng.normal(size=(5, 128)).astype(np.float32)
    adapters = make_adapters(rng, 128, 64, [8, 2])
    index = np.array([0, 1, -1, 1, 0])
    q = Linear4bit(W, b)  # NF4, blocksize 64, double quantization
    want = oracle(x, q.dequantize(), adapters, index) + b  # the 4-bit layer computes with dequant(W)
    np.testing.assert_allclose(bgmv(x, q, adapters, index, impl=impl), want, rtol=1e-4, atol=1e-3)
    lin = Linear(128, 64, bias=True)
    lin.weight.data[...] = W
    lin.bias.data[...] = b
    np.testing.assert_allclose(bgmv(x, lin, adapters, index, impl=impl), oracle(x, W, adapters, index) + b,
                               rtol=1e-4, atol=1e-3)


def test_out_receives_the_result():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    W = rng.normal(size=(5, 8)).astype(np.float32)
    adapters = make_adapters(rng, 8, 5, [2])
    out = np.full((3, 5), np.nan, np.float32)
    y = bgmv(x, W, adapters, np.array([0, -1, 0]), out=out)
    assert y is out and np.array_equal(out, bgmv(x, W, adapters, np.array([0, -1, 0])))


def test_empty_batch_and_no_adapters():
    W = np.ones((3, 4), np.float32)
    assert bgmv(np.zeros((0, 4), np.float32), W, [], np.zeros(0, int)).shape == (0, 3)
    x = np.ones((2, 4), np.float32)
    assert np.array_equal(bgmv(x, W, [], np.array([-1, -1])), x @ W.T)


@pytest.mark.parametrize("call, match", [
    (lambda x, W, ad: bgmv(x[:, :3], W, ad, np.zeros(2, int)), "x must have shape"),
    (lambda x, W, ad: bgmv(x, W, ad, np.array([0, 2])), "index values"),
    (lambda x, W, ad: bgmv(x, W, ad, np.array([0.0, 1.0])), "index must be an int array"),
    (lambda x, W, ad: bgmv(x, W, ad, np.array([0])), "index must be an int array"),
    (lambda x, W, ad: bgmv(x, W, [(ad[0][0].T, ad[0][1], 1.0)], np.zeros(2, int)), "A must have shape"),
    (lambda x, W, ad: bgmv(x, W, [(ad[0][0], ad[0][1][:, :1], 1.0)], np.zeros(2, int)), "B must have shape"),
    (lambda x, W, ad: bgmv(x, W, [(ad[0][0], ad[0][1], float("nan"))], np.zeros(2, int)), "scale must be a finite number"),
    (lambda x, W, ad: bgmv(x, W, [ad[0][:2]], np.zeros(2, int)), "must be a tuple"),
    (lambda x, W, ad: bgmv(x, W, ad, np.zeros(2, int), impl="cuda"), "unknown impl"),
    (lambda x, W, ad: bgmv(x, W, StackedLora([(ad[0][0], ad[0][1][:4], 1.0)], 6, 4), np.zeros(2, int)), "stacked adapters are for"),
    (lambda x, W, ad: bgmv(x, W, ad, np.zeros(2, int), out=np.zeros((2, 5))), "out must be float32"),
])
def test_bad_input_raises_value_error(call, match):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 6)).astype(np.float32)
    W = rng.normal(size=(5, 6)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        call(x, W, make_adapters(rng, 6, 5, [2]))
