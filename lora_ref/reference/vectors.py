"""Reference vectors: inputs and exact expected outputs for checking other implementations against lora_ref.

``write_vectors(out)`` writes, deterministically (the same bytes on every run and machine thread count):

- a few safetensors files, one per family of operations, holding ``<case>/inputs/<name>`` and
  ``<case>/outputs/<name>`` tensors;
- ``manifest.json`` = ``{"version", "cases": [{"name", "op", "file", "tolerance", "oracle", "description",
  "params"}]}``, where ``tolerance`` is ``"exact"`` (bit for bit, claimed only where the case's oracle agrees bit
  for bit), ``{"atol", "rtol"}``, or either with ``"max_mismatched": k`` (at most k elements of each output may
  miss it, where the oracle's evidence allows a few: see the case's description), and ``oracle`` names the
  independent implementation the case is checked against, live, in ``tests/oracles/test_vector_oracles.py``
  (:data:`ORACLES`);
- ``check.py``, the standalone checker (a copy of :mod:`lora_ref.reference.check`), and a README.

Conventions of the files: float tensors are float32; where a case's dtype is bfloat16 or float16 the stored float32
values are exactly the bfloat16/float16 values (``params["dtype"]`` says so). Inputs are drawn from
``np.random.default_rng(seed)`` with the seed stated in ``params``. Outputs are computed by lora_ref's readable
NumPy paths with BLAS pinned to one thread (``threadpoolctl``), so they do not depend on threads.

Cases marked ``divergence`` in their name document where another library differs from lora_ref, and why; their
descriptions say what the other library returns.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

VERSION = "1.0"
F32_TOL = {"atol": 1e-6, "rtol": 1e-5}  # float32 results computed through a different summation order
F32_LOOSE = {"atol": 1e-5, "rtol": 1e-4}  # results of several chained float32 matmuls (a whole model's logits)
# FP4 on CUDA: the kernel's fast-math reciprocal 1/absmax flips a code within an ulp of a threshold now and then
# (≤ 3 of 65,536 codes in the CUDA fixtures), so a few elements of each output may differ; the rest bit for bit
CUDA_FP4_TOL = {"max_mismatched": 3}
# double quantization on CUDA: the offset is torch's float32 mean on the GPU, whose reduction order lora_ref does not
# reproduce (a float64 mean rounded to float32; equal on the fixtures, possibly an ulp off elsewhere): the offset and
# absmax2 within a few ulps, and one nested code (64 dequantized values) allowed to flip
CUDA_DOUBLE_QUANT_TOL = {"atol": 0.0, "rtol": 1e-6, "max_mismatched": 64}
# FP4 on bitsandbytes' CPU path: codes and scales bit for bit, but its dequantization returns +0.0 or -0.0 for code
# 8 depending on the kernel the shape selects, so values are compared as numbers (-0.0 == +0.0)
CPU_FP4_TOL = {"atol": 0.0, "rtol": 0.0}


@dataclass
class Case:
    name: str
    op: str
    file: str
    tolerance: object
    description: str
    params: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    oracle: str = ""

    def manifest_entry(self) -> dict:
        return {"name": self.name, "op": self.op, "file": self.file, "tolerance": self.tolerance,
                "oracle": self.oracle, "description": self.description, "params": self.params}


ORACLE_KINDS = ("torch", "transformers", "peft", "bitsandbytes_cpu", "bitsandbytes_cuda_fixtures", "gguf", "formula")
"""The independent implementations a case can name as its oracle; anything else is ``"none: <reason>"``.

``bitsandbytes_cpu``: bitsandbytes 0.50.2 run on the CPU, live. ``bitsandbytes_cuda_fixtures``: bitsandbytes'
CUDA kernels, through the outputs they produced on an H200 (``tests/data/bnb``): the case's settings (quant type,
dtype, blocksize, double quantization, CUDA rounding) reproduce those outputs on the fixtures' inputs.
``formula``: the paper's formula written out independently in the test. ``torch``/``transformers``/``peft``: the
library computes the case's outputs from its inputs, live."""

ORACLES = {
    "nf4_codebook": "bitsandbytes_cpu", "fp4_codebook": "bitsandbytes_cpu", "dynamic_map_8bit": "bitsandbytes_cpu",
    "nf4_quantize_cuda_float32": "bitsandbytes_cuda_fixtures", "nf4_quantize_cpu_float32": "bitsandbytes_cpu",
    "fp4_quantize_cuda_float32": "bitsandbytes_cuda_fixtures", "fp4_quantize_cpu_float32": "bitsandbytes_cpu",
    "nf4_quantize_cuda_bfloat16": "bitsandbytes_cuda_fixtures", "nf4_quantize_cuda_float16": "bitsandbytes_cuda_fixtures",
    "nf4_double_quant_cuda": "bitsandbytes_cuda_fixtures", "nf4_quantize_blocksize_4096": "bitsandbytes_cuda_fixtures",
    "blockwise_8bit_dynamic": "bitsandbytes_cuda_fixtures",
    "divergence_bnb_zero_block_cuda": "bitsandbytes_cuda_fixtures",
    "divergence_bnb_nf4_thresholds_cuda": "bitsandbytes_cuda_fixtures",
    "divergence_bnb_fp4_cuda": "bitsandbytes_cuda_fixtures",
    "divergence_bnb_zero_block_cpu": "bitsandbytes_cpu", "divergence_bnb_nf4_thresholds_cpu": "bitsandbytes_cpu",
    "divergence_bnb_fp4_cpu": "bitsandbytes_cpu", "divergence_bnb_nested_codes_cpu": "bitsandbytes_cpu",
    "rms_norm": "torch", "softmax": "torch", "cross_entropy": "torch", "attention_gqa_causal": "torch",
    "swiglu": "torch", "rope_llama3": "transformers", "tiny_llama_logits": "transformers",
    "lora_forward_backward": "peft", "rslora_forward_backward": "peft", "dora_forward_backward": "peft",
    "merge_unmerge_float32": "peft", "dora_merge": "peft", "merge_bfloat16_unsafe_single_rounding": "peft",
    "merge_bfloat16_safe_double_rounding": "peft",
    "divergence_peft_4bit_merge_bias_scaling": "formula",
    "qlora_forward_backward": "bitsandbytes_cpu",
    "qlora_merge_requantize": "none: the requantization rounds as bitsandbytes' CUDA kernel, which no test can run; "
                              "its two steps are checked elsewhere (the dequantization in qlora_forward_backward "
                              "against bitsandbytes' CPU path, the CUDA quantizer with these settings in "
                              "nf4_double_quant_cuda against the CUDA fixtures)",
    "loftq_iterations": "peft", "pissa_to_lora_conversion": "peft", "dora_4bit_forward_merge": "peft",
    "dora_alternative_axis": "formula", "qlora_merge_targets": "formula", "qlora_merge_targets_codes": "peft",
    "lora_embedding": "peft",
    "combine_cat": "peft", "combine_svd": "peft", "combine_linear": "peft", "combine_ties": "peft",
    "combine_dare_linear": "peft", "combine_dare_ties": "peft", "combine_magnitude_prune": "peft",
    "divergence_peft_rslora_combination": "formula", "task_arithmetic_full": "formula", "ties_full": "formula",
}
"""Each case's oracle. The two ``divergence_peft_*`` cases name the formula (lora_ref's semantics) and record in
their description how PEFT differs; the DARE combinations replay the stored keep masks inside PEFT. The PEFT cases
on a 4-bit base (DoRA, the re-quantized merge of ``qlora_merge_targets_codes``) run PEFT over bitsandbytes'
``Linear4bit`` on the CPU, built from the case's stored codes; ``loftq_iterations`` replays the loop of PEFT's
``loftq_init`` (which refuses to run without a GPU) with bitsandbytes' CPU NF4 and PEFT's own SVD step, so that case
uses bitsandbytes' CPU rounding (LoftQ with CUDA rounding is checked against PEFT's H100 outputs on the fixture's
weights in the LoftQ tests). ``qlora_merge_targets`` names the formula: each deployment written out in the test,
with bitsandbytes' CPU quantizer for the re-quantization and the refit procedure re-implemented from its
definition."""


