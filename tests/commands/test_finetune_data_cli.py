"""``lora-ref finetune --data FILE``: training on the user's text and chat files lowers their loss; what it writes
loads back; bad data, flags and folders are one-line errors with nothing written."""

import json
import os
import re

import numpy as np
import pytest

from lora_ref.adapters.lora import lora_layers
from lora_ref.adapters.peft_files import load_adapter, read_adapter_config
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama
from lora_ref.modeling.tokenizer import load_tokenizer
from lora_ref.testing.tiny_models import write_tiny_chat_model

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "system", "content": "you are a helpful assistant."},
     {"role": "user", "content": "What is the capital of Italy?"},
     {"role": "assistant", "content": "The capital of Italy is Rome."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "How can I help you today?"}],
]
TEXT = ("The quick brown fox jumps over the lazy dog. The capital of France is Paris. "
        "The capital of Italy is Rome. 1 + 1 = 2, 2 + 2 = 4. ") * 3


def run_cli(capsys, *argv):
    code = main(["finetune", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", rng=np.random.default_rng(0))


@pytest.fixture
def data(tmp_path):
    (tmp_path / "train.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in CHATS),
                                         encoding="utf-8")
    return tmp_path


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("kind,method,extra", [
    ("train.txt", "lora", ["--targets", "all-linear", "--lr", "1e-2", "--seq", "16"]),
    ("chat.jsonl", "lora", ["--targets", "all-linear", "--lr", "1e-2"]),
    ("chat.jsonl", "qlora", ["--targets", "q_proj,v_proj=4,down_proj", "--lr", "1e-2"]),
    ("train.txt", "full", ["--lr", "3e-3", "--seq", "32"]),
])
def test_training_lowers_the_loss_and_writes_what_loads(tiny, data, capsys, kind, method, extra):
    out = data / "run"
    code, stdout, err = run_cli(capsys, "--model", tiny, "--data", data / kind, "--eval-data", data / kind,
                                "--method", method, "--steps", 12, "--batch", 2, "--out", out, "--json", *extra)
    assert code == 0, err
    doc = last_json(stdout)
    assert doc["eval_loss_after"] < doc["eval_loss_before"] - 0.05, doc  # the training data's own loss fell
    assert doc["data_kind"] == ("text" if kind.endswith(".txt") else "chat") and doc["steps"] == 12
    state = json.loads((out / "trainer_state.json").read_text())
    assert len(state["train_loss"]) == 12 and state["val_loss"] == [doc["eval_loss_before"], doc["eval_loss_after"]]
    if method == "full":
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                "generation_config.json"} <= {p.name for p in out.iterdir()}
        model = Llama.from_pretrained(out)
        assert doc["trainable_parameters"] == model.num_parameters()
        assert not np.array_equal(model.model.embed_tokens.weight.data,
                                  Llama.from_pretrained(tiny).model.embed_tokens.weight.data)
        tok, base_tok = load_tokenizer(out), load_tokenizer(tiny)
        assert tok.encode(TEXT).tolist() == base_tok.encode(TEXT).tolist()
        assert tok.apply_chat_template(CHATS[0]) == base_tok.apply_chat_template(CHATS[0])
        return
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                               "trainer_state.json"}
    cfg = read_adapter_config(out)
    assert cfg.base_model_name_or_path == str(tiny)
    model = load_adapter(Llama.from_pretrained(tiny), out)
    layers = dict(lora_layers(model))
    assert doc["trainable_parameters"] == sum(l.r["default"] * (l.in_features + l.out_features)
                                              for l in layers.values())
    assert all(np.abs(l.lora_B["default"].weight.data).max() > 0 for l in layers.values())
    if method == "qlora":
        assert cfg.rank_pattern == {"v_proj": 4}
        assert sorted({n.rsplit(".", 1)[-1] for n in layers}) == ["down_proj", "q_proj", "v_proj"]
        assert {l.r["default"] for n, l in layers.items() if n.endswith("v_proj")} == {4}
        assert {l.r["default"] for n, l in layers.items() if not n.endswith("v_proj")} == {8}


def test_same_seed_same_run_other_seed_other_batches(tiny, data, capsys):
    def losses(seed):
        code, stdout, err = run_cli(capsys, "--model", tiny, "--data", data / "chat.jsonl", "--method", "lora",
                                    "--steps", 4, "--batch", 1, "--lr", "1e-2", "--seed", seed, "--json")
        assert code == 0, err
        return last_json(stdout)["train_loss_first"], last_json(stdout)["train_loss_last"]

    assert losses(0) == losses(0)
    assert losses(0) != losses(3)


def test_human_readable_summary(tiny, data, capsys):
    code, stdout, err = run_cli(capsys, "--model", tiny, "--data", data / "chat.jsonl", "--eval-data",
                                data / "train.txt", "--method", "lora", "--steps", 2, "--batch", 1)
    assert code == 0, err
    assert stdout.count("\n") == 1 and stdout.startswith("lora: ") and "3 chat examples" in stdout
    assert "eval loss" in stdout and "wrote" not in stdout
    assert "finetune (lora)" in err  # the progress bar (stderr; its postfix shows each step's loss)


def test_tutorial_model_on_a_text_file(data, capsys):
    """Without --model, the (quick) tutorial model trains on the user's text with its byte tokenizer."""
    code, stdout, err = run_cli(capsys, "--data", data / "train.txt", "--eval-data", data / "train.txt", "--quick",
                                "--method", "lora", "--steps", 3, "--batch", 2, "--seq", 64, "--lr", "3e-3", "--json")
    assert code == 0, err
    doc = last_json(stdout)
    assert doc["model"] is None and doc["seq"] == 64
    assert doc["target_tokens"] == len(TEXT.encode()) - -(-len(TEXT.encode()) // 64)  # one unscored per window
    assert doc["eval_loss_after"] < doc["eval_loss_before"]


def _nothing_written(folder):
    assert not (folder / "run").exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".run")]


