"""``lora-ref quantize`` writes a checkpoint that transformers + bitsandbytes load, and reads theirs.

The tiny Llama is built with transformers (random weights, ``save_pretrained``). Its linear layers have
in_features 64 and 128, multiples of the blocksize, where bitsandbytes' CPU dequantization is exact (see
tests/interop/test_quant_interop.py for the shapes where it is not).

transformers runs in train mode: in eval mode without gradients, bitsandbytes 0.50.2 on an AVX512-BF16 CPU repacks
each Linear4bit weight and computes in bfloat16 (logits then differ by ~1e-3). Dropout is 0 in this model, so train
mode is deterministic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_ref.cli import main
from lora_ref.quant import dequantize_4bit, quantize_4bit
from lora_ref.quant import serialize as S
from lora_ref.testing import tiny_llama_config

TINY = tiny_llama_config(vocab_size=96, max_position_embeddings=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "base"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    return path


def quantize(base, out, *extra):
    return main(["quantize", "--base", str(base), "--out", str(out), *extra])


@pytest.mark.interop
def test_json_report_and_files(base, tmp_path, capsys):
    out = tmp_path / "q"
    assert quantize(base, out, "--double-quant", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["tensors"] == 14 and report["total"]["params"] == 2 * (2 * 64 * 64 + 2 * 32 * 64
                                                                                  + 3 * 64 * 128)
    assert 0.08 < report["total"]["rel_frobenius_error"] < 0.11  # NF4 on Gaussian weights: ~0.092
    assert 4.12 < report["total"]["bits_per_param"] < 4.16
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= set(report["kept_in_float"])
    # the numbers are what the written tensors give
    base_t, _ = S.read_safetensors_raw(base / "model.safetensors")
    out_t, meta = S.read_safetensors_raw(out / "model.safetensors")
    assert meta == {"format": "pt"}
    row = next(r for r in report["tensors"] if r["name"] == "model.layers.1.mlp.down_proj.weight")
    packed, state = S.state_from_tensors(out_t, row["name"])
    w, w_hat = base_t[row["name"]].astype(np.float64), dequantize_4bit(packed, state).astype(np.float64)
    assert row["rel_frobenius_error"] == pytest.approx(np.linalg.norm(w - w_hat) / np.linalg.norm(w), rel=1e-12)
    assert row["max_abs_error"] == pytest.approx(np.abs(w - w_hat).max(), rel=1e-12)
    assert np.array_equal(out_t["lm_head.weight"], base_t["lm_head.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert (out / "generation_config.json").is_file()


@pytest.mark.interop
def test_quantization_config_is_what_transformers_writes():
    import torch
    from transformers import BitsAndBytesConfig

    for qt, dq in (("nf4", True), ("fp4", False)):
        theirs = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq,
                                    bnb_4bit_compute_dtype=torch.float32).to_dict()
        theirs["bnb_4bit_compute_dtype"] = str(theirs["bnb_4bit_compute_dtype"]).replace("torch.", "")
        assert S.transformers_quantization_config(qt, dq, "float32") == theirs


@pytest.mark.interop
def test_transformers_loads_our_checkpoint_and_logits_match(base, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from lora_ref.modeling.llama import Llama

    torch.set_num_threads(1)
    out = tmp_path / "q"
    assert quantize(base, out, "--quant-type", "nf4", "--double-quant") == 0
    text = capsys.readouterr().out
    assert "total" in text and "bits/param" in text
    model = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.quant_state.nested
    model.train()  # see the module docstring
    ids = np.array([[1, 5, 9, 33, 90, 7, 2, 64, 11, 0]])
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    tensors, _ = S.read_safetensors_raw(out / "model.safetensors")
    ours_model = Llama.from_pretrained(base)
    ours_model.load_checkpoint_tensors({k: v.astype(np.float32) for k, v in S.dequantize_state_dict(tensors).items()})
    ours = np.asarray(ours_model(ids))
    assert ours.shape == theirs.shape == (1, 10, TINY["vocab_size"])
    assert np.abs(ours - theirs).max() <= 1e-4
    # and the quantization mattered: the float base gives visibly different logits
    assert np.abs(np.asarray(Llama.from_pretrained(base)(ids)) - theirs).max() > 1e-3


@pytest.mark.interop
def test_we_read_a_checkpoint_transformers_quantized(base, tmp_path):
    import bitsandbytes.functional as F
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=cfg, device_map="cpu")
    model.save_pretrained(tmp_path / "theirs")
    tensors, _ = S.read_safetensors_raw(tmp_path / "theirs" / "model.safetensors")
    names = S.quantized_weight_names(tensors)
    assert len(names) == 14
    deq = S.dequantize_state_dict(tensors)
    for name in names:
        module = model.get_submodule(name.rsplit(".", 1)[0])
        ref = F.dequantize_4bit(module.weight.data, module.weight.quant_state).numpy()
        assert np.array_equal(deq[name], ref), name
        packed, state = S.state_from_tensors(tensors, name)
        written = S.state_to_tensors(name, packed, state)
        for k, v in written.items():  # we write back their bytes exactly
            assert np.array_equal(np.ascontiguousarray(v).view(np.uint8), tensors[k].view(np.uint8)), k
    # their 4-bit codes are ours: bitsandbytes' CPU path, FP4
    w = S.read_safetensors_raw(base / "model.safetensors")[0]["model.layers.0.self_attn.q_proj.weight"]
    packed, _ = quantize_4bit(w, quant_type="fp4", rounding="cpu")
    assert np.array_equal(packed, tensors["model.layers.0.self_attn.q_proj.weight"].reshape(-1))


def test_quantize_without_interop_libraries(tmp_path, capsys):
    """A base written by hand (no transformers): bfloat16 weights keep their dtype; FP4 at blocksize 128."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    base = tmp_path / "b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "bfloat16"}))
    (base / "tokenizer.json").write_text("{}")
    w = (rng.standard_normal((48, 256)) * 0.02).astype(ml_dtypes.bfloat16)
    emb = rng.standard_normal((10, 256)).astype(ml_dtypes.bfloat16)
    S.write_safetensors(base / "model.safetensors", {"model.layers.0.mlp.up_proj.weight": w,
                                                     "model.embed_tokens.weight": emb})
    out = tmp_path / "o"
    assert quantize(base, out, "--quant-type", "fp4", "--blocksize", "128", "--rounding", "cpu", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weight_dtypes"] == ["bfloat16"] and report["total"]["bits_per_param"] == 4 + 32 / 128
    t, _ = S.read_safetensors_raw(out / "model.safetensors")
    assert t["model.embed_tokens.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(t["model.embed_tokens.weight"].view(np.uint16), emb.view(np.uint16))
    packed, state = S.state_from_tensors(t, "model.layers.0.mlp.up_proj.weight")
    assert state.dtype == np.dtype(ml_dtypes.bfloat16) and state.quant_type == "fp4" and state.blocksize == 128
    expected, _ = quantize_4bit(w, blocksize=128, quant_type="fp4", rounding="cpu")
    assert np.array_equal(packed, expected)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file()


def test_sharded_base(tmp_path, capsys):
    rng = np.random.default_rng(1)
    base = tmp_path / "b"
    base.mkdir()
    (base / "config.json").write_text("{}")
    q = rng.standard_normal((64, 64)).astype(np.float32)
    o = rng.standard_normal((64, 64)).astype(np.float32)
    S.write_safetensors(base / "model-00001-of-00002.safetensors", {"model.layers.0.self_attn.q_proj.weight": q})
    S.write_safetensors(base / "model-00002-of-00002.safetensors", {"model.layers.0.self_attn.o_proj.weight": o})
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.self_attn.q_proj.weight": "model-00001-of-00002.safetensors",
        "model.layers.0.self_attn.o_proj.weight": "model-00002-of-00002.safetensors"}}))
    out = tmp_path / "o"
    assert quantize(base, out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["total"]["tensors"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    t, _ = S.read_safetensors_raw(out / "model.safetensors")
    for name, w in (("model.layers.0.self_attn.q_proj.weight", q), ("model.layers.0.self_attn.o_proj.weight", o)):
        packed, state = S.state_from_tensors(t, name)
        assert np.array_equal(packed, quantize_4bit(w)[0])
