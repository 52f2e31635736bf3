"""``lora-ref merge --report FILE``: the report of a QLoRA adapter on a 4-bit base checkpoint (equal to the library's
``merge_report`` on the same inputs), PEFT's re-quantized merge in --out, and one-line errors."""

import json

import numpy as np
import pytest

from lora_ref.adapters import qlora as Q
from lora_ref.adapters.lora import LoraConfig, inject_lora, lora_layers
from lora_ref.adapters.merge_report import capture_inputs, load_4bit_llama, merge_report, save_4bit_llama
from lora_ref.adapters.peft_files import load_adapter, save_adapter
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.testing import tiny_llama_config

TINY = tiny_llama_config()


@pytest.fixture
def files(tmp_path):
    Llama(LlamaConfig(**TINY), rng=np.random.default_rng(0)).save_pretrained(tmp_path / "float")
    save_4bit_llama(Q.quantize_model(Llama.from_pretrained(tmp_path / "float")), tmp_path / "q4")
    model = load_4bit_llama(tmp_path / "q4")
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False), rng=np.random.default_rng(1))
    save_adapter(model, tmp_path / "adapter")
    return tmp_path


def run_cli(capsys, *argv):
    code = main(["merge", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_and_merged_checkpoint(files, capsys):
    t = files
    code, out, err = run_cli(capsys, "--base", t / "q4", "--adapter", t / "adapter", "--out", t / "merged",
                             "--report", t / "report.json", "--report-original", t / "float", "--seed", 3)
    assert code == 0, err
    assert "recommendation:" in out
    report = json.loads((t / "report.json").read_text())
    assert len(report["layers"]) == 6 and report["targets"][3] == "original"
    # the same numbers from the library on the same inputs
    model = load_adapter(load_4bit_llama(t / "q4"), t / "adapter")
    ids = np.random.default_rng(3).integers(0, 64, size=(1, 64))
    names = [n for n, _ in lora_layers(model)]
    lib = merge_report(model, inputs=capture_inputs(model, ids, names),
                       original={n: Llama.from_pretrained(t / "float").get_submodule(n).weight.data for n in names})
    for n in names:
        for k, v in lib["layers"][n]["errors"].items():
            assert report["layers"][n]["errors"][k] == pytest.approx(v, rel=1e-12)
    assert report["recommendation"] == lib["recommendation"]
    # --out holds PEFT's re-quantized merge, loadable as a 4-bit checkpoint
    merged = load_4bit_llama(t / "merged")
    expect = Q.merge_and_unload_4bit(load_adapter(load_4bit_llama(t / "q4"), t / "adapter"), "requantize")
    for n in names:
        np.testing.assert_array_equal(merged.get_submodule(n).dequantize(), expect.get_submodule(n).dequantize())


def test_float_base_is_one_line_error(files, capsys):
    t = files
    Llama.from_pretrained(t / "float")
    model = Llama.from_pretrained(t / "float")
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), rng=np.random.default_rng(0))
    save_adapter(model, t / "float_adapter")
    code, out, err = run_cli(capsys, "--base", t / "float", "--adapter", t / "float_adapter", "--out",
                             t / "o", "--report", t / "r.json")
    assert code == 1 and err.count("\n") == 1 and "no 4-bit merge question" in err
    assert not (t / "r.json").exists() and not (t / "o").exists()


def test_report_usage_errors(files, capsys):
    t = files
    code, _, err = run_cli(capsys, "--base", t / "q4", "--adapter", t / "adapter", "--adapter", t / "adapter",
                           "--out", t / "o", "--report", t / "r.json")
    assert code == 2 and "exactly one --adapter" in err and err.count("\n") == 1
    code, _, err = run_cli(capsys, "--base", t / "q4", "--adapter", t / "adapter", "--out", t / "o",
                           "--report-original", t / "float")
    assert code == 2 and "--report-original needs --report" in err
