"""Bad input to the quantization API raises ValueError naming the problem; the CLI prints one line."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from lora_ref.quant import dequantize_4bit, dequantize_blockwise, quantize_4bit, quantize_blockwise
from lora_ref.quant import serialize as S

X = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)


NEG_NAN = np.uint32(0xFFC00001).view(np.float32)  # a NaN with the sign bit set and a payload


@pytest.mark.parametrize("impl", ["numpy", "numba"])
@pytest.mark.parametrize("bad, what", [(np.nan, "NaN"), (NEG_NAN, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_input(bad, what, impl):
    # the check reads the block maxima, so each twin of absmax_blocks must carry the bad value through
    x = X.copy()
    x[3, 5] = bad
    with pytest.raises(ValueError, match=rf"contains {what} \(first at flat index 197, 1 non-finite in total\)"):
        quantize_4bit(x, impl=impl)
    with pytest.raises(ValueError, match=rf"contains {what} \(first at flat index 197"):
        quantize_blockwise(x, impl=impl)
    tail = np.zeros(1000, np.float32)  # two bad values in a partial last block, in float32 and in float16
    tail[[990, 999]] = bad
    with pytest.raises(ValueError, match=rf"contains {what} \(first at flat index 990, 2 non-finite in total\)"):
        quantize_4bit(tail, blocksize=64, impl=impl)
    half = tail.astype(np.float16)
    with pytest.raises(ValueError, match=rf"contains {what} \(first at flat index 990"):
        quantize_4bit(half, blocksize=64, impl=impl)


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, 64.0, True, "64"])
def test_blocksize_not_allowed(blocksize):
    with pytest.raises(ValueError, match="blocksize .* is not allowed"):
        quantize_4bit(X, blocksize=blocksize)
    with pytest.raises(ValueError, match="blocksize .* is not allowed"):
        quantize_blockwise(X, blocksize=blocksize)


def test_unknown_quant_type_rounding_impl():
    with pytest.raises(ValueError, match="unknown quant_type 'int4'"):
        quantize_4bit(X, quant_type="int4")
    with pytest.raises(ValueError, match="unknown rounding 'gpu'"):
        quantize_4bit(X, rounding="gpu")
    with pytest.raises(ValueError, match="unknown impl 'cupy'"):
        quantize_4bit(X, impl="cupy")


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.uint8, np.complex64, bool])
def test_unsupported_dtype(dtype):
    with pytest.raises(ValueError, match=r"dtype .*; expected float32, float16 or bfloat16"):
        quantize_4bit(X.astype(dtype))


def test_empty_input():
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit(np.zeros((0, 4), np.float32))


def test_packed_data_that_does_not_fit_its_state():
    packed, state = quantize_4bit(X)
    with pytest.raises(ValueError, match=r"packed data holds 255 bytes .* needs 256"):
        dequantize_4bit(packed[:-1], state)
    with pytest.raises(ValueError, match="must be uint8"):
        dequantize_4bit(packed.astype(np.int16), state)
    with pytest.raises(ValueError, match=r"state.absmax has shape \(7,\)"):
        dequantize_4bit(packed, dataclasses.replace(state, absmax=state.absmax[:-1]))
    with pytest.raises(ValueError, match=r"state's shape \(8, 65\)"):
        dequantize_4bit(packed, dataclasses.replace(state, shape=(8, 65)))
    with pytest.raises(ValueError, match="quant_type"):
        dequantize_4bit(packed, dataclasses.replace(state, quant_type="int4"))
    with pytest.raises(ValueError, match="must be a QuantState"):
        dequantize_4bit(packed, {"absmax": state.absmax})
    _, state_dq = quantize_4bit(X, double_quant=True)
    with pytest.raises(ValueError, match="uint8 absmax codes"):
        dequantize_4bit(packed, dataclasses.replace(state_dq, absmax=state_dq.absmax.astype(np.float32)))
    with pytest.raises(ValueError, match="needs an offset"):
        dequantize_4bit(packed, dataclasses.replace(state_dq, offset=None))


def test_8bit_codes_that_do_not_fit():
    codes, state = quantize_blockwise(X, blocksize=64)
    with pytest.raises(ValueError, match="511 elements"):
        dequantize_blockwise(codes.reshape(-1)[:-1], state)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_blockwise(codes.astype(np.int32), state)
    with pytest.raises(ValueError, match="sorted float32 table of 256"):
        quantize_blockwise(X, code=np.linspace(-1, 1, 16, dtype=np.float32))


def test_a_kernel_without_a_readable_twin_is_refused():
    """The chooser's table is checked when it is made: a kernel whose twin is missing, or has another signature,
    is a clear error at import, not a silent fallback at run time."""
    import types

    from lora_ref.kernels import switch
    from lora_ref.quant import steps

    kernel = types.ModuleType("fake_kernels")  # a kernel module with a twin of one step only
    kernel.absmax_blocks = lambda flat, blocksize: flat
    switch.Twins(kernel, {"absmax_blocks": switch.Operation(("absmax_blocks",), steps, bool)})  # fine
    with pytest.raises(ValueError, match="fake_kernels has no function 'encode_4bit'"):
        switch.Twins(kernel, {"encode_4bit": switch.Operation(("encode_4bit",), steps, bool)})
    kernel.pack_nibbles = lambda codes, n: codes
    with pytest.raises(ValueError, match="different signatures"):
        switch.Twins(kernel, {"pack_nibbles": switch.Operation(("pack_nibbles",), steps, bool)})
    switch.TWINS.pop("fake_kernels")
    assert set(switch.TWINS) >= {"lora_ref.quant.kernels"}


def test_serialized_state_errors():
    packed, state = quantize_4bit(X, double_quant=True)
    t = S.state_to_tensors("w.weight", packed, state)
    with pytest.raises(ValueError, match="'w.weight.nested_absmax' is missing"):
        S.state_from_tensors({k: v for k, v in t.items() if not k.endswith("nested_absmax")}, "w.weight")
    with pytest.raises(ValueError, match="missing tensor 'w.weight.absmax'"):
        S.state_from_tensors({k: v for k, v in t.items() if not k.endswith(".absmax")}, "w.weight")
    bad = dict(t)
    bad["w.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b"\xff{", dtype=np.uint8)
    with pytest.raises(ValueError, match="does not hold UTF-8 JSON"):
        S.state_from_tensors(bad, "w.weight")
    bad = dict(t)
    bad["w.weight"] = t["w.weight"][:-1]
    with pytest.raises(ValueError, match="packed bytes do not fit shape"):
        S.state_from_tensors(bad, "w.weight")
    with pytest.raises(ValueError, match="not found"):
        S.state_from_tensors(t, "v.weight")


def test_cli_errors(tmp_path, capsys):
    from lora_ref.cli import main

    assert main(["quantize", "--base", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "base checkpoint folder not found" in err
    assert main(["quantize", "--base", str(tmp_path), "--out", str(tmp_path / "o"), "--blocksize", "100"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--blocksize 100 is not allowed" in err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["quantize", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"quantization_config": {}}')
    assert main(["quantize", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "already has a quantization_config" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    S.write_safetensors(tmp_path / "model.safetensors", {"model.norm.weight": np.ones(4, np.float32)})
    assert main(["quantize", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no linear weights" in capsys.readouterr().err
    S.write_safetensors(tmp_path / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight":
                                                         np.array([[1.0, np.nan]], np.float32)})
    assert main(["quantize", "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "NaN" in err and "model.layers.0.self_attn.q_proj.weight" in err and err.count("\n") == 1
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    assert main(["quantize", "--base", str(tmp_path), "--out", str(busy)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
