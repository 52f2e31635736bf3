"""``lora_ref.modeling.generate`` and the ``generate`` / ``chat`` commands on small models built here.

Token-for-token agreement with transformers on a real model is in ``tests/interop/test_generate_interop.py``.
"""

import io
import json
import math
import sys

import numba
import numpy as np
import pytest

from lora_ref.cli import main
from lora_ref.modeling.generate import TextStream, generate, generate_tokens, stop_token_ids
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.modeling.tokenizer import ByteTokenizer, load_tokenizer

TEMPLATE = ("{% for m in messages %}{{ '<s>' + m['role'] + '\n' + m['content'] + '</s>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")


def _random_llama(vocab: int, max_pos: int = 64, seed: int = 0) -> Llama:
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_pos)
    rng = np.random.default_rng(seed)
    model = Llama(config, rng=rng)
    for p in model.parameters():  # larger weights than the init, so the argmax changes from step to step
        if p.ndim == 2:
            p.data[...] = rng.normal(0, 2 / math.sqrt(p.shape[1]), p.shape)
    return model


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A model folder with a tiny trained byte-level BPE (vocabulary 300), a chat template and a random Llama."""
    from lora_ref.testing.tiny_models import train_tiny_tokenizer

    tok = train_tiny_tokenizer(300, ["hello there, how are you today? fine thanks"] * 20, ["<unk>", "<s>", "</s>"])
    folder = tmp_path_factory.mktemp("chat") / "model"
    model = _random_llama(tok.get_vocab_size(), max_pos=96)
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "chat_template": TEMPLATE}))
    return folder, model


def test_streaming_greedy_equals_recomputing_without_cache():
    model = _random_llama(256)
    prompt = np.array([5, 17, 200, 3])
    ours = generate(model, prompt, 20)
    full = model.generate(prompt[None], 20, use_cache=False)[0, 4:]  # every step recomputes the whole sequence
    assert ours == full.tolist()
    assert model.generate(prompt[None], 20)[0, 4:].tolist() == ours  # Llama.generate keeps working
    # the generator yields as it goes: the first token is available before the rest are computed
    it = generate_tokens(model, prompt, 20)
    assert next(it) == ours[0]


def test_stops_at_a_stop_token_which_is_not_yielded():
    model = _random_llama(256)
    prompt = np.array([1, 2, 3])
    free = generate(model, prompt, 12)
    stop = free[5]
    first = free.index(stop)  # the first occurrence ends generation
    assert generate(model, prompt, 12, stop_ids=[stop]) == free[:first]
    assert generate(model, prompt, 12, stop_ids=[9999, stop]) == free[:first]
    assert generate(model, prompt, 0) == []


def test_sampling_needs_a_generator_and_is_reproducible():
    model = _random_llama(256)
    prompt = np.array([7, 8])
    with pytest.raises(ValueError, match="needs rng"):
        generate(model, prompt, 5, temperature=1.0)
    a = generate(model, prompt, 15, temperature=1.5, top_k=20, rng=np.random.default_rng(3))
    b = generate(model, prompt, 15, temperature=1.5, top_k=20, rng=np.random.default_rng(3))
    c = generate(model, prompt, 15, temperature=1.5, top_k=20, rng=np.random.default_rng(4))
    assert a == b and a != c


def test_bad_arguments_and_training_flag_restored():
    model = _random_llama(256, max_pos=16)
    model.train()
    with pytest.raises(ValueError, match="exceed max_position_embeddings=16"):
        generate(model, np.arange(10), 7)
    with pytest.raises(ValueError, match="one sequence"):
        generate(model, np.zeros((2, 3), dtype=np.int64), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        generate(model, np.arange(3), -1)
    with pytest.raises(ValueError, match="token id out of range"):
        generate(model, np.array([256]), 1)
    it = generate_tokens(model, np.arange(3), 5)
    next(it)
    assert not model.training  # eval mode while generating
    it.close()
    assert model.training


def test_text_stream_never_splits_a_character():
    text = "aé€🙂 naïve\nnext line ✓"
    tok = ByteTokenizer()
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text)] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[:2] == ["a", ""]  # é's first byte waits for the second
    # an incomplete character at the very end is released by finish() as it decodes
    stream = TextStream(tok)
    assert [stream.push(t) for t in [0x61, 0xE2, 0x82]] == ["a", "", ""]
    assert stream.finish() == "\ufffd"


def test_text_stream_on_bpe_equals_decode(chat_folder):
    tok = load_tokenizer(chat_folder[0])
    text = "hello there 🙂, how are you? ünïcödé\n\nfine"
    ids = tok.encode(text)
    stream = TextStream(tok)
    assert "".join([stream.push(t) for t in ids] + [stream.finish()]) == tok.decode(ids) == text


def test_stop_token_ids_sources(tmp_path, chat_folder):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert stop_token_ids(folder, ByteTokenizer()) == ()  # a byte-level folder: no end token
    assert stop_token_ids(folder) == (7,)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 9]}))
    assert stop_token_ids(folder, ByteTokenizer()) == (2, 9)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="eos_token_id must be"):
        stop_token_ids(folder)
    (folder / "generation_config.json").write_text(json.dumps({}))
    (folder / "config.json").write_text(json.dumps({}))
    assert stop_token_ids(folder, load_tokenizer(chat_folder[0])) == (2,)  # the tokenizer's eos_token


def _run(capsys, monkeypatch, command, *argv, stdin=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main([command, *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_chat_uses_the_template_and_stops_at_eos(chat_folder, capsys, monkeypatch):
    folder, model = chat_folder
    tok = load_tokenizer(folder)
    code, out, err = _run(capsys, monkeypatch, "generate", "--model", folder, "--chat", "hello", "--system", "be nice",
                          "--max-new-tokens", 30, "--json")
    assert code == 0, err
    doc = json.loads(out)
    prompt = tok.encode("<s>system\nbe nice</s>\n<s>user\nhello</s>\n<s>assistant\n")
    free = model.generate(prompt[None], 30, use_cache=False)[0, prompt.size:].tolist()
    expected = free[:free.index(2)] if 2 in free else free
    assert doc["token_ids"] == expected and doc["prompt_tokens"] == prompt.size
    assert doc["stop_reason"] == ("eos" if 2 in free else "length") and doc["text"] == tok.decode(expected)
    code, out, _ = _run(capsys, monkeypatch, "generate", "--model", folder, "--chat", "hello", "--system", "be nice",
                        "--max-new-tokens", 30)
    assert code == 0 and out == doc["text"] + "\n"  # --chat prints the answer only


def test_chat_keeps_history_and_ends_on_exit_or_eof(chat_folder, capsys, monkeypatch):
    folder, _ = chat_folder
    import lora_ref.modeling.generate as G

    prompts = []
    real = G.generate_tokens

    def recording(model, ids, n, **kw):
        prompts.append(load_tokenizer(folder).decode(ids))
        return real(model, ids, n, **kw)

    monkeypatch.setattr(G, "generate_tokens", recording)
    code, out, err = _run(capsys, monkeypatch, "chat", "--model", folder, "--max-new-tokens", 8,
                          stdin="hello\n\nhow are you\n/exit\nnever read\n")
    assert code == 0, err
    assert len(prompts) == 2 and not out.startswith(">")  # no prompt marker on a pipe; blank lines skipped
    answers = out.split("\n")
    head, tail = "<s>user\nhello</s>\n<s>assistant\n", "</s>\n<s>user\nhow are you</s>\n<s>assistant\n"
    assert prompts[1].startswith(head) and prompts[1].endswith(tail)
    first = prompts[1][len(head):-len(tail)]  # the first answer, as the second prompt carries it
    assert first and out.startswith(first + "\n")
    assert len(answers) >= 3
    prompts.clear()
    code, out, _ = _run(capsys, monkeypatch, "chat", "--model", folder, "--max-new-tokens", 4,
                        stdin="hello\n/reset\nhow are you")  # end of input without a newline, then EOF
    assert code == 0 and len(prompts) == 2 and prompts[1] == "<s>user\nhow are you</s>\n<s>assistant\n"


@pytest.mark.parametrize("command, argv", [("generate", ["--prompt", "hello"]), ("chat", [])])
@pytest.mark.parametrize("threads", [1, min(2, numba.config.NUMBA_NUM_THREADS)])
def test_the_commands_decode_on_the_threads_they_were_given(chat_folder, capsys, monkeypatch, command, argv,
                                                            threads):
    """generate_tokens decodes on one thread unless told otherwise; the commands tell it to keep --threads (else
    the CPUs idle at the start) for the one-token steps too: one thread is slower on an idle machine. The thread
    count is read inside each step, where generate_tokens' own limit would be in force."""
    from lora_ref.modeling.decode import Decoder

    seen = []
    real = Decoder.step

    def recording(self, token):
        seen.append(numba.get_num_threads())
        return real(self, token)

    monkeypatch.setattr(Decoder, "step", recording)
    code, _, err = _run(capsys, monkeypatch, command, "--model", chat_folder[0], "--max-new-tokens", 3,
                        "--threads", threads, *argv, stdin="hello\n" if command == "chat" else None)
    assert code == 0, err
    assert seen and set(seen) == {threads}