def rng_for(name: str) -> tuple[np.random.Generator, int]:
    """A generator seeded from the case name (CRC-32), so adding a case never changes another case's inputs."""
    seed = zlib.crc32(name.encode())
    return np.random.default_rng(seed), seed


def _f32(a) -> np.ndarray:
    """A float32 copy (never a view: the layers are merged in place after their inputs are recorded)."""
    return np.array(a, dtype=np.float32, copy=True, order="C")


# ================================================================================================================
# quantization
# ================================================================================================================
def codebook_cases() -> list[Case]:
    from lora_ref.quant import nf4

    return [
        Case("nf4_codebook", "codebook", "quant.safetensors", "exact",
             "The 16 NF4 values (index = 4-bit code) as bitsandbytes ships them, derived from standard-normal "
             "quantiles at offset 0.9677083 in float32 (QLoRA §3; lora_ref.quant.nf4.nf4_code).",
             {"quant_type": "nf4"}, {}, {"code": _f32(nf4.nf4_code())}),
        Case("fp4_codebook", "codebook", "quant.safetensors", "exact",
             "The 16 FP4 (E2M1) values of bitsandbytes' get_4bit_type('fp4'), index = 4-bit code (sign bit 8).",
             {"quant_type": "fp4"}, {}, {"code": _f32(nf4.get_4bit_type("fp4"))}),
        Case("dynamic_map_8bit", "codebook", "quant.safetensors", "exact",
             "The signed 8-bit dynamic map of bitsandbytes' create_dynamic_map() used by double quantization "
             "(the table an AVX2/AVX512 CPU produces; other instruction sets differ by 1 ulp in 42 entries).",
             {}, {}, {"code": _f32(nf4.DYNAMIC_MAP)}),
    ]


def _quant_case(name, *, shape, blocksize, quant_type, rounding, dtype="float32", double_quant=False,
                make_input=None, description="", op=None, seed_name=None, tolerance="exact") -> Case:
    from lora_ref.quant import dequantize_4bit, quantize_4bit

    rng, seed = rng_for(seed_name or name)
    x = make_input(rng) if make_input is not None else rng.standard_normal(shape).astype(np.float32)
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    xq = np.asarray(x, dtype=np.float32).astype(np_dtype)
    packed, state = quantize_4bit(xq, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant,
                                  rounding=rounding)
    deq = dequantize_4bit(packed, state)
    outputs = {"packed": packed, "dequantized": _f32(deq)}
    if double_quant:
        outputs.update({"absmax_codes": np.asarray(state.absmax, dtype=np.uint8),
                        "offset": np.array([state.offset], dtype=np.float32),
                        "absmax2": _f32(state.state2.absmax)})
    else:
        outputs["absmax"] = _f32(state.absmax)
    params = {"seed": seed, "shape": list(xq.shape), "blocksize": blocksize, "quant_type": quant_type,
              "rounding": rounding, "dtype": dtype, "double_quant": double_quant,
              "packing": "first element in the high nibble; ceil(n/2) bytes"}
    return Case(name, op or "quantize_4bit", "quant.safetensors", tolerance, description, params,
                {"x": _f32(xq)}, outputs)


def quantize_cases() -> list[Case]:
    cases = []
    for qt in ("nf4", "fp4"):
        for rounding in ("cuda", "cpu"):
            cases.append(_quant_case(
                f"{qt}_quantize_{rounding}_float32", shape=(37, 65), blocksize=64, quant_type=qt, rounding=rounding,
                description=f"{qt.upper()} quantize + dequantize of N(0,1) float32, blocksize 64, n odd (2405 "
                            f"elements, blocks spanning rows), as bitsandbytes' {rounding.upper()} path computes "
                            f"it. Outputs: packed codes, float32 absmax per block, dequantized values."
                            + (" FP4 code 8 is -0 and dequantizes to -0.0 (as on CUDA); bitsandbytes' CPU "
                               "dequantization returns +0.0 or -0.0 for it depending on which of its kernels the "
                               "tensor's shape selects, so values are compared as numbers." if (qt, rounding) ==
                               ("fp4", "cpu") else "")
                            + (" Not bit for bit: CUDA's fast-math reciprocal 1/absmax flips a code within an ulp of "
                               "a threshold now and then (at most 3 of 65,536 codes in the CUDA fixtures), so up to 3 "
                               "elements of each output may differ." if (qt, rounding) == ("fp4", "cuda") else ""),
                tolerance={("fp4", "cuda"): CUDA_FP4_TOL, ("fp4", "cpu"): CPU_FP4_TOL}.get((qt, rounding), "exact")))
    cases.append(_quant_case(
        "nf4_quantize_cuda_bfloat16", shape=(48, 40), blocksize=128, quant_type="nf4", rounding="cuda",
        dtype="bfloat16", description="NF4 of a bfloat16 tensor (inputs and dequantized outputs are bfloat16 "
                                      "values stored as float32), blocksize 128."))
    cases.append(_quant_case(
        "nf4_quantize_cuda_float16", shape=(7, 33), blocksize=32, quant_type="nf4", rounding="cuda",
        dtype="float16", description="NF4 of a float16 tensor, blocksize 32, odd n."))
    cases.append(_quant_case(
        "nf4_double_quant_cuda", shape=(64, 300), blocksize=64, quant_type="nf4", rounding="cuda",
        double_quant=True, op="quantize_4bit_double_quant",
        make_input=lambda rng: (0.02 * rng.standard_normal((64, 300))).astype(np.float32),
        description="NF4 with double quantization (QLoRA §3): the 300 block scales minus their mean (offset), "
                    "8-bit dynamic-map codes in blocks of 256 with float32 absmax2, found by the CUDA kernel's "
                    "binary search. Dequantization: absmax = code8[q]·absmax2 + offset, then the 4-bit decode. "
                    "Not bit for bit: the offset is torch's float32 mean on the GPU, whose reduction order is not "
                    "reproduced (a float64 mean rounded to float32; equal on the CUDA fixtures, possibly an ulp off "
                    "here), so offset and absmax2 agree within 1e-6 relative and one nested code (64 dequantized "
                    "values) may flip.", tolerance=CUDA_DOUBLE_QUANT_TOL))
    cases.append(_quant_case(
        "nf4_quantize_blocksize_4096", shape=(5000,), blocksize=4096, quant_type="nf4", rounding="cuda",
        description="NF4, blocksize 4096, a 1-D tensor whose last block is partial."))
    return cases


