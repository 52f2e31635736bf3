"""Properties of LoRA layers with B ≠ 0: merge equivalence, unmerge, rank, counts, gradients, bf16 rounding.

Every adapter here comes from ``lora_ref.testing`` (entries of A and B at least 0.1 in magnitude), so a merge that
drops the scaling, transposes a factor or forgets an adapter fails.
"""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.adapters.lora import (
    LoraConfig,
    LoraLinear,
    as_bfloat16,
    delete_adapter,
    disable_adapters,
    find_targets,
    inject_lora,
    lora_layers,
    merge_and_unload,
    round_to_dtype,
    set_adapter,
    trainable_count,
    unload,
)
from lora_ref.autograd.numerical import gradcheck
from lora_ref.autograd.tensor import Tensor
from lora_ref.modeling.nn import Linear, Module, ModuleList
from lora_ref.testing import adapters, lora_configs

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
# unit roundoff per storage dtype (half an ulp at 1): float32 (24 significand bits) 2^-24, bfloat16 (8) 2^-8
UNIT_ROUNDOFF = {F32: 2.0 ** -24, BF16: 2.0 ** -8}
F32_U = 2.0 ** -24


def inputs(in_features, batch=3):
    """(batch, in) inputs with independent entries U(−2, 2) from a drawn seed (no repeated fill value)."""
    return st.integers(0, 2**32 - 1).map(
        lambda seed: np.random.default_rng(seed).uniform(-2, 2, (batch, in_features)).astype(np.float32))


def abs_bound(x, M):
    """|x| @ |M|ᵀ: the scale of the rounding error of x @ Mᵀ."""
    return np.abs(x).astype(np.float64) @ np.abs(M).astype(np.float64).T


# ------------------------------------------------------------------------------------------------ merge
@given(st.data())
def test_merged_forward_equals_unmerged_forward(data):
    """y(merged W') == y(W, A, B) for every dtype, rank, α, rsLoRA and DoRA, within the dtype's rounding."""
    ad = data.draw(adapters(dtype=None, use_dora=None, use_rslora=None))
    x = data.draw(inputs(ad.W.shape[1]))
    layer = ad.to_layer()
    y_unmerged = layer(x).data.astype(np.float64)
    layer.merge()
    assert layer.merged_adapters == ["default"]
    y_merged = layer(x).data.astype(np.float64)
    dW = ad.delta_weight()
    factor = 1.0 if not ad.use_dora else np.maximum(1.0, np.abs(ad.magnitude / np.linalg.norm(ad.W + dW, axis=1)))
    scale = abs_bound(x, (np.abs(ad.W) + np.abs(dW)) * np.reshape(factor, (-1, 1)) + np.abs(ad.W))
    n_terms = ad.W.shape[1] + ad.r + 4
    # merged weight rounded once to the storage dtype; both products accumulate float32 rounding errors
    tol = UNIT_ROUNDOFF[ad.dtype] * abs_bound(x, np.reshape(factor, (-1, 1)) * (np.abs(ad.W) + np.abs(dW))) \
        + 4 * n_terms * F32_U * scale + 1e-30
    assert np.all(np.abs(y_merged - y_unmerged) <= tol)


@given(adapters(dtype=F32, use_dora=None, use_rslora=None), st.booleans())
def test_unmerge_after_merge_restores_float32_weight(ad, safe):
    layer = ad.to_layer()
    layer.merge(safe_merge=safe)
    assert not np.array_equal(layer.weight.data, ad.W)  # B ≠ 0: the merge changed W
    layer.unmerge()
    assert layer.merged_adapters == []
    dW = ad.delta_weight()
    # W + ΔW − ΔW in float32: two roundings of numbers of size |W| + |ΔW| (DoRA: a multiply and a divide more)
    k = 8 if ad.use_dora else 2
    tol = k * F32_U * (np.abs(ad.W) + np.abs(dW)) * (2.0 if ad.use_dora else 1.0)
    if ad.use_dora:
        f = ad.magnitude / np.linalg.norm(ad.W + dW, axis=1)
        tol = tol * np.maximum(1.0, np.maximum(f, 1 / f))[:, None]
    assert np.all(np.abs(layer.weight.data - ad.W) <= tol)