def test_chat_drops_old_turns_when_the_context_is_full(chat_folder, capsys, monkeypatch):
    folder, _ = chat_folder
    long = "hello there how are you " * 4  # ~ 20 tokens
    code, _, err = _run(capsys, monkeypatch, "chat", "--model", folder, "--max-new-tokens", 40,
                        stdin=f"{long}\n{long}\n{long * 5}\nhello\n")
    assert code == 0
    assert "too long for the model's context of 96 tokens" in err and err.count("\n") == 1


def test_chat_refuses_a_folder_without_template(tmp_path, capsys, monkeypatch):
    _random_llama(256).save_pretrained(tmp_path / "byte")
    code, out, err = _run(capsys, monkeypatch, "chat", "--model", tmp_path / "byte", stdin="hi\n")
    assert code == 1 and out == "" and "has no chat template" in err and err.count("\n") == 1


def test_adapter_for_another_model_is_refused_before_the_base_is_read(chat_folder, tmp_path, capsys, monkeypatch):
    from lora_ref.adapters.lora import LoraConfig, inject_lora
    from lora_ref.adapters.peft_files import save_adapter

    folder, _ = chat_folder
    other = Llama(LlamaConfig(vocab_size=300, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=96), rng=np.random.default_rng(1))
    inject_lora(other, LoraConfig(r=2, target_modules=["q_proj"]), rng=np.random.default_rng(2))
    save_adapter(other, tmp_path / "wrong")
    deep = Llama(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=96),
                 rng=np.random.default_rng(1))
    inject_lora(deep, LoraConfig(r=2, target_modules=["v_proj"]), rng=np.random.default_rng(2))
    save_adapter(deep, tmp_path / "deep")
    base = tmp_path / "base"  # the folder's config, but a weights file that cannot be read
    base.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (base / f).write_bytes((folder / f).read_bytes())
    (base / "model.safetensors").write_bytes(b"not safetensors")
    wrong = ("is for another model: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight in "
             "adapter_model.safetensors has shape (2, 24)")
    deep_message = "is for another model: it adapts model.layers.2.self_attn.v_proj"
    commands = [("generate", ["--prompt", "hi"]), ("eval", ["--data", folder / "tokenizer.json", "--seq", "32"])]
    for adapter, message in [("wrong", wrong), ("deep", deep_message)]:
        for command, extra in commands:
            code, out, err = _run(capsys, monkeypatch, command, "--model", base, "--adapter", tmp_path / adapter,
                                  *extra)
            assert code == 1 and out == "" and message in err and err.count("\n") == 1, err