def blockwise_8bit_cases() -> list[Case]:
    from lora_ref.quant import dequantize_blockwise, quantize_blockwise

    name = "blockwise_8bit_dynamic"
    rng, seed = rng_for(name)
    x = (rng.standard_normal(1000) * np.exp(rng.uniform(-6, 0, 1000))).astype(np.float32)
    codes, state = quantize_blockwise(x, blocksize=256, rounding="cuda")
    return [Case(name, "quantize_blockwise", "quant.safetensors", "exact",
                 "8-bit blockwise quantization with the signed dynamic map, blocksize 256 (what double "
                 "quantization applies to the block scales), code chosen by the CUDA kernel's 7-step binary search.",
                 {"seed": seed, "blocksize": 256, "rounding": "cuda"}, {"x": x},
                 {"codes": codes, "absmax": _f32(state.absmax), "dequantized": _f32(dequantize_blockwise(codes, state))})]


def bnb_divergence_cases() -> list[Case]:
    """Inputs on which bitsandbytes' CPU and CUDA paths disagree; lora_ref reproduces each (``rounding=``)."""
    from lora_ref.quant import nf4

    def zero_block(rng):
        x = rng.standard_normal(256).astype(np.float32)
        x[64:128] = 0.0  # one all-zero block
        return x

    def threshold_probes(rng):
        t = nf4.cuda_nf4_thresholds().astype(np.float32)  # (15,) the CUDA kernel's decimal thresholds
        mids = nf4.midpoints_f32(nf4.nf4_code()).astype(np.float32)
        probes = np.concatenate([t, mids, np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2))])
        x = np.concatenate([probes, [1.0]]).astype(np.float32)  # a 1.0 makes absmax 1, so s = x exactly
        return np.resize(x, 64).astype(np.float32) if x.size < 64 else x[:64]

    def fp4_small(rng):
        x = rng.standard_normal(128).astype(np.float32) * 1e-3
        x[::7] *= -1e-3
        x[0] = 1.0
        x[64] = -1.0
        return x

    out = []
    for rounding, other in (("cuda", "cpu"), ("cpu", "cuda")):
        out.append(_quant_case(
            f"divergence_bnb_zero_block_{rounding}", shape=(256,), blocksize=64, quant_type="nf4", rounding=rounding,
            make_input=zero_block, op="quantize_4bit", seed_name="divergence_bnb_zero_block",
            description=f"An all-zero block, as bitsandbytes' {rounding.upper()} path encodes it. "
                        + ("CUDA: 1/0 = inf and 0·inf = NaN, so every code is 0 (bytes 0x00) and dequantizes to "
                           "-0.0. The CPU path instead gives bytes 0x77 (the code of 0.0) and +0.0."
                           if rounding == "cuda" else
                           "CPU: the scale is clamped to 1e-38, so zeros encode as code 7 (bytes 0x77) and "
                           "dequantize to +0.0. The CUDA kernel instead gives bytes 0x00 and -0.0.")))
        out.append(_quant_case(
            f"divergence_bnb_nf4_thresholds_{rounding}", shape=(64,), blocksize=64, quant_type="nf4",
            rounding=rounding, make_input=threshold_probes, op="quantize_4bit",
            seed_name="divergence_bnb_nf4_thresholds",
            description=f"Values on and 1 ulp beside the NF4 decision thresholds, as the {rounding.upper()} path "
                        "encodes them. The CUDA kernel compares against 15 decimal literals, 4 of which are 1 ulp "
                        "from the float32 midpoints the CPU path uses, so values on those midpoints get "
                        "different codes; ties go to the lower code in both."))
        out.append(_quant_case(
            f"divergence_bnb_fp4_{rounding}", shape=(128,), blocksize=64, quant_type="fp4", rounding=rounding,
            make_input=fp4_small, op="quantize_4bit", seed_name="divergence_bnb_fp4",
            tolerance="exact" if rounding == "cuda" else CPU_FP4_TOL,
            description=f"FP4 of tiny positive and negative values, as the {rounding.upper()} path encodes them. "
                        "CUDA sets the sign bit from x < 0 and compares |x| with literal thresholds; the CPU path "
                        "bucketizes against midpoints of the sorted table, so tiny values and exact ties get "
                        f"the other sign of zero or the neighbouring magnitude (about 0.5% of random codes)."
                        + (" Bit for bit: each block's absmax is exactly 1, so CUDA's approximate reciprocal is exact."
                           if rounding == "cuda" else " Values compared as numbers (the CPU's sign of a zero code "
                           "varies with the shape).")))
    out.append(_quant_case(
        "divergence_bnb_nested_codes_cpu", shape=(64, 300), blocksize=64, quant_type="nf4", rounding="cpu",
        double_quant=True, op="quantize_4bit_double_quant", seed_name="nf4_double_quant_cuda",
        make_input=lambda rng: (0.02 * rng.standard_normal((64, 300))).astype(np.float32),
        description="Double quantization as bitsandbytes' CPU path does it: the 8-bit codes of the block scales "
                    "come from a 65,536-bin lookup table, an approximation of the nearest code, so about 0.1% "
                    "differ from the CUDA kernel's binary search (compare nf4_double_quant_cuda)."))
    return out


# ================================================================================================================
# autograd composites and the model
# ================================================================================================================
def _grad_case(name, op, fn, inputs: dict, description, params=None) -> Case:
    """Forward value and the gradients of sum(out · w) for fixed random weights w (stored as an input)."""
    from lora_ref.autograd.tensor import Tensor

    rng, seed = rng_for(name + "/weights")
    ts = {k: Tensor(v, requires_grad=v.dtype.kind == "f") for k, v in inputs.items()}
    out = fn(**ts)
    w = rng.standard_normal(out.shape).astype(np.float32)
    (out * Tensor(w)).sum().backward()
    outputs = {"out": _f32(out.data)}
    for k, t in ts.items():
        if t.requires_grad:
            outputs[f"grad_{k}"] = _f32(t.grad)
    p = {"loss_for_gradients": "sum(out * out_weight)", **(params or {})}
    return Case(name, op, "autograd.safetensors", F32_TOL, description, p, {**inputs, "out_weight": w}, outputs)


