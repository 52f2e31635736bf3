"""Every reference-vector case against the oracle its manifest entry names, live.

``lora_ref/reference/vectors.py`` (:data:`lora_ref.reference.vectors.ORACLES`) gives each case an ``oracle``: torch, transformers,
PEFT, bitsandbytes on the CPU, bitsandbytes' CUDA outputs (``tests/data/bnb``), the paper's formula written out
here, or ``none: <reason>``. Here each oracle computes the case's outputs from the case's inputs, and the
standalone checker compares them with the published outputs at the case's own tolerance, so a case marked
``exact`` is one its oracle reproduces bit for bit. CUDA can't run here: for ``bitsandbytes_cuda_fixtures`` the
case's settings (quant type, dtype, blocksize, double quantization, CUDA rounding) must reproduce bitsandbytes'
H200 outputs on the fixtures' inputs at the case's tolerance.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from lora_ref.reference.check import check, compare
from lora_ref.reference.vectors import ORACLE_KINDS

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors"
EXAMPLES = ROOT / "book" / "examples"
BNB_DATA = ROOT / "tests" / "data" / "bnb"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}


@functools.cache
def tensors() -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(VECTORS.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def inputs(name: str) -> dict[str, np.ndarray]:
    prefix = f"{name}/inputs/"
    return {k[len(prefix):]: v for k, v in tensors().items() if k.startswith(prefix)}


def _example(name):
    spec = importlib.util.spec_from_file_location(f"_oracle_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ torch
@functools.cache
def torch_results() -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as TF

    torch.set_num_threads(1)
    res = {}

    def grads(name, fn, float_inputs):
        inp = inputs(name)
        ts = {k: torch.from_numpy(inp[k].copy()).requires_grad_(True) for k in float_inputs}
        out = fn(**ts)
        (out * torch.from_numpy(inp["out_weight"])).sum().backward()
        res[f"{name}/outputs/out"] = out.detach().numpy()
        for k, t in ts.items():
            res[f"{name}/outputs/grad_{k}"] = t.grad.numpy()

    eps = CASES["rms_norm"]["params"]["eps"]
    grads("rms_norm", lambda x, weight: TF.rms_norm(x, (x.shape[-1],), weight, eps), ["x", "weight"])
    grads("softmax", lambda x: torch.softmax(x, dim=-1), ["x"])
    grads("attention_gqa_causal", lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True), ["q", "k", "v"])
    grads("swiglu", lambda gate, up: TF.silu(gate) * up, ["gate", "up"])
    inp = inputs("cross_entropy")
    z = torch.from_numpy(inp["logits"].copy()).requires_grad_(True)
    loss = TF.cross_entropy(z, torch.from_numpy(inp["targets"]), ignore_index=-100)
    loss.backward()
    res["cross_entropy/outputs/loss"] = loss.detach().numpy().reshape(1)
    res["cross_entropy/outputs/grad_logits"] = z.grad.numpy()
    return res


# ------------------------------------------------------------------------------------------------ transformers
@functools.cache
def transformers_results() -> dict[str, np.ndarray]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    torch.set_num_threads(1)
    res = {}
    p, inp = CASES["rope_llama3"]["params"], inputs("rope_llama3")
    cfg = LlamaConfig(hidden_size=2 * p["head_dim"], num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=64, rope_parameters=dict(p["rope_parameters"]))
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.from_numpy(inp["x"])
    pos = torch.from_numpy(inp["positions"]).reshape(1, -1)
    cos, sin = rope(x, pos)
    rotated, _ = apply_rotary_pos_emb(x, x, cos, sin)
    res["rope_llama3/outputs/inv_freq"] = rope.inv_freq.float().numpy()
    res["rope_llama3/outputs/rotated"] = rotated.numpy()

    p, inp = CASES["tiny_llama_logits"]["params"], inputs("tiny_llama_logits")
    model = LlamaForCausalLM(LlamaConfig(**p["config"])).eval()
    state = {k[len("weight/"):]: torch.from_numpy(v) for k, v in inp.items() if k.startswith("weight/")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        res["tiny_llama_logits/outputs/logits"] = model(torch.from_numpy(inp["ids"])).logits.numpy()
    return res


# ------------------------------------------------------------------------------------------------ PEFT
@functools.cache
def peft_results() -> dict[str, np.ndarray]:
    import torch
    from peft.utils import merge_utils

    torch.set_num_threads(1)
    example = _example("check_peft")
    res = dict(example.peft_results(VECTORS))
    # DARE: PEFT draws its masks with torch.bernoulli; replay the case's stored keep masks instead, in PEFT's order
    # (the A factors of both adapters, then the B factors)
    for name in ("combine_dare_linear", "combine_dare_ties"):
        p, inp = CASES[name]["params"], inputs(name)
        masks = [inp[f"keep_mask_{f}_{i}"] for f in ("A", "B") for i in range(2)]
        calls = []

        def random_pruning(tensor, density, rescale):
            mask = torch.from_numpy(masks[len(calls)].astype(np.float32))
            calls.append(tuple(tensor.shape))
            assert tuple(mask.shape) == tuple(tensor.shape) and density == p["density"]
            pruned = tensor * mask
            return pruned / density if rescale else pruned

        ranks = [inp[f"lora_A_{i}"].shape[0] for i in range(2)]
        model, layer = example.peft_layer(inp, {}, names=("a0", "a1"), ranks=ranks,
                                          alphas=[s * r for s, r in zip(p["scalings"], ranks)])
        orig = merge_utils.random_pruning
        merge_utils.random_pruning = random_pruning
        try:
            model.add_weighted_adapter(["a0", "a1"], p["weights"], "combo", combination_type=p["combination_type"],
                                       density=p["density"])
        finally:
            merge_utils.random_pruning = orig
        assert len(calls) == 4, calls
        res[f"{name}/outputs/delta_W"] = layer.get_delta_weight("combo").detach().numpy()
        res[f"{name}/outputs/lora_A"] = layer.lora_A["combo"].weight.detach().numpy()
        res[f"{name}/outputs/lora_B"] = layer.lora_B["combo"].weight.detach().numpy()
    return res


# ------------------------------------------------------------------------------------------------ bitsandbytes (CPU)
@functools.cache
def bitsandbytes_cpu_results() -> dict[str, np.ndarray]:
    import bitsandbytes.functional as bnbf
    import torch

    torch.set_num_threads(1)
    res = dict(_example("check_bitsandbytes_cpu").bitsandbytes_results(VECTORS))
    res["nf4_codebook/outputs/code"] = bnbf.get_4bit_type("nf4", device="cpu").numpy()
    res["fp4_codebook/outputs/code"] = bnbf.get_4bit_type("fp4", device="cpu").numpy()
    res["dynamic_map_8bit/outputs/code"] = bnbf.create_dynamic_map(signed=True).numpy()

    name = "divergence_bnb_nested_codes_cpu"
    p = CASES[name]["params"]
    x = torch.from_numpy(inputs(name)["x"]).reshape(p["shape"])
    packed, state = bnbf.quantize_4bit(x, blocksize=p["blocksize"], quant_type=p["quant_type"],
                                       compress_statistics=True)
    res[f"{name}/outputs/packed"] = packed.numpy().reshape(-1)
    res[f"{name}/outputs/dequantized"] = bnbf.dequantize_4bit(packed, state).numpy()
    res[f"{name}/outputs/absmax_codes"] = state.absmax.numpy()
    res[f"{name}/outputs/offset"] = np.array([float(state.offset)], np.float32)
    res[f"{name}/outputs/absmax2"] = state.state2.absmax.numpy()

    # QLoRA: the 4-bit weight dequantized by bitsandbytes from the stored codes, the LoRA branch in torch
    name = "qlora_forward_backward"
    p, inp = CASES[name]["params"], inputs(name)
    W = bnbf.dequantize_4bit(torch.from_numpy(inp["W_packed"]).reshape(-1, 1), _bnb_state(inp, inp["W"].shape, p))
    x = torch.from_numpy(inp["x"]).requires_grad_(True)
    A = torch.from_numpy(inp["lora_A"]).requires_grad_(True)
    B = torch.from_numpy(inp["lora_B"]).requires_grad_(True)
    y = x @ W.T + ((x @ A.T) @ B.T) * p["scaling"]
    (y * torch.from_numpy(inp["out_weight"])).sum().backward()
    res[f"{name}/outputs/y"] = y.detach().numpy()
    res[f"{name}/outputs/grad_x"] = x.grad.numpy()
    res[f"{name}/outputs/grad_lora_A"] = A.grad.numpy()
    res[f"{name}/outputs/grad_lora_B"] = B.grad.numpy()
    return res


def _bnb_state(inp: dict, shape, p: dict):
    """bitsandbytes' QuantState for a case's stored NF4 codes with double quantization (the nested 8-bit state
    rebuilt from the stored codes, offset and absmax2; blocksize 256 as bitsandbytes' compress_statistics)."""
    import bitsandbytes.functional as bnbf
    import torch

    state2 = bnbf.QuantState(absmax=torch.from_numpy(inp["W_absmax2"]), code=bnbf.create_dynamic_map(signed=True),
                             blocksize=256, dtype=torch.float32)
    return bnbf.QuantState(absmax=torch.from_numpy(inp["W_absmax_codes"]), shape=torch.Size(shape),
                           code=bnbf.get_4bit_type("nf4", device="cpu"), blocksize=p.get("blocksize", 64),
                           quant_type="nf4", dtype=torch.float32,
                           offset=torch.from_numpy(inp["W_offset"]).reshape(()), state2=state2)


# ------------------------------------------------------------------------------------------------ formulas
def _paper_ties(tvs, density, lam):
    """TIES-Merging (Yadav et al. 2023, Algorithm 1) entry by entry: keep each task's ⌊density·P⌋ largest |τ|,
    γ_p = sgn(Σ_t τ̂_t,p), mean of the τ̂_t,p whose sign is γ_p (0 if none), times λ."""
    flats = [t.astype(np.float64).ravel() for t in tvs]
    k = int(density * flats[0].size)
    trimmed = []
    for f in flats:
        order = sorted(range(f.size), key=lambda i: -abs(f[i]))
        keep = set(order[:k])
        trimmed.append([f[i] if i in keep else 0.0 for i in range(f.size)])
    merged = []
    for i in range(flats[0].size):
        total = sum(t[i] for t in trimmed)
        agree = [t[i] for t in trimmed if t[i] != 0 and total != 0 and math.copysign(1, t[i]) == math.copysign(1, total)]
        merged.append(sum(agree) / len(agree) if agree else 0.0)
    return lam * np.array(merged).reshape(tvs[0].shape)


def _refit_4bit(T: np.ndarray, blocksize: int = 64) -> np.ndarray:
    """The "refit" re-quantization as its docstring defines it (``lora_ref.adapters.qlora.quantize_4bit_refit``),
    written out here block by block: per block, the scale among {f·absmax : f = 0.70, 0.71, …, 1.10} with the least
    squared error under nearest NF4 codes, then one least-squares step c = Σx·q/Σq² where it lowers the error; the
    scales double-quantized (float32 mean offset, nearest of the signed 8-bit dynamic map, one absmax per 256
    scales); the codes nearest against the scales as stored. Returns the dequantized weight."""
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type("nf4", device="cpu").numpy().astype(np.float32)
    dyn = bnbf.create_dynamic_map(signed=True).numpy().astype(np.float32)
    X = T.astype(np.float32).reshape(-1, blocksize)

    def nearest(v, table):  # ties to the lower entry of the ascending table
        return np.abs(v[..., None] - table).argmin(axis=-1)

    def sse(block, c):
        q = code[nearest(block / c, code)] * c
        return float(((q - block) ** 2).sum(dtype=np.float32))

    scales = []
    for block in X:
        amax = np.float32(np.abs(block).max())
        best, best_err = amax, sse(block, amax)
        for f in np.linspace(0.70, 1.10, 41):
            c = np.float32(amax * np.float32(f))
            e = sse(block, c)
            if e < best_err:
                best, best_err = c, e
        q = code[nearest(block / best, code)]
        ls = np.float32((block * q).sum(dtype=np.float32) / (q * q).sum(dtype=np.float32))
        scales.append(ls if ls > 0 and sse(block, ls) <= best_err else best)
    scales = np.array(scales, np.float32)
    offset = np.float32(scales.astype(np.float64).mean())
    centred = (scales - offset).astype(np.float32)
    assert centred.size <= 256  # one nested block
    amax2 = np.float32(np.abs(centred).max())
    stored = (dyn[nearest(centred / amax2, dyn)] * amax2 + offset).astype(np.float32)
    return (code[nearest(X / stored[:, None], code)] * stored[:, None]).reshape(T.shape)


def _merge_targets() -> dict:
    """The five deployments of a QLoRA adapter (lora_ref.adapters.merge_report), each written out: dequant(W) by
    bitsandbytes from the stored codes, ΔW = s·B·A in float64; requantize = bitsandbytes' CPU NF4 of
    dequant(W) + ΔW (double quantization, what PEFT's merge does); refit (:func:`_refit_4bit`); float; original
    (W16 + ΔW); unmerged; errors ‖y_t − y‖/‖y‖ against y = x·(dequant(W) + ΔW)ᵀ."""
    import bitsandbytes.functional as bnbf
    import torch

    name = "qlora_merge_targets"
    p, inp = CASES[name]["params"], inputs(name)
    shape = inp["W16"].shape
    deq = bnbf.dequantize_4bit(torch.from_numpy(inp["W_packed"]).reshape(-1, 1), _bnb_state(inp, shape, p))
    deq = deq.numpy().astype(np.float64)
    delta = p["scaling"] * (inp["lora_B"].astype(np.float64) @ inp["lora_A"])
    target = (deq + delta).astype(np.float32)
    packed, state = bnbf.quantize_4bit(torch.from_numpy(target).reshape(-1, 1), blocksize=64, quant_type="nf4",
                                       compress_statistics=True)
    requant = bnbf.dequantize_4bit(packed, state).numpy().reshape(shape)
    x = inp["x"].astype(np.float64)
    ys = {"requantize": x @ requant.astype(np.float64).T, "refit": x @ _refit_4bit(target).astype(np.float64).T,
          "float": x @ target.astype(np.float64).T, "original": x @ (inp["W16"] + delta).T,
          "unmerged": x @ deq.T + p["scaling"] * (x @ inp["lora_A"].T) @ inp["lora_B"].T}
    ref = x @ (deq + delta).T
    res = {f"{name}/outputs/y_{t}": y for t, y in ys.items()}
    res[f"{name}/outputs/errors"] = np.array([np.linalg.norm(ys[t] - ref) / np.linalg.norm(ref)
                                              for t in p["targets"]])
    return res


@functools.cache
def formula_results() -> dict[str, np.ndarray]:
    res = {}
    name = "divergence_peft_4bit_merge_bias_scaling"  # b' = b + s·b_B, W' = W + s·B·A (Hu et al. 2021; PEFT #2489)
    p, inp = CASES[name]["params"], inputs(name)
    s = p["lora_alpha"] / p["r"]
    res[f"{name}/outputs/merged_bias"] = inp["bias"].astype(np.float64) + s * inp["lora_B_bias"]
    res[f"{name}/outputs/merged_W"] = inp["W"] + s * (inp["lora_B"].astype(np.float64) @ inp["lora_A"])
    name = "divergence_peft_rslora_combination"  # Σ sᵢ·Bᵢ·Aᵢ, s = α/√r (Kalajdzievski 2023)
    p, inp = CASES[name]["params"], inputs(name)
    s = p["lora_alpha"] / math.sqrt(p["r"])
    res[f"{name}/outputs/delta_W"] = sum(w * s * (inp[f"lora_B_{i}"].astype(np.float64) @ inp[f"lora_A_{i}"])
                                         for i, w in enumerate(p["weights"]))
    name = "dora_alternative_axis"  # DoRA with the norm taken per input column: V·(m/‖V‖_col)
    p, inp = CASES[name]["params"], inputs(name)
    V = inp["W_dequantized"].astype(np.float64) + p["scaling"] * (inp["lora_B"].astype(np.float64) @ inp["lora_A"])
    col_norm = np.sqrt((V * V).sum(axis=0))
    merged = V * (inp["magnitude"] / col_norm)[None, :]
    res[f"{name}/outputs/merged_weight"] = merged
    res[f"{name}/outputs/y"] = inp["x"].astype(np.float64) @ merged.T
    res.update(_merge_targets())
    for name in ("task_arithmetic_full", "ties_full"):
        p, inp = CASES[name]["params"], inputs(name)
        tvs = [inp[f"task_vector_{i}"] for i in range(3)]
        if name == "task_arithmetic_full":  # λ·Σ τ_t (Ilharco et al. 2023)
            res[f"{name}/outputs/merged"] = p["lambda"] * sum(t.astype(np.float64) for t in tvs)
        else:
            res[f"{name}/outputs/merged"] = _paper_ties(tvs, p["density"], p["lambda"])
    return res


PRODUCERS = {"torch": torch_results, "transformers": transformers_results, "peft": peft_results,
             "bitsandbytes_cpu": bitsandbytes_cpu_results, "formula": formula_results}


# ------------------------------------------------------------------------------------------------ CUDA fixtures
FIXTURE_CASES = {  # vector case → the fixture cases (tests/data/bnb/README.md) with the same settings
    "nf4_quantize_cuda_float32": [0, 1], "fp4_quantize_cuda_float32": [9], "nf4_quantize_cuda_bfloat16": [2],
    "nf4_quantize_cuda_float16": [3], "nf4_double_quant_cuda": [7], "nf4_quantize_blocksize_4096": [4],
    "divergence_bnb_zero_block_cuda": [5], "divergence_bnb_nf4_thresholds_cuda": [6],
    "divergence_bnb_fp4_cuda": [9], "blockwise_8bit_dynamic": [7, 8, 11],
}
F_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


@functools.cache
def cuda_fixtures():
    path = BNB_DATA / "nf4_fp4_cuda.safetensors"
    with safe_open(str(path), "np") as f:
        manifest = {c["case"]: c for c in json.loads(f.metadata()["manifest"])}
    return manifest, load_file(str(path))


def check_against_cuda_fixtures(name: str) -> list[str]:
    """The failures (empty: agreement) of the case's settings on the fixture cases it names."""
    from lora_ref.quant import dequantize_4bit, quantize_4bit, quantize_blockwise

    case = CASES[name]
    p, tol = case["params"], case["tolerance"]
    manifest, t = cuda_fixtures()
    failures = []
    for k in FIXTURE_CASES[name]:
        meta = manifest[k]
        f = {key.split(".", 1)[1]: v for key, v in t.items() if key.startswith(f"case{k:02d}.")}
        x = f["input"].astype(F_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        if case["op"] == "quantize_blockwise":  # the nested 8-bit codes of a double-quantized fixture
            assert meta["double_quant"] and p["blocksize"] == meta["nested_blocksize"] and p["rounding"] == "cuda"
            flat = f["input"].reshape(-1)
            bs = meta["blocksize"]
            padded = np.zeros(-(-flat.size // bs) * bs, np.float32)
            padded[:flat.size] = np.abs(flat)
            scales = padded.reshape(-1, bs).max(axis=1)  # absmax per block, written out
            codes, state = quantize_blockwise((scales - f["offset"][0]).astype(np.float32), blocksize=p["blocksize"],
                                              rounding="cuda")
            got = {"absmax_codes": codes, "absmax2": state.absmax}
        else:
            settings = {key: p[key] for key in ("quant_type", "blocksize", "double_quant", "dtype")}
            assert settings == {key: meta[key] for key in settings} and p["rounding"] == "cuda", (settings, meta)
            packed, state = quantize_4bit(x, blocksize=p["blocksize"], quant_type=p["quant_type"],
                                          double_quant=p["double_quant"], rounding="cuda")
            got = {"packed": packed, "dequant": dequantize_4bit(packed, state).astype(np.float32).reshape(-1)}
            if p["double_quant"]:
                got.update(absmax_codes=state.absmax, offset=np.array([state.offset], np.float32),
                           absmax2=state.state2.absmax)
            else:
                got["absmax"] = state.absmax
        for key, value in got.items():
            ok, a, r, detail = compare(f[key].reshape(-1), np.asarray(value).reshape(-1), tol)
            if not ok:
                failures.append(f"fixture case {k} {key}: {detail} (max_abs {a:.3g})")
    return failures


# ------------------------------------------------------------------------------------------------ the tests
def test_every_case_names_a_known_oracle():
    for c in MANIFEST["cases"]:
        o = c["oracle"]
        assert o in ORACLE_KINDS or (o.startswith("none: ") and len(o) > 40), (c["name"], o)
    named = [c for c in MANIFEST["cases"] if not c["oracle"].startswith("none")]
    assert len(named) >= 52, len(named)


def test_the_two_checkers_are_the_same_bytes():
    """lora_ref/reference/check.py ships as tests/vectors/check.py (and in every written set): one checker, two places."""
    assert (ROOT / "lora_ref" / "reference" / "check.py").read_bytes() == (VECTORS / "check.py").read_bytes()


@pytest.mark.parametrize("name", [c["name"] for c in MANIFEST["cases"] if not c["oracle"].startswith("none")])
def test_case_agrees_with_its_oracle(name):
    oracle = CASES[name]["oracle"]
    if oracle == "bitsandbytes_cuda_fixtures":
        failures = check_against_cuda_fixtures(name)
        assert not failures, failures
        return
    prefix = f"{name}/outputs/"
    results = {k: v for k, v in PRODUCERS[oracle]().items() if k.startswith(prefix)}
    expected = {k for k in tensors() if k.startswith(prefix)}
    assert set(results) == expected, (sorted(results), sorted(expected))
    rows = check(VECTORS, results)
    assert len(rows) == 1 and rows[0].passed, rows[0].line()


def test_fp4_cuda_tolerance_is_what_the_fixtures_need():
    """FP4 on CUDA is not bit-exact in general: some fixture case flips a few codes (the kernel's fast-math
    reciprocal), never more than the case tolerance allows; NF4 flips none."""
    from lora_ref.quant import quantize_4bit
    from lora_ref.quant.blockwise import unpack_nibbles

    allowed = CASES["fp4_quantize_cuda_float32"]["tolerance"]["max_mismatched"]
    manifest, t = cuda_fixtures()
    flips = {}
    for k, meta in manifest.items():
        x = t[f"case{k:02d}.input"].astype(F_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        packed, _ = quantize_4bit(x, blocksize=meta["blocksize"], quant_type=meta["quant_type"],
                                  double_quant=meta["double_quant"], rounding="cuda")
        n = x.size
        flips[k] = int(np.sum(unpack_nibbles(packed, n) != unpack_nibbles(t[f"case{k:02d}.packed"].reshape(-1), n)))
    fp4 = [k for k, m in manifest.items() if m["quant_type"] == "fp4"]
    assert max(flips[k] for k in fp4) > 0 and all(flips[k] <= allowed for k in fp4), flips
    assert all(flips[k] == 0 for k in manifest if k not in fp4), flips
