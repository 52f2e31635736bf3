"""The real-model bench rows (``lora-ref bench real``) on SmolLM2: the JSON shape, and that each baseline does the
same work — the same loss, computed here independently with transformers, and the same logits. Cheap shapes and
one repeat: the rows' timings are never asserted."""

import json

import numpy as np
import pytest

from lora_ref.bench import real
from lora_ref.cli import main

pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("torch_one_thread")]

KEYS = {"name", "ours_s", "baseline", "baseline_s", "ratio", "goal", "met", "params"}
ONE = {"repeats": 1, "warmup": 0}


def _check_row(r, name, baseline, goal):
    assert set(r) == KEYS
    assert r["name"] == name and r["baseline"] == baseline and r["goal"] == goal
    assert r["ours_s"] > 0 and r["baseline_s"] > 0 and r["ratio"] == pytest.approx(r["ours_s"] / r["baseline_s"])
    assert r["met"] is (r["ratio"] <= goal)
    json.dumps(r)  # the row is plain JSON


def _hf_loss(folder, x, y) -> float:
    """The base model's next-token loss on (x, y), by transformers alone."""
    import torch
    import torch.nn.functional as F
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = m(input_ids=torch.from_numpy(x)).logits
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1)))


def test_batch_is_text_of_the_corpus(smollm2_dir):
    x, y = real.batch_tokens(smollm2_dir, 2, 8)
    assert x.shape == y.shape == (2, 8) and x.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    import transformers

    from lora_ref.training.data import pydoc_text

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)  # windows of 9 tokens from the text's start
    start = tok(pydoc_text()[:2000], add_special_tokens=False)["input_ids"][:18]
    np.testing.assert_array_equal(np.concatenate([x, y[:, -1:]], axis=1).ravel(), start)


def test_real_lora_rows_same_work(smollm2_dir):
    lora, qlora = real.real_lora_rows(model_dir=smollm2_dir, batch=1, seq=12, timing=ONE)
    _check_row(lora, "real_lora_step", "torch_peft", 0.9)
    _check_row(qlora, "real_qlora_step", "real_lora_step", 1.3)
    p = lora["params"]
    assert p["batch"] == 1 and p["seq"] == 12 and p["lora"]["r"] == 16
    # r 16 on q, k, v, o, gate, up, down of 30 layers: 16 · (in + out) each
    per_layer = 16 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 2 + (1536 + 576))
    assert p["trainable_parameters"] == 30 * per_layer
    (ours0, peft0), (ours1, peft1) = p["losses"]
    x, y = real.batch_tokens(smollm2_dir, 1, 12)
    base = _hf_loss(smollm2_dir, x, y)  # lora_B starts at zero: the first step's loss is the base model's
    assert peft0 == pytest.approx(base, rel=1e-5)  # PEFT adds B·A·x = 0 to the same torch model
    assert ours0 == pytest.approx(base, rel=1e-4)  # our Llama: transformers' logits to ~1e-4 in float32
    assert ours1 == pytest.approx(peft1, rel=1e-4)  # the same update on both sides
    assert ours1 < ours0  # and it lowered the loss on this batch
    q = qlora["params"]["losses"]
    assert q["lora"] == [ours0, ours1]
    # the NF4 base (of weights that were Q4_1 already) costs loss: +0.39 nats on these 12 tokens when written;
    # a broken 4-bit base lands near ln V = 10.8 or beyond
    assert ours0 < q["qlora"][0] < ours0 + 1.0
    assert q["qlora"][1] < q["qlora"][0]  # the QLoRA step trains too


def test_real_prefill_row_same_logits(smollm2_dir):
    r = real.real_prefill_row(model_dir=smollm2_dir, seq=16, timing=ONE)
    _check_row(r, "real_prefill", "torch", 1.0)
    p = r["params"]
    assert p["baseline_attention"] in ("eager", "sdpa")
    assert r["baseline_s"] == min(p["torch_s"].values())
    assert all(d < 1e-3 for d in p["max_abs_logit_diff"].values())


def test_contention_row_shape():
    r = real.contention_row(timing=ONE)
    _check_row(r, "contention", "quiet", 2.0)
    p = r["params"]
    assert len(p["threads_busy"]) == len(p["threads_quiet"]) == 2 and all(n >= 1 for n in p["threads_busy"])


def test_bench_real_without_torch_says_so(monkeypatch, capsys):
    def missing():
        raise ImportError("torch, transformers, peft not installed (pip install 'lora_ref[interop]')")

    monkeypatch.setattr(real, "require_torch", missing)
    assert main(["bench", "real", "--json", "--threads", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"] == []
    assert len(doc["notes"]) == 1 and "real_lora_step" in doc["notes"][0] and "not installed" in doc["notes"][0]