def autograd_cases() -> list[Case]:
    from lora_ref.autograd import functional as F

    cases = []
    rng, seed = rng_for("rms_norm")
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(16)).astype(np.float32)
    cases.append(_grad_case("rms_norm", "rms_norm", lambda x, weight: F.rms_norm(x, weight, 1e-5),
                            {"x": x, "weight": w},
                            "RMSNorm over the last axis, y = w·x/sqrt(mean(x²)+eps), eps 1e-5, and its gradients.",
                            {"seed": seed, "eps": 1e-5}))
    rng, seed = rng_for("softmax")
    x = (3 * rng.standard_normal((4, 7, 11))).astype(np.float32)
    cases.append(_grad_case("softmax", "softmax", lambda x: F.softmax(x, -1), {"x": x},
                            "Softmax over the last axis and its gradient.", {"seed": seed, "axis": -1}))
    rng, seed = rng_for("cross_entropy")
    z = (2 * rng.standard_normal((12, 9))).astype(np.float32)
    t = rng.integers(0, 9, size=12).astype(np.int64)
    t[3] = -100
    from lora_ref.autograd.tensor import Tensor

    zt = Tensor(z, requires_grad=True)
    loss = F.cross_entropy(zt, t)
    loss.backward()
    cases.append(Case("cross_entropy", "cross_entropy", "autograd.safetensors", F32_TOL,
                      "Mean cross-entropy of integer targets (target -100 is ignored, as in torch) and d loss/d "
                      "logits.", {"seed": seed, "ignore_index": -100},
                      {"logits": z, "targets": t}, {"loss": _f32([loss.item()]), "grad_logits": _f32(zt.grad)}))
    rng, seed = rng_for("attention_gqa_causal")
    q = rng.standard_normal((2, 4, 5, 8)).astype(np.float32)
    k = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
    v = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
    cases.append(_grad_case("attention_gqa_causal", "attention",
                            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
                            {"q": q, "k": k, "v": v},
                            "Causal grouped-query attention softmax(q kᵀ/√E + mask) v: 4 query heads share 2 "
                            "key/value heads (query head h reads kv head h // 2), and its gradients.",
                            {"seed": seed, "layout": "q (B, H, T, E); k, v (B, K, S, E)"}))
    rng, seed = rng_for("swiglu")
    g, u = rng.standard_normal((2, 3, 10)).astype(np.float32), rng.standard_normal((2, 3, 10)).astype(np.float32)
    cases.append(_grad_case("swiglu", "swiglu", lambda gate, up: F.swiglu(gate, up), {"gate": g, "up": u},
                            "SwiGLU gating silu(gate)·up and its gradients.", {"seed": seed}))
    return cases


def tiny_llama_config(rope: str = "llama3") -> dict:
    """The config.json of the tiny Llama used by the model cases (GQA, llama3 RoPE scaling, untied head)."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "initializer_range": 0.1, "hidden_act": "silu"}
    if rope == "llama3":
        cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8}
    return cfg


def model_cases() -> list[Case]:
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.llama import Llama, LlamaConfig, rope_cos_sin, rope_inv_freq

    cases = []
    name = "rope_llama3"
    rng, seed = rng_for(name)
    cfg = LlamaConfig.from_dict({**tiny_llama_config("llama3"), "hidden_size": 64, "num_attention_heads": 2,
                                 "num_key_value_heads": 2})
    inv = rope_inv_freq(cfg)
    positions = np.arange(0, 24)  # beyond original_max_position_embeddings = 8
    cos, sin = rope_cos_sin(inv, positions)
    from lora_ref.autograd import functional as F

    x = rng.standard_normal((1, 2, 24, cfg.head_dim)).astype(np.float32)
    cases.append(Case(name, "rope", "model.safetensors", F32_TOL,
                      "RoPE with Llama-3 scaling (theta 5e5, factor 8, low/high freq factors 1/4, original context "
                      "8) at positions 0..23: the frequencies, and x rotated in the rotate-half layout "
                      "(dimension i paired with i + head_dim/2) as transformers computes it.",
                      {"seed": seed, "head_dim": cfg.head_dim, "rope_parameters": cfg.rope_parameters},
                      {"x": x, "positions": positions.astype(np.int64)},
                      {"inv_freq": _f32(inv), "rotated": _f32(F.rotary(x, cos, sin).data)}))

    name = "tiny_llama_logits"
    rng, seed = rng_for(name)
    config = tiny_llama_config("llama3")
    model = Llama(config, rng=rng)
    ids = rng.integers(0, config["vocab_size"], size=(2, 12)).astype(np.int64)
    with no_grad():
        logits = model(ids)
    weights = {f"weight/{k}": _f32(v) for k, v in model.state_dict().items()}
    cases.append(Case(name, "llama_logits", "model.safetensors", F32_LOOSE,
                      "Logits of a tiny Llama (2 layers, GQA 4/2 heads, llama3 RoPE scaling with a sequence longer "
                      "than original_max_position_embeddings, untied head). Inputs hold every weight under "
                      "weight/<transformers state-dict key> and the token ids; params hold config.json.",
                      {"seed": seed, "config": config}, {"ids": ids, **weights}, {"logits": _f32(np.asarray(logits))}))
    return cases


# ================================================================================================================
# LoRA, DoRA, merging, combinations
# ================================================================================================================
def _lora_layer(name: str, out_f: int, in_f: int, r: int, alpha: float, *, use_rslora=False, use_dora=False,
                lora_bias=False, base_bias=False, bf16=False):
    """A LoraLinear over a random base, with B ≠ 0 (init_lora_weights=False), from the case's own generator."""
    from lora_ref.adapters.lora import LoraLinear, round_to_dtype
    from lora_ref.modeling.nn import Linear

    rng, seed = rng_for(name)
    base = Linear(in_f, out_f, bias=base_bias, rng=rng, std=0.1)
    if base_bias:
        base.bias.data[...] = rng.normal(0, 0.1, out_f)
    if bf16:
        base.weight.data[...] = round_to_dtype(base.weight.data, ml_dtypes.bfloat16)
        base.weight_dtype = np.dtype(ml_dtypes.bfloat16)
    layer = LoraLinear(base, "default", r=r, lora_alpha=alpha, use_rslora=use_rslora, init_lora_weights=False,
                       use_dora=use_dora, lora_bias=lora_bias, rng=rng)
    return layer, rng, seed


def _lora_io(layer) -> dict:
    d = {"W": _f32(layer.base_layer.weight.data), "lora_A": _f32(layer.lora_A["default"].weight.data),
         "lora_B": _f32(layer.lora_B["default"].weight.data)}
    if layer.base_layer.bias is not None:
        d["bias"] = _f32(layer.base_layer.bias.data)
    if layer.lora_B["default"].bias is not None:
        d["lora_B_bias"] = _f32(layer.lora_B["default"].bias.data)
    if "default" in layer.lora_magnitude_vector:
        d["magnitude"] = _f32(layer.lora_magnitude_vector["default"].weight.data)
    return d


def _lora_params(layer, seed, **extra) -> dict:
    return {"seed": seed, "r": layer.r["default"], "lora_alpha": layer.lora_alpha["default"],
            "scaling": layer.scaling["default"], "use_rslora": layer.use_rslora["default"],
            "use_dora": layer.use_dora["default"], "shapes": "W (out, in), lora_A (r, in), lora_B (out, r), x (..., in)", **extra}


