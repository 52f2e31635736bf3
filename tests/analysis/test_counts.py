"""Parameter counts and the memory model against numbers published in the papers (LoRA, QLoRA) and by transformers and PEFT.

Every expected value here is written out by hand from a paper, a model card or arithmetic on the published
dimensions; none is produced by lora_ref. Counts the papers print but their stated configurations do not give
are pinned as *not* reproduced, with the count that the configuration does give.
"""

import json
import subprocess
import sys

import pytest

from lora_ref.analysis.counts import (
    LORA_PAPER_COUNTS,
    PRESETS,
    lora_plan,
    lora_trainable,
    resolve_model,
    spec_from_config,
    spec_from_preset,
)
from lora_ref.analysis.memory import (
    QuantConfig,
    Setup,
    bits_per_quantized_param,
    inference_memory,
    nf4_tensor_bytes,
    torch_block_ledger,
    training_memory,
)

GPT3 = spec_from_preset("gpt3-175b")


# ---------------------------------------------------------------------------------------------------------------
# headline counts: the LoRA paper's GPT-3 and RoBERTa numbers, Llama 3 8B, QLoRA's bits per parameter
# ---------------------------------------------------------------------------------------------------------------
def test_headline_counts():
    assert lora_trainable(GPT3, ["q_proj", "v_proj"], 1) == 4_718_592
    assert lora_trainable(GPT3, ["q_proj", "v_proj"], 8) == 37_748_736
    assert lora_trainable(spec_from_preset("roberta-base"), ["q_proj", "v_proj"], 8) == 294_912
    llama8 = spec_from_preset("llama-3-8b")
    assert llama8.total == 8_030_261_248
    assert lora_trainable(llama8, "all-linear", 16) == 41_943_040
    assert bits_per_quantized_param(QuantConfig("nf4", 64, double_quant=True)) == 4.126953125
    assert bits_per_quantized_param(QuantConfig("nf4", 64, double_quant=False)) == 4.5


def test_qlora_constants_per_parameter():
    # QLoRA §3: 32/64 = 0.5 bits without double quantization; 8/64 + 32/(64·256) = 0.127 with it; saving 0.373
    plain = bits_per_quantized_param(QuantConfig(double_quant=False)) - 4
    dq = bits_per_quantized_param(QuantConfig(double_quant=True)) - 4
    assert plain == 0.5
    assert round(dq, 3) == 0.127
    assert round(plain - dq, 3) == 0.373
    # "approximately 3 GB for a 65B model" (QLoRA §1)
    assert round(65e9 * (plain - dq) / 8 / 1e9) == 3


# ---------------------------------------------------------------------------------------------------------------
# every trainable-parameter count of the LoRA paper's tables (Hu et al. 2021, arXiv 2106.09685 v2)
# ---------------------------------------------------------------------------------------------------------------
PAPER = [
    # (model, targets, r, exact count by hand: 2 · L̂ · d · r)
    ("roberta-base", ["q_proj", "v_proj"], 8, 2 * 24 * 768 * 8),            # T2 0.3M
    ("roberta-large", ["q_proj", "v_proj"], 8, 2 * 48 * 1024 * 8),          # T2 0.8M
    ("deberta-v2-xxlarge", ["q_proj", "v_proj"], 16, 2 * 96 * 1536 * 16),  # T2 4.7M with the repo's r = 16
    ("gpt3-175b", ["q_proj", "v_proj"], 1, 4_718_592),                      # T4/T15 4.7M
    ("gpt3-175b", ["v_proj=2"], 1, 4_718_592),                              # T15 4.7M (r_v = 2 only)
    ("gpt3-175b", ["q_proj", "v_proj"], 2, 9_437_184),                      # T15 9.4M
    ("gpt3-175b", ["q_proj", "k_proj", "v_proj", "o_proj"], 1, 9_437_184),  # T15 9.4M
    ("gpt3-175b", ["q_proj", "v_proj"], 4, 18_874_368),                     # T5/T15 18M budget ("18.8M")
    ("gpt3-175b", ["q_proj"], 8, 18_874_368),                               # T5: r = 8 on one type
    ("gpt3-175b", ["q_proj", "k_proj"], 4, 18_874_368),                     # T5: r = 4 on two types
    ("gpt3-175b", ["q_proj", "k_proj", "v_proj", "o_proj"], 2, 18_874_368),  # T5: r = 2 on four types
    ("gpt3-175b", ["q_proj", "v_proj"], 8, 37_748_736),                     # T4/T15 37.7M
    ("gpt3-175b", ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 37_748_736),  # T15 37.7M
    ("gpt3-175b", ["q_proj", "v_proj"], 64, 301_989_888),                   # T15 301.9M
    ("gpt3-175b", ["q_proj", "k_proj", "v_proj", "o_proj"], 64, 603_979_776),  # T15 "603.8M"
]


