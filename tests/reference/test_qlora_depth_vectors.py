"""The QLoRA-depth reference cases (qlora_depth_cases) hold what their descriptions say, checked from their own
tensors with formulas written out here (not with the code that made them)."""

import numpy as np
import pytest

from lora_ref.quant import dequantize_4bit, quantize_4bit
from lora_ref.reference.vectors import qlora_depth_cases


@pytest.fixture(scope="module")
def cases():
    return {c.name: c for c in qlora_depth_cases()}


def test_loftq_case(cases):
    c = cases["loftq_iterations"]
    W = c.inputs["W"]
    np.testing.assert_array_equal(c.outputs["dequantized_iter1"],
                                  dequantize_4bit(*quantize_4bit(W, 64, "nf4", False, c.params["rounding"])))
    e1 = np.linalg.norm((W - c.outputs["dequantized_iter1"] - c.outputs["BA_iter1"]).astype(np.float64))
    assert c.outputs["errors"][0] == pytest.approx(e1, rel=1e-5)
    assert np.linalg.matrix_rank(c.outputs["BA_iter1"].astype(np.float64), tol=1e-6) == 4


def test_pissa_conversion_case(cases):
    c = cases["pissa_to_lora_conversion"]
    i, o, s = c.inputs, c.outputs, c.params["scaling"]
    Ap, Bp = o["lora_A_converted"].astype(np.float64), o["lora_B_converted"].astype(np.float64)
    assert Ap.shape[0] == Bp.shape[1] == c.params["converted_r"]
    y_conv = i["x"].astype(np.float64) @ (i["W"] + s * Bp @ Ap).T
    np.testing.assert_allclose(y_conv, o["y"], rtol=1e-4, atol=1e-5)


def test_dora_cases_normalize_their_axes(cases):
    row, col = cases["dora_4bit_forward_merge"], cases["dora_alternative_axis"]
    np.testing.assert_allclose(np.linalg.norm(row.outputs["merged_weight"].astype(np.float64), axis=1),
                               row.inputs["magnitude"], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(col.outputs["merged_weight"].astype(np.float64), axis=0),
                               col.inputs["magnitude"], rtol=1e-5)
    np.testing.assert_allclose(row.inputs["x"].astype(np.float64) @ row.outputs["merged_weight"].T.astype(np.float64),
                               row.outputs["y"], rtol=1e-4, atol=1e-5)
    assert np.abs(row.outputs["y"] - col.outputs["y"]).max() > 1e-3  # the two axes are different functions


def test_merge_targets_case(cases):
    c = cases["qlora_merge_targets"]
    i, o, s = c.inputs, c.outputs, c.params["scaling"]
    x = i["x"].astype(np.float64)
    Wq = i["W16"]  # not the base: rebuild dequant(W) from W16 the documented way
    Wq = dequantize_4bit(*quantize_4bit(Wq, 64, "nf4", True, c.params["rounding"])).astype(np.float64)
    ref = x @ (Wq + s * i["lora_B"].astype(np.float64) @ i["lora_A"]).T
    for k, t in enumerate(c.params["targets"]):
        err = np.linalg.norm(o[f"y_{t}"] - ref) / np.linalg.norm(ref)
        assert o["errors"][k] == pytest.approx(err, rel=1e-3, abs=1e-6), t
    assert o["errors"][2] < 1e-6 and o["errors"][4] < 1e-6 and o["errors"][0] > 1e-3


def test_embedding_case(cases):
    c = cases["lora_embedding"]
    i, o, s = c.inputs, c.outputs, c.params["scaling"]
    dE = s * (i["lora_embedding_B"].astype(np.float64) @ i["lora_embedding_A"]).T
    np.testing.assert_allclose(o["y"], (i["E"] + dE)[i["ids"]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o["merged_E"], i["E"] + dE, rtol=1e-5, atol=1e-5)