def lora_cases() -> list[Case]:
    from lora_ref.autograd.tensor import Tensor

    cases = []
    for name, kw, text in (
        ("lora_forward_backward", dict(r=4, alpha=8), "scaling α/r = 2"),
        ("rslora_forward_backward", dict(r=16, alpha=8, use_rslora=True), "rsLoRA scaling α/√r = 2"),
        ("dora_forward_backward", dict(r=4, alpha=8, use_dora=True),
         "DoRA: y = (m/‖W + sBA‖_row)·(x·(W + sBA)ᵀ) + b, the norm per output row and detached (no gradient "
         "through it), m initialized to that norm and then perturbed"),
    ):
        layer, rng, seed = _lora_layer(name, 24, 20, kw["r"], kw["alpha"], use_rslora=kw.get("use_rslora", False),
                                       use_dora=kw.get("use_dora", False), base_bias=True)
        if "default" in layer.lora_magnitude_vector:
            m = layer.lora_magnitude_vector["default"].weight
            m.data[...] = m.data * (1 + 0.1 * rng.standard_normal(m.shape)).astype(np.float32)
        inputs = _lora_io(layer)
        x = Tensor(rng.standard_normal((3, 5, 20)).astype(np.float32), requires_grad=True)
        y = layer(x)
        w = rng.standard_normal(y.shape).astype(np.float32)
        (y * Tensor(w)).sum().backward()
        outputs = {"y": _f32(y.data), "grad_x": _f32(x.grad),
                   "grad_lora_A": _f32(layer.lora_A["default"].weight.grad),
                   "grad_lora_B": _f32(layer.lora_B["default"].weight.grad)}
        if "default" in layer.lora_magnitude_vector:
            outputs["grad_magnitude"] = _f32(layer.lora_magnitude_vector["default"].weight.grad)
        cases.append(Case(name, "lora_forward", "lora.safetensors", F32_TOL,
                          f"A LoRA layer y = x·Wᵀ + b + ((x·Aᵀ)·Bᵀ)·s, {text}, with B ≠ 0; gradients of "
                          "sum(y · out_weight) for x, lora_A and lora_B (the base is frozen).",
                          _lora_params(layer, seed),
                          {**inputs, "x": _f32(x.data), "out_weight": w}, outputs))

    # merge / unmerge in float32, and DoRA's merge
    for name, dora in (("merge_unmerge_float32", False), ("dora_merge", True)):
        layer, rng, seed = _lora_layer(name, 16, 12, 4, 16, use_dora=dora)
        inputs = _lora_io(layer)
        layer.merge()
        merged = _f32(layer.base_layer.weight.data)
        layer.unmerge()
        cases.append(Case(name, "merge", "lora.safetensors", F32_TOL,
                          ("DoRA merge: W' = (m/‖W + sBA‖_row)[:, None]·(W + sBA), PEFT's definition. "
                           if dora else "Merge W' = W + s·(B @ A) in float32, and unmerge W'' = W' − s·(B @ A). ")
                          + "Outputs: the merged and the unmerged weight.",
                          _lora_params(layer, seed), inputs,
                          {"merged_W": merged, "unmerged_W": _f32(layer.base_layer.weight.data)}))

    # bfloat16: one rounding (PEFT's unsafe merge) vs two (safe_merge)
    for safe in (False, True):
        name = f"merge_bfloat16_{'safe_double_rounding' if safe else 'unsafe_single_rounding'}"
        layer, rng, seed = _lora_layer("merge_bfloat16", 32, 32, 8, 16, bf16=True)
        inputs = _lora_io(layer)
        layer.merge(safe_merge=safe)
        merged = _f32(layer.base_layer.weight.data)
        layer.unmerge()
        cases.append(Case(name, "merge_bfloat16", "lora.safetensors", "exact",
                          ("safe_merge=True on a bfloat16 base: W' = bf16(W + bf16(s·B@A)), the update rounded "
                           "first, then the sum (two roundings), as PEFT's safe path does."
                           if safe else
                           "Unsafe merge on a bfloat16 base: W' = bf16(W + s·B@A) with the update in float32, one "
                           "rounding, as PEFT's in-place W.data += ΔW does.")
                          + " W (an input) and W' hold bfloat16 values stored as float32; the two merges disagree "
                            "on about a third of the weights. unmerged_W = bf16(W' − bf16(s·B@A)), PEFT's unmerge, "
                            "which does not give W back exactly.",
                          _lora_params(layer, seed, dtype="bfloat16", safe_merge=safe), inputs,
                          {"merged_W": merged, "unmerged_W": _f32(layer.base_layer.weight.data)}))

    # lora_B bias: merged with its scaling (PEFT's bitsandbytes merge forgets it)
    name = "divergence_peft_4bit_merge_bias_scaling"
    layer, rng, seed = _lora_layer(name, 16, 12, 4, 32, lora_bias=True, base_bias=True)
    inputs = _lora_io(layer)
    layer.merge()
    cases.append(Case(name, "merge_lora_bias", "lora.safetensors", F32_TOL,
                      "Merging an adapter with lora_bias=True: b' = b + s·b_B (s = α/r = 8). PEFT 0.21.2 does this "
                      "for torch Linear (fixed in PR #2489) but its bitsandbytes 4-bit and 8-bit merges add b_B "
                      "without s (issue #3741), so a merged 4-bit PEFT model's bias is off by (s − 1)·b_B; "
                      "lora_ref scales it on every base.",
                      _lora_params(layer, seed), inputs,
                      {"merged_bias": _f32(layer.base_layer.bias.data), "merged_W": _f32(layer.base_layer.weight.data)}))
    return cases


def qlora_cases() -> list[Case]:
    from lora_ref.adapters.qlora import Linear4bit, LoraLinear4bit, merge_4bit
    from lora_ref.autograd.tensor import Tensor

    name = "qlora_forward_backward"
    rng, seed = rng_for(name)
    W = (0.05 * rng.standard_normal((24, 40))).astype(np.float32)
    base = Linear4bit(W, blocksize=64, quant_type="nf4", double_quant=True, rounding="cuda", impl="numpy")
    st = base.quant_state
    layer = LoraLinear4bit(base, "default", r=4, lora_alpha=16, init_lora_weights=False, rng=rng)
    A, B = _f32(layer.lora_A["default"].weight.data), _f32(layer.lora_B["default"].weight.data)
    x = Tensor(rng.standard_normal((3, 40)).astype(np.float32), requires_grad=True)
    y = layer(x)
    w = rng.standard_normal(y.shape).astype(np.float32)
    (y * Tensor(w)).sum().backward()
    quant_inputs = {"W_packed": np.asarray(base.weight.data, np.uint8).reshape(-1),
                    "W_absmax_codes": np.asarray(st.absmax, np.uint8), "W_offset": np.array([st.offset], np.float32),
                    "W_absmax2": _f32(st.state2.absmax)}
    cases = [Case(name, "qlora_forward", "lora.safetensors", F32_TOL,
                  "QLoRA (Eq. 5-6 of the paper): y = x·dequant(W)ᵀ + s·(x·Aᵀ)·Bᵀ, W in NF4 with double quantization "
                  "(blocksize 64, CUDA rounding; the packed codes and nested scales are inputs, the float W they "
                  "came from too), s = 16/4; gradients for x (through the 4-bit weight), lora_A and lora_B.",
                  {"seed": seed, "r": 4, "lora_alpha": 16, "scaling": 4.0, "blocksize": 64, "quant_type": "nf4",
                   "double_quant": True},
                  {"W": W, **quant_inputs, "lora_A": A, "lora_B": B, "x": _f32(x.data), "out_weight": w},
                  {"y": _f32(y.data), "grad_x": _f32(x.grad), "grad_lora_A": _f32(layer.lora_A["default"].weight.grad),
                   "grad_lora_B": _f32(layer.lora_B["default"].weight.grad)})]
    merged = merge_4bit(layer, strategy="requantize")
    cases.append(Case("qlora_merge_requantize", "merge_4bit", "lora.safetensors", {"max_mismatched": 1},
                      "Merging the adapter of qlora_forward_backward into its 4-bit base the way PEFT does: "
                      "dequantize W, add s·B@A in float32, quantize again with the same settings (NF4, double "
                      "quantization, blocksize 64). Outputs: the new packed codes and nested scale codes. The "
                      "merged layer differs from the unmerged one by the NF4 error of the merged weight. One element "
                      "of each output may differ from the GPU's: the double-quantization offset is a float32 mean "
                      "whose GPU reduction order is not reproduced (see nf4_double_quant_cuda).",
                      {"seed": seed, "strategy": "requantize"}, {**quant_inputs, "lora_A": A, "lora_B": B},
                      {"packed": np.asarray(merged.weight.data, np.uint8).reshape(-1),
                       "absmax_codes": np.asarray(merged.quant_state.absmax, np.uint8)}))
    return cases


