"""The memory model against memory measured on our own NumPy model: one training step each as full, lora and qlora.

The measured number is the peak that ``tracemalloc`` traces during a training step (NumPy's and Numba's buffers)
above the traced memory before it; the predicted number comes from ``lora_ref.analysis.memory`` with the ``lora_ref``
profile. They must agree within 10% for each method (``lora-ref count --measure``).
"""

import contextlib
import json

import pytest

from lora_ref.analysis.counts import lora_plan, spec_from_config
from lora_ref.analysis.memory import Setup, training_memory
from lora_ref.analysis.memory_measure import measure, predict, step_peak, tutorial_config

TOLERANCE = 0.10


def _close(row):
    return abs(row["measured_bytes"] / row["predicted_bytes"] - 1) < TOLERANCE


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_tutorial_model_measured_within_10_percent(method):
    row = measure(method, batch=4, seq=64, r=8, targets="all-linear")
    assert row["measured_bytes"] > 1_000_000  # a real step was traced
    assert _close(row), row


# another shape of model: multi-head attention (no query regrouping copy), tied embeddings, other target sets
OTHER = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 160,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 64, "tie_word_embeddings": True}


@pytest.mark.parametrize("method,targets", [
    ("full", None),
    ("lora", ["q_proj", "v_proj"]),
    ("lora", ["o_proj"]),
    ("lora", ["down_proj=2"]),
    ("qlora", ["gate_proj", "up_proj"]),
])
def test_other_model_measured_within_10_percent(method, targets):
    row = measure(method, OTHER, batch=3, seq=48, r=4, targets=targets or "all-linear")
    assert _close(row), row


def _readable():
    """The readable NumPy twins instead of the fused kernels (when lora_ref has a switch between them)."""
    try:
        from lora_ref.kernels import switch as fast
    except ImportError:  # no fused kernels: every path is the readable one
        return contextlib.nullcontext()
    return fast.readable()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_readable_twins_measured_within_10_percent(method):
    with _readable():
        row = measure(method, batch=4, seq=64, r=8, targets="all-linear")
    assert row["fast_paths"] is False
    assert _close(row), row


def test_prediction_is_the_sum_of_its_terms():
    cfg = tutorial_config()
    spec = spec_from_config(cfg)
    plan = lora_plan(spec, "all-linear", 8)
    peak = step_peak(spec, "lora", plan, 4, 64)
    assert peak["peak"] == sum(peak[k] for k in ("activations", "saved_for_backward", "gradients", "temporaries"))
    est = training_memory(spec, "lora", Setup(batch=4, seq=64, dtype="fp32", profile="lora_ref"), plan)
    pred = predict(spec, "lora", plan, 4, 64)
    assert pred["step"] == peak["peak"] and pred["resident"] + pred["step"] == est.total
    assert pred["resident"] == est["weights"] + est["adapters"] + est["optimizer_state"]
    with pytest.raises(ValueError, match="float32"):
        training_memory(spec, "lora", Setup(dtype="bf16", profile="lora_ref"), plan)


def test_cli_measure_json(capsys):
    from lora_ref.cli import main

    assert main(["count", "--measure", "--json", "--batch", "4", "--seq", "64"]) == 0
    doc = json.loads(capsys.readouterr().out)  # exactly one JSON document on stdout
    rows = doc["measured"]
    assert [r["method"] for r in rows] == ["full", "lora", "qlora"]
    for r in rows:
        assert {"method", "predicted_bytes", "measured_bytes"} <= set(r)
        assert _close(r), r
