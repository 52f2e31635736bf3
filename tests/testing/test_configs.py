"""lora_ref.testing.tiny_llama_config: the shared tiny Llama defaults and their overrides."""

import transformers

from lora_ref.modeling.llama import LlamaConfig
from lora_ref.testing import TINY_LLAMA, tiny_llama_config


def test_defaults_build_both_configs_alike():
    cfg = tiny_llama_config()
    ours, theirs = LlamaConfig(**cfg), transformers.LlamaConfig(**cfg)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(ours, key) == getattr(theirs, key) == TINY_LLAMA[key]
    assert ours.num_attention_heads > ours.num_key_value_heads  # grouped-query attention
    for key in ("hidden_size", "intermediate_size"):  # whole 4-bit blocks at bitsandbytes' default blocksize
        assert TINY_LLAMA[key] % 64 == 0


def test_overrides_apply_and_leave_the_defaults_alone():
    cfg = tiny_llama_config(num_hidden_layers=1, tie_word_embeddings=False)
    assert cfg["num_hidden_layers"] == 1 and cfg["tie_word_embeddings"] is False
    assert cfg["hidden_size"] == TINY_LLAMA["hidden_size"]
    cfg["hidden_size"] = 8
    assert TINY_LLAMA["hidden_size"] == 64 and tiny_llama_config()["hidden_size"] == 64
    assert TINY_LLAMA["num_hidden_layers"] == 2
