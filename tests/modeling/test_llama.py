"""The Llama model without transformers: config parsing, RoPE, structure, causality, KV cache, sampling, gradients,
checkpoint files and bad input. Equality with transformers is in ``test_llama_interop.py``."""

import json
import math
import struct

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.autograd import functional as F
from lora_ref.autograd.numerical import gradcheck
from lora_ref.autograd.tensor import Tensor, no_grad
from lora_ref.modeling.llama import (
    KVCache,
    Llama,
    LlamaConfig,
    apply_rope,
    read_safetensors,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
    sample_next_token,
)
from lora_ref.modeling.nn import Linear, Module
from lora_ref.testing import tiny_llama_config

TINY = tiny_llama_config(vocab_size=40, hidden_size=16, intermediate_size=24, max_position_embeddings=32)


def tiny(**kw) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **kw})


def o1_model(config: LlamaConfig, seed: int = 0, dtype=np.float32) -> Llama:
    """A model whose logits are of order 1 (std 0.02 init gives logits near 0, where every comparison is easy)."""
    rng = np.random.default_rng(seed)
    model = Llama(config, rng=rng, dtype=dtype)
    for name, p in model.named_parameters():
        if p.ndim == 2:
            p.data[...] = rng.normal(0, 1 / math.sqrt(p.shape[1]), p.shape)
        else:
            p.data[...] = 1 + 0.2 * rng.standard_normal(p.shape) if name.endswith("norm.weight") \
                else 0.1 * rng.standard_normal(p.shape)
    return model


# ================================================================================================================
# config
# ================================================================================================================
def test_defaults_are_transformers_llama_defaults():
    c = LlamaConfig()
    # values of transformers 5.24 LlamaConfig()
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads) == \
        (32000, 4096, 11008, 32, 32)
    assert (c.num_key_value_heads, c.head_dim, c.max_position_embeddings) == (32, 128, 2048)
    assert (c.rms_norm_eps, c.rope_theta, c.rope_type, c.tie_word_embeddings) == (1e-6, 10000.0, "default", False)
    assert (c.attention_bias, c.mlp_bias, c.initializer_range) == (False, False, 0.02)


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_both_rope_styles_give_the_same_config():
    base = {**TINY, "max_position_embeddings": 131072}
    new = LlamaConfig.from_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                                             **LLAMA3}})
    old = LlamaConfig.from_dict({**base, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    legacy = LlamaConfig.from_dict({**base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}})
    assert new == old == legacy
    assert new.rope_type == "llama3" and new.rope_theta == 500000.0 and new.rope_parameters["factor"] == 8.0
    plain = LlamaConfig.from_dict({**TINY, "rope_theta": 1234.0, "rope_scaling": None})
    assert plain.rope_type == "default" and plain.rope_theta == 1234.0


def test_llama3_original_context_defaults_to_max_position_embeddings():
    params = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    c = LlamaConfig.from_dict({**TINY, "rope_scaling": {"rope_type": "llama3", **params}})
    assert c.rope_parameters["original_max_position_embeddings"] == TINY["max_position_embeddings"]


def test_unused_keys_are_ignored_and_derived_values_filled_in():
    c = LlamaConfig.from_dict({**TINY, "torch_dtype": "bfloat16", "transformers_version": "4.40.0",
                               "architectures": ["LlamaForCausalLM"], "use_cache": False, "pretraining_tp": 1,
                               "num_key_value_heads": None, "some_future_key": [1, 2]})
    assert c.num_key_value_heads == 4 and c.head_dim == 4
    assert LlamaConfig.from_dict({**TINY, "head_dim": 8}).head_dim == 8


def test_to_dict_round_trips():
    c = tiny(tie_word_embeddings=True, attention_bias=True, head_dim=8, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3})
    d = json.loads(json.dumps(c.to_dict()))
    assert LlamaConfig.from_dict(d) == c
    assert d["model_type"] == "llama" and d["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type 'linear' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3.*needs low_freq_factor, high_freq_factor"),
    ({"rope_scaling": {"rope_type": "llama3", **LLAMA3, "high_freq_factor": 1.0}}, "high_freq_factor > low"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported"),
    ({"attention_dropout": 0.1}, "attention_dropout"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
    ({"hidden_size": 18}, "hidden_size .18. is not a multiple of num_attention_heads"),
    ({"head_dim": 5}, "head_dim must be even"),
    ({"vocab_size": 40.0}, "vocab_size must be a positive integer"),
    ({"num_hidden_layers": 0}, "num_hidden_layers must be a positive integer"),
    ({"rms_norm_eps": 0}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": -1.0}, "rope_theta must be a positive number"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
])
def test_unsupported_config_values_raise(change, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_dict({**TINY, **change})


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"config file not found: .*{tmp_path.name}"):
        LlamaConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config file is not valid JSON .*config.json"):
        LlamaConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match=r"config.json: hidden_act 'relu'"):
        LlamaConfig.from_json_file(tmp_path / "config.json")


