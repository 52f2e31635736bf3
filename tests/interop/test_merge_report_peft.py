"""The merge report's 4-bit files against transformers + bitsandbytes + PEFT on the CPU: the base written by
``save_4bit_llama`` loads in transformers with the same codes, the adapter on it gives our logits, and the
re-quantized merge that ``lora-ref merge --report`` writes to --out equals PEFT's ``merge_and_unload`` on the same
4-bit model (its "requantize" target is PEFT's merge). Shapes are multiples of 64 (bitsandbytes' CPU dequantize is
wrong otherwise); the PEFT model stays in train mode (dropout 0) before merging (eval-mode forwards repack bitsandbytes'
4-bit weights on AVX512-BF16 CPUs, after which PEFT's merge reads garbage)."""

import numpy as np
import pytest

from lora_ref.adapters import qlora as Q
from lora_ref.adapters.lora import LoraConfig, inject_lora, lora_layers
from lora_ref.adapters.merge_report import load_4bit_llama, save_4bit_llama
from lora_ref.adapters.peft_files import save_adapter
from lora_ref.autograd.tensor import no_grad
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.testing import tiny_llama_config

pytestmark = pytest.mark.interop

TINY = tiny_llama_config()


def test_report_out_equals_peft_4bit_merge(tmp_path, capsys):
    import bitsandbytes.functional as BF
    import peft
    import torch
    import transformers

    torch.set_num_threads(1)
    Llama(LlamaConfig(**TINY), rng=np.random.default_rng(0)).save_pretrained(tmp_path / "float")
    save_4bit_llama(Q.quantize_model(Llama.from_pretrained(tmp_path / "float"), rounding="cpu"), tmp_path / "q4")
    model = load_4bit_llama(tmp_path / "q4")
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False), rng=np.random.default_rng(1))
    save_adapter(model, tmp_path / "adapter")
    ids = np.random.default_rng(2).integers(0, 64, size=(2, 7))
    with no_grad():
        ours = np.asarray(model(ids).data)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    pm.train()
    names = [n for n, _ in lora_layers(model)]
    for n in names:
        w = pm.base_model.model.get_submodule(n).base_layer.weight
        np.testing.assert_array_equal(BF.dequantize_4bit(w.data, w.quant_state).numpy(),
                                      model.get_submodule(n).base_layer.dequantize())
    with torch.no_grad():
        np.testing.assert_allclose(pm(torch.from_numpy(ids)).logits.numpy(), ours, rtol=1e-4, atol=1e-4)

    code = main(["merge", "--base", str(tmp_path / "q4"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged"), "--report", str(tmp_path / "report.json"), "--json"])
    assert code == 0, capsys.readouterr().err
    merged = load_4bit_llama(tmp_path / "merged")
    peft_merged = pm.merge_and_unload()
    for n in names:
        w = peft_merged.get_submodule(n).weight
        theirs = BF.dequantize_4bit(w.data, w.quant_state).numpy()
        mine = merged.get_submodule(n).dequantize()
        # our base was loaded with CUDA rounding for re-quantization, PEFT re-quantizes with bitsandbytes' CPU path:
        # for NF4 they agree on the codes; the double-quantization offset (a float32 mean) may differ by an ulp
        assert np.mean(w.data.numpy().reshape(-1) != merged.get_submodule(n).weight.data.reshape(-1)) <= 1e-3
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)
    # transformers loads our merged 4-bit checkpoint with the same weights
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    w = hf2.get_submodule(names[0]).weight
    np.testing.assert_array_equal(BF.dequantize_4bit(w.data, w.quant_state).numpy(),
                                  merged.get_submodule(names[0]).dequantize())
