"""A real model's tokenizer through ``lora_ref.load_tokenizer`` against transformers' ``AutoTokenizer``.

Ids, decoded text and rendered chat prompts must be equal on SmolLM2-135M-Instruct (a gpt2-style byte-level BPE
with a ChatML template that adds a default system message).
"""

import pytest

from lora_ref import load_tokenizer

pytestmark = pytest.mark.interop

TEXTS = [
    "What is the capital of France? Answer in one sentence.",
    "",
    " leading space and trailing space ",
    "multiple   spaces\tand\ttabs\n\nand blank lines\r\n",
    "Numbers: 3.14159, 1,000,000 and 2026-12-06; 12345678901234567890",
    "Accents: café, naïve, Ångström, façade, über, señor",
    "CJK 你好，世界 and こんにちは and 안녕하세요",
    "Emoji 🙂👍🏽🇫🇷 and symbols ∑∫√≈≠ € £ ¥",
    "def f(x):\n    return {'a': [x ** 2 for _ in range(3)]}  # code\n",
    "Contractions: don't, I'm, we'll, they've, it's, O'Neil's",
    "<|im_start|>user\nspecial tokens in the text<|im_end|>\n<|endoftext|>",
    "URL https://example.org/path?q=1&r=two#frag and e-mail a.b@c.de",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke 🙂"}],
]


@pytest.fixture(scope="module")
def both(smollm2_dir):
    from transformers import AutoTokenizer

    return load_tokenizer(smollm2_dir), AutoTokenizer.from_pretrained(str(smollm2_dir))


def test_ids_and_decode_equal_transformers(both):
    ours, theirs = both
    for text in TEXTS:
        expected = theirs.encode(text, add_special_tokens=False)
        got = ours.encode(text)
        assert got.tolist() == expected, text
        assert ours.decode(got) == theirs.decode(expected), text
        assert ours.decode(got, skip_special_tokens=True) == theirs.decode(expected, skip_special_tokens=True), text


def test_special_tokens_equal_transformers(both):
    ours, theirs = both
    assert ours.bos_token_id == theirs.bos_token_id == 1
    assert ours.eos_token_id == theirs.eos_token_id == 2
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.vocab_size == len(theirs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_prompts_equal_transformers(both, add_generation_prompt):
    ours, theirs = both
    for messages in CHATS:
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == text
        ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                         return_dict=False)
        got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        assert got.tolist() == list(ids)
    # the template adds SmolLM's default system message only when none is given
    no_system = ours.apply_chat_template(CHATS[0])
    assert "You are a helpful AI assistant named SmolLM" in no_system
    assert "You are a helpful AI assistant" not in ours.apply_chat_template(CHATS[1])