@pytest.mark.parametrize("model,targets,r,expected", PAPER)
def test_lora_paper_counts(model, targets, r, expected):
    assert lora_trainable(spec_from_preset(model), targets, r) == expected


def test_lora_paper_not_reproduced():
    # GPT-2 M / L (T3): r_q = r_v = 4 (T11) gives 393,216 and 737,280, printed as 0.35M and 0.77M (PreLayer's budgets)
    assert lora_trainable(spec_from_preset("gpt2-medium"), ["q_proj", "v_proj"], 4) == 393_216
    assert lora_trainable(spec_from_preset("gpt2-large"), ["q_proj", "v_proj"], 4) == 737_280
    m = lora_trainable(spec_from_preset("gpt2-medium"), ["q_proj", "v_proj"], 4)
    l_ = lora_trainable(spec_from_preset("gpt2-large"), ["q_proj", "v_proj"], 4)
    assert (round(m / 1e6, 2), round(l_ / 1e6, 2)) == (0.39, 0.74)  # not the table's 0.35M and 0.77M
    # the released GPT-2 M checkpoint is "1.5 MB": the count in float32 bytes is 1,572,864 (1.5 MiB)
    assert m * 4 == 1_572_864 == 1.5 * 2**20
    # DeBERTa XXL with T10's r = 8 gives 2.4M, not T2's 4.7M
    assert lora_trainable(spec_from_preset("deberta-v2-xxlarge"), ["q_proj", "v_proj"], 8) == 2_359_296
    # GPT-2 M's full count: the paper's 354.92M is not the model's 354,823,168; GPT-2 L's 774.03M is exact
    assert spec_from_preset("gpt2-medium").total == 354_823_168
    assert spec_from_preset("gpt2-large").total == 774_030_080


def test_paper_table_flags():
    """The table the notebook prints: each row's count equals the hand count above, and the flags are right."""
    by_key = {(r["model"], r["targets"], r["r"]): r for r in LORA_PAPER_COUNTS}
    row = by_key[("gpt2-medium", "q_proj,v_proj", 4)]
    assert row["count"] == 393_216 and not row["reproduced"] and "PreLayer" in row["reason"]
    row = by_key[("deberta-v2-xxlarge", "q_proj,v_proj", 8)]
    assert row["count"] == 2_359_296 and not row["reproduced"]
    row = by_key[("deberta-v2-xxlarge", "q_proj,v_proj", 16)]
    assert row["count"] == 4_718_592 and row["reproduced"]
    row = by_key[("roberta-base", "q_proj,v_proj", 8)]
    assert row["count"] == 294_912 and row["reproduced"]
    assert {r["model"] for r in LORA_PAPER_COUNTS if not r["reproduced"]} >= {"gpt2-medium", "gpt2-large",
                                                                               "deberta-v2-xxlarge"}


def test_gpt3_total_from_its_paper_dimensions():
    d, L, V, ctx = 12288, 96, 50257, 2048
    block = 12 * d * d + 13 * d  # 4 d² attention + 8 d² MLP, biases, two LayerNorms
    assert GPT3.total == L * block + V * d + ctx * d + 2 * d == 174_604_259_328
    # the LoRA paper's "175,255.8M" is not what these dimensions give (not even with an untied head: 175,221.8M)
    assert GPT3.total + V * d == 175_221_817_344


