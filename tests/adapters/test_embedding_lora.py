"""LoRA on an embedding table and modules_to_save, against float64 references written out here; bad input."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.adapters.embedding import LoraEmbedding
from lora_ref.adapters.lora import LoraConfig, disable_adapters, inject_lora, merge_and_unload, unload
from lora_ref.adapters.modules_to_save import ModulesToSave
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.modeling.nn import Embedding
from lora_ref.testing import tiny_llama_config

TINY = tiny_llama_config(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=False)


@given(seed=st.integers(0, 2**16), r=st.integers(1, 6), alpha=st.sampled_from([1.0, 8.0, 32.0]),
       rslora=st.booleans())
def test_forward_and_merge_equal_the_float64_formula(seed, r, alpha, rslora):
    rng = np.random.default_rng(seed)
    E = Embedding(30, 12, rng=rng, std=1.0)
    E0 = E.weight.data.astype(np.float64).copy()
    layer = LoraEmbedding(E, "default", r, alpha, use_rslora=rslora, init_lora_weights=False, rng=rng)
    s = alpha / np.sqrt(r) if rslora else alpha / r
    A, B = layer.lora_embedding_A["default"].data, layer.lora_embedding_B["default"].data
    assert A.shape == (r, 30) and B.shape == (12, r) and layer.scaling["default"] == pytest.approx(s)
    ids = rng.integers(0, 30, size=(3, 5))
    ref = (E0 + s * (B.astype(np.float64) @ A).T)[ids]
    with no_grad():
        np.testing.assert_allclose(np.asarray(layer(ids).data), ref, rtol=1e-4, atol=1e-4)
        layer.merge()
        np.testing.assert_allclose(E.weight.data, E0 + s * (B.astype(np.float64) @ A).T, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(np.asarray(layer(ids).data), ref, rtol=1e-4, atol=1e-4)
        layer.unmerge()
    np.testing.assert_allclose(E.weight.data, E0, atol=1e-4)


def test_default_init_is_a_no_op_and_refusals():
    rng = np.random.default_rng(0)
    E = Embedding(10, 4, rng=rng)
    layer = LoraEmbedding(E, "default", 2, 4, rng=rng)
    assert np.all(layer.lora_embedding_A["default"].data == 0) and np.abs(layer.lora_embedding_B["default"].data).max() > 0
    for kw, word in ((dict(use_dora=True), "DoRA"), (dict(lora_bias=True), "lora_bias"),
                     (dict(init_lora_weights="pissa"), "pissa")):
        with pytest.raises(ValueError, match=word):
            LoraEmbedding(Embedding(10, 4), "default", 2, 4, rng=rng, **kw)


def test_modules_to_save_wraps_trains_and_unwraps():
    model = Llama(LlamaConfig(**TINY), rng=np.random.default_rng(1))
    head0 = model.lm_head.weight.data.copy()
    inject_lora(model, LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
                rng=np.random.default_rng(2))
    assert isinstance(model.model.embed_tokens, LoraEmbedding) and isinstance(model.lm_head, ModulesToSave)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.modules_to_save.default.weight" in trainable
    assert "lm_head.original_module.weight" not in trainable
    model.lm_head.modules_to_save["default"].weight.data[...] += 1.0
    ids = np.array([[1, 2, 3]])
    with no_grad():
        y = np.asarray(model(ids).data)
        with disable_adapters(model):
            y0 = np.asarray(model(ids).data)
    assert np.abs(y - y0).max() > 0.5
    merged = merge_and_unload(model)
    np.testing.assert_array_equal(merged.lm_head.weight.data, head0 + 1.0)  # the trained copy replaces the head
    model2 = Llama(LlamaConfig(**TINY), rng=np.random.default_rng(1))
    inject_lora(model2, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                rng=np.random.default_rng(2))
    model2.lm_head.modules_to_save["default"].weight.data[...] += 1.0
    assert np.array_equal(unload(model2).lm_head.weight.data, head0 + 1.0)  # as PEFT's unload


def test_bad_modules_to_save_are_one_line_errors():
    model = Llama(LlamaConfig(**TINY), rng=np.random.default_rng(1))
    with pytest.raises(ValueError, match="modules_to_save names 'score', but the model has no such module") as ei:
        inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"]))
    assert "\n" not in str(ei.value)
    assert not hasattr(model, "peft_config") and type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    with pytest.raises(ValueError, match="both a LoRA target and in modules_to_save"):
        inject_lora(model, LoraConfig(r=2, target_modules=["lm_head"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="list of module names"):
        LoraConfig(modules_to_save="lm_head")


def test_two_adapters_with_modules_to_save_round_trip(tmp_path):
    from lora_ref.adapters.lora import set_adapter
    from lora_ref.adapters.peft_files import load_adapter, save_adapter

    model = Llama(LlamaConfig(**TINY), rng=np.random.default_rng(1))
    inject_lora(model, LoraConfig(r=2, target_modules=["embed_tokens"], modules_to_save=["lm_head"],
                                  init_lora_weights=False), rng=np.random.default_rng(2))
    inject_lora(model, LoraConfig(r=3, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                  init_lora_weights=False), "second", rng=np.random.default_rng(3))
    model.lm_head.modules_to_save["second"].weight.data[...] += 0.5
    set_adapter(model, "second")
    ids = np.array([[3, 1, 4, 1, 5]])
    with no_grad():
        y2 = np.asarray(model(ids).data)
    save_adapter(model, tmp_path / "second", "second")
    save_adapter(model, tmp_path / "first", "default")
    fresh = Llama(LlamaConfig(**TINY), rng=np.random.default_rng(1))
    load_adapter(fresh, tmp_path / "first")
    load_adapter(fresh, tmp_path / "second", "second")
    set_adapter(fresh, "second")
    with no_grad():
        np.testing.assert_allclose(np.asarray(fresh(ids).data), y2, rtol=1e-6, atol=1e-6)
