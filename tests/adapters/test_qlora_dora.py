"""DoRA on a 4-bit base (no refusal any more): the layer computes DoRA with dequant(W) as its weight, and the three
4-bit merges of :func:`merge_4bit` apply DoRA's (m/n)·(W + ΔW). References: float64 DoRA written out here."""

import numpy as np

from lora_ref.adapters import qlora as Q
from lora_ref.adapters.lora import LoraConfig, lora_layers
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.nn import Linear, Module


class Two(Module):
    def __init__(self, rng):
        super().__init__()
        self.up_proj = Linear(64, 128, bias=True, rng=rng)
        self.down_proj = Linear(128, 64, bias=False, rng=rng)

    def forward(self, x):
        return self.down_proj(self.up_proj(x))


def _dora_model(seed=0):
    rng = np.random.default_rng(seed)
    m = Q.quantize_model(Two(rng))
    Q.inject_qlora(m, LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"], use_dora=True,
                                 init_lora_weights=False), rng=rng)
    for _, layer in lora_layers(m):
        mag = layer.lora_magnitude_vector["default"].weight
        mag.data[...] = mag.data * rng.uniform(0.7, 1.3, mag.shape).astype(np.float32)
    return m


def _dora64(layer, x):
    W = layer.base_layer.dequantize().astype(np.float64)
    A = layer.lora_A["default"].weight.data.astype(np.float64)
    B = layer.lora_B["default"].weight.data.astype(np.float64)
    s = layer.scaling["default"]
    V = W + s * B @ A
    m = layer.lora_magnitude_vector["default"].weight.data.astype(np.float64)
    y = x.astype(np.float64) @ (V * (m / np.linalg.norm(V, axis=1))[:, None]).T
    return y + (0 if layer.bias is None else layer.bias.data)


def test_forward_is_dora_on_the_dequantized_weight():
    m = _dora_model()
    layer = m.up_proj
    assert isinstance(layer, Q.LoraLinear4bit) and layer.use_dora["default"]
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    with no_grad():
        y = np.asarray(layer(x).data)
    np.testing.assert_allclose(y, _dora64(layer, x), rtol=1e-4, atol=1e-5)


def test_magnitude_starts_at_the_dequantized_norm():
    rng = np.random.default_rng(3)
    m = Q.quantize_model(Two(rng))
    Q.inject_qlora(m, LoraConfig(r=4, target_modules=["up_proj"], use_dora=True), rng=rng)
    layer = m.up_proj
    np.testing.assert_allclose(layer.lora_magnitude_vector["default"].weight.data,
                               np.linalg.norm(layer.base_layer.dequantize().astype(np.float64), axis=1), rtol=1e-6)


def test_three_merges_apply_dora():
    m = _dora_model(seed=4)
    layer = m.up_proj
    x = np.random.default_rng(5).normal(size=(7, 64)).astype(np.float32)
    ref = _dora64(layer, x)
    f = Q.merge_4bit(layer, "float")
    with no_grad():
        np.testing.assert_allclose(np.asarray(f(x).data), ref, rtol=1e-4, atol=1e-5)
        errs = {}
        for strategy in ("requantize", "refit"):
            y = np.asarray(Q.merge_4bit(layer, strategy)(x).data)
            errs[strategy] = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert 1e-4 < errs["refit"] <= errs["requantize"] < 0.2, errs
    # the in-place merge (PEFT's way) is the "requantize" merge
    req = Q.merge_4bit(layer, "requantize").dequantize()
    layer.merge()
    np.testing.assert_array_equal(layer.base_layer.dequantize(), req)


def test_training_step_moves_the_magnitude():
    from lora_ref.autograd.tensor import Tensor

    m = _dora_model(seed=6)
    x = Tensor(np.random.default_rng(7).normal(size=(4, 64)).astype(np.float32))
    (m(x) ** 2).sum().backward()
    layer = m.down_proj
    g = layer.lora_magnitude_vector["default"].weight.grad
    assert g is not None and np.abs(g).max() > 0
    assert layer.base_layer.weight.grad is None  # the 4-bit codes get no gradient