# ---------------------------------------------------------------------------------------------------------------
# presets and configs (the models' config.json files; totals as transformers counts them)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,total", [
    ("llama-3-8b", 8_030_261_248), ("llama-3-70b", 70_553_706_496), ("mistral-7b", 7_241_732_096),
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
])
def test_preset_totals(name, total):
    assert spec_from_preset(name).total == total


def test_llama_block_and_all_linear():
    llama8 = spec_from_preset("llama-3-8b")
    assert llama8.block_total == 218_112_000  # 2d² + 2·d·1024 + 3·d·14336 + 2d
    assert lora_trainable(llama8, "all-linear", 16) == 32 * 16 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)
    assert lora_trainable(spec_from_preset("mistral-7b"), "all-linear", 16) == 41_943_040
    assert lora_trainable(spec_from_preset("llama-3-70b"), "all-linear", 16) == 207_093_760


def test_gpt2_fused_c_attn():
    for name, count in (("gpt2", 147_456), ("gpt2-medium", 393_216), ("gpt2-large", 737_280)):
        spec = spec_from_preset(name)
        assert lora_trainable(spec, ["c_attn"], 4) == count  # PEFT: A (4, D), B (3D, 4)
        assert lora_trainable(spec, ["q_proj", "v_proj"], 4) == count  # loralib: two (D, D) parts, 4rD too
        assert lora_trainable(spec, ["q_proj"], 4) == count // 2
    plan = lora_plan(spec_from_preset("gpt2"), ["c_attn"], 4)
    assert [(a.in_features, a.out_features) for a in plan.adapted] == [(768, 2304)]
    with pytest.raises(ValueError, match="both whole and by its parts"):
        lora_plan(spec_from_preset("gpt2"), ["c_attn", "q_proj"], 4)
    with pytest.raises(ValueError, match="one rank"):
        lora_plan(spec_from_preset("gpt2"), ["q_proj=4", "v_proj=8"], 4)


def test_per_target_ranks():
    assert lora_trainable(GPT3, "q_proj=1,v_proj=2", 8) == 96 * 2 * 12288 * 3
    assert lora_trainable(GPT3, {"q_proj": 1, "v_proj": 2}) == 96 * 2 * 12288 * 3
    plan = lora_plan(spec_from_preset("llama-3-8b"), ["q_proj", "down_proj=4"], 16)
    assert [(a.module, a.r) for a in plan.adapted] == [("self_attn.q_proj", 16), ("mlp.down_proj", 4)]
    assert plan.trainable == 32 * (16 * (4096 + 4096) + 4 * (14336 + 4096))


def test_encoder_names_and_pooler():
    rb = spec_from_preset("roberta-base")
    assert rb.total == 124_645_632  # RobertaModel with its pooler (transformers, meta device)
    assert lora_trainable(rb, ["query", "value"], 8) == lora_trainable(rb, ["q_proj", "v_proj"], 8) == 294_912
    # all-linear on a model without a task head includes the pooler, as PEFT does
    assert lora_trainable(rb, "all-linear", 8) == 12 * 8 * (4 * 1536 + 2 * (768 + 3072)) + 8 * 1536


