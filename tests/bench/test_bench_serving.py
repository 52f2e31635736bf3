"""The serving bench rows (lora_ref/bench/serving.py) on a tiny model: names, baselines, units and the ratios'
arithmetic, and the report's goals for them. Timings are never asserted."""

import numpy as np
import pytest

from lora_ref.bench.report import GOALS, table
from lora_ref.bench.serving import serving_rows
from lora_ref.modeling.llama import Llama
from lora_ref.testing import tiny_llama_config


def test_serving_rows_on_a_tiny_model(tmp_path):
    folder = Llama(tiny_llama_config(tie_word_embeddings=True, max_position_embeddings=256),
                   rng=np.random.default_rng(0)).save_pretrained(tmp_path / "tiny")
    rows = serving_rows(quick=True, model_dir=folder, batch=4)
    assert [(r["name"], r["baseline"]) for r in rows] == [("serve_mixed", "serve_one_adapter"),
                                                          ("serve_vs_sequential", "one_request_at_a_time"),
                                                          ("unmerged_overhead", "merged")]
    for r in rows:
        assert set(r) == {"name", "ours_s", "baseline", "baseline_s", "ratio", "goal", "met", "params"}
        assert r["goal"] == GOALS[r["name"]] and r["met"] == (r["ratio"] <= r["goal"])
        assert r["ours_s"] > 0 and r["baseline_s"] > 0 and r["ratio"] == pytest.approx(r["ours_s"] / r["baseline_s"])
        assert r["params"]["unit"] == "seconds per generated token" and r["params"]["through"].startswith("BatchDecoder")
    assert [r["params"]["batch"] for r in rows] == [4, 4, 1]
    assert rows[2]["params"]["generate_ratio"] > 0
    assert (GOALS["serve_mixed"], GOALS["serve_vs_sequential"], GOALS["unmerged_overhead"]) == (1.25, 0.33, 1.15)
    text = table({"machine": {}, "results": rows})
    assert "| `serve_mixed` |" in text and "<= 1.25" in text and "<= 0.33" in text
