"""PiSSA / OLoRA → LoRA conversion against PEFT 0.21.2 (``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``), live on the CPU: the same tensors and config from the same initial
and trained adapters, and the converted adapter on the *original* base computes PEFT's PiSSA model; OLoRA's
initialization equals PEFT's."""

import json

import numpy as np
import pytest

from lora_ref.adapters.lora import LoraConfig, inject_lora, lora_layers
from lora_ref.adapters.peft_files import load_adapter
from lora_ref.adapters.pissa import save_converted_adapter
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.llama import Llama
from lora_ref.testing import tiny_llama_config

pytestmark = pytest.mark.interop


def _assert_same_weights(ours, theirs):
    """The two adapter folders hold the same tensors, bit for bit."""
    import safetensors.numpy

    mine = safetensors.numpy.load_file(ours / "adapter_model.safetensors")
    peft_t = safetensors.numpy.load_file(theirs / "adapter_model.safetensors")
    assert sorted(mine) == sorted(peft_t)
    for k in peft_t:
        np.testing.assert_array_equal(mine[k], peft_t[k])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama")
    cfg = transformers.LlamaConfig(**tiny_llama_config(hidden_size=32, intermediate_size=48))
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _hf(path):
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_conversion_equals_peft(base_dir, tmp_path, init, rslora):
    import peft
    import torch

    torch.set_num_threads(1)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora)
    pm = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(init_lora_weights=init, **kw))
    pm.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = init
    torch.manual_seed(1)
    with torch.no_grad():  # "training"
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "trained")
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 7))
    with torch.no_grad():
        y_pissa = pm(torch.from_numpy(ids)).logits.numpy()  # residual base + trained adapter
    pm.save_pretrained(tmp_path / "peft_conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))

    # ours, from the same initial and trained adapters
    ours = load_adapter(Llama.from_pretrained(base_dir), tmp_path / "trained")
    assert ours.peft_config["default"].init_lora_weights == init
    save_converted_adapter(ours, tmp_path / "our_conv", tmp_path / "init")
    _assert_same_weights(tmp_path / "our_conv", tmp_path / "peft_conv")
    c_theirs = json.loads((tmp_path / "peft_conv" / "adapter_config.json").read_text())
    c_ours = json.loads((tmp_path / "our_conv" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora", "rank_pattern", "alpha_pattern",
                "target_modules"):
        assert c_ours[key] == (sorted(c_theirs[key]) if key == "target_modules" else c_theirs[key]), key
    assert c_ours["r"] == 8
    # the converted adapter on the unmodified base computes the PiSSA model, here and in PEFT
    conv = load_adapter(Llama.from_pretrained(base_dir), tmp_path / "our_conv")
    with no_grad():
        y_conv = np.asarray(conv(ids).data)
    np.testing.assert_allclose(y_conv, y_pissa, rtol=1e-4, atol=1e-4)
    back = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "our_conv")
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(ids)).logits.numpy(), y_pissa, rtol=1e-4, atol=1e-4)


def test_olora_init_equals_peft(base_dir):
    import peft

    kw = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights="olora")
    pm = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(**kw))
    theirs = {k.removeprefix("base_model.model."): v.detach().numpy() for k, v in pm.state_dict().items()}
    model = inject_lora(Llama.from_pretrained(base_dir), LoraConfig(**kw))
    n = 0
    for name, layer in lora_layers(model):
        np.testing.assert_allclose(layer.weight.data, theirs[f"{name}.base_layer.weight"], atol=1e-5)
        delta = 2.0 * theirs[f"{name}.lora_B.default.weight"] @ theirs[f"{name}.lora_A.default.weight"]
        np.testing.assert_allclose(layer.get_delta_weight("default"), delta, atol=1e-5)
        n += 1
    assert n == 4


def test_qpissa_equals_peft_recipe_and_its_conversion(tmp_path):
    """QPiSSA as PEFT's PiSSA example does it: PiSSA on the float model, the residual model saved and loaded with
    ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization)`` (every linear layer but lm_head in 4 bits),
    the initial adapter on top. Same logits here with bitsandbytes' CPU rounding; the conversion after training
    equals PEFT's. Widths are multiples of 64 (bitsandbytes' CPU dequantize is wrong otherwise); the 4-bit PEFT
    model stays in train mode (dropout 0)."""
    import bitsandbytes.functional as BF
    import peft
    import torch
    import transformers

    from lora_ref.adapters.pissa import apply_qpissa

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**tiny_llama_config())
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    kw = dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    pm = peft.get_peft_model(_hf(tmp_path / "base"), peft.LoraConfig(init_lora_weights="pissa", **kw))
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "init")
    pm.unload().save_pretrained(tmp_path / "residual")
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "residual", quantization_config=bnb_cfg,
                                                          dtype=torch.float32)
    qm = peft.PeftModel.from_pretrained(q, tmp_path / "init", is_trainable=True)
    qm.train()
    ours = Llama.from_pretrained(tmp_path / "base")
    stats = apply_qpissa(ours, LoraConfig(init_lora_weights="pissa", **kw), rounding="cpu")
    assert all(v["qpissa_error"] < v["qlora_error"] for v in stats.values())
    assert type(ours.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"  # the rest of the model is 4-bit too
    for n, layer in lora_layers(ours):  # the residual's NF4, up to the ulps the two SVDs differ by
        w = qm.base_model.model.get_submodule(n).base_layer.weight
        np.testing.assert_allclose(BF.dequantize_4bit(w.data, w.quant_state).numpy(), layer.base_layer.dequantize(),
                                   rtol=1e-5, atol=1e-6)
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 7))
    with torch.no_grad():
        y_peft = qm(torch.from_numpy(ids)).logits.numpy()
    with no_grad():
        np.testing.assert_allclose(np.asarray(ours(ids).data), y_peft, rtol=1e-4, atol=1e-4)

    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in qm.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    state = {k: v.detach().numpy() for k, v in qm.named_parameters() if "lora_" in k}
    for n, layer in lora_layers(ours):  # the same trained adapter here
        for part in ("lora_A", "lora_B"):
            getattr(layer, part)["default"].weight.data[...] = state[f"base_model.model.{n}.{part}.default.weight"]
    qm.save_pretrained(tmp_path / "peft_conv", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    save_converted_adapter(ours, tmp_path / "our_conv", tmp_path / "init")
    _assert_same_weights(tmp_path / "our_conv", tmp_path / "peft_conv")