def qlora_depth_cases() -> list[Case]:
    """LoftQ, PiSSA → LoRA conversion, DoRA on a 4-bit base (and DoRA's other normalization axis), the 4-bit merge
    targets, LoRA on an embedding table."""
    from lora_ref.adapters.embedding import LoraEmbedding
    from lora_ref.adapters.loftq import loftq
    from lora_ref.adapters.merge_report import layer_report, target_layer
    from lora_ref.adapters.pissa import converted_state_dict
    from lora_ref.adapters.qlora import Linear4bit, LoraLinear4bit, merge_4bit
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.nn import Embedding

    cases: list[Case] = []

    def qstate(base):
        st = base.quant_state
        return {"W_packed": np.asarray(base.weight.data, np.uint8).reshape(-1),
                "W_absmax_codes": np.asarray(st.absmax, np.uint8), "W_offset": np.array([st.offset], np.float32),
                "W_absmax2": _f32(st.state2.absmax)}

    # ---- LoftQ
    name = "loftq_iterations"
    rng, seed = rng_for(name)
    W = (0.02 * rng.standard_t(4, size=(64, 128))).astype(np.float32)
    one = loftq(W, 4, 4, 1, rounding="cpu")
    three = loftq(W, 4, 4, 3, rounding="cpu")
    cases.append(Case(name, "loftq_init", "lora.safetensors", {"atol": 1e-6, "rtol": 1e-3},
                      "LoftQ (Li et al. 2023, Algorithm 1; PEFT's loftq_init(W, num_bits=4, reduced_rank=4, num_iter=N)):"
                      " alternate NF4 (blocksize 64, no double quantization) of W − B·A and a rank-4 SVD of W − Q, with "
                      "bitsandbytes' CPU rounding (PEFT's loop run on a CPU; the CUDA rounding PEFT's GPU-only "
                      "function uses is checked against its H100 outputs in tests/data/loftq). Outputs: dequant(Q_1) "
                      "(bitsandbytes' CPU NF4 of W, exact values), B·A after one iteration, and "
                      "‖W − (Q_t + B_t·A_t)‖_F for t = 1, 2, 3 of a 3-iteration run. B·A (not A, B: an SVD fixes "
                      "them only up to signs) and the errors depend on the SVD's float32 rounding.",
                      {"seed": seed, "num_bits": 4, "reduced_rank": 4, "num_iter": 3, "blocksize": 64,
                       "rounding": "cpu"},
                      {"W": W},
                      {"dequantized_iter1": _f32(one.dequantized), "BA_iter1": _f32(one.lora_B @ one.lora_A),
                       "errors": np.array(three.errors, np.float32)}))

    # ---- PiSSA → LoRA
    name = "pissa_to_lora_conversion"
    rng, seed = rng_for(name)
    out_f, in_f, r, alpha = 16, 24, 4, 8.0
    s = alpha / r
    W = (0.1 * rng.standard_normal((out_f, in_f))).astype(np.float32)
    U, S, Vh = np.linalg.svd(W, full_matrices=False)
    A0 = (np.sqrt(S[:r] / s)[:, None] * Vh[:r]).astype(np.float32)
    B0 = (U[:, :r] * np.sqrt(S[:r] / s)[None, :]).astype(np.float32)
    W_res = (W - np.float32(s) * (B0 @ A0)).astype(np.float32)
    A = (A0 + 0.05 * rng.standard_normal(A0.shape)).astype(np.float32)
    B = (B0 + 0.05 * rng.standard_normal(B0.shape)).astype(np.float32)
    conv = converted_state_dict({"m.lora_A.weight": A, "m.lora_B.weight": B},
                                {"m.lora_A.weight": A0, "m.lora_B.weight": B0})
    x = rng.standard_normal((3, in_f)).astype(np.float32)
    y = (x.astype(np.float64) @ (W_res.astype(np.float64) + s * B.astype(np.float64) @ A).T).astype(np.float32)
    cases.append(Case(name, "pissa_to_lora", "lora.safetensors", F32_TOL,
                      "PiSSA → LoRA (PEFT's save_pretrained(path_initial_model_for_weight_conversion=…)): from the "
                      "initial adapter (A0, B0; W_res = W − s·B0·A0) and the trained one (A, B), the rank-2r adapter "
                      "for the unmodified W: A' = [A; A0], B' = [B, −B0], r' = 2r, α' = 2α (same s). A' and B' are "
                      "concatenations (exact values); y = x·(W + s·B'·A')ᵀ equals the PiSSA model x·(W_res + s·B·A)ᵀ.",
                      {"seed": seed, "r": r, "lora_alpha": alpha, "scaling": s, "converted_r": 2 * r,
                       "converted_lora_alpha": 2 * alpha},
                      {"W": W, "W_res": W_res, "lora_A_init": A0, "lora_B_init": B0, "lora_A": A, "lora_B": B,
                       "x": x},
                      {"lora_A_converted": conv["m.lora_A.weight"], "lora_B_converted": conv["m.lora_B.weight"],
                       "y": y}))

    # ---- DoRA on a 4-bit base, and the other normalization axis
    name = "dora_4bit_forward_merge"
    rng, seed = rng_for(name)
    W = (0.05 * rng.standard_normal((32, 64))).astype(np.float32)
    base = Linear4bit(W, blocksize=64, quant_type="nf4", double_quant=True, rounding="cuda", impl="numpy")
    layer = LoraLinear4bit(base, "default", r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, rng=rng)
    m = layer.lora_magnitude_vector["default"].weight
    m.data[...] = m.data * rng.uniform(0.7, 1.3, m.shape).astype(np.float32)
    A, B, mag = (_f32(layer.lora_A["default"].weight.data), _f32(layer.lora_B["default"].weight.data),
                 _f32(m.data))
    x = rng.standard_normal((5, 64)).astype(np.float32)
    with no_grad():
        y = _f32(layer(x).data)
    target = _f32(merge_4bit(layer, "float").weight.data)
    Wq = base.dequantize()
    cases.append(Case(name, "dora_4bit", "lora.safetensors", F32_TOL,
                      "DoRA (Liu et al. 2024) on an NF4 base with double quantization (blocksize 64, CUDA rounding), "
                      "as PEFT's bnb Linear4bit + DoraLinearVariant: V = dequant(W) + s·B·A, n = ‖V‖ per output row "
                      "(over in_features, PEFT's axis), y = x·((m/n)[:, None]·V)ᵀ; merged_weight = (m/n)[:, None]·V "
                      "(the float32 target that PEFT then re-quantizes).",
                      {"seed": seed, "r": 4, "lora_alpha": 8, "scaling": 2.0, "norm_axis": "per output row"},
                      {**qstate(base), "W": W, "W_dequantized": _f32(Wq), "lora_A": A, "lora_B": B, "magnitude": mag,
                       "x": x},
                      {"y": y, "merged_weight": target}))
    V = Wq.astype(np.float64) + 2.0 * B.astype(np.float64) @ A
    rng_alt, seed_alt = rng_for("dora_alternative_axis")
    m_col = (np.linalg.norm(V, axis=0) * rng_alt.uniform(0.7, 1.3, V.shape[1])).astype(np.float32)
    W_alt = V * (m_col / np.linalg.norm(V, axis=0))[None, :]
    cases.append(Case("dora_alternative_axis", "dora_column_norm", "lora.safetensors", F32_TOL,
                      "The other DoRA normalization axis, an alternative some implementations use (reading the paper's "
                      "column norm ‖·‖_c on the (out, in) layout): n = ‖V‖ per *input column* (over out_features), "
                      "m has in_features entries, W' = V·(m/n)[None, :]. Not what PEFT does (dora_4bit_forward_merge "
                      "normalizes each output row); same V = dequant(W) + s·B·A as that case.",
                      {"seed": seed_alt, "r": 4, "lora_alpha": 8, "scaling": 2.0, "norm_axis": "per input column"},
                      {"W_dequantized": _f32(Wq), "lora_A": A, "lora_B": B, "magnitude": m_col, "x": x},
                      {"y": _f32(x.astype(np.float64) @ W_alt.T), "merged_weight": _f32(W_alt)}))

    # ---- the 4-bit merge targets
    name = "qlora_merge_targets"
    rng, seed = rng_for(name)
    W16 = (0.05 * rng.standard_normal((32, 128))).astype(np.float32)
    base = Linear4bit(W16, blocksize=64, quant_type="nf4", double_quant=True, rounding="cpu", impl="numpy")
    layer = LoraLinear4bit(base, "default", r=4, lora_alpha=8, init_lora_weights=False, rng=rng)
    layer.lora_B["default"].weight.data[...] *= np.float32(0.05)
    A, B = _f32(layer.lora_A["default"].weight.data), _f32(layer.lora_B["default"].weight.data)
    x = rng.standard_normal((6, 128)).astype(np.float32)
    outs = {}
    with no_grad():
        for t in ("requantize", "refit", "float", "original", "unmerged"):
            outs[f"y_{t}"] = _f32(target_layer(layer, t, W16)(x).data)
    row = layer_report(layer, x, W16)
    requant = merge_4bit(layer, "requantize")
    cases.append(Case(name, "merge_4bit_targets", "lora.safetensors", F32_LOOSE,
                      "A QLoRA adapter (s = 2) on an NF4 base (double quantization, blocksize 64, bitsandbytes' CPU "
                      "rounding, so that PEFT + bitsandbytes can re-quantize it live on a CPU) and "
                      "the outputs of its five deployments: requantize (PEFT: Q(dequant(W) + ΔW)), refit (the same "
                      "target, per-block MSE-fitted scales), float (dequant(W) + ΔW), original (W16 + ΔW, the weight "
                      "that was quantized), unmerged (dequant(W) and the adapter apart). errors = ‖y_t − y‖/‖y‖ with y "
                      "the float64 x·(dequant(W) + ΔW)ᵀ, in the order above. The codes of the re-quantized merge "
                      "are the case qlora_merge_targets_codes.",
                      {"seed": seed, "r": 4, "lora_alpha": 8, "scaling": 2.0, "rounding": "cpu",
                       "targets": ["requantize", "refit", "float", "original", "unmerged"]},
                      {**qstate(base), "W16": W16, "lora_A": A, "lora_B": B, "x": x},
                      {**outs, "errors": np.array([row["errors"][t] for t in ("requantize", "refit", "float",
                                                                               "original", "unmerged")], np.float32)}))
    cases.append(Case("qlora_merge_targets_codes", "merge_4bit", "lora.safetensors", "exact",
                      "The packed NF4 codes and nested scale codes of qlora_merge_targets' re-quantized merge "
                      "(bitsandbytes' CPU rounding, as PEFT's merge of a bitsandbytes Linear4bit does on a CPU).",
                      {"seed": seed, "r": 4, "lora_alpha": 8, "scaling": 2.0, "strategy": "requantize",
                       "rounding": "cpu"},
                      {**qstate(base), "lora_A": A, "lora_B": B},
                      {"packed": np.asarray(requant.weight.data, np.uint8).reshape(-1),
                       "absmax_codes": np.asarray(requant.quant_state.absmax, np.uint8)}))

    # ---- LoRA on an embedding table
    name = "lora_embedding"
    rng, seed = rng_for(name)
    E = Embedding(40, 16, rng=rng, std=1.0)
    E0 = _f32(E.weight.data)
    layer = LoraEmbedding(E, "default", r=4, lora_alpha=8, init_lora_weights=False, rng=rng)
    A, B = _f32(layer.lora_A["default"].weight.data), _f32(layer.lora_B["default"].weight.data)
    ids = rng.integers(0, 40, size=(2, 7)).astype(np.int64)
    with no_grad():
        y = _f32(layer(ids).data)
    layer.merge()
    cases.append(Case(name, "lora_embedding", "lora.safetensors", F32_TOL,
                      "LoRA on an embedding table, as PEFT's lora.Embedding: E (V=40, d=16), lora_embedding_A (r, V), "
                      "lora_embedding_B (d, r), s = α/r = 2: y = E[ids] + s·(Aᵀ[ids])·Bᵀ; merged table "
                      "E + s·(B·A)ᵀ.",
                      {"seed": seed, "r": 4, "lora_alpha": 8, "scaling": 2.0},
                      {"E": E0, "lora_embedding_A": A, "lora_embedding_B": B, "ids": ids},
                      {"y": y, "merged_E": _f32(E.weight.data)}))
    return cases