@given(adapters(dtype=F32, use_rslora=None))
def test_delta_weight_has_rank_at_most_r(ad):
    dW = ad.to_layer().get_delta_weight("default")
    assert dW.shape == ad.W.shape
    assert np.linalg.matrix_rank(dW.astype(np.float64), tol=1e-4 * max(1.0, np.abs(dW).max())) <= ad.r


@given(adapters(dtype=F32, use_rslora=None))
def test_delta_weight_is_scaled_product(ad):
    """ΔW = s·B·A with s = α/r, or α/√r with rsLoRA (compared in float64, not with the layer's own formula)."""
    s = ad.lora_alpha / (math.sqrt(ad.r) if ad.use_rslora else ad.r)
    expected = s * (ad.B.astype(np.float64) @ ad.A.astype(np.float64))
    got = ad.to_layer().get_delta_weight("default")
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@given(adapters(dtype=BF16, use_rslora=None), st.booleans())
def test_bfloat16_merge_rounds_once_unsafe_twice_safe(ad, safe):
    """PEFT: unsafe W.data += ΔW gives round(W + ΔW); safe W += ΔW.to(bf16) gives round(W + round(ΔW))."""
    layer = ad.to_layer()
    layer.merge(safe_merge=safe)
    dW = (ad.B @ ad.A) * np.float32(ad.scaling)  # float32, as PEFT's get_delta_weight
    w_bf16 = ad.W.astype(ml_dtypes.bfloat16)
    if safe:
        expected = (w_bf16.astype(np.float32) + dW.astype(ml_dtypes.bfloat16).astype(np.float32)).astype(
            ml_dtypes.bfloat16)
    else:
        expected = (w_bf16.astype(np.float32) + dW).astype(ml_dtypes.bfloat16)
    assert np.array_equal(layer.weight.data, expected.astype(np.float32))


def test_bfloat16_safe_and_unsafe_merges_differ():
    """On a realistic layer the two roundings disagree on a sizeable share of the weights (PEFT: ~31%)."""
    rng = np.random.default_rng(0)
    W = round_to_dtype(rng.normal(0, 0.02, (48, 64)).astype(np.float32), BF16)
    layers = []
    for safe in (False, True):
        base = Linear(64, 48)
        base.weight.data[...] = W
        base.weight_dtype = BF16
        layer = LoraLinear(base, r=8, lora_alpha=16, init_lora_weights=False, rng=np.random.default_rng(1))
        layer.merge(safe_merge=safe)
        layers.append(layer.weight.data.copy())
    differ = layers[0] != layers[1]
    assert 0.2 < differ.mean() < 0.45  # on a 64x48 bf16 layer PEFT's two merges differ in 957 of 3072 weights (31%)
    # and both are within the rounding bound: |safe − unsafe| ≤ u·(|ΔW| + 2|W + ΔW|) + O(u²), u = 2^-8
    dW = layer.get_delta_weight("default").astype(np.float64)
    bound = UNIT_ROUNDOFF[BF16] * (2 * np.abs(dW) + 2 * np.abs(W + dW))
    assert np.all(np.abs(layers[0].astype(np.float64) - layers[1]) <= bound)
    # and the unmerge of a bf16 merge does not restore W
    layer.unmerge()
    assert not np.array_equal(layer.weight.data, W)


def test_safe_merge_raises_on_non_finite_and_leaves_weight():
    rng = np.random.default_rng(0)
    base = Linear(4, 3, rng=rng)
    layer = LoraLinear(base, r=2, init_lora_weights=False, rng=rng)
    layer.lora_B["default"].weight.data[0, 0] = np.inf
    W = base.weight.data.copy()
    with pytest.raises(ValueError, match="NaNs detected"):
        layer.merge(safe_merge=True)
    assert np.array_equal(base.weight.data, W) and layer.merged_adapters == []


# ------------------------------------------------------------------------------------------------ init
def test_default_init_is_kaiming_uniform_A_and_zero_B():
    rng = np.random.default_rng(0)
    layer = LoraLinear(Linear(64, 32, rng=rng), r=16, init_lora_weights=True, rng=rng)
    A = layer.lora_A["default"].weight.data
    assert A.shape == (16, 64) and layer.lora_B["default"].weight.data.shape == (32, 16)
    assert np.abs(A).max() <= 1 / 8 and np.abs(A).max() > 0.12  # U(±1/√64)
    assert abs(A.std() - (1 / 8) / math.sqrt(3)) < 0.005  # std of U(±b) is b/√3
    assert not layer.lora_B["default"].weight.data.any()
    x = rng.normal(size=(2, 64)).astype(np.float32)
    assert np.array_equal(layer(x).data, layer.base_layer(x).data)  # B = 0: a no-op at init


