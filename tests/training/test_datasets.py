"""lora_ref.training.datasets: masks built by hand (byte tokenizer, a tiny BPE, SmolLM2's tokenizer), batches, the
sampler, the evaluation loss, and every way a data file can be wrong."""

import json

import numpy as np
import pytest

from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.modeling.tokenizer import ByteTokenizer, load_tokenizer
from lora_ref.testing.tiny_models import write_tiny_chat_model
from lora_ref.training.datasets import (
    IGNORE_INDEX,
    Example,
    batch_indices,
    chat_example,
    collate,
    load_data,
    mean_nll,
    prompt_completion_example,
    text_examples,
)

BYTES = ByteTokenizer()


def b(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", rng=np.random.default_rng(0))


@pytest.fixture(scope="module")
def tiny_tok(tiny_dir):
    return load_tokenizer(tiny_dir)


def trained_spans(tok, ex: Example) -> list[str]:
    """The decoded runs of target tokens."""
    out, t = [], 0
    m = ex.mask
    while t < m.size:
        if m[t]:
            s = t
            while t < m.size and m[t]:
                t += 1
            out.append(tok.decode(ex.ids[s:t]))
        else:
            t += 1
    return out


# --------------------------------------------------------------------------------------------- text
def test_text_windows_by_hand(tmp_path):
    (tmp_path / "a.txt").write_text("abcdefgh", encoding="utf-8")
    ds = load_data(tmp_path / "a.txt", BYTES, seq=3)
    assert ds.kind == "text" and ds.seq == 3
    assert [e.ids.tolist() for e in ds.examples] == [b("abc"), b("def"), b("gh")]
    assert [e.mask.tolist() for e in ds.examples] == [[False, True, True]] * 2 + [[False, True]]
    assert ds.n_targets == 2 + 2 + 1


def test_text_last_window_of_one_token_is_dropped():
    ex = text_examples(b("abcdefg"), 3)
    assert [e.ids.tolist() for e in ex] == [b("abc"), b("def")]


def test_text_default_window_is_128_or_the_context(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 300, encoding="utf-8")
    assert [len(e) for e in load_data(tmp_path / "a.txt", BYTES).examples] == [128, 128, 44]
    assert [len(e) for e in load_data(tmp_path / "a.txt", BYTES, context=100).examples] == [100, 100, 100]


def test_text_adds_no_special_tokens(tmp_path, tiny_tok):
    (tmp_path / "a.txt").write_text("The capital of France is Paris.", encoding="utf-8")
    ds = load_data(tmp_path / "a.txt", tiny_tok, seq=64)
    assert ds.examples[0].ids.tolist() == tiny_tok.encode("The capital of France is Paris.").tolist()


# --------------------------------------------------------------------------------------------- prompt / completion
def test_prompt_completion_bytes_by_hand():
    ex = prompt_completion_example("ab", "cd", BYTES)  # the byte tokenizer has no end-of-sequence token
    assert ex.ids.tolist() == b("abcd") and ex.mask.tolist() == [False, False, True, True]
    ex = prompt_completion_example("", "xy", BYTES)  # nothing precedes the first completion token
    assert ex.ids.tolist() == b("xy") and ex.mask.tolist() == [False, True]


def test_prompt_completion_appends_eos_once(tiny_tok):
    p, c = tiny_tok.encode("The capital of France is"), tiny_tok.encode(" Paris.")
    ex = prompt_completion_example("The capital of France is", " Paris.", tiny_tok)
    assert ex.ids.tolist() == p.tolist() + c.tolist() + [tiny_tok.eos_token_id]
    assert ex.mask.tolist() == [False] * p.size + [True] * (c.size + 1)
    again = prompt_completion_example("The capital of France is", " Paris.<|im_end|>", tiny_tok)
    assert again.ids.tolist() == ex.ids.tolist()


def test_prompt_completion_tokenized_separately(tiny_tok):
    # "Hello " + "world": joined, BPE reads " world"; separately, the prompt's tokens end with the space, as at
    # inference time when the model reads the prompt alone
    ex = prompt_completion_example("Hello ", "world", tiny_tok)
    p = tiny_tok.encode("Hello ").tolist()
    assert ex.ids.tolist()[:len(p)] == p
    assert ex.ids.tolist()[len(p):] == tiny_tok.encode("world").tolist() + [tiny_tok.eos_token_id]


# --------------------------------------------------------------------------------------------- chat
CHAT = [{"role": "system", "content": "you are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]


def test_chat_mask_by_hand_tiny_bpe(tiny_tok):
    ex = chat_example(CHAT, tiny_tok)
    enc = tiny_tok.encode
    eos = [tiny_tok.eos_token_id]
    nl = enc("\n").tolist()
    start = tiny_tok.token_to_id("<|im_start|>")
    def head(role):
        return [start] + enc(role + "\n").tolist()
    context1 = (head("system") + enc("you are a helpful assistant.").tolist() + eos + nl
                + head("user") + enc("What is the capital of France?").tolist() + eos + nl + head("assistant"))
    answer1 = enc("Paris.").tolist() + eos
    context2 = nl + head("user") + enc("And of Italy?").tolist() + eos + nl + head("assistant")
    answer2 = enc("Rome.").tolist() + eos  # the template's final newline is dropped: nothing after it is scored
    assert ex.ids.tolist() == context1 + answer1 + context2 + answer2
    assert ex.mask.tolist() == ([False] * len(context1) + [True] * len(answer1) + [False] * len(context2)
                                + [True] * len(answer2))


def test_chat_mask_smollm2(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome! 😊"}]
    ex = chat_example(msgs, tok)
    assert trained_spans(tok, ex) == ["The capital of France is Paris.<|im_end|>", "You're welcome! 😊<|im_end|>"]
    n_answers = tok.encode("The capital of France is Paris.").size + tok.encode("You're welcome! 😊").size + 2
    assert ex.n_targets == n_answers
    # the untrained part is the template's text: the default system prompt, the user turns, the role headers
    assert tok.decode(ex.ids) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
        "<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\nYou're welcome! 😊<|im_end|>")
    assert ex.ids[-1] == 2 and ex.mask[-1]


def test_smollm2_prompt_completion_and_conversational(smollm2_dir, tmp_path):
    tok = load_tokenizer(smollm2_dir)
    path = write(tmp_path, "pc.jsonl", [
        {"prompt": "The capital of France is", "completion": " Paris."},
        {"prompt": [{"role": "user", "content": "Capital of France?"}],
         "completion": [{"role": "assistant", "content": "Paris."}]},
    ])
    ds = load_data(path, tok)
    assert ds.kind == "prompt-completion" and len(ds) == 2
    assert trained_spans(tok, ds.examples[0]) == [" Paris.<|im_end|>"]
    assert trained_spans(tok, ds.examples[1]) == ["Paris.<|im_end|>"]
    assert ds.seq == max(len(e) for e in ds.examples)


def test_conversational_completion_trains_only_its_own_assistant_turns(tiny_tok):
    prompt = CHAT[:3] + [CHAT[3]]  # an earlier assistant turn inside the prompt is context
    ex = chat_example(prompt + [CHAT[4]], tiny_tok, train_from=len(prompt))
    assert trained_spans(tiny_tok, ex) == ["Rome.<|im_end|>"]


def test_jsonl_blank_lines_and_line_numbers(tmp_path, tiny_tok):
    path = write(tmp_path, "c.jsonl", ["", json.dumps({"messages": CHAT[1:3]}), "   ",
                                       json.dumps({"prompt": "a", "completion": "b"})])
    ds = load_data(path, tiny_tok)
    assert [e.where for e in ds.examples] == ["line 2", "line 4"]
    assert ds.kind == "chat+prompt-completion"


# --------------------------------------------------------------------------------------------- batches
def test_collate_by_hand():
    e1 = Example([5, 6, 7, 8], [False, False, True, True])
    e2 = Example([9, 10], [False, True])
    x, y = collate([e1, e2], pad_id=0)
    assert x.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert y.tolist() == [[IGNORE_INDEX, 7, 8], [10, IGNORE_INDEX, IGNORE_INDEX]]
    assert x.dtype == y.dtype == np.int64


def test_batch_indices_epochs_and_determinism():
    def first(seed, k):
        it = batch_indices(6, 3, np.random.default_rng(seed))
        return [next(it).tolist() for _ in range(k)]

    a = first(0, 4)
    assert a == first(0, 4) and a != first(1, 4)
    assert sorted(a[0] + a[1]) == list(range(6)) and sorted(a[2] + a[3]) == list(range(6))  # each epoch once
    small = batch_indices(2, 3, np.random.default_rng(0))
    assert all(sorted(set(next(small).tolist())) == [0, 1] for _ in range(3))  # n < batch: repeats, all seen
    with pytest.raises(ValueError, match="explicit rng"):
        next(batch_indices(3, 1, None))


def test_mean_nll_is_the_token_weighted_mean_and_padding_changes_nothing():
    rng = np.random.default_rng(0)
    config = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    model = Llama(config, rng=rng)
    examples = [Example(rng.integers(0, 256, n), np.arange(n) >= k) for n, k in [(9, 1), (4, 2), (12, 5)]]

    def by_hand(e):  # log-softmax of the model's logits, each example alone, no padding
        z = model(e.ids[None, :-1]).data[0].astype(np.float64)
        logp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
        t = np.arange(1, len(e))
        keep = e.mask[1:]
        return -logp[t - 1, e.ids[t]][keep].sum(), keep.sum()

    sums = [by_hand(e) for e in examples]
    expected = sum(s for s, _ in sums) / sum(n for _, n in sums)
    for batch in (1, 2, 3):
        assert mean_nll(model, examples, batch=batch) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("lines,match", [
    (['{"messages": []}', '{"prompt": "a", "completion": "b"', ""], r"line 2: not valid JSON"),
    ([{"text": "hello"}], r"line 1: a record needs \"messages\".*keys \['text'\]"),
    ([[1, 2]], r"line 1: expected a JSON object"),
    ([{"prompt": "a", "completion": "b"}, {"messages": [{"role": "user", "content": "hi"}]}],
     r"line 2: the conversation has no assistant message"),
    ([{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}],
     r"line 1: the conversation starts with an assistant message"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}], r"line 1: message 1 must be"),
    ([{"messages": "hi"}], r"line 1: \"messages\" must be a non-empty list"),
    ([{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}], r"line 1: .*both be strings"),
    ([{"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}],
     r"line 1: the completion has no assistant message"),
    ([{"prompt": "a", "completion": ""}, {"prompt": "", "completion": ""}], r"line 2: the completion is empty"),
    (["", "  "], r"has no records"),
])
def test_jsonl_errors(tmp_path, tiny_tok, lines, match):
    path = write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(ValueError, match=match) as e:
        load_data(path, tiny_tok)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_record_longer_than_seq_is_refused_not_truncated(tmp_path, tiny_tok):
    path = write(tmp_path, "long.jsonl", [{"prompt": "a", "completion": "b"},
                                          {"prompt": "What is the capital of France?", "completion": " Paris."}])
    n = len(load_data(path, tiny_tok).examples[1])
    assert len(load_data(path, tiny_tok, seq=n).examples[1]) == n
    with pytest.raises(ValueError, match=rf"line 2: the record is {n} tokens long, more than the sequence length "
                                         rf"{n - 1} \(--seq\)"):
        load_data(path, tiny_tok, seq=n - 1)
    with pytest.raises(ValueError, match=rf"line 2: the record is {n} tokens long, more than the model's context"):
        load_data(path, tiny_tok, context=n - 1)


@pytest.mark.parametrize("name,content,kw,match", [
    ("a.txt", b"", {}, r"data file is empty"),
    ("a.jsonl", b"", {}, r"data file is empty"),
    ("a.txt", b"\xff\xfe\xfa", {}, r"is not UTF-8 text"),
    ("a.txt", b"x", {}, r"holds 1 token\(s\); training needs at least 2"),
    ("a.csv", b"x,y", {}, r"must be \.txt .* or \.jsonl"),
    ("a.txt", b"hello", {"seq": 300, "context": 256}, r"sequence length 300 is longer than the model's context \(256"),
    ("a.txt", b"hello", {"seq": 1}, r"sequence length must be an integer >= 2"),
])
def test_file_errors(tmp_path, name, content, kw, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=match):
        load_data(tmp_path / name, BYTES, **kw)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="data file not found"):
        load_data(tmp_path / "nope.txt", BYTES)


def test_chat_needs_a_template(tmp_path):
    path = write(tmp_path, "c.jsonl", [{"messages": CHAT}])
    with pytest.raises(ValueError, match=r"line 1: chat records need a chat template"):
        load_data(path, BYTES)


def _with_template(tmp_path, tiny_dir, template):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(tiny_dir, d)
    (d / "chat_template.jinja").write_text(template, encoding="utf-8")
    return load_tokenizer(d)


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path, tiny_dir):
    # a footer after the last message only: the conversation up to a turn is not the beginning of the whole
    tok = _with_template(tmp_path, tiny_dir, "{% for m in messages %}{{ m['content'] + '<|im_end|>' }}{% endfor %}"
                                             "{% if not add_generation_prompt %}<|endoftext|>{% endif %}")
    with pytest.raises(ValueError, match="cannot be located"):
        chat_example(CHAT, tok)


def test_turn_boundary_inside_a_token_is_refused(tmp_path, tiny_dir):
    # the generation prompt ends in "cap" and the answer starts with "ital": BPE reads "capital" as one token
    tok = _with_template(tmp_path, tiny_dir, "{% for m in messages %}{% if m['role'] == 'assistant' %}"
                                             "{{ 'The cap' + m['content'] + '<|im_end|>' }}{% else %}"
                                             "{{ m['content'] + '\n' }}{% endif %}{% endfor %}"
                                             "{% if add_generation_prompt %}{{ 'The cap' }}{% endif %}")
    assert tok.encode("The capital").size < tok.encode("The cap").size + tok.encode("ital").size
    with pytest.raises(ValueError, match="token boundary"):
        chat_example([{"role": "user", "content": "x"}, {"role": "assistant", "content": "ital"}], tok)
