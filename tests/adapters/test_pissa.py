"""PiSSA / OLoRA → LoRA conversion (the converted rank-2r adapter on the original base is the PiSSA model's function),
QPiSSA (the residual quantized: a smaller starting error than QLoRA's), OLoRA on a 4-bit base, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.adapters import qlora as Q
from lora_ref.adapters.lora import LoraConfig, inject_lora, lora_layers
from lora_ref.adapters.peft_files import load_adapter, read_adapter_config
from lora_ref.adapters.pissa import apply_qpissa, save_converted_adapter, save_initial_adapter
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.testing import tiny_llama_config

TINY = tiny_llama_config(num_hidden_layers=1)


def _llama(seed):
    return Llama(LlamaConfig(**TINY), rng=np.random.default_rng(seed))


def _train(model, rng, scale=0.05):
    for _, layer in lora_layers(model):
        for d in (layer.lora_A, layer.lora_B):
            w = d["default"].weight
            w.data[...] = w.data + scale * rng.standard_normal(w.shape).astype(np.float32)


def _logits(model, ids):
    with no_grad():
        return np.asarray(model(ids).data, dtype=np.float64)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), init=st.sampled_from(["pissa", "olora"]), r=st.sampled_from([2, 4]),
       rslora=st.booleans(), alpha=st.sampled_from([4.0, 16.0]))
def test_converted_adapter_on_the_original_base_is_the_pissa_model(tmp_path_factory, seed, init, r, rslora, alpha):
    tmp = tmp_path_factory.mktemp("conv")
    original = _llama(seed)
    model = _llama(seed)
    inject_lora(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, init_lora_weights=init,
                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    save_initial_adapter(model, tmp / "init")
    assert read_adapter_config(tmp / "init").init_lora_weights is True
    _train(model, np.random.default_rng(seed))
    ids = np.random.default_rng(seed + 1).integers(0, 64, size=(2, 6))
    y_pissa = _logits(model, ids)
    save_converted_adapter(model, tmp / "conv", tmp / "init")
    cfg = read_adapter_config(tmp / "conv")
    assert cfg.r == 2 * r and cfg.init_lora_weights is True
    conv = load_adapter(original, tmp / "conv")
    for _, layer in lora_layers(conv):
        assert layer.lora_A["default"].weight.shape[0] == 2 * r
    y_conv = _logits(conv, ids)
    assert np.abs(y_conv - y_pissa).max() <= 1e-4 * max(1.0, np.abs(y_pissa).max())
    assert np.abs(y_pissa - _logits(_llama(seed), ids)).max() > 1e-3  # the adapter is not a no-op


def test_qpissa_starts_closer_to_w_than_qlora(tmp_path):
    model = _llama(3)
    W = {n: m.weight.data.copy() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    stats = apply_qpissa(model, LoraConfig(r=8, lora_alpha=8, init_lora_weights="pissa",
                                           target_modules=["q_proj", "down_proj"]))
    assert set(stats) == set(W)
    for n, layer in lora_layers(model):
        assert isinstance(layer, Q.LoraLinear4bit) and layer.base_layer.double_quant
        # measured here: ‖W − (Q(W_res) + s·B₀A₀)‖ against ‖W − Q(W)‖, both with the same NF4
        err = np.linalg.norm(W[n].astype(np.float64) - layer.base_layer.dequantize() - layer.get_delta_weight("default"))
        assert err == pytest.approx(stats[n]["qpissa_error"], rel=1e-6)
        qlora = Q.Linear4bit(W[n]).dequantize()
        assert stats[n]["qlora_error"] == pytest.approx(np.linalg.norm(W[n].astype(np.float64) - qlora), rel=1e-6)
        assert stats[n]["qpissa_error"] < stats[n]["qlora_error"]
    # conversion from QPiSSA: on the original base it differs from the trained 4-bit model by the residual's NF4 error
    save_initial_adapter(model, tmp_path / "init")
    _train(model, np.random.default_rng(4))
    ids = np.random.default_rng(5).integers(0, 64, size=(1, 8))
    save_converted_adapter(model, tmp_path / "conv", tmp_path / "init")
    conv = load_adapter(_llama(3), tmp_path / "conv")
    gap = np.abs(_logits(conv, ids) - _logits(model, ids)).max()
    assert 1e-4 < gap < 0.5


def test_olora_on_a_4bit_base_requantizes_the_residual():
    rng = np.random.default_rng(6)
    model = Q.quantize_model(_llama(6))
    before = model.model.layers[0].self_attn.q_proj.dequantize()
    inject_lora(model, LoraConfig(r=4, lora_alpha=4, init_lora_weights="olora", target_modules=["q_proj"]), rng=rng)
    layer = model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    np.testing.assert_allclose(B.T @ B, np.eye(4), atol=1e-5)  # Q's columns are orthonormal
    assert np.allclose(np.tril(A[:, :4], -1), 0)  # R is upper triangular
    # base = Q(dequant(W) − s·B·A): the layer starts within NF4 error of the old function
    resid = Q.Linear4bit(before - B @ A).dequantize()
    np.testing.assert_array_equal(layer.base_layer.dequantize(), resid)


def test_bad_input(tmp_path):
    model = Q.quantize_model(_llama(7))
    with pytest.raises(ValueError, match="QPiSSA cannot decompose model.layers.0.self_attn.q_proj") as ei:
        apply_qpissa(model, LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"]))
    assert "\n" not in str(ei.value)
    with pytest.raises(ValueError, match="init_lora_weights 'pissa' or 'olora'"):
        apply_qpissa(_llama(7), LoraConfig(r=2, target_modules=["q_proj"]))
    a = inject_lora(_llama(8), LoraConfig(r=2, init_lora_weights="pissa", target_modules=["q_proj"]))
    save_initial_adapter(a, tmp_path / "init2")
    b = inject_lora(_llama(8), LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="rank 2, the trained one 4"):
        save_converted_adapter(b, tmp_path / "conv", tmp_path / "init2")
    assert not (tmp_path / "conv").exists()