def _combo_sources(name: str, n: int = 2, out_f: int = 12, in_f: int = 10, ranks=(4, 4)):
    rng, seed = rng_for(name)
    As = [rng.uniform(-0.3, 0.3, (r, in_f)).astype(np.float32) for r in ranks[:n]]
    Bs = [rng.uniform(-0.5, 0.5, (out_f, r)).astype(np.float32) for r in ranks[:n]]
    return rng, seed, As, Bs


def combination_cases() -> list[Case]:
    from lora_ref.merging.combine import combine_lora

    cases = []
    weights, scalings, density = [0.7, -0.3], [2.0, 0.5], 0.5
    for ctype in ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        name = f"combine_{ctype}"
        ranks = (4, 6) if ctype in ("cat", "svd") else (4, 4)
        _, seed, As, Bs = _combo_sources(name, ranks=ranks)
        kw = {}
        inputs = {f"lora_A_{i}": a for i, a in enumerate(As)}
        inputs.update({f"lora_B_{i}": b for i, b in enumerate(Bs)})
        text = ""
        if ctype in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
            kw["density"] = density
        if ctype == "svd":
            kw["svd_rank"] = 10
            text = " svd_rank 10 = the total rank, so the result is exact; only the product is compared (singular " \
                   "vectors have free signs)."
        if ctype.startswith("dare"):
            mask_seed = zlib.crc32((name + "/masks").encode())
            kw["rng"] = np.random.default_rng(mask_seed)
            replay = np.random.default_rng(mask_seed)
            for i, a in enumerate(As):
                inputs[f"keep_mask_A_{i}"] = (replay.random(a.shape) < density).astype(np.uint8)
            for i, b in enumerate(Bs):
                inputs[f"keep_mask_B_{i}"] = (replay.random(b.shape) < density).astype(np.uint8)
            text = " DARE's keep masks (1 = kept, then rescaled by 1/density) are inputs keep_mask_*."
        res = combine_lora(As, Bs, scalings, weights, ctype, **kw)
        outputs = {"delta_W": _f32(res.delta_weight())}
        if ctype != "svd":
            outputs.update({"lora_A": res.lora_A, "lora_B": res.lora_B})
        cases.append(Case(name, f"add_weighted_adapter_{ctype}", "merge.safetensors", F32_TOL,
                          f"PEFT's add_weighted_adapter combination '{ctype}' of two adapters with weights "
                          f"{weights} and source scalings {scalings} (the new adapter has scaling 1): the new "
                          f"lora_A, lora_B and delta_W = lora_B @ lora_A.{text}",
                          {"seed": seed, "weights": weights, "scalings": scalings, "combination_type": ctype,
                           **{k: v for k, v in kw.items() if k != "rng"}}, inputs, outputs))

    name = "divergence_peft_rslora_combination"
    _, seed, As, Bs = _combo_sources(name, ranks=(4, 4))
    r, alpha = 4, 8
    s = alpha / np.sqrt(r)
    res = combine_lora(As, Bs, [s, s], [1.0, 1.0], "cat")
    cases.append(Case(name, "add_weighted_adapter_cat", "merge.safetensors", F32_TOL,
                      "Combining two rsLoRA adapters (r 4, α 8, s = α/√r = 4) with 'cat', weights 1 and 1: the "
                      "combined update is Σ sᵢ·Bᵢ·Aᵢ. PEFT 0.21.2 copies use_rslora into the new adapter, whose "
                      "r = α = 8, so it applies scaling 8/√8 = √8 and its update is √8 ≈ 2.83 times too large "
                      "(PR #3449, issue #3761); lora_ref's new adapter has scaling 1.",
                      {"seed": seed, "r": r, "lora_alpha": alpha, "use_rslora": True, "weights": [1.0, 1.0]},
                      {"lora_A_0": As[0], "lora_A_1": As[1], "lora_B_0": Bs[0], "lora_B_1": Bs[1]},
                      {"delta_W": _f32(res.delta_weight())}))

    # task arithmetic, TIES and DARE on full task vectors, as the papers define them
    from lora_ref.merging import combine as M

    rng, seed = rng_for("full_delta_merges")
    tv = [rng.standard_normal((8, 6)).astype(np.float32) for _ in range(3)]
    inputs = {f"task_vector_{i}": t for i, t in enumerate(tv)}
    cases.append(Case("task_arithmetic_full", "task_arithmetic", "merge.safetensors", F32_TOL,
                      "Task arithmetic (Ilharco et al. 2023): λ·Σ τ_t with λ = 0.5 on three full task vectors.",
                      {"seed": seed, "lambda": 0.5}, inputs,
                      {"merged": _f32(M.paper_task_arithmetic(tv, lam=0.5))}))
    cases.append(Case("ties_full", "ties", "merge.safetensors", F32_TOL,
                      "TIES-merging (Yadav et al. 2023) as the paper defines it: trim each task vector to its top "
                      "20% by magnitude, elect the sign of the summed mass per entry, average the agreeing entries "
                      "(disjoint mean), times λ = 1.",
                      {"seed": seed, "density": 0.2, "lambda": 1.0}, inputs,
                      {"merged": _f32(M.paper_ties(tv, density=0.2, lam=1.0))}))
    return cases


