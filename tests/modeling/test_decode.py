"""The compiled one-token decoder (lora_ref.modeling.decode.Decoder) computes what the module graph computes: the
same logits at every position (float32 and 4-bit models, compiled kernels and readable twins), the same greedy
tokens through generate_tokens, and it refuses (generation falls back) for models it does not cover."""

import numpy as np
import pytest

from lora_ref.adapters.lora import LoraConfig, inject_lora
from lora_ref.adapters.qlora import quantize_model
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.decode import Decoder, unsupported
from lora_ref.modeling.generate import generate_tokens
from lora_ref.modeling.llama import Llama

CFG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _model(kind, **overrides):
    m = Llama({**CFG, **overrides}, rng=np.random.default_rng(0))
    if kind == "nf4":
        quantize_model(m, blocksize=64, double_quant=True)
    return m


@pytest.mark.parametrize("impl", ["numba", "numpy"])
@pytest.mark.parametrize("kind, overrides", [("fp32", {}), ("nf4", {}), ("fp32", {"tie_word_embeddings": False})],
                         ids=["fp32", "nf4", "fp32-untied"])
def test_decoder_logits_equal_the_module_graph(kind, overrides, impl):
    model = _model(kind, **overrides)
    ids = np.random.default_rng(1).integers(0, 256, 14)
    with no_grad():
        full = np.asarray(model(ids[None]).data)[0]                   # (T, V): every position at once, no cache
    d = Decoder(model, 20, impl=impl)
    got = [d.prefill(ids[:5]).copy()]
    for t in range(5, 14):
        got.append(d.step(int(ids[t])).copy())
    assert d.length == 14
    np.testing.assert_allclose(np.stack(got), full[4:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fp32", "nf4"])
def test_generate_tokens_take_the_compiled_path_and_choose_the_graphs_tokens(kind, monkeypatch):
    from lora_ref.modeling import decode

    model = _model(kind)
    prompt = np.random.default_rng(2).integers(0, 256, 6)
    steps = []
    real_step = Decoder.step
    monkeypatch.setattr(decode.Decoder, "step", lambda self, t: steps.append(t) or real_step(self, t))
    fast = list(generate_tokens(model, prompt, 12))
    assert len(steps) == 11                                         # every token after the first, one call each
    want = model.generate(prompt[None], 12)[0, 6:].tolist()         # the module graph with its KVCache
    assert fast == want


def test_unsupported_models_fall_back_to_the_module_graph():
    model = _model("fp32")
    assert unsupported(model) is None
    prompt = np.arange(5)
    before = list(generate_tokens(model, prompt, 6))
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]), rng=np.random.default_rng(3))
    assert "q_proj is a LoraLinear" in unsupported(model)
    with pytest.raises(ValueError, match="cannot run this model: model.layers.0.self_attn.q_proj"):
        Decoder(model, 10)
    assert list(generate_tokens(model, prompt, 6)) == before        # B = 0 at init: the same function, other path
    assert "has a bias" in unsupported(Llama({**CFG, "attention_bias": True}, rng=np.random.default_rng(0)))
    assert "float32" in unsupported(Llama(CFG, rng=np.random.default_rng(0), dtype=np.float64))


def test_decoder_capacity_is_checked():
    model = _model("fp32")
    with pytest.raises(ValueError, match="capacity"):
        Decoder(model, 0)
    d = Decoder(model, 4)
    with pytest.raises(ValueError, match="does not fit"):
        d.prefill(np.arange(5))
    d.prefill(np.arange(3))
    d.step(1)
    with pytest.raises(ValueError, match="full"):
        d.step(2)


def test_weight_bytes_count_what_is_stored():
    from lora_ref.modeling.linear4bit import Linear4bit

    model = _model("nf4")
    d = Decoder(model, 8)
    stored = sum(m.nbytes() for m in model.modules() if isinstance(m, Linear4bit))
    parts = d.weight_bytes()
    assert parts["layers"] == stored
    assert parts["head"] == model.lm_head.weight.data.nbytes and parts["embedding_row"] == 0  # tied: read once
    assert d.kv_bytes(10) == 2 * 2 * 2 * 10 * 16 * 4