# ================================================================================================================
# RoPE
# ================================================================================================================
def test_default_inv_freq_is_the_roformer_formula():
    c = tiny(head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    expected = 500.0 ** (-np.arange(4) * 2 / 8)  # θ_i = base^(−2i/Dh)
    np.testing.assert_allclose(rope_inv_freq(c), expected, rtol=1e-6)


def test_llama3_scaling_keeps_fast_divides_slow_and_blends_between():
    # Dh = 16, base 10000: wavelengths 2π·10000^(i/8) ≈ 6.3, 20, 63, 199, ... ; L = 32, α = 1, β = 4:
    # λ < 8 kept, λ > 32 divided by the factor 8, λ in [8, 32] blended
    params = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    c = tiny(hidden_size=64, head_dim=16, rope_parameters=params)
    base = 10000.0 ** (-np.arange(8) * 2 / 16)
    got = rope_inv_freq(c).astype(np.float64)
    wavelen = 2 * np.pi / base
    assert wavelen[0] < 8 and 8 < wavelen[1] < 32 and np.all(wavelen[2:] > 32)
    np.testing.assert_allclose(got[0], base[0], rtol=1e-6)
    np.testing.assert_allclose(got[2:], base[2:] / 8, rtol=1e-6)
    gamma = (32 / wavelen[1] - 1) / (4 - 1)
    np.testing.assert_allclose(got[1], (1 - gamma) * base[1] / 8 + gamma * base[1], rtol=1e-6)


def test_rotate_half_twice_is_negation():
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, 8)))
    np.testing.assert_array_equal(np.asarray(rotate_half(rotate_half(x))), -x.data)


@given(m=st.integers(0, 60), n=st.integers(0, 60), shift=st.integers(0, 60))
def test_rope_scores_depend_only_on_relative_position(m, n, shift):
    c = tiny(max_position_embeddings=256)
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((1, c.head_dim)), rng.standard_normal((1, c.head_dim))
    inv = rope_inv_freq(c).astype(np.float64)

    def score(a, b):
        ca, sa = rope_cos_sin(inv, np.array([a]), dtype=np.float64)
        cb, sb = rope_cos_sin(inv, np.array([b]), dtype=np.float64)
        return float(np.sum(np.asarray(apply_rope(Tensor(q), ca, sa)) * np.asarray(apply_rope(Tensor(k), cb, sb))))

    assert math.isclose(score(m, n), score(m + shift, n + shift), rel_tol=1e-4, abs_tol=1e-4)


def test_fused_rope_equals_primitives_and_passes_gradcheck():
    c = tiny()
    cos, sin = rope_cos_sin(rope_inv_freq(c).astype(np.float64), np.arange(3, 8), dtype=np.float64)  # (5, Dh)
    x = Tensor(np.random.default_rng(3).standard_normal((2, 3, 5, c.head_dim)), requires_grad=True)
    y = apply_rope(x, cos, sin)
    x2 = Tensor(x.data.copy(), requires_grad=True)
    y2 = x2 * cos + rotate_half(x2) * sin  # the same map from primitives
    np.testing.assert_allclose(np.asarray(y), np.asarray(y2), rtol=0, atol=1e-14)
    w = np.random.default_rng(4).standard_normal(y.shape)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    np.testing.assert_allclose(x.grad, x2.grad, rtol=0, atol=1e-13)
    assert gradcheck(lambda t: apply_rope(t, cos, sin), [x])


