"""The 4-bit merge report: every reported error equals the error measured here directly (from the quantization API
and float64 products, not from the report's own layers), the grid comparison and code counts, the recommendation,
and the refusal for float bases."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.adapters import qlora as Q
from lora_ref.adapters.lora import LoraConfig, inject_lora, lora_layers
from lora_ref.adapters.merge_report import NO_4BIT_QUESTION, merge_report
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.quant import dequantize_4bit, quantize_4bit
from lora_ref.quant.blockwise import unpack_nibbles
from lora_ref.testing import tiny_llama_config

TINY = tiny_llama_config(num_hidden_layers=1)


def qlora_llama(seed, b_scale, use_dora=False):
    rng = np.random.default_rng(seed)
    model = Llama(LlamaConfig(**TINY), rng=rng)
    original = {n: m.weight.data.copy() for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))}
    Q.quantize_model(model)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=use_dora,
                                  init_lora_weights=False), rng=rng)
    for _, layer in lora_layers(model):
        layer.lora_B["default"].weight.data[...] *= np.float32(b_scale)
    return model, original


def _direct(layer, x, W16):
    """Each target's relative output error, computed from scratch in float64 (plain LoRA)."""
    x64 = x.astype(np.float64)
    Wq = layer.base_layer.dequantize().astype(np.float64)
    A = layer.lora_A["default"].weight.data.astype(np.float64)
    B = layer.lora_B["default"].weight.data.astype(np.float64)
    s = layer.scaling["default"]
    ref = x64 @ (Wq + s * B @ A).T
    A32, B32 = A.astype(np.float32), B.astype(np.float32)
    T32 = (layer.base_layer.dequantize() + (B32 @ A32) * np.float32(s)).astype(np.float32)  # PEFT's order: (B·A)·s
    requant = dequantize_4bit(*quantize_4bit(T32, 64, "nf4", True, "cuda"))
    refit = dequantize_4bit(*Q.quantize_4bit_refit(T32, 64, "nf4", True))
    outs = {
        "requantize": x64 @ requant.astype(np.float64).T,
        "refit": x64 @ refit.astype(np.float64).T,
        "float": x64 @ T32.astype(np.float64).T,
        "original": x64 @ (W16.astype(np.float64) + s * B @ A).T,
        "unmerged": x64 @ Wq.T + s * (x64 @ A.T) @ B.T,
    }
    rel = {t: np.linalg.norm(y - ref) / np.linalg.norm(ref) for t, y in outs.items()}
    codes_changed = np.mean(unpack_nibbles(quantize_4bit(T32, 64, "nf4", True, "cuda")[0], T32.size)
                            != unpack_nibbles(layer.base_layer.weight.data.reshape(-1), T32.size))
    effect = np.linalg.norm(s * (x64 @ A.T) @ B.T) / np.linalg.norm(ref)
    return rel, codes_changed, effect


@settings(max_examples=8)
@given(seed=st.integers(0, 2**16), b_scale=st.sampled_from([0.01, 0.1, 1.0]))
def test_every_reported_error_equals_the_error_measured_directly(seed, b_scale):
    model, original = qlora_llama(seed, b_scale)
    rng = np.random.default_rng(seed + 1)
    inputs = {n: rng.standard_normal((16, l.in_features)).astype(np.float32) for n, l in lora_layers(model)}
    report = merge_report(model, inputs=inputs, original=original)
    assert report["targets"] == ["requantize", "refit", "float", "original", "unmerged"]
    for n, layer in lora_layers(model):
        row = report["layers"][n]
        rel, codes, effect = _direct(layer, inputs[n], original[n])
        for t in ("requantize", "refit", "original"):
            assert row["errors"][t] == pytest.approx(rel[t], rel=1e-4), (n, t)
        for t in ("float", "unmerged"):  # float32 rounding only: same size, not the same digits
            assert row["errors"][t] < 1e-5 and rel[t] < 1e-5
        assert row["codes_changed"] == pytest.approx(codes, abs=1e-12)
        assert row["adapter_effect"] == pytest.approx(effect, rel=1e-6)
        assert row["errors"]["refit"] <= row["errors"]["requantize"] * 1.05


