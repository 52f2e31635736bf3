"""DoRA on a 4-bit base against PEFT 0.21.2 + bitsandbytes 0.50.2, live on the CPU: the magnitude's initial value,
the forward pass, gradients and a few training steps, merge and unmerge (PEFT's ``lora.bnb.Linear4bit`` with
``DoraLinearVariant``: dequantize, (m/n)·(W + s·B·A), re-quantize).

Shapes are multiples of 64: bitsandbytes' CPU ``dequantize_4bit`` is wrong for 2-D inputs whose last dimension is
not a multiple of the blocksize. Forwards run in train mode (dropout 0): on CPUs with AVX512-BF16, an eval-mode
forward makes bitsandbytes 0.50.2 repack the 4-bit weight, after which PEFT's merge dequantizes garbage.
"""

import numpy as np
import pytest
from bnb_net import bnb_net

from lora_ref.adapters import qlora as Q
from lora_ref.autograd.tensor import Tensor

pytestmark = pytest.mark.interop

IN, OUT, R, ALPHA = 128, 64, 4, 8


def _build(seed=0, bias=True):
    import peft
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 0.05, (OUT, IN)).astype(np.float32)
    b = rng.normal(0, 0.1, OUT).astype(np.float32) if bias else None

    net = bnb_net(W, b)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                                                  init_lora_weights=False, use_dora=True))
    pm.train()
    tl = pm.base_model.model.proj
    base = Q.Linear4bit(W, b, blocksize=64, quant_type="nf4", double_quant=True, rounding="cpu")
    ours = Q.LoraLinear4bit(base, "default", R, ALPHA, init_lora_weights=None, use_dora=True)
    # m's initial value is computed by each side from its own dequantized weight and B·A: copy A and B only
    ours.lora_A["default"].weight.data[...] = tl.lora_A["default"].weight.detach().numpy()
    ours.lora_B["default"].weight.data[...] = tl.lora_B["default"].weight.detach().numpy()
    ours.lora_magnitude_vector["default"].weight.data[...] = ours.dora_weight_norm("default")
    return pm, tl, ours


def _bnb_dequant(param):
    import bitsandbytes.functional as BF

    return BF.dequantize_4bit(param.data, param.quant_state).float().numpy()


def test_magnitude_init_and_forward():
    import torch

    pm, tl, ours = _build()
    assert type(tl).__module__.endswith("lora.bnb") and "default" in tl.lora_variant
    np.testing.assert_array_equal(_bnb_dequant(tl.base_layer.weight), ours.base_layer.dequantize())
    m_peft = tl.lora_magnitude_vector["default"].weight.detach().numpy()
    np.testing.assert_allclose(ours.lora_magnitude_vector["default"].weight.data, m_peft, rtol=1e-6)
    # a magnitude away from the norm, so that m/n − 1 matters
    m = (m_peft * np.random.default_rng(5).uniform(0.5, 1.5, OUT)).astype(np.float32)
    with torch.no_grad():
        tl.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
    ours.lora_magnitude_vector["default"].weight.data[...] = m
    x = np.random.default_rng(1).normal(size=(2, 5, IN)).astype(np.float32)
    with torch.no_grad():
        y_peft = pm(torch.from_numpy(x)).numpy()
    y = np.asarray(ours(x).data)
    np.testing.assert_allclose(y, y_peft, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y_base = tl.base_layer(torch.from_numpy(x)).numpy()
    assert np.abs(y_peft - y_base).max() > 0.05  # DoRA changes the output


def test_gradients_and_training_steps():
    import torch

    pm, tl, ours = _build(seed=2)
    rng = np.random.default_rng(3)
    lr = 0.05
    for step in range(3):
        x = rng.normal(size=(6, IN)).astype(np.float32)
        g = rng.normal(size=(6, OUT)).astype(np.float32)
        xt = torch.from_numpy(x).requires_grad_(True)
        pm.zero_grad()
        (pm(xt) * torch.from_numpy(g)).sum().backward()
        xo = Tensor(x, requires_grad=True)
        for p in ours.parameters():
            p.grad = None
        (ours(xo) * Tensor(g)).sum().backward()
        pairs = [(ours.lora_A["default"].weight, tl.lora_A["default"].weight),
                 (ours.lora_B["default"].weight, tl.lora_B["default"].weight),
                 (ours.lora_magnitude_vector["default"].weight, tl.lora_magnitude_vector["default"].weight)]
        for o, t in pairs:
            np.testing.assert_allclose(o.grad, t.grad.numpy(), rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(xo.grad, xt.grad.numpy(), rtol=2e-4, atol=2e-5)  # through dequant(W) and m/n
        assert tl.base_layer.weight.grad is None and ours.base_layer.weight.grad is None
        with torch.no_grad():  # plain SGD on both sides
            for o, t in pairs:
                t -= lr * t.grad
                o.data[...] = o.data - lr * o.grad
    x = rng.normal(size=(4, IN)).astype(np.float32)
    with torch.no_grad():
        y_peft = pm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(x).data), y_peft, rtol=1e-4, atol=1e-4)


def test_merge_and_unmerge_equal_peft():
    import torch

    pm, tl, ours = _build(seed=4)
    m = (tl.lora_magnitude_vector["default"].weight.detach().numpy()
         * np.random.default_rng(6).uniform(0.8, 1.2, OUT)).astype(np.float32)
    with torch.no_grad():
        tl.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(m))
    ours.lora_magnitude_vector["default"].weight.data[...] = m
    target = Q.merge_4bit(ours, "float").weight.data.copy()  # (m/n)(dequant(W) + ΔW) in float32
    tl.merge()
    ours.merge()
    _same_4bit(tl.base_layer.weight, ours.base_layer)
    w_peft = _bnb_dequant(tl.base_layer.weight)
    assert np.abs(target - w_peft).max() <= 0.1385 * np.abs(target).max() * 1.01  # NF4's largest half gap
    assert np.abs(target - ours.base_layer.dequantize()).max() > 1e-3  # the merge really re-quantized
    tl.unmerge()
    ours.unmerge()
    _same_4bit(tl.base_layer.weight, ours.base_layer)


def _same_4bit(param, layer):
    """Same codes and scales up to float32 rounding. torch and NumPy sum DoRA's float32 row norms in different
    orders, so the merged weights differ in their last bits: a block maximum can move by an ulp (and with it the
    double-quantization offset) and a value within an ulp of an NF4 decision threshold can take the neighbouring
    code."""
    codes_peft = param.data.numpy().reshape(-1)
    codes_ours = layer.weight.data.reshape(-1)
    assert np.mean(codes_peft != codes_ours) <= 1e-3
    np.testing.assert_array_equal(param.quant_state.absmax.numpy(), layer.quant_state.absmax)
    same = np.repeat(codes_peft == codes_ours, 2)  # two codes per byte
    np.testing.assert_allclose(_bnb_dequant(param).reshape(-1)[same], layer.dequantize().reshape(-1)[same],
                               rtol=1e-6, atol=1e-7)
