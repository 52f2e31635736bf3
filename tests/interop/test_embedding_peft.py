"""LoRA on embeddings and ``modules_to_save`` against PEFT 0.21.2, both ways: an adapter PEFT saved (with the
extra ``embed_tokens.base_layer.weight`` it writes when ``embed_tokens`` is targeted, and ``lm_head.weight`` for a
module to save) loads here with PEFT's logits; one saved here loads in ``PeftModel.from_pretrained`` with ours;
merges equal; PEFT's initialization and scaling of ``lora_embedding_A/B``."""

import json

import numpy as np
import pytest

from lora_ref.adapters.lora import LoraConfig, inject_lora, merge_and_unload
from lora_ref.adapters.peft_files import load_adapter, save_adapter
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.llama import Llama
from lora_ref.testing import tiny_llama_config

pytestmark = pytest.mark.interop

CASES = {
    "embed+q, save lm_head": dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
    "q, save embed+lm_head": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "embed rslora": dict(target_modules=["embed_tokens"], use_rslora=True),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    import torch
    import transformers

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama_untied")
    cfg = transformers.LlamaConfig(**tiny_llama_config(hidden_size=32, intermediate_size=48,
                                                     tie_word_embeddings=False))
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _hf(path):
    import torch
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _peft_logits(pm, ids):
    import torch

    with torch.no_grad():
        return pm(torch.from_numpy(ids)).logits.numpy()


def _perturb_saved_modules(pm, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_adapter_loads_here(base_dir, tmp_path, case):
    import peft
    import safetensors.numpy
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(1)
    pm = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            **CASES[case])).eval()
    _perturb_saved_modules(pm, 2)
    pm.save_pretrained(tmp_path / "peft")
    keys = set(safetensors.numpy.load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    if "embed_tokens" in CASES[case]["target_modules"]:
        assert "base_model.model.model.embed_tokens.base_layer.weight" in keys  # the extra tensor PEFT writes
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 9))
    ours = load_adapter(Llama.from_pretrained(base_dir), tmp_path / "peft")
    with no_grad():
        y = np.asarray(ours(ids).data)
    np.testing.assert_allclose(y, _peft_logits(pm, ids), rtol=1e-4, atol=1e-4)
    assert np.abs(y - _peft_logits(_hf(base_dir), ids)).max() > 1e-2
    # merge_and_unload: the LoRA embedding merged, the trained copies in place of the originals
    merged_ours = merge_and_unload(ours).state_dict()
    merged_peft = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    for k, v in merged_peft.items():
        assert np.abs(merged_ours[k] - v).max() <= 1e-6, k


@pytest.mark.parametrize("case", CASES)
def test_adapter_saved_here_loads_in_peft(base_dir, tmp_path, case):
    import peft
    import torch

    torch.set_num_threads(1)
    model = Llama.from_pretrained(base_dir)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **CASES[case]),
                rng=np.random.default_rng(3))
    rng = np.random.default_rng(4)
    for n, p in model.named_parameters():
        if ".modules_to_save." in n:
            p.data[...] = p.data + 0.1 * rng.standard_normal(p.shape).astype(np.float32)
    ids = np.random.default_rng(5).integers(0, 64, size=(2, 9))
    with no_grad():
        y = np.asarray(model(ids).data)
    save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == CASES[case].get("modules_to_save")
    pm = peft.PeftModel.from_pretrained(_hf(base_dir), tmp_path / "ours").eval()
    np.testing.assert_allclose(_peft_logits(pm, ids), y, rtol=1e-4, atol=1e-4)


def test_embedding_init_and_gradients_equal_peft(base_dir):
    """PEFT's init for init_lora_weights=True: A = 0, B ~ N(0, 1); the gradients of A and B equal PEFT's."""
    import peft
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(6)
    pm = peft.get_peft_model(_hf(base_dir), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["embed_tokens"]))
    emb = pm.base_model.model.model.embed_tokens
    assert float(emb.lora_embedding_A["default"].abs().max()) == 0.0
    assert 0.8 < float(emb.lora_embedding_B["default"].std()) < 1.2
    model = inject_lora(Llama.from_pretrained(base_dir), LoraConfig(r=4, lora_alpha=16,
                                                                     target_modules=["embed_tokens"]),
                        rng=np.random.default_rng(0))
    layer = model.model.embed_tokens
    assert np.all(layer.lora_embedding_A["default"].data == 0) and layer.scaling["default"] == 4.0
    assert 0.8 < layer.lora_embedding_B["default"].data.std() < 1.2
    with torch.no_grad():  # same nonzero A and B on both sides
        emb.lora_embedding_A["default"].normal_()
    layer.lora_A["default"].weight.data[...] = emb.lora_embedding_A["default"].detach().numpy()
    layer.lora_B["default"].weight.data[...] = emb.lora_embedding_B["default"].detach().numpy()
    ids = np.random.default_rng(7).integers(0, 64, size=(2, 5))
    pm.train()
    pm(torch.from_numpy(ids)).logits.square().mean().backward()
    model.train()
    out = model(ids)
    (out * out).mean().backward()
    np.testing.assert_allclose(layer.lora_A["default"].weight.grad, emb.lora_embedding_A["default"].grad.numpy(),
                               rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(layer.lora_B["default"].weight.grad, emb.lora_embedding_B["default"].grad.numpy(),
                               rtol=1e-3, atol=1e-6)
