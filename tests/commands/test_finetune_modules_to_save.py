"""``lora-ref finetune --modules-to-save embed_tokens,lm_head``: the listed modules train in full, are saved under
PEFT's key names next to the adapter and load back; bad names are one-line errors."""

import json

import numpy as np
import safetensors.numpy

from lora_ref.adapters.peft_files import load_adapter, read_adapter_config
from lora_ref.autograd.tensor import no_grad
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama
from lora_ref.training import tutorial


def run_cli(capsys, *argv):
    code = main(["finetune", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_modules_to_save_train_and_load(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "--method", "lora", "--quick", "--steps", "2", "--batch", "2", "--seq", "16",
                                "--r", "2", "--modules-to-save", "embed_tokens,lm_head", "--out", out, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["modules_to_save"] == ["embed_tokens", "lm_head"]
    base_dir = tutorial.pretrained_base_dir(quick=True, progress=False) / "model"
    base = Llama.from_pretrained(base_dir)
    emb, head = base.model.embed_tokens.weight.data, base.lm_head.weight.data
    assert doc["trainable_parameters"] > emb.size + head.size  # both tables train in full (plus the adapters)
    assert read_adapter_config(out).modules_to_save == ["embed_tokens", "lm_head"]
    t = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    saved_emb, saved_head = t["base_model.model.model.embed_tokens.weight"], t["base_model.model.lm_head.weight"]
    assert saved_emb.shape == emb.shape and np.abs(saved_emb - emb).max() > 0  # trained
    assert np.abs(saved_head - head).max() > 0
    model = load_adapter(Llama.from_pretrained(base_dir), out)
    np.testing.assert_array_equal(model.model.embed_tokens.modules_to_save["default"].weight.data, saved_emb)
    np.testing.assert_array_equal(model.model.embed_tokens.original_module.weight.data, emb)
    ids = np.arange(8)[None] % base.config.vocab_size
    with no_grad():
        assert np.abs(np.asarray(model(ids).data) - np.asarray(base(ids).data)).max() > 0


def test_missing_module_and_full_method_are_one_line_errors(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--method", "lora", "--quick", "--steps", "1", "--modules-to-save", "wte")
    assert code == 1 and err.count("\n") == 1 and "modules_to_save names 'wte'" in err
    code, _, err = run_cli(capsys, "--method", "full", "--quick", "--steps", "1", "--modules-to-save", "lm_head")
    assert code == 2 and err.count("\n") == 1 and "--modules-to-save" in err
