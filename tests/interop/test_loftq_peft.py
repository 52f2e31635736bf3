"""A LoftQ model written by ``save_loftq`` loads in transformers (bitsandbytes 4-bit) + PEFT on the CPU with the same
4-bit codes and the same logits; and lora_ref's LoftQ equals the loop of PEFT's ``loftq_init`` run on the CPU with
bitsandbytes' CPU NF4 (PEFT's own function insists on a GPU, so its loop is replayed here with torch and bnb calls).

Shapes are multiples of 64: bitsandbytes 0.50.2's CPU ``dequantize_4bit`` is wrong for 2-D inputs whose last
dimension is not a multiple of the blocksize.
"""

import numpy as np
import pytest

from lora_ref.adapters.loftq import apply_loftq, loftq, save_loftq
from lora_ref.adapters.lora import LoraConfig
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.llama import Llama
from lora_ref.testing import tiny_llama_config

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama64")
    cfg = transformers.LlamaConfig(**tiny_llama_config())
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def test_saved_loftq_pair_loads_in_transformers_and_peft(base_dir, tmp_path):
    import bitsandbytes.functional as BF
    import peft
    import torch
    import transformers

    torch.set_num_threads(1)
    model = Llama.from_pretrained(base_dir)
    results = apply_loftq(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
                          num_iter=2)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"  # untargeted layers: plain NF4
    save_loftq(model, tmp_path / "base", tmp_path / "adapter")
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 9))
    with no_grad():
        ours = np.asarray(model(ids).data)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    assert pm.peft_config["default"].init_lora_weights is True  # PEFT does not re-run LoftQ on load
    n = 0
    for name, res in results.items():
        layer = pm.base_model.model.get_submodule(name)
        w = layer.base_layer.weight
        assert type(w).__name__ == "Params4bit" and w.quant_state.blocksize == 64
        np.testing.assert_array_equal(BF.dequantize_4bit(w.data, w.quant_state).numpy(), res.dequantized)
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy(), res.lora_B)
        n += 1
    assert n == 6
    k = pm.base_model.model.model.layers[1].self_attn.k_proj.weight  # an untargeted layer: the same plain NF4
    np.testing.assert_array_equal(BF.dequantize_4bit(k.data, k.quant_state).numpy(),
                                  model.model.layers[1].self_attn.k_proj.dequantize())
    pm.train()  # dropout is 0; train mode keeps bitsandbytes off its repacking eval path
    with torch.no_grad():
        theirs = pm(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # the adapter matters: without it the logits move by far more than the tolerance
    with pm.disable_adapter(), torch.no_grad():
        bare = pm(torch.from_numpy(ids)).logits.numpy()
    assert np.abs(bare - theirs).max() > 1e-2


def _peft_loop_on_cpu(weight, rank, iters):
    """``peft.utils.loftq_utils.loftq_init``'s loop, with the device moves dropped (bitsandbytes' CPU NF4)."""
    import bitsandbytes as bnb
    import torch
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = torch.from_numpy(weight)
    res = weight.clone()
    for i in range(iters):
        q = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        deq = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        res = weight - deq
        out = _low_rank_decomposition(res, reduced_rank=rank)
        L, R = out["L"], out["R"]
        if i + 1 == iters:
            break
        res = weight - torch.mm(L, R)
    return deq.numpy(), R.numpy(), L.numpy()


@pytest.mark.parametrize("iters", [1, 3])
def test_equals_peft_loop_with_bitsandbytes_cpu_nf4(iters):
    import torch

    torch.set_num_threads(1)
    W = np.random.default_rng(3).standard_t(4, size=(128, 192)).astype(np.float32) * 0.02
    deq_ref, A_ref, B_ref = _peft_loop_on_cpu(W, 8, iters)
    res = loftq(W, 4, 8, iters, rounding="cpu")
    err_ref = np.linalg.norm((W - deq_ref - B_ref @ A_ref).astype(np.float64))
    assert abs(res.errors[-1] / err_ref - 1) < 1e-3
    if iters == 1:
        np.testing.assert_array_equal(res.dequantized, deq_ref)
        BA, BA_ref = res.lora_B @ res.lora_A, B_ref @ A_ref
        assert np.linalg.norm(BA - BA_ref) / np.linalg.norm(BA_ref) < 1e-4