def test_config_json_file(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256, "torch_dtype": "bfloat16"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert resolve_model(str(path)).total == 8_030_261_248
    assert resolve_model(str(tmp_path)).total == 8_030_261_248  # a folder holding config.json


def test_errors():
    with pytest.raises(ValueError, match="known presets: .*llama-3-8b"):
        spec_from_preset("llama-9000")
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
        spec_from_config({"model_type": "mamba"})
    with pytest.raises(ValueError, match="has no 'hidden_size'"):
        spec_from_config({"model_type": "llama", "num_hidden_layers": 2})
    with pytest.raises(ValueError, match=r"\['gate_proj'\] match no linear layer"):
        lora_trainable(spec_from_preset("gpt2"), ["gate_proj"], 8)
    with pytest.raises(ValueError, match="positive integer"):
        lora_trainable(GPT3, ["q_proj"], 0)
    with pytest.raises(ValueError, match="no such config file"):
        resolve_model("/nonexistent/config.json")
    with pytest.raises(ValueError, match="unknown method"):
        training_memory(GPT3, "prefix")


def test_presets_have_sources():
    assert all(cfg.get("_source") for cfg in PRESETS.values())


# ---------------------------------------------------------------------------------------------------------------
# memory model
# ---------------------------------------------------------------------------------------------------------------
def test_full_finetuning_16_bytes_per_parameter():
    spec = spec_from_preset("llama-3-8b")
    P = 8_030_261_248
    fp32 = training_memory(spec, "full", Setup(dtype="fp32"))
    assert fp32["weights"] == fp32["gradients"] == 4 * P and fp32["optimizer_state"] == 8 * P
    assert "master_weights" not in [t.key for t in fp32.terms]
    bf16 = training_memory(spec, "full", Setup(dtype="bf16"))  # 2 + 2 + 4 (master) + 8 (m, v) = 16 B/param
    assert bf16["weights"] + bf16["gradients"] + bf16["master_weights"] + bf16["optimizer_state"] == 16 * P


def test_lora_state_is_per_trainable_parameter():
    spec = spec_from_preset("llama-3-8b")
    plan = lora_plan(spec, "all-linear", 16)
    e = training_memory(spec, "lora", Setup(), plan)
    assert e["weights"] == 2 * 8_030_261_248
    assert e["adapters"] == e["gradients"] == 4 * 41_943_040  # float32 adapters, as PEFT keeps them
    assert e["optimizer_state"] == 8 * 41_943_040


def test_nf4_storage_llama_3_8b():
    spec = spec_from_preset("llama-3-8b")
    e = training_memory(spec, "qlora", Setup(), lora_plan(spec, "all-linear", 16), QuantConfig(double_quant=True))
    linear = 6_979_321_856  # 32 blocks × 4096·(2·4096 + 2·1024 + 3·14336): the linear weights bitsandbytes quantizes (lm_head is skipped)
    assert e["nf4_codes"] == linear // 2
    assert e["weights"] == (8_030_261_248 - linear) * 2  # embeddings, lm_head and norms in bf16
    # one 4096×4096 tensor: 262,144 uint8 absmax + 1,024 float32 absmax2 + a float32 offset
    assert nf4_tensor_bytes(4096 * 4096, QuantConfig(double_quant=True)) == {
        "codes": 8_388_608, "constants": 262_144 + 4096 + 4, "tables": 64 + 1024}
    assert nf4_tensor_bytes(33_000, QuantConfig()) == {"codes": 16_500, "constants": 516 * 4, "tables": 64}
    assert e["nf4_tables"] == 32 * 7 * (64 + 1024)
    # bits per quantized parameter including constants (tables excluded): 4.127 to three decimals
    assert round(8 * (e["nf4_codes"] + e["nf4_constants"]) / linear, 3) == 4.127


def test_kv_cache_llama_3_8b():
    # 2 (k, v) × 32 layers × 8 kv heads × 128 × 2 bytes = 131,072 bytes per token: 1 GiB at 8,192 tokens
    e = inference_memory(spec_from_preset("llama-3-8b"), "full", Setup(batch=1, seq=8192))
    assert e["kv_cache"] == 131_072 * 8192 == 2**30


def test_torch_block_ledger_small_llama_by_hand():
    spec = spec_from_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 96,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "vocab_size": 100})
    # B=2, T=8, bf16, full fine-tuning with a fused attention kernel; BT = 16, D = 64, F = 96, H·Dh = 64, K·Dh = 32
    norm = 16 * 64 * 4 + 16 * 4 + 16 * 64 * 2       # float32 input, 1/rms, normalized bf16
    qkv_in = 16 * 64 * 2
    attn = 16 * (64 + 32 + 32) * 2 + 16 * 64 * 2 + 2 * 4 * 8 * 4  # q, k, v, output, log-sum-exp
    mlp = 16 * 64 * 2 + 3 * 16 * 96 * 2 + 16 * 96 * 2  # gate/up input, gate/silu/up outputs, down input
    ledger = torch_block_ledger(spec, "full", Setup(batch=2, seq=8), None)
    assert sum(b for _, b in ledger) == 2 * norm + qkv_in + attn + mlp == 35_200