def test_gaussian_init_has_std_one_over_r():
    rng = np.random.default_rng(0)
    layer = LoraLinear(Linear(512, 8), r=4, init_lora_weights="gaussian", rng=rng)
    A = layer.lora_A["default"].weight.data
    assert abs(A.std() - 0.25) < 0.01 and not layer.lora_B["default"].weight.data.any()


def test_init_false_gives_nonzero_B():
    layer = LoraLinear(Linear(6, 5), r=4, init_lora_weights=False, rng=np.random.default_rng(0))
    B = layer.lora_B["default"].weight.data
    assert np.all(B != 0) and np.abs(B).max() <= 0.5  # U(±1/√r)


def test_init_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        LoraLinear(Linear(6, 5), r=4, init_lora_weights=True)


def test_pissa_keeps_output_and_takes_top_singular_directions():
    rng = np.random.default_rng(0)
    base = Linear(12, 10, rng=rng, std=1.0)
    W = base.weight.data.copy()
    x = rng.normal(size=(4, 12)).astype(np.float32)
    y0 = base(x).data
    layer = LoraLinear(base, r=3, lora_alpha=6, init_lora_weights="pissa")
    assert np.allclose(layer(x).data, y0, atol=1e-5)
    S = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    # the residual keeps the smaller singular values; s·B·A carries the top 3
    assert np.allclose(np.linalg.svd(layer.weight.data.astype(np.float64), compute_uv=False)[:7], S[3:], atol=1e-5)
    assert np.allclose(np.linalg.svd(layer.get_delta_weight("default").astype(np.float64), compute_uv=False)[:3],
                       S[:3], atol=1e-5)


# ------------------------------------------------------------------------------------------------ DoRA
@given(adapters(dtype=F32, use_dora=True, use_rslora=None), st.data())
def test_dora_forward_is_magnitude_times_direction(ad, data):
    """DoRA: y = x·W′ᵀ with W′ = (m / ‖W + s·BA‖_row)[:, None]·(W + s·BA) (Liu et al. 2024, Eq. 5; PEFT rows)."""
    x = data.draw(inputs(ad.W.shape[1]))
    V = ad.W.astype(np.float64) + ad.lora_alpha / (math.sqrt(ad.r) if ad.use_rslora else ad.r) * (
        ad.B.astype(np.float64) @ ad.A.astype(np.float64))
    Wp = (ad.magnitude / np.linalg.norm(V, axis=1))[:, None] * V
    expected = x.astype(np.float64) @ Wp.T
    got = ad.to_layer()(x).data
    tol = 64 * F32_U * abs_bound(x, np.abs(Wp) + np.abs(ad.W) + np.abs(V)) + 1e-30
    assert np.all(np.abs(got - expected) <= tol * (ad.W.shape[1] + ad.r))


