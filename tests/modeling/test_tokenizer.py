"""``lora_ref.load_tokenizer``: the byte tokenizer of the tutorial model, a folder's ``tokenizer.json``, errors.

The HF side is exercised on a small BPE trained here with the ``tokenizers`` library, so these tests need no
downloaded model; ``tests/interop/test_tokenizer_interop.py`` compares a real model's tokenizer with transformers.
"""

import json

import numpy as np
import pytest

import lora_ref
from lora_ref.modeling.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer, render_chat_template

TEMPLATE = ("{% for m in messages %}{{ bos_token + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    """A folder with a tiny byte-level BPE tokenizer.json (special tokens <s>, </s>) and a tokenizer_config.json."""
    from lora_ref.testing.tiny_models import train_tiny_tokenizer

    texts = ["the quick brown fox jumps over the lazy dog"] * 20 + ["héllo wörld ünïcode"] * 5
    tok = train_tiny_tokenizer(300, texts, ["<unk>", "<s>", "</s>"])
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}, "unk_token": "<unk>",
        "chat_template": TEMPLATE}))
    return folder


def test_public_name():
    assert lora_ref.load_tokenizer is load_tokenizer


def test_byte_folder_gets_the_byte_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.eos_token_id is None
    ids = tok.encode("aé€")
    assert ids.dtype == np.int64 and ids.tolist() == [0x61, 0xC3, 0xA9, 0xE2, 0x82, 0xAC]
    assert tok.decode(ids) == "aé€"
    assert tok.decode([0xE2, 0x82]) == "\ufffd"  # an incomplete character decodes to the replacement character
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([256])
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="must be a str"):
        tok.encode(b"bytes")


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a model folder"):
        load_tokenizer(tmp_path / "missing")


def test_hf_folder_special_tokens_and_round_trip(bpe_folder):
    tok = load_tokenizer(bpe_folder)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, None)
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    for text in ["the quick brown fox", "héllo wörld", "  spaces\n\nand lines\t", "", "<s>the</s>"]:
        ids = tok.encode(text)
        assert ids.dtype == np.int64
        assert tok.decode(ids) == text
    # special tokens in the text are single ids; skip_special_tokens drops them
    ids = tok.encode("<s>the</s>").tolist()
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids, skip_special_tokens=True) == "the"
    with pytest.raises(ValueError, match=r"token ids must lie in 0\.\.299"):
        tok.decode([300])
    with pytest.raises(ValueError, match="must be a str"):
        tok.encode(None)


def test_chat_template_from_config_and_from_jinja_file(bpe_folder, tmp_path):
    tok = load_tokenizer(bpe_folder)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tok.apply_chat_template(messages) == "<s>user\nhi</s>\n<s>assistant\nyo</s>\n<s>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == "<s>user\nhi</s>\n<s>assistant\nyo</s>\n"
    ids = tok.apply_chat_template(messages[:1], tokenize=True)
    assert ids.tolist() == tok.encode("<s>user\nhi</s>\n<s>assistant\n").tolist() and ids[0] == 1
    # chat_template.jinja (what transformers >= 4.43 writes) wins over tokenizer_config.json
    other = tmp_path / "jinja"
    other.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (other / f).write_bytes((bpe_folder / f).read_bytes())
    (other / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert load_tokenizer(other).apply_chat_template(messages) == "HI"


def test_template_features_transformers_provides():
    msgs = [{"role": "user", "content": "<b>&"}]
    # tojson does not escape HTML; loop controls; raise_exception turns into ValueError
    assert render_chat_template("{{ messages[0]['content'] | tojson }}", msgs) == '"<b>&"'
    assert render_chat_template("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}",
                                msgs) == "01"
    assert render_chat_template("{% generation %}x{{ 1 + 1 }}{% endgeneration %}", msgs) == "x2"
    with pytest.raises(ValueError, match="chat template failed: roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", msgs)
    with pytest.raises(ValueError, match="chat template failed"):
        render_chat_template("{% for %}", msgs)


@pytest.mark.parametrize("messages", [[], "hi", [{"role": "user"}], [{"role": "user", "content": 3}]])
def test_bad_messages_are_refused(bpe_folder, messages):
    with pytest.raises(ValueError, match="message"):
        load_tokenizer(bpe_folder).apply_chat_template(messages)


def test_folder_without_template_or_with_bad_files(bpe_folder, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    tok = load_tokenizer(plain)  # no tokenizer_config.json: no special tokens, no template
    assert tok.eos_token_id is None and tok.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*tokenizer.json"):
        load_tokenizer(broken)
    bad_config = tmp_path / "bad_config"
    bad_config.mkdir()
    (bad_config / "tokenizer.json").write_bytes((bpe_folder / "tokenizer.json").read_bytes())
    (bad_config / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        load_tokenizer(bad_config)
    (bad_config / "tokenizer_config.json").write_text('{"eos_token": 5}')
    with pytest.raises(ValueError, match="special token entry"):
        load_tokenizer(bad_config)