def test_checkpointing_and_eager_attention():
    spec = spec_from_preset("llama-3-8b")
    plan = lora_plan(spec, "all-linear", 16)
    base = training_memory(spec, "lora", Setup(seq=4096), plan)
    ckpt = training_memory(spec, "lora", Setup(seq=4096, grad_checkpointing=True), plan)
    assert ckpt["activations"] < base["activations"] / 5
    eager = training_memory(spec, "lora", Setup(seq=4096, attention="eager"), plan)
    # the probabilities B·H·T² in float32 + bf16 per block dominate at T = 4096
    assert eager["activations"] - base["activations"] > 32 * 32 * 4096**2 * 6 * 0.9


# ---------------------------------------------------------------------------------------------------------------
# the glossary's claims for Llama 3 70B at r = 16 (seed-lora-glossary.txt)
# ---------------------------------------------------------------------------------------------------------------
def test_glossary_trainable_counts():
    s = spec_from_preset("llama-3-70b")
    # "into the attention layers ... ~75M": q, k, v, o give 65.5M; q, v 32.8M; all linear layers 207M
    assert lora_trainable(s, ["q_proj", "k_proj", "v_proj", "o_proj"], 16) == 80 * 16 * (3 * 8192 + 1024) * 2 \
        == 65_536_000
    assert lora_trainable(s, ["q_proj", "v_proj"], 16) == 80 * 16 * (2 * 8192 + 8192 + 1024) == 32_768_000
    # "roughly 1,000× fewer trainable parameters": 1,077× with q, k, v, o
    assert round(s.total / lora_trainable(s, ["q_proj", "k_proj", "v_proj", "o_proj"], 16)) == 1077


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------
def _cli(*args):
    code = "import sys; from lora_ref.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, "count", *args], capture_output=True, text=True)


def test_cli_json():
    p = _cli("--model", "llama-3-8b", "--r", "16", "--targets", "all-linear", "--quant", "nf4", "--double-quant",
             "--batch", "2", "--seq", "512", "--dtype", "bf16", "--grad-checkpointing", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)  # exactly one JSON document
    assert doc["base_params"] == 8_030_261_248 and doc["trainable_params"] == 41_943_040
    assert doc["bits_per_quantized_param"] == 4.126953125
    assert set(doc["memory"]) == {"full", "lora", "qlora"}
    assert doc["memory"]["lora"]["optimizer_state"] == 8 * 41_943_040
    assert doc["memory"]["qlora"]["nf4_codes"] == 6_979_321_856 // 2
    assert all(v["total"] == sum(b for k, b in v.items() if k != "total") for v in doc["memory"].values())


def test_cli_json_without_quant():
    p = _cli("--model", "gpt3-175b", "--r", "1", "--targets", "q_proj,v_proj", "--json")
    doc = json.loads(p.stdout)
    assert doc["trainable_params"] == 4_718_592 and doc["bits_per_quantized_param"] is None
    assert set(doc["memory"]) == {"full", "lora"}


def test_cli_errors():
    p = _cli("--model", "llama-9000")
    assert p.returncode == 1 and "known presets:" in p.stderr and "mistral-7b" in p.stderr
    assert p.stdout == ""
    p = _cli("--model", "gpt2", "--double-quant")
    assert p.returncode == 2 and "--quant" in p.stderr
    p = _cli("--targets", "q_proj")
    assert p.returncode == 2 and "--model is required" in p.stderr