def test_dora_magnitude_is_initialized_to_row_norms():
    rng = np.random.default_rng(0)
    base = Linear(7, 5, rng=rng, std=1.0)
    layer = LoraLinear(base, r=2, lora_alpha=4, init_lora_weights=False, use_dora=True, rng=rng)
    V = base.weight.data.astype(np.float64) + 2.0 * (layer.lora_B["default"].weight.data.astype(np.float64)
                                                     @ layer.lora_A["default"].weight.data)
    m = layer.lora_magnitude_vector["default"].weight.data
    assert m.shape == (5,) and np.allclose(m, np.linalg.norm(V, axis=1), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ gradients
@given(adapters(max_side=5, max_rank=3, dtype=F32, use_rslora=None), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=15)
def test_lora_gradients_match_finite_differences(ad, seed):
    layer = ad.to_layer()
    layer.base_layer.weight.data = ad.W.astype(np.float64)
    x = np.random.default_rng(seed).normal(size=(2, ad.W.shape[1]))
    A0, B0 = ad.A.astype(np.float64), ad.B.astype(np.float64)

    def f(x_, A_, B_):
        layer.lora_A["default"].weight = A_
        layer.lora_B["default"].weight = B_
        return layer(x_)

    assert gradcheck(f, [Tensor(x, requires_grad=True), Tensor(A0, requires_grad=True),
                         Tensor(B0, requires_grad=True)], atol=1e-6, rtol=1e-5)


@given(adapters(max_side=5, max_rank=3, dtype=F32, use_dora=True), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=15)
def test_dora_gradients_match_finite_differences_for_magnitude_and_input(ad, seed):
    """n is detached (DoRA §4.3), so finite differences agree for m and x (which n does not depend on)."""
    layer = ad.to_layer()
    layer.base_layer.weight.data = ad.W.astype(np.float64)
    for d in (layer.lora_A, layer.lora_B):
        d["default"].weight.data = d["default"].weight.data.astype(np.float64)
    x = np.random.default_rng(seed).normal(size=(2, ad.W.shape[1]))

    def f(x_, m_):
        layer.lora_magnitude_vector["default"].weight = m_
        return layer(x_)

    assert gradcheck(f, [Tensor(x, requires_grad=True), Tensor(ad.magnitude.astype(np.float64), requires_grad=True)],
                     atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ models
class Block(Module):
    def __init__(self, d, f, rng):
        super().__init__()
        self.q_proj = Linear(d, d, rng=rng, std=0.3)
        self.k_proj = Linear(d, d // 2, rng=rng, std=0.3)
        self.v_proj = Linear(d, d, rng=rng, std=0.3)
        self.o_proj = Linear(d, d, rng=rng, std=0.3, bias=True)

    def forward(self, x):
        return x + self.o_proj(self.q_proj(x) * self.v_proj(x)) + self.k_proj(x).sum(axis=-1, keepdims=True)


class Toy(Module):
    """A tiny stack of linear layers with Llama-like names (model.layers.N.q_proj, lm_head)."""

    def __init__(self, d=6, n_layers=2, vocab=5, rng=None):
        super().__init__()
        rng = rng or np.random.default_rng(0)
        self.layers = ModuleList([Block(d, 2 * d, rng) for _ in range(n_layers)])
        self.lm_head = Linear(d, vocab, rng=rng, std=0.3)

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return self.lm_head(x)


@given(lora_configs(use_dora=None), st.integers(2, 8), st.integers(1, 3))
def test_trainable_count_is_sum_of_r_times_in_plus_out(cfg, d, n_layers):
    model = inject_lora(Toy(d, n_layers), cfg, rng=np.random.default_rng(0))
    expected = 0
    for name, layer in lora_layers(model):
        assert any(name.endswith("." + t) for t in cfg.target_modules)
        expected += cfg.r * (layer.in_features + layer.out_features) + (layer.out_features if cfg.use_dora else 0)
    assert len(list(lora_layers(model))) == n_layers * len(cfg.target_modules)
    assert trainable_count(model) == expected


@given(lora_configs(use_dora=None), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=20)
def test_only_adapter_parameters_receive_gradients(cfg, seed):
    rng = np.random.default_rng(seed)
    model = inject_lora(Toy(4, 2, rng=rng), cfg, rng=rng)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    (model(x) ** 2).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and np.any(p.grad != 0), name
        else:
            assert not p.requires_grad and p.grad is None, name


@given(lora_configs(use_dora=None, target_names=("q_proj", "v_proj", "o_proj", "k_proj", "lm_head")),
       st.integers(0, 2 ** 32 - 1))
@settings(max_examples=20)
def test_merge_and_unload_equals_adapter_forward(cfg, seed):
    rng = np.random.default_rng(seed)
    model = inject_lora(Toy(5, 2, rng=rng), cfg, rng=rng)
    x = rng.normal(size=(2, 5)).astype(np.float32)
    y = model(x).data
    merge_and_unload(model)
    assert not list(lora_layers(model)) and not any("lora_" in n for n, _ in model.named_parameters())
    assert np.allclose(model(x).data, y, rtol=1e-4, atol=1e-4 * np.abs(y).max())


# ------------------------------------------------------------------------------------------------ targets
NAMES = ["layers.0.q_proj", "layers.0.k_proj", "layers.0.v_proj", "layers.0.o_proj",
         "layers.1.q_proj", "layers.1.k_proj", "layers.1.v_proj", "layers.1.o_proj", "lm_head"]


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]),
    (["layers.1.q_proj"], ["layers.1.q_proj"]),  # exact name
    (["1.q_proj"], ["layers.1.q_proj"]),  # dotted suffix on whole components
    (["proj"], "error"),  # "q_proj" does not end with ".proj"
    (r".*\.0\.[qk]_proj", ["layers.0.q_proj", "layers.0.k_proj"]),  # regex, full match
    ("q_proj", "error"),  # a string is a regex on the full name, not a suffix
    ("all-linear", NAMES[:-1]),  # every linear layer but lm_head
    ("ALL-LINEAR", NAMES[:-1]),
    (None, ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]),
])
def test_target_matching(targets, expected):
    cfg = LoraConfig(target_modules=targets)
    if expected == "error":
        with pytest.raises(ValueError, match="not found"):
            find_targets(Toy(), cfg)
    else:
        assert find_targets(Toy(), cfg) == expected


