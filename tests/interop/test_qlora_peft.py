"""QLoRA against bitsandbytes + PEFT on the CPU, live: the same NF4 base (double quantization), the same adapter;
PEFT's 4-bit merge (dequantize, add, re-quantize) equals ``merge_4bit_like_peft`` bit for bit, bias bug included,
and the LoRA forward on the 4-bit base equals PEFT's.

The forward runs in train mode: on CPUs with AVX512-BF16, bitsandbytes 0.50.2 repacks a 4-bit weight in an eval-mode
forward, after which PEFT's merge dequantizes garbage; train mode avoids that path.
"""

import numpy as np
import pytest
from bnb_net import bnb_net

from lora_ref.adapters import qlora as Q
from lora_ref.quant import dequantize_4bit

pytestmark = pytest.mark.interop

IN, OUT, R, ALPHA = 128, 96, 4, 16


@pytest.fixture
def pair():
    import peft
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    W = rng.normal(0, 0.05, (OUT, IN)).astype(np.float32)
    b = rng.normal(0, 0.1, OUT).astype(np.float32)

    net = bnb_net(W, b)
    assert net.proj.weight.bnb_quantized
    pm = peft.get_peft_model(net, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"],
                                                  init_lora_weights=False, lora_bias=True))
    tl = pm.base_model.model.proj
    with torch.no_grad():
        torch.nn.init.normal_(tl.lora_B["default"].bias, std=0.1)
    pm.train()

    base = Q.Linear4bit(W, b, blocksize=64, quant_type="nf4", double_quant=True, rounding="cpu")
    ours = Q.LoraLinear4bit(base, "default", R, ALPHA, lora_bias=True, init_lora_weights=None)
    ours.lora_A["default"].weight.data[...] = tl.lora_A["default"].weight.detach().numpy()
    ours.lora_B["default"].weight.data[...] = tl.lora_B["default"].weight.detach().numpy()
    ours.lora_B["default"].bias.data[...] = tl.lora_B["default"].bias.detach().numpy()
    return pm, ours


def _bnb_dequant(param):
    import bitsandbytes.functional as BF

    return BF.dequantize_4bit(param.data, param.quant_state).float().numpy()


def test_same_nf4_base_and_forward(pair):
    import torch

    pm, ours = pair
    tl = pm.base_model.model.proj
    np.testing.assert_array_equal(_bnb_dequant(tl.base_layer.weight), ours.base_layer.dequantize())
    x = np.random.default_rng(1).normal(size=(5, IN)).astype(np.float32)
    with torch.no_grad():
        y_peft = pm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(x)), y_peft, rtol=1e-5, atol=1e-5)


def test_peft_4bit_merge_equals_ours_like_peft_bit_for_bit(pair):
    pm, ours = pair
    assert type(pm.base_model.model.proj).__module__.endswith("lora.bnb")  # PEFT's 4-bit LoRA layer
    b_B = ours.lora_B["default"].bias.data.copy()
    s = ours.scaling["default"]
    assert s == ALPHA / R and np.abs(b_B).max() > 0
    like_peft = Q.merge_4bit_like_peft(ours)
    correct = Q.merge_4bit(ours, "requantize")
    merged = pm.merge_and_unload().proj
    w_peft = _bnb_dequant(merged.weight)
    np.testing.assert_array_equal(w_peft, like_peft.dequantize())      # dequantize → add → re-quantize, bit for bit
    np.testing.assert_array_equal(merged.bias.detach().numpy(), like_peft.bias.data)  # b + b_B (unscaled)
    np.testing.assert_allclose(correct.bias.data - merged.bias.detach().numpy(), (s - 1) * b_B, rtol=1e-5, atol=1e-6)
    assert np.array_equal(dequantize_4bit(correct.weight.data, correct.quant_state), w_peft)
    assert type(pm.base_model.model.proj).__name__ == "Linear4bit"  # still 4-bit after merge_and_unload
