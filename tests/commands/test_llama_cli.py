"""``lora-ref generate``: text out of a checkpoint, deterministic, with clear errors."""

import json
import math

import numpy as np
import pytest

from lora_ref.cli import main
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.training.data import encode


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    config = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=48)
    rng = np.random.default_rng(0)
    model = Llama(config, rng=rng)
    for p in model.parameters():
        if p.ndim == 2:
            p.data[...] = rng.normal(0, 2 / math.sqrt(p.shape[1]), p.shape)
    path = tmp_path_factory.mktemp("gen") / "model"
    model.save_pretrained(path)
    return path, model


def run(capsys, *argv):
    code = main(["generate", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_text_is_the_models_argmax_continuation(ckpt, capsys):
    path, model = ckpt
    code, out, err = run(capsys, "--model", path, "--prompt", "Hi", "--max-new-tokens", 10, "--json")
    assert code == 0, err
    doc = json.loads(out)
    expected = model.generate(encode("Hi")[None], 10, use_cache=False)[0]  # recomputed without the KV cache
    assert doc["token_ids"] == expected[2:].tolist()  # the generated ids only
    assert doc["prompt"] == "Hi" and doc["prompt_tokens"] == 2 and doc["new_tokens"] == 10
    assert doc["stop_reason"] == "length"  # a byte-level folder has no end token
    assert doc["text"] == bytes(expected[2:].astype(np.uint8)).decode("utf-8", errors="replace")
    assert "completion" not in doc
    code, text, _ = run(capsys, "--model", path, "--prompt", "Hi", "--max-new-tokens", 10)
    assert code == 0 and text == "Hi" + doc["text"] + "\n"


def test_default_length_fits_the_context(ckpt, capsys):
    path, _ = ckpt
    code, out, _ = run(capsys, "--model", path, "--prompt", "abc", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["max_new_tokens"] == doc["new_tokens"] == 48 - 3 and len(doc["token_ids"]) == 45


def test_sampling_is_reproducible_by_seed(ckpt, capsys):
    path, _ = ckpt
    args = ["--model", path, "--prompt", "x", "--max-new-tokens", 30, "--temperature", 1.5, "--top-k", 50, "--json"]
    a = json.loads(run(capsys, *args, "--seed", 1)[1])["token_ids"]
    b = json.loads(run(capsys, *args, "--seed", 1)[1])["token_ids"]
    c = json.loads(run(capsys, *args, "--seed", 2)[1])["token_ids"]
    greedy = json.loads(run(capsys, "--model", path, "--prompt", "x", "--max-new-tokens", 30, "--json")[1])
    assert a == b and a != c and a != greedy["token_ids"]


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--temperature", "1", "--top-k", "0"], "--top-k must be >= 1"),
    (["--top-k", "5"], "--top-k applies to sampling"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be >= 0"),
    (["--greedy", "--temperature", "0.5"], "--greedy and --temperature > 0 contradict"),
    (["--system", "be brief"], "--system applies to --chat"),
    (["--threads", "0"], "--threads must be a positive integer"),
])
def test_disallowed_flag_values_exit_2(ckpt, capsys, extra, message):
    code, out, err = run(capsys, "--model", ckpt[0], "--prompt", "a", *extra)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1


def test_bad_input_exits_1_with_one_line(ckpt, tmp_path, capsys):
    path, _ = ckpt
    cases = [
        (["--model", tmp_path / "missing", "--prompt", "a"], "neither an existing folder nor a known model name"),
        (["--model", path, "--prompt", ""], "the prompt is empty"),
        (["--model", path, "--prompt", "y" * 49], "the prompt is 49 tokens long; the model reads at most 48"),
        (["--model", path, "--chat", "hi"], "has no chat template"),
        (["--model", path, "--prompt", "abc", "--max-new-tokens", 46], "exceed max_position_embeddings=48"),
    ]
    other = tmp_path / "v300"
    Llama(LlamaConfig(vocab_size=300, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, max_position_embeddings=8)).save_pretrained(other)
    cases.append((["--model", other, "--prompt", "a"], "vocab_size is 300, but generate uses the byte-level"))
    cases.append((["--model", path, "--prompt", "a", "--adapter", tmp_path / "no-adapter"], "adapter folder not found"))
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 1 and out == "" and message in err and err.count("\n") == 1, (argv, err)


def test_help_shows_examples(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "lora-ref generate --model" in out and "--temperature" in out