def test_rope_preserves_norms():
    c = tiny()
    x = np.random.default_rng(2).standard_normal((3, 5, c.head_dim))
    cos, sin = rope_cos_sin(rope_inv_freq(c).astype(np.float64), np.arange(5), dtype=np.float64)
    y = np.asarray(apply_rope(Tensor(x), cos, sin))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-6)


# ================================================================================================================
# structure
# ================================================================================================================
def test_parameter_names_are_transformers_state_dict_keys():
    model = Llama(tiny(num_hidden_layers=1, attention_bias=True))
    names = sorted(n for n, _ in model.named_parameters())
    p = "model.layers.0."
    assert names == sorted([
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
        p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
        p + "self_attn.q_proj.weight", p + "self_attn.q_proj.bias", p + "self_attn.k_proj.weight",
        p + "self_attn.k_proj.bias", p + "self_attn.v_proj.weight", p + "self_attn.v_proj.bias",
        p + "self_attn.o_proj.weight", p + "self_attn.o_proj.bias",
        p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight", p + "mlp.down_proj.weight"])
    assert sorted(model.checkpoint_names()) == names


def test_shapes_follow_gqa_and_explicit_head_dim():
    model = Llama(tiny(head_dim=8, num_key_value_heads=1))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (4 * 8, 16) and attn.k_proj.weight.shape == (1 * 8, 16)
    assert attn.v_proj.weight.shape == (8, 16) and attn.o_proj.weight.shape == (16, 32)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (16, 24)


def test_all_linear_layers_are_found_through_named_modules():
    model = Llama(tiny())
    linear = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert linear == [f"model.layers.{i}.{s}" for i in range(2) for s in per_layer] + ["lm_head"]


class Doubling(Module):
    """Wraps a layer and doubles its output: proves the model calls the module, not its weight."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) * 2.0


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
                                  "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.o_proj",
                                  "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                  "model.layers.1.mlp.down_proj", "lm_head"])
def test_every_projection_is_called_as_a_module(name):
    model = o1_model(tiny())
    ids = np.array([[1, 2, 3, 4]])
    before = np.asarray(model(ids)).copy()
    wrapper = Doubling(model.get_submodule(name))
    model.set_submodule(name, wrapper)
    after = np.asarray(model(ids))
    assert wrapper.calls == 1
    assert np.abs(after - before).max() > 1e-3


def test_tied_head_is_the_embedding_parameter():
    model = Llama(tiny(tie_word_embeddings=True), rng=np.random.default_rng(0))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in model.checkpoint_names()
    assert model.num_parameters() == Llama(tiny(tie_word_embeddings=False)).num_parameters() - 40 * 16


def test_random_init_is_like_transformers():
    c = tiny(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=300, initializer_range=0.05, pad_token_id=7)
    model = Llama(c, rng=np.random.default_rng(0))
    w = model.model.layers[0].mlp.up_proj.weight.data
    assert abs(w.std() - 0.05) < 0.002 and abs(w.mean()) < 0.002
    assert np.all(model.model.layers[0].input_layernorm.weight.data == 1)
    assert np.all(model.model.embed_tokens.weight.data[7] == 0)  # the padding row
    again = Llama(c, rng=np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# ================================================================================================================
# forward, cache, generation
# ================================================================================================================
def test_float64_model_agrees_with_float32():
    m32 = o1_model(tiny(), seed=3)
    m64 = o1_model(tiny(), seed=3, dtype=np.float64)
    ids = np.random.default_rng(0).integers(0, 40, (2, 9))
    out64 = m64(ids)
    assert out64.dtype == np.float64
    np.testing.assert_allclose(np.asarray(m32(ids)), np.asarray(out64), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        Llama(tiny(), dtype=np.float16)


def test_logits_shape_dtype_and_float64_view():
    model = o1_model(tiny())
    logits = model(np.zeros((3, 5), dtype=np.int32))
    assert isinstance(logits, Tensor) and logits.shape == (3, 5, 40) and logits.dtype == np.float32
    assert np.asarray(logits, dtype=np.float64).dtype == np.float64


def test_future_tokens_do_not_change_past_logits():
    model = o1_model(tiny())
    ids = np.random.default_rng(0).integers(0, 40, (2, 10))
    other = ids.copy()
    other[:, 6:] = (other[:, 6:] + 1) % 40
    a, b = np.asarray(model(ids)), np.asarray(model(other))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_incremental_forward_with_cache_equals_full_forward():
    model = o1_model(tiny(num_key_value_heads=1))
    ids = np.random.default_rng(0).integers(0, 40, (2, 12))
    full = np.asarray(model(ids))
    cache = KVCache(2)
    parts = [np.asarray(model(ids[:, :5], cache=cache))]
    for t in range(5, 12):
        parts.append(np.asarray(model(ids[:, t:t + 1], cache=cache)))
    assert cache.length == 12
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.7, 5)])
def test_generation_with_and_without_cache_agree(temperature, top_k):
    model = o1_model(tiny())
    prompt = np.random.default_rng(0).integers(0, 40, (2, 4))
    a = model.generate(prompt, 12, temperature=temperature, top_k=top_k, rng=np.random.default_rng(5))
    b = model.generate(prompt, 12, temperature=temperature, top_k=top_k, rng=np.random.default_rng(5),
                       use_cache=False)
    assert a.shape == (2, 16) and a.dtype == np.int64
    np.testing.assert_array_equal(a[:, :4], prompt)
    np.testing.assert_array_equal(a, b)


def test_greedy_generation_follows_the_argmax():
    model = o1_model(tiny())
    out = model.generate(np.array([[3, 1, 4]]), 5)
    for t in range(3, 8):
        assert out[0, t] == np.argmax(np.asarray(model(out[:, :t]))[0, -1])


def test_generation_restores_training_mode_and_records_no_graph():
    model = o1_model(tiny())
    model.train()
    model.generate(np.array([[1, 2]]), 3)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_top_k_one_is_greedy_and_top_k_limits_the_support():
    logits = np.random.default_rng(0).standard_normal((64, 30)).astype(np.float32)
    greedy = sample_next_token(logits)
    np.testing.assert_array_equal(sample_next_token(logits, temperature=2.0, top_k=1,
                                                    rng=np.random.default_rng(0)), greedy)
    top3 = np.argsort(logits, axis=-1)[:, -3:]
    rng = np.random.default_rng(1)
    for _ in range(20):
        picks = sample_next_token(logits, temperature=5.0, top_k=3, rng=rng)
        assert all(p in row for p, row in zip(picks, top3))


def test_sampling_frequencies_follow_softmax_over_temperature():
    logits = np.array([[2.0, 1.0, 0.0, -1.0]])
    T = 0.8
    p = np.exp(logits[0] / T) / np.exp(logits[0] / T).sum()
    rng = np.random.default_rng(0)
    n = 20000
    draws = np.array([sample_next_token(logits, temperature=T, rng=rng)[0] for _ in range(n)])
    freq = np.bincount(draws, minlength=4) / n
    assert np.all(np.abs(freq - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9)  # within 4 standard errors


def test_gradients_reach_every_parameter():
    model = o1_model(tiny(tie_word_embeddings=True, attention_bias=True, mlp_bias=True))
    ids = np.random.default_rng(0).integers(0, 40, (2, 6))
    loss = F.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape and np.abs(p.grad).max() > 0, name


class _Fixed(Module):
    """A linear layer whose weight is a given Tensor (so gradcheck can perturb it)."""

    def __init__(self, w, b=None):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        return F.linear(x, self.w, self.b)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                  "model.layers.1.self_attn.v_proj"])
def test_gradcheck_through_attention_rope_and_gqa(name):
    c = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=16, attention_bias=True,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 100.0, "factor": 4.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                     "original_max_position_embeddings": 4})
    model = o1_model(c, dtype=np.float64)
    assert all(p.dtype == np.float64 for p in model.parameters())
    ids = np.random.default_rng(0).integers(0, 11, (2, 6))
    lin = model.get_submodule(name)

    def fn(w, b):
        model.set_submodule(name, _Fixed(w, b))
        return model(ids)

    assert gradcheck(fn, [Tensor(lin.weight.data, requires_grad=True), Tensor(lin.bias.data, requires_grad=True)],
                     atol=1e-6, rtol=1e-5)


# ================================================================================================================
# bad input
# ================================================================================================================
@pytest.mark.parametrize("ids, message", [
    (np.array([[1, 40]]), r"token id out of range: ids must lie in \[0, 40\), got min 1, max 40"),
    (np.array([[-1, 3]]), "token id out of range"),
    (np.array([[1.0, 2.0]]), "must be integers, got dtype float64"),
    (np.array([1, 2, 3]), r"shape \(B, T\), got shape \(3,\)"),
    (np.zeros((1, 0), dtype=np.int64), "must not be empty"),
    (np.zeros((1, 33), dtype=np.int64), "sequence too long: 33 positions exceed max_position_embeddings=32"),
])
def test_bad_ids_raise(ids, message):
    model = Llama(tiny())
    with pytest.raises(ValueError, match=message):
        model(ids)


def test_cache_positions_count_towards_the_limit():
    model = o1_model(tiny())
    cache = KVCache(2)
    with no_grad():
        model(np.zeros((1, 30), dtype=np.int64), cache=cache)
        with pytest.raises(ValueError, match=r"33 positions \(30 cached \+ 3 new\)"):
            model(np.zeros((1, 3), dtype=np.int64), cache=cache)


@pytest.mark.parametrize("kw, message", [
    (dict(max_new_tokens=30), "30 new tokens exceed max_position_embeddings=32"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=2, temperature=1.0), "needs rng"),
    (dict(max_new_tokens=2, temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=2, temperature=1.0, top_k=0, rng=np.random.default_rng(0)), "top_k must be a positive"),
])
def test_bad_generation_arguments_raise(kw, message):
    model = Llama(tiny())
    with pytest.raises(ValueError, match=message):
        model.generate(np.zeros((1, 3), dtype=np.int64), **kw)


# ================================================================================================================
# checkpoint files
# ================================================================================================================
def _write_safetensors(path, tensors: dict, dtype_name: str = "F32"):
    """An independent writer of the file format (8-byte header length, JSON header, raw little-endian data)."""
    header, blobs, offset = {}, [], 0
    np_dtype = {"F32": np.dtype("<f4"), "BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype("<f2")}[dtype_name]
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a, dtype=np_dtype).tobytes()
        header[name] = {"dtype": dtype_name, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip_exactly(tmp_path, tie):
    model = o1_model(tiny(tie_word_embeddings=tie, mlp_bias=True))
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    back = Llama.from_pretrained(tmp_path / "ckpt")
    assert back.config == model.config
    assert back.checkpoint_names() == model.checkpoint_names()
    for (n, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)
    if tie:
        assert back.lm_head.weight is back.model.embed_tokens.weight
    wide = Llama.from_pretrained(tmp_path / "ckpt", dtype=np.float64)
    for (n, a), (_, b) in zip(model.named_parameters(), wide.named_parameters()):
        assert b.dtype == np.float64 and np.array_equal(a.data, b.data), n


def test_sharded_save_and_load(tmp_path):
    model = o1_model(tiny())
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=4000)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(model.checkpoint_names())
    back = Llama.from_pretrained(tmp_path / "ckpt")
    np.testing.assert_array_equal(np.asarray(back(np.array([[1, 2, 3]]))), np.asarray(model(np.array([[1, 2, 3]]))))


def test_bfloat16_and_float16_checkpoints_are_converted_to_float32(tmp_path):
    model = o1_model(tiny())
    for dtype_name, np_dtype in [("BF16", ml_dtypes.bfloat16), ("F16", np.float16)]:
        folder = tmp_path / dtype_name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
        _write_safetensors(folder / "model.safetensors", {k: v for k, v in model.state_dict().items()}, dtype_name)
        back = Llama.from_pretrained(folder)
        w = back.model.layers[0].mlp.up_proj.weight.data
        assert w.dtype == np.float32
        expected = model.model.layers[0].mlp.up_proj.weight.data.astype(np_dtype).astype(np.float32)
        np.testing.assert_array_equal(w, expected)


def test_reader_matches_an_independent_writer(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b.c": rng.standard_normal(5).astype(np.float32)}
    _write_safetensors(tmp_path / "x.safetensors", tensors)
    got = read_safetensors(tmp_path / "x.safetensors")
    assert set(got) == {"a", "b.c"}
    np.testing.assert_array_equal(got["a"], tensors["a"])
    np.testing.assert_array_equal(got["b.c"], tensors["b.c"])


def _saved(tmp_path, **kw):
    model = o1_model(tiny(**kw))
    model.save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="checkpoint folder not found"):
        Llama.from_pretrained(tmp_path / "nope")
    d = _saved(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json in .*ckpt"):
        Llama.from_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="pickle-based .bin checkpoints are not read"):
        Llama.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="config file not found: .*config.json"):
        Llama.from_pretrained(d)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:4], r"too short for a header"),
    (lambda b: b[:-10], r"does not fit its byte range"),
    (lambda b: struct.pack("<Q", 10**9) + b[8:], r"header length 1000000000 exceeds the file size"),
    (lambda b: b[:8] + b"x" + b[9:], r"header is not JSON"),
])
def test_corrupt_safetensors_raise_naming_the_file(tmp_path, damage, message):
    d = _saved(tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    with pytest.raises(ValueError, match=f"{message}.*model.safetensors"):
        Llama.from_pretrained(d)


def test_wrong_dtype_tensor_is_refused(tmp_path):
    d = tmp_path / "q"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny().to_dict()))
    h = json.dumps({"model.norm.weight": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + b"\x00\x01")
    with pytest.raises(ValueError, match="'model.norm.weight' in .*model.safetensors has dtype U8"):
        Llama.from_pretrained(d)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    model = o1_model(tiny())
    sd = dict(model.state_dict())
    for change, message in [
        (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "lacks tensor 'model.layers.1.mlp.up_proj.weight'"),
        (lambda s: s.__setitem__("model.layers.0.extra", np.zeros(2, np.float32)), "unexpected tensor "
                                                                                  "'model.layers.0.extra'"),
        (lambda s: s.__setitem__("model.norm.weight", np.zeros(17, np.float32)),
         r"'model.norm.weight' in .*model.safetensors has shape \(17,\), the model expects \(16,\)"),
    ]:
        d = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(model.config.to_dict()))
        s = dict(sd)
        change(s)
        _write_safetensors(d / "model.safetensors", s)
        with pytest.raises(ValueError, match=message):
            Llama.from_pretrained(d)


def test_tied_checkpoint_may_carry_a_head_copy_and_a_rotary_buffer(tmp_path):
    model = o1_model(tiny(tie_word_embeddings=True))
    d = tmp_path / "c"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(model.config.to_dict()))
    sd = {**model.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(2, np.float32)}
    _write_safetensors(d / "model.safetensors", sd)
    back = Llama.from_pretrained(d)
    np.testing.assert_array_equal(back.lm_head.weight.data, model.model.embed_tokens.weight.data)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1  # a different head: transformers would untie, we refuse
    _write_safetensors(d / "model.safetensors", sd)
    with pytest.raises(ValueError, match="config ties lm_head to embed_tokens, but .*model.safetensors holds a "
                                         "different lm_head.weight"):
        Llama.from_pretrained(d)


def test_sharded_index_errors(tmp_path):
    model = o1_model(tiny())
    model.save_pretrained(tmp_path / "ckpt", max_shard_bytes=4000)
    d = tmp_path / "ckpt"
    index = d / "model.safetensors.index.json"
    good = index.read_text()
    first = sorted(d.glob("model-*.safetensors"))[0]
    first.rename(d / "moved")
    with pytest.raises(ValueError, match=f"shard listed in .*index.json not found: .*{first.name}"):
        Llama.from_pretrained(d)
    (d / "moved").rename(first)
    data = json.loads(good)
    data["weight_map"]["model.norm.weight"] = first.name if data["weight_map"]["model.norm.weight"] != first.name \
        else sorted(d.glob("model-*.safetensors"))[1].name
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'model.norm.weight' is listed in .*index.json under .* but not found"):
        Llama.from_pretrained(d)
    data["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="names a shard outside its folder"):
        Llama.from_pretrained(d)
    index.write_text("[1, 2")
    with pytest.raises(ValueError, match="corrupt index file.*index.json"):
        Llama.from_pretrained(d)


def test_save_refuses_non_empty_folders_and_replaced_layers(tmp_path):
    model = o1_model(tiny())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="output folder is not empty"):
        model.save_pretrained(tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]
    model.set_submodule("model.layers.0.mlp.up_proj", Doubling(model.get_submodule("model.layers.0.mlp.up_proj")))
    with pytest.raises(ValueError, match="differ from a plain Llama's.*up_proj"):
        model.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
