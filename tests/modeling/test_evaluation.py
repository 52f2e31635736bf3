"""``lora_ref.modeling.evaluation`` and ``lora-ref eval`` on small models: windows, the loss, errors.

The loss against torch on a real model (and against PEFT with an adapter) is in
``tests/interop/test_generate_interop.py``.
"""

import json
import math

import numpy as np
import pytest

from lora_ref.cli import main
from lora_ref.modeling.evaluation import evaluate_tokens, window_nll, windows
from lora_ref.modeling.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    config = LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model = Llama(config, rng=np.random.default_rng(0))
    path = tmp_path_factory.mktemp("eval") / "model"
    model.save_pretrained(path)
    return path, model


def test_windows_are_consecutive_and_a_short_last_one_counts_from_two_tokens():
    ids = np.arange(10)
    assert [w.tolist() for w in windows(ids, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [w.tolist() for w in windows(np.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # [8] predicts nothing
    assert windows(np.arange(1), 4) == []
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="seq must be an integer >= 2"):
            windows(ids, bad)


def test_window_nll_is_minus_log_softmax_of_the_next_token():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    expected = np.zeros(2)
    for b in range(2):
        for t in range(4):  # position t predicts token t + 1; the last position predicts nothing
            z = logits[b, t].astype(np.float64)
            expected[b] -= z[ids[b, t + 1]] - math.log(np.exp(z).sum())
    np.testing.assert_allclose(window_nll(logits, ids), expected, rtol=1e-6)
    big = np.full((1, 2, 3), 1e4, dtype=np.float32)  # no overflow
    assert window_nll(big, np.array([[0, 1]]))[0] == pytest.approx(math.log(3), rel=1e-6)


def test_evaluate_tokens_is_the_mean_over_predicted_positions(byte_model):
    _, model = byte_model
    ids = np.random.default_rng(1).integers(0, 256, 70)
    result = evaluate_tokens(model, ids, 32)
    # by hand: windows 32, 32, 6 -> 31 + 31 + 5 predictions, each window run alone through the model
    total = 0.0
    for w in (ids[:32], ids[32:64], ids[64:]):
        logits = np.asarray(model(w[None]).data, dtype=np.float64)[0]
        z = logits[:-1]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        total += float((lse - z[np.arange(len(w) - 1), w[1:]]).sum())
    assert result["tokens"] == 67 and result["windows"] == 3 and result["text_tokens"] == 70
    assert result["loss"] == pytest.approx(total / 67, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    with pytest.raises(ValueError, match="longer than the model's context"):
        evaluate_tokens(model, ids, 33)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_tokens(model, ids[:1], 32)


def run(capsys, *argv):
    code = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_command_json_and_line(byte_model, tmp_path, capsys):
    path, model = byte_model
    data = tmp_path / "t.txt"
    text = "héllo wörld, " * 8  # bytes: 'é' and 'ö' are two tokens each
    data.write_text(text, encoding="utf-8")
    code, out, err = run(capsys, "--model", path, "--data", data, "--seq", 32, "--json")
    assert code == 0, err
    doc = json.loads(out)
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    assert doc["loss"] == evaluate_tokens(model, ids, 32)["loss"] and doc["text_tokens"] == ids.size
    assert set(doc) >= {"loss", "perplexity", "tokens", "windows", "seq", "model", "adapter", "data"}
    code, out, _ = run(capsys, "--model", path, "--data", data, "--seq", 32)
    assert code == 0 and out.startswith(f"loss {doc['loss']:.4f} nats/token") and out.count("\n") == 1


def test_eval_command_errors(byte_model, tmp_path, capsys):
    path, _ = byte_model
    data = tmp_path / "t.txt"
    data.write_text("some text to score", encoding="utf-8")
    (tmp_path / "one.txt").write_text("a", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        (["--model", path, "--data", data, "--seq", 33], 2, "--seq 33 is longer than the model's context (32 tokens)"),
        (["--model", path, "--data", data, "--seq", 1], 2, "--seq must be >= 2"),
        (["--model", path, "--data", tmp_path / "missing.txt"], 1, "data file not found"),
        (["--model", path, "--data", tmp_path / "latin1.txt", "--seq", 8], 1, "is not UTF-8 text"),
        (["--model", path, "--data", tmp_path / "one.txt", "--seq", 8], 1, "has 1 token(s); eval needs at least 2"),
        (["--model", tmp_path / "nope", "--data", data], 1, "neither an existing folder nor a known model name"),
    ]
    for argv, status, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == status and out == "" and message in err and err.count("\n") == 1, (argv, err)
