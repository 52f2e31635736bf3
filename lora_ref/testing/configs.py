"""Tiny Llama configurations for tests: one set of defaults instead of a dict copied into every test file.

:func:`tiny_llama_config` returns the keyword arguments of a Llama small enough that a forward pass takes
microseconds, in the names both :class:`lora_ref.modeling.llama.LlamaConfig` and transformers' ``LlamaConfig``
take, so the same dict builds our model and its transformers twin. The defaults are multiples of 64 (bitsandbytes'
default blocksize, so every linear weight is a whole number of 4-bit blocks) and use grouped-query attention (4
query heads sharing 2 key/value heads). A test whose result depends on a size passes it as an override.
"""

from __future__ import annotations

__all__ = ["TINY_LLAMA", "tiny_llama_config"]

TINY_LLAMA = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}
"""The defaults of :func:`tiny_llama_config` (read-only by convention: the function returns a copy)."""


def tiny_llama_config(**overrides) -> dict:
    """A new dict of Llama config keywords: :data:`TINY_LLAMA` with ``overrides`` applied (any config key, e.g.
    ``tie_word_embeddings=False`` or ``num_hidden_layers=1``).

    >>> tiny_llama_config(num_hidden_layers=1)["num_hidden_layers"]
    1
    """
    return {**TINY_LLAMA, **overrides}
