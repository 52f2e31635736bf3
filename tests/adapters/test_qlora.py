"""QLoRA: the 4-bit base layer, its gradients, LoRA on top of it, and the three ways to merge into it.

References are computed independently of the layer under test: float64 products with the dequantized weight,
central finite differences in float64, block maxima taken from the merged weight itself, and the NF4 table's
largest gap.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.adapters import qlora as Q
from lora_ref.adapters.lora import LoraConfig, set_adapter
from lora_ref.autograd.tensor import Tensor
from lora_ref.modeling.nn import Embedding, Linear, Module
from lora_ref.quant import DYNAMIC_MAP, NF4_CODE, dequantize_4bit, quantize_4bit

NF4_HALF_GAP = float(np.max(np.diff(np.sort(NF4_CODE.astype(np.float64))))) / 2  # 0.1385: nearest-code error / absmax
DYNAMIC_MAX_GAP = float(np.max(np.diff(np.sort(DYNAMIC_MAP.astype(np.float64)))))  # 0.0141, the 8-bit map's widest step


class Tiny(Module):
    def __init__(self, rng, d=64, f=96, v=40, bias=False):
        super().__init__()
        self.embed_tokens = Embedding(v, d, rng=rng)
        self.up_proj = Linear(d, f, bias=bias, rng=rng)
        self.down_proj = Linear(f, d, bias=bias, rng=rng)
        self.lm_head = Linear(d, v, rng=rng)

    def forward(self, ids):
        h = self.embed_tokens(ids)
        return self.lm_head(self.down_proj(self.up_proj(h).silu()) + h)


def qlora_tiny(seed=0, r=4, alpha=8.0, bias=False, lora_bias=False, impl="numba"):
    rng = np.random.default_rng(seed)
    m = Q.quantize_model(Tiny(rng, bias=bias), impl=impl)
    Q.inject_qlora(m, LoraConfig(r=r, lora_alpha=alpha, target_modules=["up_proj", "down_proj"],
                                 init_lora_weights=False, lora_bias=lora_bias), rng=rng)
    if lora_bias:  # nonzero lora_B biases
        for name in ("up_proj", "down_proj"):
            b = m.get_submodule(name).lora_B["default"].bias
            b.data[...] = rng.normal(0, 0.1, b.shape)
    return m


# ------------------------------------------------------------------------------------------------ the 4-bit layer


@given(st.integers(1, 5), st.sampled_from([(64, 32), (48, 20), (33, 7), (128, 96)]), st.booleans(),
       st.sampled_from(["numba", "numpy"]), st.integers(0, 2**31 - 1))
def test_linear4bit_forward_is_x_times_dequantized_weight(m, shape, bias, impl, seed):
    out, inp = shape
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.05, (out, inp)).astype(np.float32)
    b = rng.normal(0, 0.1, out).astype(np.float32) if bias else None
    layer = Q.Linear4bit(w, b, impl=impl)
    packed, state = quantize_4bit(w, 64, "nf4", True)  # what the layer should hold
    np.testing.assert_array_equal(layer.weight.data.reshape(-1), packed)
    wd = dequantize_4bit(packed, state).astype(np.float64)
    x = rng.normal(size=(m, 3, inp)).astype(np.float32)
    want = x.astype(np.float64) @ wd.T + (0 if b is None else b)
    got = np.asarray(layer(x))
    assert got.shape == (m, 3, out) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert not layer.weight.requires_grad and layer.weight.dtype == np.uint8


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_input_gradient_equals_finite_differences_through_dequantized_weight(impl):
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.05, (24, 40)).astype(np.float32)
    layer = Q.Linear4bit(w, rng.normal(size=24), impl=impl)
    wd = layer.dequantize().astype(np.float64)
    x0 = rng.normal(size=(3, 40))
    G = rng.normal(size=(3, 24))  # loss = Σ y ⊙ G

    x = Tensor(x0.astype(np.float32), requires_grad=True)
    (layer(x) * G.astype(np.float32)).sum().backward()

    def loss64(xv):
        return float(np.sum((xv @ wd.T + layer.bias.data) * G))

    eps = 1e-6
    fd = np.zeros_like(x0)
    for idx in np.ndindex(*x0.shape):
        e = np.zeros_like(x0)
        e[idx] = eps
        fd[idx] = (loss64(x0 + e) - loss64(x0 - e)) / (2 * eps)
    np.testing.assert_allclose(x.grad, fd, rtol=1e-4, atol=1e-5)


def test_qlora_gradients_equal_finite_differences_and_only_adapters_learn():
    m = qlora_tiny(seed=2)
    layer = m.up_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    wd = layer.base_layer.dequantize().astype(np.float64)
    s = layer.scaling["default"]
    rng = np.random.default_rng(3)
    x0 = rng.normal(size=(2, 64))
    G = rng.normal(size=(2, 96))

    def loss64(xv, a, b):
        return float(np.sum((xv @ wd.T + s * (xv @ a.T) @ b.T) * G))

    x = Tensor(x0.astype(np.float32), requires_grad=True)
    (layer(x) * G.astype(np.float32)).sum().backward()
    a0, b0 = A.data.astype(np.float64), B.data.astype(np.float64)
    for name, val, grad, f in (
        ("x", x0, x.grad, lambda v: loss64(v, a0, b0)),
        ("A", a0, A.grad, lambda v: loss64(x0, v, b0)),
        ("B", b0, B.grad, lambda v: loss64(x0, a0, v)),
    ):
        fd = np.zeros_like(val)
        for idx in list(np.ndindex(*val.shape))[:200]:
            e = np.zeros_like(val)
            e[idx] = 1e-6
            fd[idx] = (f(val + e) - f(val - e)) / 2e-6
        flat_idx = list(np.ndindex(*val.shape))[:200]
        got = np.array([grad[i] for i in flat_idx])
        want = np.array([fd[i] for i in flat_idx])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{l}.lora_{ab}.default.weight" for l in ("up_proj", "down_proj") for ab in "AB"}
    assert m.up_proj.base_layer.weight.grad is None


def test_quantize_model_keeps_embeddings_and_head_float():
    m = Q.quantize_model(Tiny(np.random.default_rng(0)))
    assert isinstance(m.up_proj, Q.Linear4bit) and isinstance(m.down_proj, Q.Linear4bit)
    assert type(m.lm_head) is Linear and type(m.embed_tokens) is Embedding
    assert m.up_proj.quant_state.quant_type == "nf4" and m.up_proj.quant_state.nested
    assert m.up_proj.quant_state.blocksize == 64
    # 4 bits + 8/64 + nested scales: ≈ 0.516 bytes per weight instead of 4
    n = 64 * 96
    assert m.up_proj.nbytes() == n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4
    with pytest.raises(ValueError, match="already has LoRA"):
        Q.quantize_model(qlora_tiny())


# ------------------------------------------------------------------------------------------------ merging


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_float_merge_equals_unmerged_and_4bit_merges_do_not():
    m = qlora_tiny(seed=4)
    layer = m.up_proj
    x = np.random.default_rng(5).normal(size=(16, 64)).astype(np.float32)
    y = np.asarray(layer(x))
    y_float = np.asarray(Q.merge_4bit(layer, "float")(x))
    assert _rel(y_float, y) < 1e-5
    errs = {s: _rel(np.asarray(Q.merge_4bit(layer, s)(x)), y) for s in ("requantize", "refit")}
    assert 1e-3 < errs["refit"] < errs["requantize"]
    assert not layer.merged  # merge_4bit does not touch the layer


def test_lora_merge_method_on_4bit_layer_requantizes_like_peft():
    m = qlora_tiny(seed=6)
    layer = m.down_proj
    want = Q.merge_4bit(layer, "requantize")
    layer.merge()
    np.testing.assert_array_equal(layer.base_layer.weight.data, want.weight.data)
    np.testing.assert_array_equal(layer.base_layer.dequantize(), want.dequantize())


@given(st.integers(0, 2**31 - 1), st.sampled_from([8.0, 32.0]), st.sampled_from([(96, 64), (40, 70)]))
def test_requantized_merge_error_is_within_the_nf4_bound(seed, alpha, shape):
    """|Q(T) − T| ≤ absmax_b · (largest NF4 gap)/2 + |absmax_b − stored scale_b| for every element of block b."""
    out, inp = shape
    rng = np.random.default_rng(seed)
    lin = Linear(inp, out, rng=rng)
    layer = Q.LoraLinear4bit(Q.Linear4bit.from_linear(lin), "default", 4, alpha, init_lora_weights=False, rng=rng)
    T = layer.base_weight() + layer.get_delta_weight("default")  # the merged target, float32
    merged = Q.merge_4bit(layer, "requantize")
    err = np.abs(merged.dequantize().astype(np.float64) - T).reshape(-1)
    n, bs = T.size, 64
    pad = np.zeros(-(-n // bs) * bs)
    pad[:n] = np.abs(T).reshape(-1)
    absmax = pad.reshape(-1, bs).max(axis=1)  # from T itself
    stored = merged.quant_state.block_absmax().astype(np.float64)
    # double quantization: absmax − mean is coded with the 8-bit dynamic map scaled by its largest |value|,
    # so a stored scale is off by at most one step of that map (≤ 0.0141) times that largest |value|
    centred = absmax - np.float32(np.mean(absmax))
    assert np.all(np.abs(stored - absmax) <= DYNAMIC_MAX_GAP * np.abs(centred).max() * (1 + 1e-5) + 1e-8)
    bound = absmax * NF4_HALF_GAP * (1 + 1e-6) + np.abs(stored - absmax)
    assert np.all(err <= np.repeat(bound, bs)[:n] + 1e-7)
    assert err.max() > 0


@given(st.integers(0, 2**31 - 1), st.sampled_from([(32, 64), (17, 30), (100, 40)]))
def test_refit_never_loses_to_absmax_without_double_quant(seed, shape):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, size=shape) * 0.02).astype(np.float32)  # heavy tails: outliers in blocks
    packed, state = Q.quantize_4bit_refit(x, 64, "nf4", double_quant=False)
    p0, s0 = quantize_4bit(x, 64, "nf4", False)
    e_refit = (dequantize_4bit(packed, state).astype(np.float64) - x).reshape(-1)
    e_abs = (dequantize_4bit(p0, s0).astype(np.float64) - x).reshape(-1)
    n = x.size
    blocks = lambda e: np.bincount(np.arange(n) // 64, weights=e ** 2)  # noqa: E731
    assert np.all(blocks(e_refit) <= blocks(e_abs) * (1 + 1e-5) + 1e-12)


def test_refit_with_double_quant_is_a_valid_bnb_state_and_better_overall():
    rng = np.random.default_rng(7)
    x = (rng.standard_t(4, size=(256, 192)) * 0.02).astype(np.float32)
    packed, state = Q.quantize_4bit_refit(x, 64, "nf4", double_quant=True)
    assert state.nested and packed.dtype == np.uint8 and packed.size == x.size // 2
    from lora_ref.quant import kernels

    xin = rng.normal(size=(5, 192)).astype(np.float32)
    wd = dequantize_4bit(packed, state)
    np.testing.assert_allclose(kernels.matmul_4bit(xin, packed, state), xin @ wd.T, rtol=1e-5, atol=1e-6)
    p0, s0 = quantize_4bit(x, 64, "nf4", True)
    e_refit = np.linalg.norm(wd - x)
    e_abs = np.linalg.norm(dequantize_4bit(p0, s0) - x)
    assert e_refit < 0.97 * e_abs


def test_peft_bias_bug_is_reproduced_only_by_the_named_function():
    m = qlora_tiny(seed=8, alpha=16.0, bias=True, lora_bias=True)
    layer = m.up_proj
    s = layer.scaling["default"]
    assert s == 4.0
    b_B = layer.lora_B["default"].bias.data
    x = np.random.default_rng(9).normal(size=(4, 64)).astype(np.float32)
    good = Q.merge_4bit(layer, "requantize")
    bad = Q.merge_4bit_like_peft(layer)
    np.testing.assert_array_equal(good.weight.data, bad.weight.data)
    np.testing.assert_allclose(np.asarray(bad(x)) - np.asarray(good(x)), np.broadcast_to((1 - s) * b_B, (4, 96)),
                               rtol=1e-5, atol=1e-6)
    # the float merge reproduces the unmerged output, lora_B bias included
    assert _rel(np.asarray(Q.merge_4bit(layer, "float")(x)), np.asarray(layer(x))) < 1e-5


def test_merge_and_unload_4bit_whole_model():
    """Every layer is merged: float exactly (the output is unchanged); requantize within NF4's per-element bound of
    the float merge W* = dequant(W) + s·B·A (absmax_b(W*)·half the widest NF4 gap, plus the stored scale's
    double-quantization error); refit with no larger squared error than requantize, layer by layer."""
    half_gap = float(np.max(np.diff(np.sort(NF4_CODE.astype(np.float64))))) / 2
    errors = {}
    for strategy, kind in (("float", Linear), ("requantize", Q.Linear4bit), ("refit", Q.Linear4bit)):
        m = qlora_tiny(seed=10)
        ids = np.random.default_rng(11).integers(0, 40, size=(2, 7))
        y = np.asarray(m(ids))
        target = {}
        for name in ("up_proj", "down_proj"):
            layer = m.get_submodule(name)
            target[name] = layer.base_weight().astype(np.float64) + layer.get_delta_weight("default")
        Q.merge_and_unload_4bit(m, strategy)
        assert type(m.up_proj) is kind and type(m.down_proj) is kind and not hasattr(m, "peft_config")
        if strategy == "float":
            assert _rel(np.asarray(m(ids)), y) < 1e-5
            continue
        for name, W in target.items():
            layer = m.get_submodule(name)
            err = layer.dequantize().astype(np.float64) - W
            errors[strategy, name] = float(np.sum(err ** 2))
            if strategy == "requantize":
                bs = layer.quant_state.blocksize
                flat = W.reshape(-1)
                nb = -(-flat.size // bs)
                absmax = np.abs(np.pad(flat, (0, nb * bs - flat.size))).reshape(nb, bs).max(axis=1)
                stored = layer.quant_state.block_absmax().astype(np.float64)
                bound = np.repeat(absmax * half_gap * (1 + 1e-6) + np.abs(stored - absmax), bs)[: flat.size]
                assert np.all(np.abs(err.reshape(-1)) <= bound + 2.0 ** -22 * np.abs(flat)), name
    for name in ("up_proj", "down_proj"):
        assert 0 < errors["refit", name] <= errors["requantize", name], name


def test_bad_input():
    with pytest.raises(ValueError, match="strategy"):
        Q.merge_4bit(qlora_tiny().up_proj, "average")
    with pytest.raises(ValueError, match="2-D"):
        Q.Linear4bit(np.zeros(8, np.float32))
    layer = Q.Linear4bit(np.ones((4, 64), np.float32))
    with pytest.raises(ValueError, match="features"):
        layer(np.ones((2, 63), np.float32))
    m = qlora_tiny()
    set_adapter(m, "default")
    with pytest.raises(ValueError, match="no adapter"):
        Q.merge_4bit(m.up_proj, "float", ["other"])


def test_plain_lora_layer_around_a_4bit_base_merges_through_the_dequantized_weight():
    """inject_lora / load_adapter on a quantized model make a plain LoraLinear: its merge must still dequantize."""
    import numpy as np

    from lora_ref.adapters.lora import LoraLinear
    from lora_ref.adapters.qlora import Linear4bit

    rng = np.random.default_rng(3)
    W = (0.05 * rng.standard_normal((16, 64))).astype(np.float32)
    layer = LoraLinear(Linear4bit(W, impl="numpy"), r=2, lora_alpha=4, init_lora_weights=False, rng=rng)
    expected = layer.base_layer.dequantize() + layer.get_delta_weight("default")
    layer.merge()
    merged = layer.base_layer.dequantize()
    assert merged.shape == W.shape
    # requantized: within the NF4 error of the target, far from the garbage of reading packed bytes as floats
    assert np.linalg.norm(merged - expected) / np.linalg.norm(expected) < 0.15
