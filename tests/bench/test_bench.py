"""``lora-ref bench train``: its PyTorch baseline is the same model (logits and gradients equal ours), and the
JSON document has the documented shape. Timings are never asserted."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.training import tutorial
from lora_ref.training.data import pretraining_corpus, sample_batch
from lora_ref.training.loop import lm_loss

pytestmark = pytest.mark.interop


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)


@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("cfg", [
    tutorial.TUTORIAL_CONFIG,
    dict(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
         num_key_value_heads=3, max_position_embeddings=32, tie_word_embeddings=True,
         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
], ids=["tutorial", "tied-gqa3"])
def test_torch_baseline_is_the_same_model(cfg, sdpa):
    import torch
    import torch.nn.functional as F

    from lora_ref.reference.torch_model import TorchLlama

    config = LlamaConfig.from_dict(dict(cfg))
    ours = Llama(config, rng=np.random.default_rng(0))
    theirs = TorchLlama.from_state_dict(config, ours.state_dict(), sdpa=sdpa)
    x, y = sample_batch(pretraining_corpus().train, 3, 24, np.random.default_rng(1))
    loss = lm_loss(ours, x, y)
    loss.backward()
    tlogits = theirs(torch.from_numpy(x))
    tloss = F.cross_entropy(tlogits.reshape(-1, 256), torch.from_numpy(y).reshape(-1))
    tloss.backward()
    np.testing.assert_allclose(np.asarray(ours(x)), tlogits.detach().numpy(), atol=1e-4, rtol=0)
    assert float(loss.data) == pytest.approx(float(tloss.detach()), rel=1e-5)
    tgrads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # the same array as model.embed_tokens.weight
        g = tgrads[name].grad.numpy()
        np.testing.assert_allclose(p.grad, g, atol=1e-5 * float(np.abs(g).max()) + 1e-8, rtol=1e-3, err_msg=name)


def test_bench_train_json():
    script = Path(sys.executable).parent / "lora-ref"
    proc = subprocess.run([str(script), "bench", "train", "--quick", "--json", "--threads", "1"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert set(doc) == {"machine", "results", "notes"}
    assert "python" in doc["machine"]
    rows = {r["name"]: r for r in doc["results"]}
    assert list(rows) == ["train_step", "qlora_step", "memory_full", "memory_lora", "memory_qlora", "contention"]
    for r in rows.values():
        assert set(r) == {"name", "ours_s", "baseline", "baseline_s", "ratio", "goal", "met", "params"}
        assert r["ours_s"] > 0 and r["baseline_s"] > 0 and r["ratio"] == pytest.approx(r["ours_s"] / r["baseline_s"])
        assert r["met"] is (None if r["goal"] is None else r["ratio"] <= r["goal"])
    assert rows["train_step"]["goal"] == 1.0 and rows["memory_full"]["goal"] is None
    c = rows["contention"]
    assert c["baseline"] == "quiet" and c["goal"] == 2.0
    assert len(c["params"]["threads_busy"]) == len(c["params"]["threads_quiet"]) >= 2 * c["params"]["repeats"]
    r = rows["train_step"]
    assert r["baseline"] == "torch"
    p = r["params"]
    assert p["numba_threads"] == 1 and p["torch_threads"] == 1 and p["blas_threads"] == 1  # --threads 1, both sides
    assert p["batch"] == tutorial.RECIPES["full"]["batch"] and p["seq"] == tutorial.RECIPES["full"]["seq"]
    # both sides start from the same near-uniform initialization, so the first loss is close to ln 256 (logits of
    # std ≈ √128 · 0.02 ≈ 0.23 add about σ²/2 ≈ 0.03 nats on average), and the two losses are equal
    (ours, torch_loss), _ = p["losses"]
    assert 0 < ours - math.log(256) < 0.1
    assert ours == pytest.approx(torch_loss, rel=1e-5)
    assert rows["qlora_step"]["baseline"] == "lora_step"
    assert rows["memory_full"]["params"]["unit"] == "bytes"
    assert "[bench]" in proc.stderr  # progress goes to stderr
