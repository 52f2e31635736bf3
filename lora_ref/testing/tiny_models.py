"""Tiny chat models for tests: a random Llama with a real byte-level BPE ``tokenizer.json`` and a ChatML template.

:func:`write_tiny_chat_model` writes an HF model folder of the same shape as a real instruct model's —
``config.json``, ``model.safetensors``, ``tokenizer.json`` (a byte-level BPE trained by the ``tokenizers`` library
on a few sentences, with ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>`` as special tokens),
``tokenizer_config.json`` and ``chat_template.jinja`` — but small enough that fine-tuning it takes milliseconds a
step. transformers' ``AutoTokenizer`` and ``LlamaForCausalLM`` load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["CHATML_TEMPLATE", "TINY_CORPUS", "write_tiny_chat_model"]

#: ChatML, as SmolLM2 and Qwen write it (without a default system prompt).
CHATML_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                   "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% endif %}")

#: The text the tiny tokenizer's merges are learned from.
TINY_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is the capital of France? Paris is the capital of France.",
    "Hello! How can I help you today? I can answer questions about places.",
    "The quick brown fox jumps over the lazy dog. 1 + 1 = 2, 2 + 2 = 4.",
    "user assistant system: you are a helpful assistant.",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tiny_tokenizer(vocab_size: int = 400, texts=None, special_tokens=None):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts`` (default :data:`TINY_CORPUS` four times) with
    ``special_tokens`` (default :data:`SPECIAL_TOKENS`): GPT-2's pre-tokenizer and decoder, as SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS if special_tokens is None else special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS * 4 if texts is None else texts, trainer)
    return tok


def write_tiny_chat_model(folder: str | os.PathLike, *, rng: np.random.Generator, vocab_size: int = 400,
                          hidden_size: int = 32, num_hidden_layers: int = 2, max_position_embeddings: int = 256,
                          tie_word_embeddings: bool = True) -> Path:
    """Write a tiny random Llama with a BPE tokenizer and a ChatML template into ``folder`` (missing or empty).

    The weights come from ``rng`` (transformers' initialization: N(0, 0.02²)); ``vocab_size`` is the tokenizer's
    (byte alphabet + merges + 3 special tokens), and the config's ``vocab_size`` equals the tokenizer's size.
    Special tokens: bos ``<|im_start|>``, eos and pad ``<|im_end|>``, unk ``<|endoftext|>`` (as SmolLM2).
    """
    from lora_ref.files.outputs import write_json
    from lora_ref.modeling.llama import Llama, LlamaConfig

    tok = train_tiny_tokenizer(vocab_size)
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(vocab_size=n_vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                         tie_word_embeddings=tie_word_embeddings, bos_token_id=ids["<|im_start|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|im_end|>"])
    folder = Llama(config, rng=rng).save_pretrained(folder)
    tok.save(str(Path(folder) / "tokenizer.json"))
    write_json(Path(folder) / "tokenizer_config.json", {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
    })
    (Path(folder) / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    (Path(folder) / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": ids["<|im_start|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|im_end|>"]},
        indent=2) + "\n", encoding="utf-8")
    return Path(folder)
