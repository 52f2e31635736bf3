"""Reading 4-bit checkpoints: a bitsandbytes NF4/FP4 folder loads with its linear layers as ``Linear4bit`` (the
file's codes, never a float copy), and generate, QLoRA fine-tuning and merge run on it directly.

The expected values come from an independent route: the file's tensors dequantized by
:func:`lora_ref.quant.serialize.dequantize_state_dict` into a plain float model, and the LoRA delta computed here
with NumPy. The comparison with transformers + bitsandbytes + PEFT is in tests/interop/test_4bit_interop.py.
"""

from __future__ import annotations

import json
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

from lora_ref.adapters.qlora import Linear4bit
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.quant import serialize as S
from lora_ref.quant.blockwise import quantize_4bit
from lora_ref.testing import tiny_llama_config

TINY = tiny_llama_config(vocab_size=256, tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")
IDS = np.array([[1, 5, 9, 33, 90, 7, 2, 64, 11, 0, 255, 3]])


def linear_names(n_layers=2):
    return [f"model.layers.{i}.{p}" for i in range(n_layers) for p in LINEAR]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A float32 tiny Llama (byte vocabulary, attention biases) written by lora_ref, with side files."""
    path = tmp_path_factory.mktemp("q4") / "base"
    Llama(LlamaConfig(**TINY), rng=np.random.default_rng(0)).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja"):
        (path / f).write_text(json.dumps({"file": f}))
    return path


@pytest.fixture(scope="module")
def q4(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("q4out") / "nf4"
    assert main(["quantize", "--base", str(base), "--out", str(out), "--double-quant", "--json"]) == 0
    return out


def dequantized_model(folder) -> Llama:
    """The independent reference: the file's tensors dequantized into a plain float32 Llama."""
    tensors, _ = S.read_safetensors_raw(folder / "model.safetensors")
    model = Llama(LlamaConfig.from_json_file(folder / "config.json"))
    model.load_checkpoint_tensors({k: v.astype(np.float32) for k, v in S.dequantize_state_dict(tensors).items()})
    return model


@pytest.mark.parametrize("args", [["--double-quant"], ["--quant-type", "fp4", "--blocksize", "128"]])
def test_quantized_folder_loads_the_files_codes(base, tmp_path, args):
    out = tmp_path / "q"
    assert main(["quantize", "--base", str(base), "--out", str(out), "--json", *args]) == 0
    tensors, _ = S.read_safetensors_raw(out / "model.safetensors")
    model = Llama.from_pretrained(out)
    assert model.quantization_config == json.loads((out / "config.json").read_text())["quantization_config"]
    for name in linear_names():
        layer = model.get_submodule(name)
        assert isinstance(layer, Linear4bit) and layer.weight.dtype == np.uint8
        packed, state = S.state_from_tensors(tensors, f"{name}.weight")
        assert np.array_equal(layer.weight.data.reshape(-1), packed)
        assert np.array_equal(layer.quant_state.absmax, state.absmax)
        assert (layer.quant_type, layer.blocksize, layer.double_quant) == (state.quant_type, state.blocksize,
                                                                           state.nested)
        assert np.array_equal(layer.bias.data, tensors[f"{name}.bias"])
    assert type(model.lm_head).__name__ == "Linear" and type(model.model.embed_tokens).__name__ == "Embedding"
    ref = dequantized_model(out)
    np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(ref(IDS)), rtol=0, atol=1e-5)
    # the quantization mattered: the float base is visibly different
    assert np.abs(np.asarray(Llama.from_pretrained(base)(IDS)) - np.asarray(ref(IDS))).max() > 1e-3


def test_bfloat16_and_sharded_4bit_folder(tmp_path):
    """A bfloat16 base quantized keeps bfloat16 as the state dtype; a sharded 4-bit folder loads as well."""
    base = tmp_path / "b"
    Llama(LlamaConfig(**TINY), rng=np.random.default_rng(3)).save_pretrained(base)
    tensors, _ = S.read_safetensors_raw(base / "model.safetensors")
    S.write_safetensors(base / "model.safetensors", {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()})
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    out = tmp_path / "q"
    assert main(["quantize", "--base", str(base), "--out", str(out), "--json"]) == 0
    q, _ = S.read_safetensors_raw(out / "model.safetensors")
    # re-shard the 4-bit file: each weight's companions in the shard of the weight
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((out / "config.json").read_text())
    weight_map = {k: ("model-00001-of-00002.safetensors" if ".layers.0." in k else "model-00002-of-00002.safetensors")
                  for k in q}
    for fname in sorted(set(weight_map.values())):
        S.write_safetensors(shard_dir / fname, {k: v for k, v in q.items() if weight_map[k] == fname})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = Llama.from_pretrained(shard_dir)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, Linear4bit) and layer.quant_state.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_allclose(np.asarray(model(IDS)), np.asarray(dequantized_model(out)(IDS)), rtol=0, atol=1e-5)


