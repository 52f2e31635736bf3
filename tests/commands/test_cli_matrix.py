"""The bad-input matrix: every mistake a user makes gets a one-line answer, a non-zero exit and costs no file.

Each row runs the real command line (a subprocess, so a traceback would show) and checks: the exit status, one
line on stderr naming the problem, no traceback, the inputs byte for byte unchanged, and no output left behind.
"""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_ref import cli
from lora_ref.adapters.lora import LoraConfig, inject_lora
from lora_ref.adapters.peft_files import save_adapter
from lora_ref.modeling.llama import Llama

TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "model_type": "llama", "tie_word_embeddings": False}


def _model(rng, **over):
    return Llama({**TINY, **over}, rng=rng)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A base checkpoint, an adapter for it, and an adapter for a wider base."""
    root = tmp_path_factory.mktemp("matrix")
    rng = np.random.default_rng(0)
    base = _model(rng)
    base.save_pretrained(root / "base")
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    save_adapter(inject_lora(Llama.from_pretrained(root / "base"), cfg, rng=rng), root / "adapter")
    other = inject_lora(_model(rng, hidden_size=48, num_attention_heads=4), cfg, rng=rng)
    save_adapter(other, root / "adapter_other")
    return root


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def run_cli(*args, inputs=(), out=None, code=None):
    """Run lora-ref; assert a one-line error, no traceback, unchanged inputs and no output. Returns stderr."""
    before = {str(i): _snapshot(Path(i)) if Path(i).is_dir() else None for i in inputs}
    out_before = _snapshot(Path(out)) if out is not None and Path(out).is_dir() else None
    proc = subprocess.run([sys.executable, "-m", "lora_ref", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    # progress bars (tqdm, on stderr) may come first; the error itself is exactly one line, the last one
    lines = [ln for ln in proc.stderr.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    err = lines[-1] if lines else ""
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert err.startswith("lora-ref") and "error" in err, proc.stderr
    assert sum("error" in ln for ln in lines) == 1, proc.stderr
    for i, snap in before.items():
        if snap is not None:
            assert _snapshot(Path(i)) == snap, f"{i} changed"
    if out is not None:
        out = Path(out)
        if out_before is None:
            assert not out.exists(), f"{out} was created"
        else:
            assert _snapshot(out) == out_before, f"{out} changed"
        leftovers = [p.name for p in out.resolve().parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers, leftovers
    return err


# ------------------------------------------------------------------------------------------------ safetensors files
@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_damaged_adapter_file_is_named(world, tmp_path, damage):
    adapter = _copy(world / "adapter", tmp_path / "adapter")
    f = adapter / "adapter_model.safetensors"
    if damage == "missing":
        f.unlink()
    elif damage == "corrupt":
        f.write_bytes(b"this is not a safetensors file at all" * 10)
    else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    err = run_cli("merge", "--base", world / "base", "--adapter", adapter, "--out", tmp_path / "out",
                  inputs=[world / "base", adapter], out=tmp_path / "out")
    assert "adapter_model.safetensors" in err


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_damaged_base_checkpoint_is_named(world, tmp_path, damage):
    base = _copy(world / "base", tmp_path / "base")
    f = base / "model.safetensors"
    f.write_bytes(b"\x00" * 64 if damage == "corrupt" else f.read_bytes()[:-100])
    for args in (["merge", "--base", base, "--adapter", world / "adapter"], ["quantize", "--base", base]):
        err = run_cli(*args, "--out", tmp_path / "out", inputs=[base, world / "adapter"], out=tmp_path / "out")
        assert "model.safetensors" in err


def test_missing_base_or_adapter_folder_names_the_path(world, tmp_path):
    missing = tmp_path / "no-such-base"
    err = run_cli("merge", "--base", missing, "--adapter", world / "adapter", "--out", tmp_path / "out",
                  out=tmp_path / "out")
    assert str(missing) in err
    missing = tmp_path / "no-such-adapter"
    err = run_cli("merge", "--base", world / "base", "--adapter", missing, "--out", tmp_path / "out",
                  inputs=[world / "base"], out=tmp_path / "out")
    assert str(missing) in err
    err = run_cli("quantize", "--base", tmp_path / "nothing", "--out", tmp_path / "out", out=tmp_path / "out")
    assert str(tmp_path / "nothing") in err


def test_adapter_for_another_base_names_tensor_and_both_shapes(world, tmp_path):
    err = run_cli("merge", "--base", world / "base", "--adapter", world / "adapter_other", "--out", tmp_path / "out",
                  inputs=[world / "base", world / "adapter_other"], out=tmp_path / "out")
    assert "shape" in err
    assert "lora_A" in err or "lora_B" in err
    assert "48" in err and "32" in err  # the adapter's width and the base's


# ------------------------------------------------------------------------------------------------ flags
def test_unknown_model_preset_lists_the_known_ones():
    err = run_cli("count", "--model", "llama-9-1t", "--r", "8")
    assert "llama-9-1t" in err
    for known in ("gpt3-175b", "roberta-base", "llama-3-8b", "llama-3-70b", "mistral-7b"):
        assert known in err


@pytest.mark.parametrize("blocksize", ["48", "8192", "0", "sixty-four"])
def test_invalid_blocksize(world, tmp_path, blocksize):
    err = run_cli("quantize", "--base", world / "base", "--out", tmp_path / "out", "--blocksize", blocksize,
                  inputs=[world / "base"], out=tmp_path / "out", code=2)
    assert "blocksize" in err


def test_quantize_4bit_api_errors():
    from lora_ref.quant import quantize_4bit

    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit(np.ones(128, np.float32), blocksize=48)
    with pytest.raises(ValueError, match="(?i)nan"):
        quantize_4bit(np.array([1.0, np.nan] * 32, np.float32))
    with pytest.raises(ValueError, match="(?i)inf"):
        quantize_4bit(np.array([1.0, np.inf] * 32, np.float32))


def test_nan_weights(world, tmp_path):
    from safetensors.numpy import load_file, save_file

    base = _copy(world / "base", tmp_path / "base")
    tensors = load_file(str(base / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = np.nan
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    err = run_cli("quantize", "--base", base, "--out", tmp_path / "out", inputs=[base], out=tmp_path / "out")
    assert "nan" in err.lower() and "up_proj" in err
    adapter = _copy(world / "adapter", tmp_path / "adapter")
    t = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key][0, 0] = np.nan
    save_file(t, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    err = run_cli("merge", "--base", world / "base", "--adapter", adapter, "--out", tmp_path / "out2",
                  inputs=[world / "base", adapter], out=tmp_path / "out2")
    assert "nan" in err.lower()


# ------------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("command", ["merge", "quantize", "vectors"])
def test_non_empty_out_is_refused_and_untouched(world, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("do not lose me")
    args = {"merge": ["merge", "--base", world / "base", "--adapter", world / "adapter"],
            "quantize": ["quantize", "--base", world / "base"], "vectors": ["vectors"]}[command]
    err = run_cli(*args, "--out", out, inputs=[world / "base", world / "adapter"], out=out)
    assert "not empty" in err and str(out) in err


@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_unwritable_out(world, command):
    """/proc refuses a new folder to every user, root included, so this runs everywhere."""
    out = Path("/proc/lora-ref-cannot-write-here")
    args = {"merge": ["merge", "--base", world / "base", "--adapter", world / "adapter"],
            "quantize": ["quantize", "--base", world / "base"]}[command]
    err = run_cli(*args, "--out", out, inputs=[world / "base", world / "adapter"])
    assert "/proc" in err


@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_interrupted_write_leaves_nothing_behind(world, tmp_path, monkeypatch, capsys, command):
    import lora_ref.files.outputs
    import lora_ref.modeling.llama

    real = lora_ref.files.outputs.write_json

    def interrupted(path, obj):  # the first file is written, then the user presses Ctrl-C
        real(path, obj)
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_ref.files.outputs, "write_json", interrupted)
    monkeypatch.setattr(lora_ref.modeling.llama, "write_json", interrupted)
    out = tmp_path / "out"
    before = _snapshot(world)
    args = {"merge": ["merge", "--base", str(world / "base"), "--adapter", str(world / "adapter")],
            "quantize": ["quantize", "--base", str(world / "base")]}[command]
    rc = cli.main([*args, "--out", str(out)])
    lines = [ln for ln in capsys.readouterr().err.replace("\r", "\n").splitlines() if ln.strip() and "%|" not in ln]
    assert rc == 130 and len(lines) == 1 and "interrupted" in lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left either
    assert _snapshot(world) == before


def test_missing_parent_folders_of_out_are_created(world, tmp_path):
    """A fresh clone has no runs/: the default output paths must work there."""
    out = tmp_path / "runs" / "deeper" / "quantized"
    proc = subprocess.run([sys.executable, "-m", "lora_ref", "quantize", "--base", str(world / "base"), "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()
