"""lora_ref's Llama equals transformers' LlamaForCausalLM (eager attention, float32) on the same checkpoint.

Each test builds a tiny random checkpoint with transformers (seeded, weights rescaled so the logits are of order 1
and a 1e-4 tolerance means something), loads it in lora_ref and compares logits; the reverse direction saves with
lora_ref and loads with transformers. Configs cover GQA and MQA, tied and untied heads, explicit head_dim, biases,
llama3 RoPE scaling with sequences longer than ``original_max_position_embeddings``, both ``config.json`` styles,
bfloat16 and sharded checkpoints.
"""

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

from lora_ref.modeling.llama import Llama, LlamaConfig, rope_inv_freq
from lora_ref.testing import tiny_llama_config

pytestmark = pytest.mark.interop
torch.set_num_threads(1)

TOL = 1e-4  # max abs logit difference, float32

BASE = tiny_llama_config(vocab_size=50, hidden_size=32, intermediate_size=40, num_key_value_heads=None)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CASES = {
    "gqa-untied-default": dict(num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "mqa-headdim-biases": dict(num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True),
    "llama3-gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3),
    "llama3-headdim-untied": dict(num_key_value_heads=2, head_dim=16, rope_parameters={
        **LLAMA3, "factor": 4.0, "rope_theta": 2000.0, "original_max_position_embeddings": 32}),
}


def hf_model(seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = HFConfig(**{**BASE, **kw}, attn_implementation="eager")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # order-1 activations: weights ~ N(0, 1/fan_in), norms ~ 1 ± 0.2, biases ~ ±0.1
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            elif name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    return model


def hf_logits(model: LlamaForCausalLM, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def load_hf(path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def ids_for(T: int, seed: int = 0, B: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], (B, T))


def to_old_style(path) -> dict:
    """Rewrite a saved config.json into the older style: top-level rope_theta plus a rope_scaling dict."""
    f = path / "config.json"
    d = json.loads(f.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = None if rope["rope_type"] == "default" else {"type": rope.pop("rope_type"), **rope}
    f.write_text(json.dumps(d))
    return d


@pytest.mark.parametrize("style", ["new", "old"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(tmp_path, case, style):
    ref = hf_model(**CASES[case])
    ref.save_pretrained(tmp_path, safe_serialization=True)
    if style == "old":
        d = to_old_style(tmp_path)
        assert "rope_parameters" not in d and "rope_theta" in d
        ref = load_hf(tmp_path)  # transformers reads the same rewritten file
    ours = Llama.from_pretrained(tmp_path)
    T = 40  # > original_max_position_embeddings (16) of the llama3 cases
    ids = ids_for(T)
    expected = hf_logits(ref, ids)
    got = np.asarray(ours(ids))
    assert got.shape == expected.shape == (2, T, BASE["vocab_size"])
    assert np.abs(expected).max() > 1.0  # the tolerance below is small against the logits
    assert np.abs(got - expected).max() <= TOL


def test_llama3_cases_exercise_the_scaling():
    """The llama3 cases put frequencies in the kept, the blended and the divided bands, and the sequences (40) pass
    the original context (16, 32), so equality above is not reached by default RoPE in disguise."""
    bands = set()
    for case in ("llama3-gqa-tied", "llama3-headdim-untied"):
        c = LlamaConfig(**{**BASE, **CASES[case]})
        plain = LlamaConfig(**{**BASE, **CASES[case], "rope_parameters": {"rope_type": "default",
                                                                          "rope_theta": c.rope_theta}})
        scaled, base = rope_inv_freq(c), rope_inv_freq(plain)
        ratio = base / scaled
        factor = c.rope_parameters["factor"]
        assert c.rope_parameters["original_max_position_embeddings"] < 40
        bands |= {"kept" if r == 1.0 else "divided" if np.isclose(r, factor) else "blended" for r in ratio}
        assert np.all((ratio >= 1.0) & (ratio <= factor * (1 + 1e-6)))
    assert bands == {"kept", "blended", "divided"}
    tied = hf_model(**CASES["llama3-gqa-tied"])
    plain = hf_model(**{**CASES["llama3-gqa-tied"], "rope_parameters": {"rope_type": "default",
                                                                        "rope_theta": 10000.0}})
    ids = ids_for(40)
    assert np.abs(hf_logits(tied, ids) - hf_logits(plain, ids)).max() > 10 * TOL


@pytest.mark.parametrize("case", ["gqa-untied-default", "mha-tied", "mqa-headdim-biases", "llama3-gqa-tied"])
def test_saved_by_lora_ref_loads_in_transformers_and_back(tmp_path, case):
    config = LlamaConfig(**{**BASE, **CASES[case]})
    rng = np.random.default_rng(1)
    ours = Llama(config, rng=rng)
    for name, p in ours.named_parameters():
        p.data[...] = rng.normal(1.0, 0.2, p.shape) if name.endswith("norm.weight") else \
            rng.normal(0.0, 1 / math.sqrt(p.shape[1]) if p.ndim == 2 else 0.1, p.shape)
    ids = ids_for(40, seed=3)
    mine = np.asarray(ours(ids))
    ours.save_pretrained(tmp_path / "a")
    theirs = load_hf(tmp_path / "a")
    assert theirs.config.tie_word_embeddings == config.tie_word_embeddings
    expected = hf_logits(theirs, ids)
    assert np.abs(expected).max() > 1.0
    assert np.abs(mine - expected).max() <= TOL
    theirs.save_pretrained(tmp_path / "b", safe_serialization=True)
    back = Llama.from_pretrained(tmp_path / "b")
    assert back.config == config
    for (n, a), (_, b) in zip(ours.named_parameters(), back.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=n)


def test_sharded_checkpoints_both_ways(tmp_path):
    ref = hf_model(**CASES["gqa-untied-default"])
    ref.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    ours = Llama.from_pretrained(tmp_path / "hf")
    ids = ids_for(20)
    assert np.abs(np.asarray(ours(ids)) - hf_logits(ref, ids)).max() <= TOL
    ours.save_pretrained(tmp_path / "ours", max_shard_bytes=16_000)
    assert len(list((tmp_path / "ours").glob("model-*-of-*.safetensors"))) > 2
    assert np.abs(hf_logits(load_hf(tmp_path / "ours"), ids) - hf_logits(ref, ids)).max() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_is_read_as_float32(tmp_path, dtype):
    ref = hf_model(**CASES["mqa-headdim-biases"]).to(dtype)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = Llama.from_pretrained(tmp_path)
    assert ours.model.embed_tokens.weight.dtype == np.float32
    up = ref.model.layers[0].mlp.up_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(ours.model.layers[0].mlp.up_proj.weight.data, up)
    ids = ids_for(24)
    assert np.abs(np.asarray(ours(ids)) - hf_logits(load_hf(tmp_path), ids)).max() <= TOL


def test_greedy_generation_equals_transformers_generate(tmp_path):
    ref = hf_model(**CASES["llama3-gqa-tied"])
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = Llama.from_pretrained(tmp_path)
    prompt = ids_for(6, seed=4, B=1)
    ref.generation_config.eos_token_id = None  # lora_ref never stops early; token 2 (eos) must not end the run
    with torch.no_grad():
        expected = ref.generate(torch.as_tensor(prompt), max_new_tokens=30, do_sample=False, top_k=None,
                                top_p=None, attention_mask=torch.ones_like(torch.as_tensor(prompt)),
                                pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours.generate(prompt, 30), expected)
    np.testing.assert_array_equal(ours.generate(prompt, 30, use_cache=False), expected)


@st.composite
def hf_configs(draw):
    """Random tiny Llama configs in either config.json style, and a sequence length."""
    H = draw(st.sampled_from([2, 4, 6]))
    K = draw(st.sampled_from([k for k in (1, 2, 3, 6) if H % k == 0]))
    cfg = dict(vocab_size=draw(st.integers(20, 60)), hidden_size=H * draw(st.sampled_from([4, 6, 8])),
               intermediate_size=draw(st.integers(8, 40)), num_hidden_layers=draw(st.integers(1, 2)),
               num_attention_heads=H, num_key_value_heads=K, max_position_embeddings=48,
               tie_word_embeddings=draw(st.booleans()), attention_bias=draw(st.booleans()),
               mlp_bias=draw(st.booleans()), rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5])))
    if draw(st.booleans()):
        cfg["head_dim"] = draw(st.sampled_from([4, 8, 12]))
    theta = draw(st.sampled_from([100.0, 10000.0, 500000.0]))
    if draw(st.booleans()):
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": draw(st.sampled_from([2.0, 8.0])),
                "low_freq_factor": 1.0, "high_freq_factor": draw(st.sampled_from([2.0, 4.0])),
                "original_max_position_embeddings": draw(st.sampled_from([8, 16]))}
    else:
        rope = {"rope_type": "default", "rope_theta": theta}
    T = draw(st.integers(rope.get("original_max_position_embeddings", 8) + 1, 48))
    return cfg, rope, draw(st.sampled_from(["new", "old"])), T


@settings(max_examples=12)
@given(drawn=hf_configs(), seed=st.integers(0, 2**16))
def test_random_configs_equal_transformers(drawn, seed):
    cfg, rope, style, T = drawn
    ref = hf_model(seed, **{**cfg, "rope_parameters": dict(rope)})
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp, safe_serialization=True)
        if style == "old":
            to_old_style(Path(tmp))
            ref = load_hf(tmp)
        ours = Llama.from_pretrained(tmp)
    ids = np.random.default_rng(seed).integers(0, cfg["vocab_size"], (2, T))
    expected = hf_logits(ref, ids)
    assert np.abs(expected).max() > 0.5
    assert np.abs(np.asarray(ours(ids)) - expected).max() <= TOL
