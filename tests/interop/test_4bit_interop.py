"""4-bit checkpoints against transformers + bitsandbytes + PEFT, live on the CPU.

- A folder transformers + bitsandbytes write for a ``load_in_4bit`` model (NF4 with double quantization, FP4
  without) loads in :meth:`lora_ref.modeling.llama.Llama.from_pretrained` as :class:`lora_ref.modeling.linear4bit.Linear4bit` layers whose
  codes, scales and nested scales are the file's and bitsandbytes' own, and gives transformers' logits.
- A folder ``lora-ref quantize`` writes loads the same way and gives the logits transformers + bitsandbytes compute
  from it.
- ``lora-ref merge`` on a 4-bit base: the default float output equals dequantizing with bitsandbytes and merging
  with PEFT's ``merge_and_unload`` into that float model; ``--quantized requantize --rounding cpu`` equals PEFT's
  ``merge_and_unload`` on the bitsandbytes model (dequantize, add, quantize again) code for code.

The tiny Llama's linear layers have in_features 128 and 256, multiples of the blocksize 64: bitsandbytes 0.50.2's CPU
``dequantize_4bit`` is wrong for 2-D weights whose last dimension is not a multiple of the blocksize
(tests/interop/test_quant_interop.py), which would make the reference wrong, not lora_ref.

transformers runs in train mode (dropout is 0 here, so it is deterministic): in an eval-mode forward without
gradients, bitsandbytes 0.50.2 on an AVX512-BF16 CPU repacks each 4-bit weight and computes in bfloat16, after which
the logits differ by ~1e-3 and a PEFT merge dequantizes the repacked bytes as if they were codes. No bitsandbytes
model here runs an eval-mode forward, and none runs any forward before a merge.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_ref.adapters.qlora import Linear4bit
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama
from lora_ref.quant import serialize as S
from lora_ref.testing import tiny_llama_config

pytestmark = pytest.mark.interop

TINY = tiny_llama_config(vocab_size=128, hidden_size=128, intermediate_size=256, tie_word_embeddings=False)
IDS = np.array([[1, 5, 9, 33, 90, 7, 2, 64, 11, 0, 127, 3]])
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random float32 tiny Llama written by transformers, with a tokenizer-like side file."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bnb") / "base"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    (path / "tokenizer.json").write_text('{"model": "placeholder"}')
    return path


def _bnb_model(folder, quant_type="nf4", double_quant=True):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.set_num_threads(1)
    kwargs = {}
    cfg_json = json.loads((folder / "config.json").read_text())
    if "quantization_config" not in cfg_json:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32, **kwargs)


def _logits(model) -> np.ndarray:
    import torch

    model.train()  # see the module docstring
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).logits.numpy()


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_transformers_4bit_folder_loads_as_linear4bit(base, tmp_path, quant_type, double_quant):
    import bitsandbytes.functional as BF

    theirs = _bnb_model(base, quant_type, double_quant)
    theirs.save_pretrained(tmp_path / "q")
    file_tensors, _ = S.read_safetensors_raw(tmp_path / "q" / "model.safetensors")
    ours = Llama.from_pretrained(tmp_path / "q")
    assert ours.quantization_config["bnb_4bit_quant_type"] == quant_type
    for i in range(TINY["num_hidden_layers"]):
        for proj in LINEAR:
            name = f"model.layers.{i}.{proj}"
            layer = ours.get_submodule(name)
            assert isinstance(layer, Linear4bit)
            assert layer.quant_type == quant_type and layer.double_quant == double_quant
            # the codes, scales and nested scales are the file's ...
            packed, state = S.state_from_tensors(file_tensors, f"{name}.weight")
            assert np.array_equal(layer.weight.data.reshape(-1), packed)
            assert np.array_equal(layer.quant_state.absmax, state.absmax)
            if double_quant:
                assert np.array_equal(layer.quant_state.state2.absmax, state.state2.absmax)
                assert layer.quant_state.offset == state.offset
            # ... and bitsandbytes' own, which dequantize to the same weight
            bnb_param = theirs.get_submodule(name).weight
            assert np.array_equal(layer.weight.data.reshape(-1), bnb_param.data.numpy().reshape(-1))
            assert np.array_equal(layer.dequantize(), BF.dequantize_4bit(bnb_param.data, bnb_param.quant_state).numpy())
    assert type(ours.lm_head).__name__ == "Linear"  # transformers keeps lm_head in floating point
    np.testing.assert_allclose(np.asarray(ours(IDS)), _logits(theirs), rtol=0, atol=2e-6)


def test_our_quantized_folder_gives_transformers_4bit_logits(base, tmp_path):
    out = tmp_path / "ours"
    assert main(["quantize", "--base", str(base), "--out", str(out), "--double-quant", "--rounding", "cpu",
                 "--json"]) == 0
    ours = Llama.from_pretrained(out)
    assert isinstance(ours.model.layers[1].mlp.down_proj, Linear4bit)
    theirs = _bnb_model(out)
    np.testing.assert_allclose(np.asarray(ours(IDS)), _logits(theirs), rtol=0, atol=2e-6)
    # bitsandbytes' CPU quantization of the same float weights gives the same codes (rounding="cpu")
    requant = _bnb_model(base, "nf4", True)
    for i in range(TINY["num_hidden_layers"]):
        for proj in LINEAR:
            name = f"model.layers.{i}.{proj}"
            assert np.array_equal(ours.get_submodule(name).weight.data.reshape(-1),
                                  requant.get_submodule(name).weight.data.numpy().reshape(-1)), name


@pytest.fixture(scope="module")
def qlora_adapter(base, tmp_path_factory):
    """A PEFT LoRA adapter (random A and B, all linear layers, rank 4) written by PEFT."""
    import peft
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights=False))
    with torch.no_grad():  # B = 0 would make every merge trivially exact
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    pm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bnb_folder(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("bnbq") / "q"
    _bnb_model(base, "nf4", True).save_pretrained(path)
    (path / "tokenizer.json").write_text((base / "tokenizer.json").read_text())
    return path


def test_float_merge_into_4bit_base_equals_bitsandbytes_dequantize_then_peft_merge(bnb_folder, qlora_adapter,
                                                                                    tmp_path):
    import bitsandbytes.functional as BF
    import peft
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--base", str(bnb_folder), "--adapter", str(qlora_adapter), "--out", str(out),
                 "--json"]) == 0
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    assert (out / "tokenizer.json").read_text() == (bnb_folder / "tokenizer.json").read_text()
    ours, _ = S.read_safetensors_raw(out / "model.safetensors")

    # the reference: every 4-bit weight dequantized by bitsandbytes into a float model, then PEFT's merge
    q = _bnb_model(bnb_folder)
    ref = LlamaForCausalLM(LlamaConfig(**TINY))
    with torch.no_grad():
        sd = {}
        for name, module in q.named_modules():
            if type(module).__name__ == "Linear4bit":
                sd[f"{name}.weight"] = BF.dequantize_4bit(module.weight.data, module.weight.quant_state)
        for name, p in q.named_parameters():
            if p.dtype.is_floating_point and name not in sd:
                sd[name] = p.data
        ref.load_state_dict(sd, strict=True)
    merged = peft.PeftModel.from_pretrained(ref, qlora_adapter).merge_and_unload()
    theirs = {k: v.numpy() for k, v in merged.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k].dtype == np.float32
        assert np.array_equal(ours[k], theirs[k]), k
    # and the adapter mattered
    name = "model.layers.0.mlp.up_proj.weight"
    assert not np.array_equal(ours[name], sd[name].numpy())


def test_requantize_merge_equals_peft_merge_on_the_bitsandbytes_model(bnb_folder, qlora_adapter, tmp_path):
    import peft

    out = tmp_path / "merged4"
    assert main(["merge", "--base", str(bnb_folder), "--adapter", str(qlora_adapter), "--out", str(out),
                 "--quantized", "requantize", "--rounding", "cpu", "--json"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    ours = Llama.from_pretrained(out)

    q = _bnb_model(bnb_folder)  # no forward before the merge (module docstring)
    merged = peft.PeftModel.from_pretrained(q, qlora_adapter).merge_and_unload()
    for i in range(TINY["num_hidden_layers"]):
        for proj in LINEAR:
            name = f"model.layers.{i}.{proj}"
            mine, theirs = ours.get_submodule(name), merged.get_submodule(name)
            assert type(theirs).__name__ == "Linear4bit"
            assert np.array_equal(mine.weight.data.reshape(-1), theirs.weight.data.numpy().reshape(-1)), name
            qs = theirs.weight.quant_state
            assert np.array_equal(mine.quant_state.absmax, qs.absmax.numpy()), name
            assert np.array_equal(mine.quant_state.state2.absmax, qs.state2.absmax.numpy()), name
    np.testing.assert_allclose(np.asarray(ours(IDS)), _logits(merged), rtol=0, atol=2e-6)
    base_codes = S.read_safetensors_raw(bnb_folder / "model.safetensors")[0]["model.layers.0.mlp.up_proj.weight"]
    assert not np.array_equal(ours.model.layers[0].mlp.up_proj.weight.data, base_codes)  # the adapter mattered