def test_grid_comparison_and_recommendation_follow_the_adapter_size():
    small, _ = qlora_llama(3, 0.001)
    large, _ = qlora_llama(3, 3.0)
    rs = merge_report(small, rng=np.random.default_rng(0))
    rl = merge_report(large, rng=np.random.default_rng(0))
    # a tiny adapter sits far inside the NF4 cells: re-quantizing changes no code and loses all of it
    assert rs["total"]["delta_over_spacing"] < 0.05 and rs["total"]["codes_changed"] < 0.01
    assert rs["total"]["errors"]["requantize"] > 0.5 * rs["total"]["adapter_effect"]
    assert rs["recommendation"].startswith("keep the adapter unmerged")
    assert rl["total"]["delta_over_spacing"] > 1 and rl["total"]["codes_changed"] > 0.3
    assert rl["total"]["errors"]["requantize"] < 0.1 * rl["total"]["adapter_effect"]
    assert rl["recommendation"].startswith("merge into 4 bits")
    row = next(iter(rs["layers"].values()))
    assert row["share_beyond_half_spacing"] < 0.01 < next(iter(rl["layers"].values()))["share_beyond_half_spacing"]


def test_original_base_target_shows_the_quantization_error():
    model, original = qlora_llama(5, 0.1)
    r = merge_report(model, rng=np.random.default_rng(1), original=original)
    e = r["total"]["errors"]
    assert e["original"] > 100 * e["float"]
    assert "do not" in r["recommendation"]


def test_dora_adapter_is_reported():
    model, original = qlora_llama(7, 1.0, use_dora=True)
    r = merge_report(model, rng=np.random.default_rng(2), original=original)
    for row in r["layers"].values():
        assert row["errors"]["float"] < 1e-5 and row["errors"]["unmerged"] < 1e-5
        assert row["errors"]["requantize"] > 1e-4


def test_token_ids_give_the_layers_real_inputs():
    model, _ = qlora_llama(8, 0.5)
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 5))
    r = merge_report(model, ids=ids)
    assert set(r["layers"]) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    assert "forward" not in vars(model.model.layers[0].self_attn.q_proj)  # the recording hook is removed


def test_float_base_has_no_4bit_question():
    model = Llama(LlamaConfig(**TINY), rng=np.random.default_rng(0))
    inject_lora(model, LoraConfig(r=2, target_modules=["q_proj"]), rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="no 4-bit merge question") as ei:
        merge_report(model, rng=np.random.default_rng(0))
    assert "\n" not in str(ei.value) and NO_4BIT_QUESTION in str(ei.value)


def test_totals_are_layer_means():
    model, original = qlora_llama(9, 0.3)
    r = merge_report(model, rng=np.random.default_rng(3), original=original)
    rows = list(r["layers"].values())
    for t in r["targets"]:
        assert r["total"]["errors"][t] == pytest.approx(np.mean([row["errors"][t] for row in rows]), rel=1e-12)
    assert r["total"]["adapter_effect"] == pytest.approx(np.mean([row["adapter_effect"] for row in rows]))


def test_captured_inputs_keep_the_rows_in_order_on_two_threads(monkeypatch):
    """``capture_inputs`` watches each layer's calls; with two threads a long input would run every decoder layer
    in parts (``row_parts``), each part a call of its own, in whatever order the threads finish (here: the last part
    first). The capture runs the layers whole, so the rows come back in order, as on one thread."""
    from lora_ref.adapters.merge_report import capture_inputs
    from lora_ref.kernels import blas
    from lora_ref.threads import limited

    cfg = dict(TINY, hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
               head_dim=128, max_position_embeddings=512)
    model = Llama(LlamaConfig(**cfg), rng=np.random.default_rng(0)).eval()
    ids = np.random.default_rng(1).integers(0, cfg["vocab_size"], size=(1, 300))
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
    inner = blas.run_parallel
    monkeypatch.setattr(blas, "run_parallel", lambda fns, threads=None: inner(list(reversed(fns)), threads))
    with limited(1):
        want = capture_inputs(model, ids, names)
    with limited(2):
        got = capture_inputs(model, ids, names)
    for n in names:
        assert got[n].shape == (300, model.get_submodule(n).in_features)
        np.testing.assert_array_equal(got[n], want[n])
