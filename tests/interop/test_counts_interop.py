"""Counts and the memory model against the real libraries on the same inputs.

- parameter totals and LoRA trainable counts against transformers models built on the meta device wrapped by
  PEFT's ``get_peft_model`` (no weights are allocated);
- 4-bit storage bytes against bitsandbytes' ``quantize_4bit`` and its ``QuantState``;
- the activation ledger against the tensors PyTorch's autograd actually saves for transformers' Llama, with and
  without PEFT, and with bitsandbytes NF4 layers under PEFT (QLoRA), tensor bytes summed over the saved tensors of
  the graph.
"""

import warnings

import peft
import pytest
import torch
import transformers

from lora_ref.analysis.counts import PRESETS, lora_plan, spec_from_config, spec_from_preset
from lora_ref.analysis.memory import QuantConfig, Setup, activation_terms, nf4_tensor_bytes, torch_block_ledger

pytestmark = pytest.mark.interop
torch.set_num_threads(1)



def _hf_config(cfg: dict):
    kw = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "model_type"}
    return transformers.AutoConfig.for_model(cfg["model_type"], **kw)


def _meta_model(cfg: dict):
    hf = _hf_config(cfg)
    cls = transformers.AutoModelForCausalLM if cfg["model_type"] in ("llama", "mistral", "gpt2") \
        else transformers.AutoModel
    with torch.device("meta"):
        return cls.from_config(hf)


def _peft_trainable(model, targets, r, rank_pattern=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fan_in_fan_out is set to False but the target module is Conv1D"
        pm = peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=targets, rank_pattern=rank_pattern or {}))
    trainable, _ = pm.get_nb_trainable_parameters()
    return trainable


SMALL = {
    "llama-gqa": {"model_type": "llama", "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 3,
                  "num_attention_heads": 6, "num_key_value_heads": 2, "vocab_size": 211},
    "llama-tied-bias": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "vocab_size": 97, "tie_word_embeddings": True,
                        "attention_bias": True, "mlp_bias": True, "head_dim": 32},
    "mistral": {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 120},
    "gpt2": {"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 4, "n_positions": 40, "vocab_size": 90,
             "n_inner": 100},
    "bert": {"model_type": "bert", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 80, "vocab_size": 90, "max_position_embeddings": 33},
    "roberta": {"model_type": "roberta", "hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 80, "vocab_size": 90, "max_position_embeddings": 35, "type_vocab_size": 1},
    "deberta-v3-like": {"model_type": "deberta-v2", "hidden_size": 48, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "intermediate_size": 80, "vocab_size": 90,
                        "max_position_embeddings": 64, "relative_attention": True, "position_buckets": 16,
                        "norm_rel_ebd": "layer_norm", "share_att_key": True, "pos_att_type": "p2c|c2p",
                        "position_biased_input": False, "type_vocab_size": 0},
    "deberta-v1-style": {"model_type": "deberta-v2", "hidden_size": 48, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "intermediate_size": 80, "vocab_size": 90,
                         "max_position_embeddings": 30, "relative_attention": True, "max_relative_positions": 12,
                         "share_att_key": False, "pos_att_type": ["c2p", "p2c"], "position_biased_input": True,
                         "type_vocab_size": 2, "conv_kernel_size": 3},
}


# targets in each family's own names, as a PEFT user writes them
NATIVE_TARGETS = {
    "llama": [["q_proj", "v_proj"], ["k_proj", "o_proj", "down_proj"], "all-linear"],
    "mistral": [["q_proj", "v_proj"], "all-linear"],
    "gpt2": [["c_attn"], ["c_proj"], ["c_fc", "c_attn"], "all-linear"],
    "bert": [["query", "value"], ["dense"], "all-linear"],
    "roberta": [["query", "value"], ["key", "intermediate.dense"], "all-linear"],
    "deberta-v2": [["query_proj", "value_proj"], ["pos_key_proj", "attention.output.dense"], "all-linear"],
}


def _cases():
    for name, cfg in SMALL.items():
        for targets in NATIVE_TARGETS[cfg["model_type"]]:
            if targets == ["pos_key_proj", "attention.output.dense"] and not name.startswith("deberta-v1"):
                continue
            yield pytest.param(cfg, targets, id=f"{name}-{targets if isinstance(targets, str) else '+'.join(targets)}")


@pytest.mark.parametrize("cfg,targets", list(_cases()))
def test_small_configs_match_peft(cfg, targets):
    model = _meta_model(cfg)
    spec = spec_from_config(cfg)
    assert spec.total == sum(p.numel() for p in model.parameters())
    assert lora_plan(spec, targets, 3).trainable == _peft_trainable(model, targets, 3)


@pytest.mark.parametrize("name,targets,r", [
    ("llama-3-8b", "all-linear", 16),
    ("llama-3-70b", ["q_proj", "k_proj", "v_proj", "o_proj"], 16),
    ("mistral-7b", ["q_proj", "v_proj"], 8),
    ("gpt2-medium", ["c_attn"], 4),
    ("roberta-base", ["query", "value"], 8),
    ("roberta-large", "all-linear", 8),
    ("deberta-v2-xxlarge", ["query_proj", "value_proj"], 16),
])
def test_presets_match_peft(name, targets, r):
    model = _meta_model(PRESETS[name])
    spec = spec_from_preset(name)
    assert spec.total == sum(p.numel() for p in model.parameters())
    assert lora_plan(spec, targets, r).trainable == _peft_trainable(model, targets, r)