def test_exclude_modules_rank_and_alpha_patterns_and_layers_to_transform():
    toy = Toy()
    assert find_targets(toy, LoraConfig(target_modules="all-linear", exclude_modules=["o_proj", "layers.0.q_proj"])) \
        == ["layers.0.k_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.k_proj", "layers.1.v_proj"]
    assert find_targets(toy, LoraConfig(target_modules=["q_proj"], exclude_modules=r"layers\.1\..*")) \
        == ["layers.0.q_proj"]
    assert find_targets(toy, LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                        layers_pattern="layers")) == ["layers.1.q_proj", "layers.1.v_proj"]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"layers.1.q_proj": 2},
                     alpha_pattern={"v_proj": 3})
    model = inject_lora(Toy(), cfg, rng=np.random.default_rng(0))
    got = {n: (l.r["default"], l.scaling["default"]) for n, l in lora_layers(model)}
    assert got == {"layers.0.q_proj": (4, 2.0), "layers.0.v_proj": (4, 0.75),
                   "layers.1.q_proj": (2, 4.0), "layers.1.v_proj": (4, 0.75)}


def test_non_linear_target_is_rejected():
    class WithList(Module):
        def __init__(self):
            super().__init__()
            self.blocks = ModuleList([Linear(2, 2)])

    with pytest.raises(ValueError, match="ModuleList"):
        find_targets(WithList(), LoraConfig(target_modules=["blocks"]))


