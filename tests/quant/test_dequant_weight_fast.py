"""dequant_matmul.dequantize_weight (QLoRA's many-rows path) decodes with the registered Numba step when the fast
paths are on, and gives the same bits as the readable step."""

import numpy as np

from lora_ref.kernels import switch
from lora_ref.quant import dequant_matmul, kernels
from lora_ref.quant.blockwise import quantize_4bit


def test_fast_decode_is_registered_and_equal():
    assert dequant_matmul.FAST_STEPS["decode_4bit"] is kernels.decode_4bit
    w = np.random.default_rng(0).standard_normal((96, 130)).astype(np.float32)
    for double_quant in (False, True):
        packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=double_quant)
        with switch.readable():
            slow = dequant_matmul.dequantize_weight(packed, state)
        with switch.fast_paths():
            fast = dequant_matmul.dequantize_weight(packed, state)
        assert fast.shape == w.shape and fast.dtype == np.float32
        np.testing.assert_array_equal(fast, slow)
        assert np.abs(fast - w).max() < 0.5 * np.abs(w).max()  # and it is the weight, roughly
