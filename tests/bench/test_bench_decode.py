"""``lora-ref bench decode``: the bytes of the roofline against an independent count from the model's config, the
rows' JSON shape, the same tokens on both sides, and the rows without torch. Timings are never asserted."""

import json

import numpy as np
import pytest

from lora_ref.adapters.qlora import quantize_model
from lora_ref.bench import decode as bench
from lora_ref.modeling.decode import Decoder
from lora_ref.modeling.llama import Llama

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _by_hand(cfg, bits, prompt, new):
    """The bytes counted once more, spelled out for the tiny config (D 64, F 96, V 300, L 3, H 4, K 2, Dh 16)."""
    weights = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 3 * (96 * 64)           # q, k, v, o, gate, up, down elements
    if bits == "fp32":
        layer = 4 * weights
    else:  # half a byte each, one 8-bit scale per 64, a float32 per 256 blocks and an offset, per matrix
        layer = sum(n // 2 + n // 64 + 4 * -(-(n // 64) // 256) + 4
                    for n in (64 * 64, 32 * 64, 32 * 64, 64 * 64, 96 * 64, 96 * 64, 96 * 64))
    kv = np.mean([2 * 3 * 2 * (prompt + j + 1) * 16 * 4 for j in range(new - 1)])  # step j sees prompt + j + 1
    return 3 * layer + 4 * 64 * 7 + 4 * 300 * 64 + kv


@pytest.mark.parametrize("bits", ["fp32", "nf4"])
def test_decode_bytes_equal_an_independent_count(bits):
    model = Llama(TINY, rng=np.random.default_rng(0))
    if bits == "nf4":
        quantize_model(model, blocksize=64, double_quant=True)
    parts = bench.decode_bytes(Decoder(model, 40), 20, 12)
    want = _by_hand(TINY, bits, 20, 12)
    assert parts["total"] == pytest.approx(want, abs=1)
    assert bench.decode_bytes_from_config(TINY, weight_bits=bits, prompt_tokens=20, new_tokens=12) == \
        pytest.approx(want, abs=1)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


def test_read_bandwidth_is_a_rate_and_checks_its_arguments():
    assert bench.read_bandwidth(2, 2**20, 2) > 0
    with pytest.raises(ValueError):
        bench.read_bandwidth(0)


def test_check_same_names_the_first_difference():
    bench._check_same("row", [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="differ from transformers' at token 1"):
        bench._check_same("row", [1, 2, 3], [1, 5, 3])


@pytest.mark.interop
def test_smollm2_bytes_equal_the_config_count(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    model = Llama.from_pretrained(smollm2_dir)
    fp32 = bench.decode_bytes(Decoder(model, 256))
    assert fp32["total"] == bench.decode_bytes_from_config(cfg)
    # SmolLM2-135M: 30 layers of 3,538,944 projection weights, the tied 49,152 x 576 head, 61 norms, and the
    # keys and values of 192 positions (129 … 255) on average (3 heads of 64, 30 layers)
    assert fp32["layers"] == 30 * 4 * (576 * 576 * 2 + 2 * 192 * 576 + 3 * 1536 * 576)
    assert fp32["head"] == 4 * 49152 * 576 and fp32["embedding_row"] == 0
    assert fp32["kv_cache"] == round(2 * 30 * 3 * 64 * 4 * 192)
    quantize_model(model, blocksize=64, double_quant=True)
    assert bench.decode_bytes(Decoder(model, 256))["total"] == bench.decode_bytes_from_config(cfg, weight_bits="nf4")


@pytest.mark.interop
def test_decode_rows_shape_and_same_tokens(smollm2_dir, monkeypatch):
    rows = bench.decode_rows(True, 1, prompt_tokens=16, new_tokens=6, bandwidth_bytes=2**22)
    assert [r["name"] for r in rows] == ["real_decode_fp32", "real_decode_fp32_roofline", "real_decode_nf4",
                                         "real_decode_nf4_roofline"]
    assert [r["baseline"] for r in rows] == ["transformers", "roofline", "transformers_fp32", "roofline"]
    goals = {"real_decode_fp32": 0.67, "real_decode_fp32_roofline": 1.43, "real_decode_nf4": 0.33,
             "real_decode_nf4_roofline": 2.0}
    for r in rows:
        assert set(r) == {"name", "ours_s", "baseline", "baseline_s", "ratio", "goal", "met", "params"}
        assert r["ours_s"] > 0 and r["baseline_s"] > 0 and r["ratio"] == r["ours_s"] / r["baseline_s"]
        assert r["goal"] == goals[r["name"]] and r["met"] == (r["ratio"] <= r["goal"])
        assert r["params"]["new_tokens"] == 6 and r["params"]["prompt_tokens"] == 16
    assert rows[0]["params"]["tokens_checked"] == 6          # both sides chose the same 6 tokens before timing
    assert rows[0]["baseline_s"] == rows[2]["baseline_s"]   # one transformers float32 figure for both rows
    json.dumps(rows)
    roof = rows[1]["params"]
    assert rows[1]["baseline_s"] == pytest.approx(roof["bytes_per_token"]["total"] / roof["read_bandwidth_bytes_per_s"])

    def no_torch(*a, **k):
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(bench, "_transformers_model", no_torch)
    rows = bench.decode_rows(True, 1, prompt_tokens=16, new_tokens=3, bandwidth_bytes=2**22)
    plain = {r["name"]: r for r in rows}
    for name in ("real_decode_fp32", "real_decode_nf4"):
        assert plain[name]["ratio"] is None and plain[name]["met"] is None
        assert "No module named 'torch'" in plain[name]["params"]["skipped"]
    assert plain["real_decode_fp32_roofline"]["ratio"] > 0


def test_report_table_has_the_decode_goals_and_unmeasured_rows():
    from lora_ref.bench.report import table

    doc = {"machine": {}, "results": [
        {"name": "real_decode_fp32", "ours_s": 0.03, "baseline": "transformers", "baseline_s": None, "ratio": None,
         "params": {"skipped": "transformers rows not measured: No module named 'torch'"}},
        {"name": "real_decode_nf4_roofline", "ours_s": 0.02, "baseline": "roofline", "baseline_s": 0.01,
         "ratio": 2.0, "params": {}}]}
    t = table(doc)
    assert "| `real_decode_fp32` | 30.00 ms | transformers | not measured | | <= 0.67 | |" in t
    assert "| `real_decode_nf4_roofline` | 20.00 ms | roofline | 10.00 ms | 2.000 | <= 2.0 | yes |" in t