def test_a_4bit_load_makes_no_float_copy_of_the_quantized_weights(q4):
    """Traced peak while loading stays below the float32 size of the quantized weights alone: no float array of
    any of them is ever made (the 4-bit layers hold 4.13 bits per weight; embeddings and lm_head are float)."""
    cfg = LlamaConfig(**TINY)
    linear_bytes = 4 * cfg.num_hidden_layers * (cfg.hidden_size * (cfg.hidden_size * 2 + 2 * 32)
                                                + 3 * cfg.hidden_size * cfg.intermediate_size)
    float_rest = 4 * (2 * cfg.vocab_size * cfg.hidden_size)  # embed_tokens + lm_head stay float32
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base_mem = tracemalloc.get_traced_memory()[0]
        model = Llama.from_pretrained(q4)
        peak = tracemalloc.get_traced_memory()[1] - base_mem
    finally:
        tracemalloc.stop()
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    # float parts + 4-bit parts (< 1/4 of the float linear bytes, generously) + slack for Python objects
    assert peak < float_rest + linear_bytes / 4 + 256 * 1024, (peak, float_rest, linear_bytes)


def test_generate_on_a_4bit_folder(q4, tmp_path, capsys):
    import shutil

    folder = tmp_path / "nf4"  # the byte-level model: without the placeholder tokenizer files the fixture copies
    shutil.copytree(q4, folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / f).unlink()
    prompt = "def f("
    assert main(["generate", "--model", str(folder), "--prompt", prompt, "--max-new-tokens", "12", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ref = dequantized_model(q4).generate(np.frombuffer(prompt.encode(), np.uint8).astype(np.int64)[None], 12)
    assert doc["token_ids"][-12:] == ref[0, -12:].tolist()


@pytest.fixture
def byte_q4(q4, tmp_path):
    """The 4-bit folder as a byte-level model (without the placeholder tokenizer files the base fixture copies)."""
    import shutil

    folder = tmp_path / "nf4-bytes"
    shutil.copytree(q4, folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / f).unlink()
    return folder


def test_eval_on_a_4bit_folder(byte_q4, tmp_path, capsys):
    text = "def f(x):\n    return x * 2  # doubles\n"
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval", "--model", str(byte_q4), "--data", str(tmp_path / "t.txt"), "--seq", "16", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    ids = np.frombuffer(text.encode(), np.uint8).astype(np.int64)
    model = dequantized_model(byte_q4)
    nll, count = 0.0, 0
    for start in range(0, ids.size, 16):  # consecutive windows of 16; a last one of >= 2 tokens counts
        w = ids[start:start + 16]
        if w.size < 2:
            continue
        z = np.asarray(model(w[None]).data, np.float64)[0, :-1]  # (T-1, V)
        logp = z - z.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        nll -= logp[np.arange(w.size - 1), w[1:]].sum()
        count += w.size - 1
    assert doc["tokens"] == count and doc["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_qlora_finetune_command_on_a_4bit_folder(byte_q4, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 8)
    before = (byte_q4 / "model.safetensors").read_bytes()
    out = tmp_path / "adapter"
    assert main(["finetune", "--model", str(byte_q4), "--data", str(tmp_path / "t.txt"), "--method", "qlora",
                 "--steps", "3", "--seq", "32", "--batch", "2", "--lr", "1e-2", "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["train_loss_last"] < doc["train_loss_first"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (byte_q4 / "model.safetensors").read_bytes() == before  # the base is only read
    for method in ("lora", "full"):  # a 4-bit base trains only adapters
        assert main(["finetune", "--model", str(byte_q4), "--data", str(tmp_path / "t.txt"), "--method", method,
                     "--steps", "1", "--seq", "32"]) == 1
        assert "already quantized to 4 bits" in capsys.readouterr().err


def test_qlora_finetune_uses_the_4bit_base_as_it_is(q4, tmp_path):
    from lora_ref.adapters.peft_files import save_adapter
    from lora_ref.commands.finetune import finetune, prepare_model

    tensors, _ = S.read_safetensors_raw(q4 / "model.safetensors")
    model, hist, summary = finetune("qlora", base=Llama.from_pretrained(q4), r=4, alpha=8, targets=["all-linear"],
                                    steps=3, batch=2, seq=32, seed=0, progress=False, eval_batches=1)
    assert summary["trainable_parameters"] == sum(4 * (l.in_features + l.out_features)
                                                  for l in map(model.get_submodule, linear_names()))
    for name in linear_names():
        layer = model.get_submodule(name).base_layer
        assert isinstance(layer, Linear4bit)  # not re-quantized: the file's codes after training too
        assert np.array_equal(layer.weight.data, tensors[f"{name}.weight"])
        assert np.array_equal(layer.quant_state.absmax, tensors[f"{name}.weight.absmax"])
    assert any(np.abs(l.lora_B["default"].weight.data).max() > 0 for l in map(model.get_submodule, linear_names()))
    save_adapter(model, tmp_path / "adapter")
    for method in ("lora", "full"):
        with pytest.raises(ValueError, match="already quantized to 4 bits.*use --method qlora"):
            prepare_model(method, base=Llama.from_pretrained(q4))


@pytest.fixture(scope="module")
def adapter(q4, tmp_path_factory):
    """A QLoRA adapter on the 4-bit base with random A and B (all linear layers, with lora_B biases)."""
    from lora_ref.adapters.lora import LoraConfig
    from lora_ref.adapters.peft_files import save_adapter
    from lora_ref.adapters.qlora import inject_qlora

    rng = np.random.default_rng(5)
    model = inject_qlora(Llama.from_pretrained(q4), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               init_lora_weights=False, lora_bias=True), rng=rng)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_B"):
            layer.lora_B["default"].weight.data[...] = rng.normal(0, 0.05, layer.lora_B["default"].weight.shape)
            layer.lora_B["default"].bias.data[...] = rng.normal(0, 0.05, layer.lora_B["default"].bias.shape)
    path = tmp_path_factory.mktemp("qadapter") / "a"
    save_adapter(model, path)
    return path


def test_merge_into_a_4bit_base_writes_the_dequantized_merge(q4, adapter, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["merge", "--base", str(q4), "--adapter", str(adapter), "--out", str(out)]) == 0
    assert "into the dequantized 4-bit base" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "chat_template.jinja"):
        assert (out / f).read_bytes() == (q4 / f).read_bytes(), f
    merged, _ = S.read_safetensors_raw(out / "model.safetensors")
    deq = S.dequantize_state_dict(S.read_safetensors_raw(q4 / "model.safetensors")[0])
    ad, _ = S.read_safetensors_raw(adapter / "adapter_model.safetensors")
    s = 8 / 4
    assert sorted(merged) == sorted(deq)
    for name in linear_names():
        A, B = ad[f"base_model.model.{name}.lora_A.weight"], ad[f"base_model.model.{name}.lora_B.weight"]
        expected = deq[f"{name}.weight"].astype(np.float32) + (B @ A) * np.float32(s)
        np.testing.assert_allclose(merged[f"{name}.weight"], expected, rtol=0, atol=2e-7)
        b_expected = deq[f"{name}.bias"] + ad[f"base_model.model.{name}.lora_B.bias"] * np.float32(s)
        np.testing.assert_allclose(merged[f"{name}.bias"], b_expected, rtol=0, atol=1e-7)
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert np.array_equal(merged[k], deq[k])
    # the merged float model computes what the QLoRA model computes
    from lora_ref.adapters.peft_files import load_adapter
    from lora_ref.adapters.qlora import to_qlora_layers

    qlora = to_qlora_layers(load_adapter(Llama.from_pretrained(q4), adapter))
    np.testing.assert_allclose(np.asarray(Llama.from_pretrained(out)(IDS)), np.asarray(qlora(IDS)), rtol=0,
                               atol=1e-4)


@pytest.mark.parametrize("strategy", ["requantize", "refit"])
def test_merge_into_a_4bit_base_can_write_4bit(q4, adapter, tmp_path, capsys, strategy):
    from lora_ref.adapters.peft_files import load_adapter
    from lora_ref.adapters.qlora import merge_and_unload_4bit, quantize_4bit_refit, to_qlora_layers

    out = tmp_path / strategy
    assert main(["merge", "--base", str(q4), "--adapter", str(adapter), "--out", str(out), "--quantized",
                 strategy, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["quantized"] == strategy and doc["base_4bit"] and doc["merged_layers"] == 14
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"]
    written, _ = S.read_safetensors_raw(out / "model.safetensors")
    deq = S.dequantize_state_dict(S.read_safetensors_raw(q4 / "model.safetensors")[0])
    ad, _ = S.read_safetensors_raw(adapter / "adapter_model.safetensors")
    for name in linear_names():
        A, B = ad[f"base_model.model.{name}.lora_A.weight"], ad[f"base_model.model.{name}.lora_B.weight"]
        target = deq[f"{name}.weight"].astype(np.float32) + (B @ A) * np.float32(2.0)
        packed, state = S.state_from_tensors(written, f"{name}.weight")
        expected = quantize_4bit(target, 64, "nf4", True)[0] if strategy == "requantize" else \
            quantize_4bit_refit(target, 64, "nf4", True)[0]
        assert np.array_equal(packed, expected), name
    # the same as merging the loaded QLoRA model in memory
    model = merge_and_unload_4bit(to_qlora_layers(load_adapter(Llama.from_pretrained(q4), adapter)), strategy)
    np.testing.assert_array_equal(np.asarray(Llama.from_pretrained(out)(IDS)), np.asarray(model(IDS)))


def test_4bit_folder_errors(q4, base, tmp_path):
    import shutil

    def variant(name, edit_config=None, tensors=None):
        d = tmp_path / name
        shutil.copytree(q4, d)
        if edit_config is not None:
            cfg = json.loads((d / "config.json").read_text())
            edit_config(cfg)
            (d / "config.json").write_text(json.dumps(cfg))
        if tensors is not None:
            S.write_safetensors(d / "model.safetensors", tensors)
        return d

    eight = variant("eight", lambda c: c["quantization_config"].update(load_in_8bit=True, _load_in_8bit=True,
                                                                       load_in_4bit=False, _load_in_4bit=False))
    with pytest.raises(ValueError, match="8-bit .* not supported"):
        Llama.from_pretrained(eight)
    other = variant("gptq", lambda c: c["quantization_config"].update(quant_method="gptq"))
    with pytest.raises(ValueError, match="quant_method 'gptq' is not supported"):
        Llama.from_pretrained(other)
    no_cfg = variant("nocfg", lambda c: c.pop("quantization_config"))
    with pytest.raises(ValueError, match="has dtype U8.*without its quantization_config"):
        Llama.from_pretrained(no_cfg)
    floats, _ = S.read_safetensors_raw(base / "model.safetensors")
    no_tensors = variant("notensors", tensors=floats)
    with pytest.raises(ValueError, match="no tensor has a '.quant_state.bitsandbytes__nf4|fp4' companion"):
        Llama.from_pretrained(no_tensors)
    q, _ = S.read_safetensors_raw(q4 / "model.safetensors")
    q.pop("model.layers.1.mlp.up_proj.weight.absmax")
    missing = variant("missing", tensors=q)
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight.absmax'"):
        Llama.from_pretrained(missing)
    with pytest.raises(ValueError, match="4-bit checkpoint; its layers compute in float32"):
        Llama.from_pretrained(q4, dtype=np.float64)
    # the command line: one line, exit 2 for --quantized on a float base, nothing written
    assert main(["merge", "--base", str(base), "--adapter", str(tmp_path), "--quantized", "requantize",
                 "--out", str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()


def test_smollm2_quantized_generates(smollm2_dir, tmp_path):
    """The real model: quantized by lora-ref quantize (NF4, double quantization), loaded in 4 bits, a few greedy
    tokens. The reference is the same folder's tensors dequantized into a float model (these weights are the
    Q4_1-dequantized release, so NF4 adds its error on top of Q4_1's; the two routes here share the NF4 codes)."""
    out = tmp_path / "smollm2-nf4"
    assert main(["quantize", "--base", str(smollm2_dir), "--out", str(out), "--double-quant", "--json"]) == 0
    assert (out / "tokenizer.json").is_file()
    model = Llama.from_pretrained(out)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 30 * 7
    ids = np.array([[1, 9690, 198, 2683, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    ref_model = dequantized_model(out)
    assert np.array_equal(model.generate(ids, 4), ref_model.generate(ids, 4))  # the fused 4-bit kernel
    # dequantize-then-BLAS 4-bit layers do the float model's arithmetic: logits equal to float32 rounding
    deq_layers = Llama.from_pretrained(out, impl="numpy")
    np.testing.assert_allclose(np.asarray(deq_layers(ids)), np.asarray(ref_model(ids)), rtol=0, atol=1e-5)


def test_save_4bit_pretrained_round_trip_and_refusals(q4, tmp_path):
    """The library's 4-bit writer: a folder from_pretrained reads back to the same codes, scales and biases;
    a model with parameters a Llama checkpoint lacks (a LoRA layer) or without 4-bit layers is refused."""
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.modeling.llama import save_4bit_pretrained

    model = Llama.from_pretrained(q4)
    save_4bit_pretrained(model, tmp_path / "again")
    back = Llama.from_pretrained(tmp_path / "again")
    assert back.quantization_config["bnb_4bit_use_double_quant"] is True
    for name in linear_names():
        a, b = model.get_submodule(name), back.get_submodule(name)
        np.testing.assert_array_equal(a.weight.data, b.weight.data)
        np.testing.assert_array_equal(a.dequantize(), b.dequantize())
        np.testing.assert_array_equal(a.bias.data, b.bias.data)
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="first difference: 'model.layers.0.self_attn.q_proj.base_layer"):
        save_4bit_pretrained(model, tmp_path / "lora")
    with pytest.raises(ValueError, match="4-bit layers of one kind, found none"):
        save_4bit_pretrained(Llama(LlamaConfig(**TINY)), tmp_path / "float")
    assert not (tmp_path / "lora").exists() and not (tmp_path / "float").exists()
