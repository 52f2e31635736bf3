"""Check PEFT (with torch) against the lora_ref reference vectors.

Usage: python check_peft.py VECTORS_DIR RESULTS.safetensors

For the LoRA layer cases (forward and gradients, rsLoRA, DoRA), the merges (float32, bfloat16 safe and unsafe, the
lora_B bias) and the adapter combinations of ``add_weighted_adapter``, this builds the same layer with PEFT
0.21.2 on a one-layer torch model, computes the case's outputs and runs the standalone checker. The QLoRA cases run
PEFT over bitsandbytes' 4-bit layer on the CPU, built from the case's stored NF4 codes: DoRA on a 4-bit base, the
re-quantized merge of the cases made with bitsandbytes' CPU rounding (the CUDA-rounded one cannot be reproduced
on a CPU); then PiSSA → LoRA conversion, LoRA on an embedding, and LoftQ (PEFT's ``loftq_init`` needs a GPU, so its
loop is replayed on the CPU with bitsandbytes' CPU NF4, which is what the CPU-rounded LoftQ case records). DARE
draws random masks with torch, so its cases are left out. ``divergence_peft_*`` cases should fail exactly as their
descriptions say: by √8 for the rsLoRA combination, and by (s − 1)·b_B for the bias merged into a 4-bit base.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402


class OneLayer(torch.nn.Module):
    def __init__(self, out_f: int, in_f: int, bias: bool):
        super().__init__()
        self.proj = torch.nn.Linear(in_f, out_f, bias=bias)

    def forward(self, x):
        return self.proj(x)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32))


def peft_layer(inp: dict, params: dict, *, dtype=torch.float32, lora_bias=False, names=("default",), alphas=None,
               ranks=None):
    """A PEFT model with one adapted Linear holding the case's W (and bias) and adapters."""
    from peft import LoraConfig, get_peft_model

    W = inp["W"] if "W" in inp else None
    out_f, in_f = (W.shape if W is not None else (inp["lora_B_0"].shape[0], inp["lora_A_0"].shape[1]))
    model = OneLayer(out_f, in_f, bias="bias" in inp)
    with torch.no_grad():
        if W is not None:
            model.proj.weight.copy_(_t(W))
        if "bias" in inp:
            model.proj.bias.copy_(_t(inp["bias"]))
    model = model.to(dtype)
    peft_model = None
    for i, name in enumerate(names):
        r = ranks[i] if ranks else params["r"]
        alpha = alphas[i] if alphas else params["lora_alpha"]
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False,
                         use_rslora=params.get("use_rslora", False), use_dora=params.get("use_dora", False),
                         lora_bias=lora_bias)
        if peft_model is None:
            peft_model = get_peft_model(model, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        for i, name in enumerate(names):
            sfx = "" if len(names) == 1 else f"_{i}"
            layer.lora_A[name].weight.copy_(_t(inp[f"lora_A{sfx}"]))
            layer.lora_B[name].weight.copy_(_t(inp[f"lora_B{sfx}"]))
            if lora_bias:
                layer.lora_B[name].bias.copy_(_t(inp["lora_B_bias"]))
            if "magnitude" in inp:
                layer.lora_magnitude_vector[name].weight.copy_(_t(inp["magnitude"]))
    return peft_model, layer


def peft_results(vectors: str | Path) -> dict[str, np.ndarray]:
    vectors = Path(vectors)
    manifest = json.loads((vectors / "manifest.json").read_text())
    files: dict[str, dict[str, np.ndarray]] = {}
    res: dict[str, np.ndarray] = {}
    for case in manifest["cases"]:
        name, op, p = case["name"], case["op"], case["params"]
        tensors = files.setdefault(case["file"], load_file(str(vectors / case["file"])))
        inp = {k.split("/", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{name}/inputs/")}
        key = f"{name}/outputs/"
        if op == "lora_forward":
            model, layer = peft_layer(inp, p)
            x = _t(inp["x"]).requires_grad_(True)
            y = model(x)
            (y * _t(inp["out_weight"])).sum().backward()
            res[key + "y"] = y.detach().numpy()
            res[key + "grad_x"] = x.grad.numpy()
            res[key + "grad_lora_A"] = layer.lora_A["default"].weight.grad.numpy()
            res[key + "grad_lora_B"] = layer.lora_B["default"].weight.grad.numpy()
            if "magnitude" in inp:
                res[key + "grad_magnitude"] = layer.lora_magnitude_vector["default"].weight.grad.numpy()
        elif op == "merge":
            model, layer = peft_layer(inp, p, lora_bias="lora_B_bias" in inp)
            layer.merge()
            res[key + "merged_W"] = layer.base_layer.weight.detach().numpy().copy()
            layer.unmerge()
            res[key + "unmerged_W"] = layer.base_layer.weight.detach().numpy().copy()
        elif op == "merge_bfloat16":
            model, layer = peft_layer(inp, p, dtype=torch.bfloat16)
            layer.merge(safe_merge=p["safe_merge"])
            res[key + "merged_W"] = layer.base_layer.weight.detach().float().numpy()
            layer.unmerge()
            res[key + "unmerged_W"] = layer.base_layer.weight.detach().float().numpy()
        elif op == "merge_lora_bias":
            res.update(_bias_merge_into_4bit(inp, p, key))
        elif op == "dora_4bit":
            res.update(_dora_4bit(inp, p, key))
        elif op == "merge_4bit" and p.get("rounding") == "cpu":
            res.update(_merge_into_4bit(inp, p, key))
        elif op == "pissa_to_lora":
            res.update(_pissa_to_lora(inp, p, key))
        elif op == "lora_embedding":
            res.update(_lora_embedding(inp, p, key))
        elif op == "loftq_init" and p.get("rounding") == "cpu":
            res.update(_loftq_loop_on_cpu(inp, p, key))
        elif op.startswith("add_weighted_adapter_") and not op.endswith(("dare_linear", "dare_ties")):
            ctype = op[len("add_weighted_adapter_"):]
            ranks = [inp[f"lora_A_{i}"].shape[0] for i in range(2)]
            if "scalings" in p:
                alphas = [s * r for s, r in zip(p["scalings"], ranks)]
                weights = p["weights"]
            else:  # the rsLoRA divergence case
                alphas = [p["lora_alpha"]] * 2
                weights = p["weights"]
            model, layer = peft_layer(inp, {"use_rslora": p.get("use_rslora", False)}, names=("a0", "a1"),
                                      alphas=alphas, ranks=ranks)
            kw = {}
            if p.get("density") is not None:
                kw["density"] = p["density"]
            if p.get("svd_rank") is not None:
                kw["svd_rank"] = p["svd_rank"]
            model.add_weighted_adapter(["a0", "a1"], weights, "combo", combination_type=p.get("combination_type", "cat"), **kw)
            delta = layer.get_delta_weight("combo").detach().numpy()
            res[key + "delta_W"] = delta
            if ctype not in ("svd",) and "combination_type" in p:
                res[key + "lora_A"] = layer.lora_A["combo"].weight.detach().numpy()
                res[key + "lora_B"] = layer.lora_B["combo"].weight.detach().numpy()
    return res


def _bias_merge_into_4bit(inp: dict, p: dict, key: str) -> dict:
    """PEFT merging a lora_bias adapter into a bitsandbytes Linear4bit: only the bias is compared."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    out_f, in_f = inp["W"].shape
    model = OneLayer(out_f, in_f, bias=True)
    q = bnb.nn.Linear4bit(in_f, out_f, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(_t(inp["W"]), requires_grad=False, quant_type="nf4")
    with torch.no_grad():
        q.bias = torch.nn.Parameter(_t(inp["bias"]), requires_grad=False)
    q = q.to("cpu")
    model.proj = q
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps the layer as a 4-bit LoRA layer
    model.train()  # an eval-mode forward would repack the weight on AVX512-BF16 CPUs before the merge
    cfg = LoraConfig(r=p["r"], lora_alpha=p["lora_alpha"], target_modules=["proj"], init_lora_weights=False,
                     lora_bias=True)
    peft_model = get_peft_model(model, cfg)
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(_t(inp["lora_A"]))
        layer.lora_B["default"].weight.copy_(_t(inp["lora_B"]))
        layer.lora_B["default"].bias.copy_(_t(inp["lora_B_bias"]))
    layer.merge()
    return {key + "merged_bias": layer.base_layer.bias.detach().float().numpy()}


def bnb_4bit_state(inp: dict, shape, blocksize: int = 64):
    """bitsandbytes' QuantState for a case's stored NF4 codes with double quantization: W_absmax_codes (8-bit codes
    of the block scales), W_offset, W_absmax2 (one scale per 256 block scales, bitsandbytes' nested blocksize)."""
    import bitsandbytes.functional as bnbf

    state2 = bnbf.QuantState(absmax=_t(inp["W_absmax2"]), code=bnbf.create_dynamic_map(signed=True), blocksize=256,
                             dtype=torch.float32)
    return bnbf.QuantState(absmax=torch.from_numpy(inp["W_absmax_codes"].copy()), shape=torch.Size(shape),
                           code=bnbf.get_4bit_type("nf4", device="cpu"), blocksize=blocksize, quant_type="nf4",
                           dtype=torch.float32, offset=_t(inp["W_offset"]).reshape(()), state2=state2)


def peft_4bit_layer(inp: dict, params: dict, **lora_kw):
    """PEFT's LoRA layer (``lora.bnb.Linear4bit``) over a bitsandbytes Linear4bit that holds the case's stored NF4
    codes as they are (not quantized again), in train mode."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    out_f, in_f = inp["lora_B"].shape[0], inp["lora_A"].shape[1]
    model = OneLayer(out_f, in_f, bias=False)
    q = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="nf4", compute_dtype=torch.float32,
                          compress_statistics=True)
    q.weight = bnb.nn.Params4bit(torch.from_numpy(inp["W_packed"].copy()).reshape(-1, 1), requires_grad=False,
                                 quant_state=bnb_4bit_state(inp, (out_f, in_f)), blocksize=64,
                                 compress_statistics=True, quant_type="nf4", bnb_quantized=True)
    model.proj = q.to("cpu")
    model.is_loaded_in_4bit = True  # what transformers sets; PEFT then wraps the layer as a 4-bit LoRA layer
    model.train()  # an eval-mode forward would repack the weight on AVX512-BF16 CPUs before a merge
    peft_model = get_peft_model(model, LoraConfig(r=params["r"], lora_alpha=params["lora_alpha"],
                                                  target_modules=["proj"], init_lora_weights=False, **lora_kw))
    peft_model.train()
    layer = peft_model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(_t(inp["lora_A"]))
        layer.lora_B["default"].weight.copy_(_t(inp["lora_B"]))
        if "magnitude" in inp:
            layer.lora_magnitude_vector["default"].weight.copy_(_t(inp["magnitude"]))
    return peft_model, layer


def _dora_4bit(inp: dict, p: dict, key: str) -> dict:
    """DoRA over a 4-bit base: PEFT's forward, and the float32 weight its merge re-quantizes
    (``DoraLinearVariant.merge_safe`` of bitsandbytes' dequantization, as ``lora.bnb.Linear4bit.merge`` calls it)."""
    from peft.utils.integrations import dequantize_bnb_weight

    model, layer = peft_4bit_layer(inp, p, use_dora=True)
    with torch.no_grad():
        y = model(_t(inp["x"])).numpy()
        weight = layer.get_base_layer().weight
        merged = layer.lora_variant["default"].merge_safe(layer, "default",
                                                           dequantize_bnb_weight(weight, state=weight.quant_state))
    return {key + "y": y, key + "merged_weight": merged.numpy()}


def _merge_into_4bit(inp: dict, p: dict, key: str) -> dict:
    """PEFT's merge into a bitsandbytes Linear4bit on the CPU: dequantize, add s·B·A, quantize again."""
    _, layer = peft_4bit_layer(inp, p)
    layer.merge()
    w = layer.get_base_layer().weight
    return {key + "packed": w.data.numpy().reshape(-1), key + "absmax_codes": w.quant_state.absmax.numpy()}


def _pissa_to_lora(inp: dict, p: dict, key: str) -> dict:
    """PEFT's PiSSA → LoRA conversion (``LoraModel.subtract_mutated_init``, which ``save_pretrained(...,
    path_initial_model_for_weight_conversion=...)`` calls) and the PiSSA model's output (residual base W_res + the
    trained adapter)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model, layer = peft_layer({"W": inp["W_res"], "lora_A": inp["lora_A"], "lora_B": inp["lora_B"]}, p)
    with torch.no_grad():
        y = model(_t(inp["x"])).numpy()
    model.add_adapter("init", LoraConfig(r=p["r"], lora_alpha=p["lora_alpha"], target_modules=["proj"],
                                         init_lora_weights=False))
    with torch.no_grad():
        layer.lora_A["init"].weight.copy_(_t(inp["lora_A_init"]))
        layer.lora_B["init"].weight.copy_(_t(inp["lora_B_init"]))
    trained = get_peft_model_state_dict(model, adapter_name="default")
    conv = model.base_model.subtract_mutated_init(trained, "init", {})
    (ka,) = [k for k in conv if "lora_A" in k]
    (kb,) = [k for k in conv if "lora_B" in k]
    return {key + "lora_A_converted": conv[ka].numpy(), key + "lora_B_converted": conv[kb].numpy(), key + "y": y}


class OneEmbedding(torch.nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.emb = torch.nn.Embedding(num, dim)

    def forward(self, ids):
        return self.emb(ids)


def _lora_embedding(inp: dict, p: dict, key: str) -> dict:
    """PEFT's ``lora.Embedding`` over a torch ``nn.Embedding``: the forward pass, then the merged table."""
    from peft import LoraConfig, get_peft_model

    model = OneEmbedding(*inp["E"].shape)
    with torch.no_grad():
        model.emb.weight.copy_(_t(inp["E"]))
    peft_model = get_peft_model(model, LoraConfig(r=p["r"], lora_alpha=p["lora_alpha"], target_modules=["emb"],
                                                  init_lora_weights=False))
    layer = peft_model.base_model.model.emb
    with torch.no_grad():
        layer.lora_embedding_A["default"].copy_(_t(inp["lora_embedding_A"]))
        layer.lora_embedding_B["default"].copy_(_t(inp["lora_embedding_B"]))
        y = peft_model(torch.from_numpy(inp["ids"])).numpy()
    layer.merge()
    return {key + "y": y, key + "merged_E": layer.base_layer.weight.detach().numpy().copy()}


def _loftq_loop_on_cpu(inp: dict, p: dict, key: str) -> dict:
    """LoftQ: ``peft.utils.loftq_utils.loftq_init``'s loop with its device moves dropped (PEFT's own function insists
    on a CUDA or XPU device): bitsandbytes' CPU NF4 (``Params4bit``, blocksize 64, no double quantization) and
    PEFT's ``_low_rank_decomposition``. The error after t iterations is the final error of a t-iteration run."""
    import bitsandbytes as bnb
    from peft.utils.loftq_utils import _low_rank_decomposition

    weight = _t(inp["W"])

    def run(iters):
        res = weight.clone()
        for i in range(iters):
            q = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
            deq = bnb.functional.dequantize_4bit(q.data, q.quant_state)
            res = weight - deq
            out = _low_rank_decomposition(res, reduced_rank=p["reduced_rank"])
            if i + 1 < iters:
                res = weight - torch.mm(out["L"], out["R"])
        return deq, out["L"] @ out["R"]

    res, errors = {}, []
    for t in range(1, p["num_iter"] + 1):
        deq, BA = run(t)
        errors.append(float(torch.linalg.norm(weight.double() - deq.double() - BA.double())))
        if t == 1:
            res.update({key + "dequantized_iter1": deq.numpy(), key + "BA_iter1": BA.numpy()})
    res[key + "errors"] = np.array(errors, np.float32)
    return res


def main(argv: list[str]) -> int:
    vectors, out = argv
    torch.set_num_threads(1)
    save_file(peft_results(vectors), out)
    sys.path.insert(0, str(Path(vectors)))
    import check

    return check.run(vectors, out)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
