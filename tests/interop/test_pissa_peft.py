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

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rms_norm_eps=1e-6)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _hf(path):
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_conversion_equals_peft(base_dir, tmp_path, init, rslora):
    import peft
    import safetensors.numpy
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
    theirs_t = safetensors.numpy.load_file(tmp_path / "peft_conv" / "adapter_model.safetensors")
    ours_t = safetensors.numpy.load_file(tmp_path / "our_conv" / "adapter_model.safetensors")
    assert sorted(theirs_t) == sorted(ours_t)
    for k in theirs_t:
        np.testing.assert_array_equal(ours_t[k], theirs_t[k])
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