# ------------------------------------------------------------------------------------------------ adapters
def test_several_named_adapters_one_active():
    rng = np.random.default_rng(0)
    model = Toy(rng=rng)
    x = rng.normal(size=(2, 6)).astype(np.float32)
    y_base = model(x).data
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), rng=rng)
    y_a = model(x).data
    inject_lora(model, LoraConfig(r=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "second",
                rng=rng)
    assert np.array_equal(model(x).data, y_a)  # a new adapter is added inactive (as PEFT's add_adapter)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".second." in n)
    set_adapter(model, "second")
    y_b = model(x).data
    assert not np.allclose(y_b, y_a)
    assert all(p.requires_grad == (".second." in n) for n, p in model.named_parameters() if "lora_" in n)
    with disable_adapters(model):
        assert np.array_equal(model(x).data, y_base)
    # merging the active adapter, then disabling: unmerged first
    for _, layer in lora_layers(model):
        layer.merge()
    assert np.allclose(model(x).data, y_b, atol=1e-5)
    with disable_adapters(model):
        assert np.allclose(model(x).data, y_base, atol=1e-5)
    assert not any(l.merged for _, l in lora_layers(model))
    set_adapter(model, "default")  # the float32 merge/unmerge round trip left W within rounding of the original
    assert np.allclose(model(x).data, y_a, rtol=1e-5, atol=1e-5)
    delete_adapter(model, "second")
    assert [n for n, _ in lora_layers(model)] == ["layers.0.q_proj", "layers.1.q_proj"]
    unload(model)
    assert np.allclose(model(x).data, y_base, rtol=1e-5, atol=1e-5)


def test_merge_with_adapter_names_merges_both():
    rng = np.random.default_rng(0)
    base = Linear(5, 4, rng=rng)
    W = base.weight.data.copy()
    layer = LoraLinear(base, "a", r=2, init_lora_weights=False, rng=rng)
    layer.update_layer("b", 3, 6.0, init_lora_weights=False, rng=rng)
    layer.merge(adapter_names=["a", "b"])
    assert layer.merged_adapters == ["a", "b"]
    expected = W.astype(np.float64) + layer.get_delta_weight("a") + layer.get_delta_weight("b")
    assert np.allclose(layer.weight.data, expected, atol=1e-6)
    layer.unmerge()
    assert np.allclose(layer.weight.data, W, atol=1e-6)


def test_bfloat16_model_and_adapter_init_rounding():
    rng = np.random.default_rng(0)
    model = as_bfloat16(Toy(rng=rng))
    w = model.layers[0].q_proj.weight.data
    assert np.array_equal(w, round_to_dtype(w, BF16))
    inject_lora(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False), rng=rng)
    layer = model.layers[0].q_proj
    assert layer.weight_dtype == BF16
    A = layer.lora_A["default"].weight.data
    assert A.dtype == np.float32 and np.array_equal(A, round_to_dtype(A, BF16))  # PEFT rounds the init values


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be"), ({"r": 2.5}, "r must be"), ({"lora_dropout": 1.0}, "lora_dropout"),
    ({"init_lora_weights": "eva"}, "init_lora_weights"), ({"bias": "some"}, "bias"),
    ({"lora_alpha": float("nan")}, "lora_alpha"), ({"fan_in_fan_out": True}, "fan_in_fan_out"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_config_aliases():
    cfg = LoraConfig(r=4, alpha=16, dropout=0.1, init=False)
    assert (cfg.lora_alpha, cfg.lora_dropout, cfg.init_lora_weights) == (16, 0.1, False)


def test_dropout_acts_on_the_branch_only():
    rng = np.random.default_rng(0)
    layer = LoraLinear(Linear(8, 4, rng=rng), r=2, lora_dropout=0.5, init_lora_weights=False, rng=rng)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    with_branch = layer(x).data
    lora_only = with_branch - layer.base_layer(x).data
    expected_full = (x @ layer.lora_A["default"].weight.data.T) @ layer.lora_B["default"].weight.data.T * (8 / 2)
    assert not np.allclose(lora_only, expected_full, atol=1e-3)  # dropped-out inputs change the branch
    layer.eval()
    assert np.allclose(layer(x).data - layer.base_layer(x).data, expected_full, atol=1e-5)


# ------------------------------------------------------------------------------------------------ more properties
@given(st.lists(adapters(dtype=F32, shape=(5, 7), use_rslora=None), min_size=2, max_size=3), st.data())
@settings(max_examples=25)
def test_merging_several_adapters_adds_their_deltas(ads, data):
    """Several active adapters: the forward sums their branches; merging adds every ΔW (float32)."""
    base = Linear(7, 5)
    base.weight.data[...] = ads[0].W
    layer = LoraLinear(base, "a0", ads[0].r, ads[0].lora_alpha, use_rslora=ads[0].use_rslora, init_lora_weights=None)
    for i, ad in enumerate(ads):
        if i:
            layer.update_layer(f"a{i}", ad.r, ad.lora_alpha, use_rslora=ad.use_rslora, init_lora_weights=None)
        layer.lora_A[f"a{i}"].weight.data[...] = ad.A
        layer.lora_B[f"a{i}"].weight.data[...] = ad.B
    names = [f"a{i}" for i in range(len(ads))]
    layer.set_adapter(names)
    x = data.draw(inputs(7))
    y = layer(x).data.astype(np.float64)
    expected_w = ads[0].W.astype(np.float64) + sum(ad.delta_weight().astype(np.float64) for ad in ads)
    assert np.allclose(y, x @ expected_w.T, rtol=1e-5, atol=1e-4)
    layer.merge()
    assert layer.merged_adapters == names
    assert np.allclose(layer.weight.data, expected_w, rtol=1e-5, atol=1e-5)


@given(adapters(dtype=None, use_rslora=None), st.data())
def test_lora_bias_is_scaled_in_forward_and_merge(ad, data):
    """lora_B's bias sits inside the branch, so it is scaled by s in the forward pass and in the merge (PEFT #2489)."""
    out_f, in_f = ad.W.shape
    base = Linear(in_f, out_f, bias=True)
    base.weight.data[...] = ad.W
    if ad.dtype != F32:
        base.weight_dtype = ad.dtype
    layer = LoraLinear(base, r=ad.r, lora_alpha=ad.lora_alpha, use_rslora=ad.use_rslora, init_lora_weights=None,
                       lora_bias=True)
    layer.lora_A["default"].weight.data[...] = ad.A
    layer.lora_B["default"].weight.data[...] = ad.B
    b_B = data.draw(weights_like(out_f))
    layer.lora_B["default"].bias.data[...] = b_B
    x = data.draw(inputs(in_f))
    y = layer(x).data.astype(np.float64)
    layer.merge()
    assert np.allclose(layer.bias.data, round_to_dtype(np.float32(ad.scaling) * b_B, ad.dtype))
    dW = ad.delta_weight()
    tol = UNIT_ROUNDOFF[ad.dtype] * (abs_bound(x, np.abs(ad.W) + np.abs(dW)) + np.abs(ad.scaling * b_B)) \
        + 8 * (in_f + ad.r + 2) * F32_U * (abs_bound(x, np.abs(ad.W) + np.abs(dW)) + np.abs(ad.scaling * b_B))
    assert np.all(np.abs(layer(x).data - y) <= tol + 1e-30)


def weights_like(n):
    return st.integers(0, 2**32 - 1).map(lambda seed: np.random.default_rng(seed).uniform(-1, 1, n).astype(np.float32))


@given(st.integers(2, 10), st.integers(2, 10), st.integers(1, 4), st.sampled_from([1.0, 4.0, 16.0]), st.booleans(),
       st.integers(0, 2 ** 32 - 1))
@settings(max_examples=25)
def test_pissa_init_leaves_the_output_unchanged(out_f, in_f, r, alpha, rs, seed):
    rng = np.random.default_rng(seed)
    base = Linear(in_f, out_f, rng=rng, std=1.0)
    x = rng.normal(size=(3, in_f)).astype(np.float32)
    y0 = base(x).data.astype(np.float64)
    layer = LoraLinear(base, r=min(r, in_f, out_f), lora_alpha=alpha, use_rslora=rs, init_lora_weights="pissa")
    scale = abs_bound(x, np.abs(layer.weight.data) + np.abs(layer.get_delta_weight("default"))) + np.abs(y0)
    assert np.all(np.abs(layer(x).data - y0) <= 64 * (in_f + out_f) * F32_U * scale)


@given(adapters(dtype=None, use_dora=None, use_rslora=None), st.booleans())
def test_layer_merge_equals_the_pure_merge_functions(ad, safe):
    """LoraLinear.merge and LoraAdapter.merged_weight (lora.merged_weight / dora_merged_weight) agree bit for bit,
    so code tested against ``lora_ref.testing`` is tested against the layer's merge; and both are PEFT's merge,
    written out here: ΔW = (B @ A)·s in float32 with s from α and r, then round(W + ΔW) (unsafe) or
    round(W + round(ΔW)) (safe) in the storage dtype; DoRA (m/‖W + ΔW‖_row)·(W + ΔW), within its roundings."""
    layer = ad.to_layer()
    layer.merge(safe_merge=safe)
    got = layer.weight.data
    assert np.array_equal(got, ad.merged_weight(safe_merge=safe))
    s = ad.lora_alpha / (math.sqrt(ad.r) if ad.use_rslora else ad.r)
    dW = (ad.B @ ad.A) * np.float32(s)
    if ad.dtype == F32:
        def rnd(a):
            return a.astype(np.float32)
    else:
        def rnd(a):
            return a.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    if not ad.use_dora:
        assert np.array_equal(got, rnd(ad.W + (rnd(dW) if safe else dW)))
    else:
        V = ad.W.astype(np.float64) + dW
        expected = (ad.magnitude / np.linalg.norm(V, axis=1))[:, None] * V
        tol = (UNIT_ROUNDOFF[ad.dtype] + 8 * (ad.W.shape[1] + 4) * F32_U) * np.abs(expected) \
            + 8 * ad.W.shape[1] * F32_U * (ad.magnitude / np.linalg.norm(V, axis=1))[:, None] * np.abs(V).max()
        assert np.all(np.abs(got - expected) <= tol)
