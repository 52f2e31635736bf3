"""``lora-ref finetune``: flag checks, and short runs whose outputs load back (PEFT adapter or HF checkpoint)."""

import json

import numpy as np
import pytest

from lora_ref.adapters.lora import lora_layers
from lora_ref.adapters.peft_files import load_adapter, read_adapter_config
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama
from lora_ref.training import tutorial


def run_cli(capsys, *argv):
    code = main(["finetune", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra,msg", [
    (["--method", "lora", "--r", "0"], "--r"),
    (["--method", "lora", "--alpha", "-1"], "--alpha"),
    (["--method", "lora", "--steps", "0"], "--steps"),
    (["--method", "lora", "--seq", "500"], "--seq"),
    (["--method", "sgd"], "invalid choice"),
])
def test_bad_flags_exit_2(capsys, extra, msg):
    code, _, err = run_cli(capsys, *extra)
    assert code == 2 and msg in err and err.count("\n") == 1


def test_refuses_non_empty_out_before_training(tmp_path, capsys):
    (tmp_path / "x").write_text("mine")
    code, _, err = run_cli(capsys, "--method", "lora", "--out", tmp_path)
    assert code == 1 and "not empty" in err


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_short_run_writes_what_loads(tmp_path, capsys, method):
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "--method", method, "--quick", "--steps", "2", "--batch", "2", "--seq", "32",
                                "--targets", "all-linear", "--r", "4", "--alpha", "8", "--out", out, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["method"] == method and doc["steps"] == 2 and doc["out"] == str(out)
    state = json.loads((out / "trainer_state.json").read_text())
    assert len(state["train_loss"]) == 2
    base_dir = tutorial.pretrained_base_dir(quick=True, progress=False) / "model"
    if method == "full":
        model = Llama.from_pretrained(out)
        assert doc["trainable_parameters"] == model.num_parameters()
        return
    cfg = read_adapter_config(out)
    assert cfg.r == 4 and cfg.lora_alpha == 8
    model = load_adapter(Llama.from_pretrained(base_dir), out)
    layers = dict(lora_layers(model))
    assert len(layers) == 7 * model.config.num_hidden_layers
    assert doc["trainable_parameters"] == sum(4 * (l.in_features + l.out_features) for l in layers.values())
    assert any(np.abs(l.lora_B["default"].weight.data).max() > 0 for l in layers.values())  # it trained