# ================================================================================================================
# writing
# ================================================================================================================
# every family of cases, in the order they are written
_BUILDERS: tuple[Callable[[], list[Case]], ...] = (
    codebook_cases,
    quantize_cases,
    blockwise_8bit_cases,
    bnb_divergence_cases,
    autograd_cases,
    model_cases,
    lora_cases,
    qlora_cases,
    qlora_depth_cases,
    combination_cases,
)


def build_cases() -> list[Case]:
    """Every case, computed with BLAS pinned to one thread (serial paths: the bytes do not depend on threads) and
    with the readable NumPy twins of the fused kernels (:func:`lora_ref.kernels.switch.readable`), so the bytes do not depend
    on compiled code either."""
    from threadpoolctl import threadpool_limits

    from lora_ref.kernels import switch as fast

    cases: list[Case] = []
    with threadpool_limits(limits=1), fast.readable():
        for b in _BUILDERS:
            cases.extend(b())
    names = [c.name for c in cases]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"duplicate case names: {sorted(dup)}")
    if set(names) != set(ORACLES):
        raise RuntimeError(f"cases without an oracle: {sorted(set(names) - set(ORACLES))}; "
                           f"oracles without a case: {sorted(set(ORACLES) - set(names))}")
    for c in cases:
        c.oracle = ORACLES[c.name]
    return cases


README = """# lora_ref reference vectors

Inputs and expected outputs for checking an implementation of LoRA, QLoRA, NF4/FP4 quantization or merging
against lora_ref. `manifest.json` lists the cases: name, op, file, tolerance ("exact" = bit for bit, or
atol/rtol, optionally with "max_mismatched": at most that many elements of each output may miss it), the
oracle (the independent implementation the case was checked against), a description and the parameters. Tensors are `<case>/inputs/<name>` and `<case>/outputs/<name>`.

Check your results (a safetensors file or folder with `<case>/outputs/<name>` keys) with the standalone checker,
which needs only NumPy and safetensors:

    python check.py . my_results.safetensors

Cases named `divergence_*` record where bitsandbytes or PEFT compute something else, and why.
"""


def write_vectors(out) -> list[Case]:
    """Write every case, manifest.json, check.py and README.md into the new folder ``out`` (atomically)."""
    from lora_ref.files.outputs import output_dir
    from lora_ref.files.safetensors import write_safetensors
    from lora_ref.reference import check as check_module

    cases = build_cases()
    files: dict[str, dict[str, np.ndarray]] = {}
    for c in cases:
        store = files.setdefault(c.file, {})
        for kind, tensors in (("inputs", c.inputs), ("outputs", c.outputs)):
            for k, v in tensors.items():
                store[f"{c.name}/{kind}/{k}"] = np.ascontiguousarray(v)
    manifest = {"version": VERSION, "cases": [c.manifest_entry() for c in cases]}
    with output_dir(out) as tmp:
        for fname, tensors in sorted(files.items()):
            # one metadata key (the safetensors package writes several in a random order)
            write_safetensors(tmp / fname, tensors, metadata={"lora_ref_vectors": VERSION})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        (tmp / "check.py").write_text(Path(check_module.__file__).read_text())
        (tmp / "README.md").write_text(README)
    return cases