def test_kv_cache_buffer_equals_a_full_forward():
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.llama import KVCache

    model = _random_llama(256, max_pos=64)
    ids = np.random.default_rng(5).integers(0, 256, (2, 40))
    with no_grad():
        full = np.asarray(model(ids).data)
    # the first chunk with gradients (concatenating cache), the rest without (in-place buffer that must grow)
    cache = KVCache(2)
    parts = [np.asarray(model(ids[:, :3], cache=cache).data)]
    with no_grad():
        t = 3
        for n in (1, 5, 1, 12, 1, 17):
            parts.append(np.asarray(model(ids[:, t:t + n], cache=cache).data))
            t += n
    assert cache.length == 40 and cache._buffers[0][0].shape[2] >= 40
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, rtol=1e-5, atol=1e-5)


def test_fit_history_drops_the_oldest_pairs_first(chat_folder):
    from lora_ref.commands.chat import fit_history

    tok = load_tokenizer(chat_folder[0])
    turns = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"},
             {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"},
             {"role": "user", "content": "today?"}]
    full = tok.apply_chat_template(turns, tokenize=True)
    ids, kept = fit_history(tok, None, turns, full.size)
    assert kept == turns and ids.tolist() == full.tolist()
    ids, kept = fit_history(tok, "sys", turns, full.size)  # the system message makes it one pair too long
    assert kept == turns[2:] and ids.tolist() == tok.apply_chat_template(
        [{"role": "system", "content": "sys"}] + turns[2:], tokenize=True).tolist()
    ids, kept = fit_history(tok, None, turns, 3)
    assert ids is None and kept == turns[4:]