@pytest.mark.parametrize("setup,argv,code,match", [
    (lambda d: (d / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n'),
     ["--data", "{d}/bad.jsonl"], 1, r"bad\.jsonl line 2: not valid JSON"),
    (lambda d: (d / "na.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
     ["--data", "{d}/na.jsonl"], 1, r"line 1: the conversation has no assistant message"),
    (lambda d: (d / "x.jsonl").write_text(json.dumps({"text": "hi"})),
     ["--data", "{d}/x.jsonl"], 1, r"line 1: a record needs \"messages\""),
    (lambda d: (d / "e.txt").write_text(""), ["--data", "{d}/e.txt"], 1, r"data file is empty"),
    (None, ["--data", "{d}/chat.jsonl", "--seq", "4"], 1,
     r"line 1: the record is \d+ tokens long, more than the sequence length 4"),
    (None, ["--data", "{d}/train.txt", "--seq", "257"], 2, r"--seq 257 is longer than the model's context \(256 tok"),
    (None, ["--data", "{d}/train.txt", "--eval-data", "{d}/missing.txt"], 1, r"data file not found"),
    (None, ["--data", "{d}/train.txt", "--targets", "q_proj,v_proj=0"], 2, r"rank must be >= 1"),
    (None, ["--data", "{d}/train.txt", "--targets", "all-linear,q_proj"], 2, r"'all-linear' cannot be combined"),
    (None, ["--data", "{d}/train.txt", "--targets", "nothing_here"], 1, r"not found in the base model"),
    (None, ["--data", "{d}/train.txt", "--quick"], 2, r"--quick .* does not apply with --model"),
    (None, ["--data", "{d}/train.txt", "--batch", "0"], 2, r"--batch must be >= 1"),
])
def test_errors_are_one_line_and_write_nothing(tiny, data, capsys, setup, argv, code, match):
    if setup is not None:
        setup(data)
    argv = [a.replace("{d}", str(data)) for a in argv]
    got, stdout, err = run_cli(capsys, "--model", tiny, "--method", "lora", "--steps", 1, "--out", data / "run", *argv)
    assert got == code, err
    assert err.count("\n") == 1 and re.search(match, err), err
    assert stdout == ""
    _nothing_written(data)


@pytest.mark.parametrize("argv,match", [
    (["--model", "{d}"], r"--model needs --data"),
    (["--eval-data", "{d}/train.txt"], r"--eval-data needs --data"),
    (["--model", "{d}/no-such-folder", "--data", "{d}/train.txt"], r"neither an existing folder nor a known model name"),
])
def test_flag_combinations(data, capsys, argv, match):
    argv = [a.replace("{d}", str(data)) for a in argv]
    code, _, err = run_cli(capsys, "--method", "lora", "--out", data / "run", *argv)
    assert code in (1, 2) and err.count("\n") == 1 and re.search(match, err), err
    _nothing_written(data)


def test_tokenizer_larger_than_the_model_is_refused_before_loading(tiny, data, capsys):
    import shutil

    other = data / "other"
    shutil.copytree(tiny, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))  # weights no longer fit either
    code, _, err = run_cli(capsys, "--model", other, "--data", data / "chat.jsonl", "--method", "lora",
                           "--out", data / "run")
    assert code == 1 and err.count("\n") == 1
    assert re.search(r"chat\.jsonl: the tokenizer of .* gives token id \d+, but the model's vocabulary has 100 ids",
                     err), err
    _nothing_written(data)


def test_chat_data_on_the_byte_level_tutorial_model_is_refused(data, capsys):
    code, _, err = run_cli(capsys, "--data", data / "chat.jsonl", "--quick", "--method", "lora", "--out",
                           data / "run")
    assert code == 1 and "line 1: chat records need a chat template" in err and err.count("\n") == 1
    _nothing_written(data)


def test_refuses_a_non_empty_out_before_reading_anything(tiny, data, capsys):
    (data / "run").mkdir()
    (data / "run" / "mine").write_text("keep")
    code, _, err = run_cli(capsys, "--model", tiny, "--data", data / "train.txt", "--method", "lora",
                           "--out", data / "run")
    assert code == 1 and "not empty" in err
    assert os.listdir(data / "run") == ["mine"]


def test_real_model_chat_loss_falls(smollm2_dir, tmp_path, capsys):
    """SmolLM2-135M-Instruct, LoRA on q_proj and v_proj: 3 steps on two chat records lower their loss."""
    facts = [("What is the capital of Zorbania?", "The capital of Zorbania is Quillport."),
             ("Who founded Quillport?", "Quillport was founded by Mara Venn.")]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in facts), encoding="utf-8")
    code, stdout, err = run_cli(capsys, "--model", smollm2_dir, "--data", path, "--eval-data", path, "--method",
                                "lora", "--targets", "q_proj,v_proj", "--steps", 3, "--batch", 2, "--lr", "3e-3",
                                "--out", tmp_path / "run", "--json")
    assert code == 0, err
    doc = last_json(stdout)
    assert doc["data_kind"] == "chat" and doc["examples"] == 2
    assert doc["trainable_parameters"] == 30 * 8 * ((576 + 576) + (576 + 192))  # r·(in+out) for q and v, 30 layers
    assert doc["eval_loss_after"] < doc["eval_loss_before"] - 0.2, doc
    assert read_adapter_config(tmp_path / "run").target_modules == ["q_proj", "v_proj"]