def test_per_target_ranks_match_peft_rank_pattern():
    cfg = SMALL["llama-gqa"]
    ours = lora_plan(spec_from_config(cfg), "q_proj=2,v_proj=5,down_proj", 3).trainable
    theirs = _peft_trainable(_meta_model(cfg), ["q_proj", "v_proj", "down_proj"], 3,
                             rank_pattern={"q_proj": 2, "v_proj": 5})
    assert ours == theirs


def test_llama_roles_equal_native_names_on_encoders():
    cfg = SMALL["roberta"]
    spec = spec_from_config(cfg)
    theirs = _peft_trainable(_meta_model(cfg), ["query", "value", "intermediate.dense"], 4)
    assert lora_plan(spec, ["q_proj", "v_proj", "up_proj"], 4).trainable == theirs


# ---------------------------------------------------------------------------------------------------------------
# NF4 storage vs bitsandbytes
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [4096 * 128, 1000 * 33, 64 * 300 + 5, 7])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_nf4_bytes_match_bitsandbytes(n, double_quant, blocksize):
    import bitsandbytes.functional as bnbf

    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    packed, st = bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    theirs = {"codes": nbytes(packed), "constants": nbytes(st.absmax), "tables": nbytes(st.code)}
    if double_quant:
        theirs["constants"] += nbytes(st.state2.absmax) + nbytes(st.offset)
        theirs["tables"] += nbytes(st.state2.code)
    assert nf4_tensor_bytes(n, QuantConfig("nf4", blocksize, double_quant)) == theirs


# ---------------------------------------------------------------------------------------------------------------
# activations vs what autograd saves
# ---------------------------------------------------------------------------------------------------------------
LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 100}


def _to_4bit(model, compute_dtype):
    """Every linear layer but the head as a bitsandbytes NF4 Linear4bit with double quantization (on the CPU)."""
    import bitsandbytes as bnb

    for _, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(module, name, q.to("cpu"))  # quantizes
    model.is_loaded_in_4bit = True  # so that PEFT wraps them with its bnb LoRA layer


def _saved_bytes(cfg, method, attention, targets, adapter_dtype, dtype, B, T):
    """Bytes of every distinct non-parameter storage that autograd saved for backward, after one forward."""
    hf = _hf_config(cfg)
    hf._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf).to(dtype)
    if method == "qlora":
        _to_4bit(model, dtype)
    if method != "full":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets),
                                        autocast_adapter_dtype=adapter_dtype == "fp32")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    seen: dict[int, int] = {}
    stack, visited = [out.loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                value = getattr(node, attr)
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
                        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(nxt for nxt, _ in node.next_functions)
    return sum(seen.values())


LEDGER_CASES = [
    ("full", "sdpa", None, "fp32", torch.bfloat16),
    ("full", "eager", None, "fp32", torch.bfloat16),
    ("full", "sdpa", None, "fp32", torch.float32),
    ("lora", "sdpa", ["q_proj", "v_proj"], "fp32", torch.bfloat16),
    ("lora", "sdpa", "all-linear", "fp32", torch.bfloat16),
    ("lora", "eager", ["o_proj", "down_proj"], "fp32", torch.bfloat16),
    ("lora", "sdpa", "all-linear", "bf16", torch.bfloat16),
    ("lora", "sdpa", ["k_proj", "up_proj"], "bf16", torch.bfloat16),
    ("lora", "sdpa", ["down_proj"], "bf16", torch.bfloat16),
    ("qlora", "sdpa", ["q_proj", "v_proj"], "fp32", torch.bfloat16),
    ("qlora", "eager", "all-linear", "fp32", torch.bfloat16),
]


@pytest.mark.parametrize("method,attention,targets,adapter_dtype,dtype", LEDGER_CASES)
def test_activation_ledger_matches_autograd(method, attention, targets, adapter_dtype, dtype):
    B, T = 2, 8
    sdtype = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    setup = Setup(batch=B, seq=T, dtype=sdtype, attention=attention, adapter_dtype=adapter_dtype)
    measured = {L: _saved_bytes(dict(LLAMA, num_hidden_layers=L), method, attention, targets, adapter_dtype,
                                dtype, B, T) for L in (1, 2, 3)}
    # one more block costs exactly the ledger of one block (from the second on: the first may record less)
    spec = spec_from_config(dict(LLAMA, num_hidden_layers=3))
    plan = lora_plan(spec, targets, 4) if targets else None
    per_block = sum(b for _, b in torch_block_ledger(spec, method, setup, plan))
    assert measured[3] - measured[2] == per_block
    # the whole model: activations + final norm + what the loss keeps (the saved part of the logits term)
    for L in (1, 2, 3):
        spec = spec_from_config(dict(LLAMA, num_hidden_layers=L))
        plan = lora_plan(spec, targets, 4) if targets else None
        terms = {t.key: t.bytes for t in activation_terms(spec, method, setup, plan)}
        s = 2 if dtype == torch.bfloat16 else 4
        not_saved = B * T * LLAMA["vocab_size"] * (s + 4)  # logits held by the output, and their gradient
        kept = terms["activations"] + terms.get("lora_activations", 0) + terms["final_norm"]
        assert kept + terms["logits"] - not_saved == measured[L]
