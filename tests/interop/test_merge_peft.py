"""add_weighted_adapter against PEFT 0.21.2, live: the same adapters (B ≠ 0) on the same small model, combined by
both libraries, then merged; the merged weights agree to 1e-6 (svd: 2e-5). Where PEFT is wrong (rsLoRA sources;
lora_B biases) PEFT's value is shown beside ours: ``add_weighted_adapter_like_peft`` equals PEFT, and ours differs
from it by exactly the documented factor.
"""

import math

import numpy as np
import pytest

from lora_ref.adapters.lora import LoraConfig, inject_lora, lora_layers, merge_and_unload, set_adapter
from lora_ref.merging import combine as M
from lora_ref.modeling.nn import Linear, Module

pytestmark = pytest.mark.interop

ATOL = {"svd": 2e-5}  # everything else 1e-6
SHAPES = {"q_proj": (12, 10), "v_proj": (12, 6), "o_proj": (10, 12)}  # name: (in, out)


class Tiny(Module):
    def __init__(self, weights: dict, bias: bool):
        super().__init__()
        for name, (i, o) in SHAPES.items():
            lin = Linear(i, o, bias=bias)
            lin.weight.data[...] = weights[name + ".weight"]
            if bias:
                lin.bias.data[...] = weights[name + ".bias"]
            setattr(self, name, lin)


def build(adapter_specs, *, bias=False, seed=0):
    """The same model and adapters in PEFT (torch) and here. adapter_specs: name -> dict of LoraConfig kwargs."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.set_num_threads(1)
    torch.manual_seed(seed)

    class TorchTiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (i, o) in SHAPES.items():
                setattr(self, name, torch.nn.Linear(i, o, bias=bias))

    tm = TorchTiny()
    weights = {k: v.detach().numpy().copy() for k, v in tm.state_dict().items()}
    peft_model = None
    ours = Tiny(weights, bias)
    for name, spec in adapter_specs.items():
        cfg = PeftLoraConfig(**spec)
        if peft_model is None:
            peft_model = get_peft_model(tm, cfg, adapter_name=name)
        else:
            peft_model.add_adapter(name, cfg)
        # B = 0 after PEFT's default init; make it (and the lora_B bias) nonzero
        with torch.no_grad():
            for module in peft_model.modules():
                if hasattr(module, "lora_B") and name in module.lora_B:
                    torch.nn.init.normal_(module.lora_B[name].weight, std=0.2)
                    if module.lora_B[name].bias is not None:
                        torch.nn.init.normal_(module.lora_B[name].bias, std=0.2)
        inject_lora(ours, LoraConfig(**spec), name, rng=np.random.default_rng(0))
    # copy PEFT's (random, B ≠ 0) adapter weights into ours
    for lname, layer in lora_layers(ours):
        tl = peft_model.base_model.model.get_submodule(lname)
        for name in adapter_specs:
            if name in layer.lora_A:
                layer.lora_A[name].weight.data[...] = tl.lora_A[name].weight.detach().numpy()
                layer.lora_B[name].weight.data[...] = tl.lora_B[name].weight.detach().numpy()
                if layer.lora_bias[name]:
                    layer.lora_B[name].bias.data[...] = tl.lora_B[name].bias.detach().numpy()
                assert np.abs(layer.lora_B[name].weight.data).max() > 0
                assert layer.scaling[name] == pytest.approx(tl.scaling[name], rel=1e-12)
    return peft_model, ours


def peft_merged(peft_model, name):
    peft_model.set_adapter(name)
    model = peft_model.merge_and_unload()
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def ours_merged(ours, name):
    set_adapter(ours, name)
    return {k: v.copy() for k, v in merge_and_unload(ours).state_dict().items()}


def peft_delta(peft_model, name):
    return {ln: peft_model.base_model.model.get_submodule(ln).get_delta_weight(name).detach().numpy()
            for ln in SHAPES if hasattr(peft_model.base_model.model.get_submodule(ln), "lora_A")
            and name in peft_model.base_model.model.get_submodule(ln).lora_A}


def ours_delta(ours, name):
    return {ln: layer.get_delta_weight(name) for ln, layer in lora_layers(ours) if name in layer.lora_A}


TWO = {"t1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
       "t2": dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj"])}
TWO_RANKS = {"t1": dict(r=3, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             "t2": dict(r=5, lora_alpha=4, target_modules=["v_proj", "o_proj"])}


@pytest.mark.parametrize("combination_type,kwargs,specs", [
    ("cat", {}, TWO_RANKS),
    ("svd", {}, TWO_RANKS),
    ("svd", {"svd_rank": 6}, TWO_RANKS),  # ≥ rank of every ΔW here: exact; PEFT fails past min(out, in)
    ("svd", {"svd_rank": 4}, TWO_RANKS),
    ("svd", {"svd_rank": 2}, TWO),  # (svd_clamp is left out: its quantile depends on LAPACK's singular-vector signs)
    ("linear", {}, TWO),
    ("ties", {"density": 0.5}, TWO),
    ("ties", {"density": 0.3, "majority_sign_method": "frequency"}, TWO),
    ("magnitude_prune", {"density": 0.4}, TWO),
    ("ties_svd", {"density": 0.5}, TWO),
    ("magnitude_prune_svd", {"density": 0.5, "svd_rank": 6}, TWO),
])
def test_combination_equals_peft(combination_type, kwargs, specs):
    peft_model, ours = build(specs)
    peft_model.add_weighted_adapter(["t1", "t2"], [0.7, -0.3], "m", combination_type=combination_type, **kwargs)
    M.add_weighted_adapter(ours, ["t1", "t2"], [0.7, -0.3], "m", combination_type=combination_type, **kwargs)
    atol = ATOL.get(combination_type, 1e-6)
    pd, od = peft_delta(peft_model, "m"), ours_delta(ours, "m")
    assert set(pd) == set(od) == {"q_proj", "v_proj", "o_proj"}
    for ln in pd:
        np.testing.assert_allclose(od[ln], pd[ln], rtol=0, atol=atol, err_msg=ln)
    pw, ow = peft_merged(peft_model, "m"), ours_merged(ours, "m")
    assert set(pw) == set(ow)
    for k in pw:
        np.testing.assert_allclose(ow[k], pw[k], rtol=0, atol=atol, err_msg=k)


def test_cat_is_exact_in_both_and_svd_default_rank_is_not():
    """cat == Σ wᵢ·ΔWᵢ in PEFT and here; svd at the default rank (max rᵢ) truncates in both."""
    peft_model, ours = build(TWO_RANKS)
    src = {n: ours_delta(ours, n) for n in ("t1", "t2")}
    M.add_weighted_adapter(ours, ["t1", "t2"], [0.7, -0.3], "c", combination_type="cat")
    M.add_weighted_adapter(ours, ["t1", "t2"], [0.7, -0.3], "s", combination_type="svd")
    want = 0.7 * src["t1"]["v_proj"].astype(np.float64) - 0.3 * src["t2"]["v_proj"]
    assert np.abs(ours_delta(ours, "c")["v_proj"] - want).max() < 1e-6
    assert np.linalg.norm(ours_delta(ours, "s")["v_proj"] - want) > 1e-2 * np.linalg.norm(want)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
def test_rslora_sources_peft_overscales_by_sqrt_rank(combination_type):
    specs = {n: dict(s, use_rslora=True) for n, s in TWO.items()}
    peft_model, ours = build(specs)
    kw = {"svd_rank": 6} if combination_type == "svd" else {}
    src = {n: ours_delta(ours, n) for n in ("t1", "t2")}
    peft_model.add_weighted_adapter(["t1", "t2"], [0.7, -0.3], "m", combination_type=combination_type, **kw)
    M.add_weighted_adapter(ours, ["t1", "t2"], [0.7, -0.3], "m", combination_type=combination_type, **kw)
    M.add_weighted_adapter_like_peft(ours, ["t1", "t2"], [0.7, -0.3], "p", combination_type=combination_type, **kw)
    R = {"cat": 8, "svd": 6, "linear": 4}[combination_type]
    pd, od, like = peft_delta(peft_model, "m"), ours_delta(ours, "m"), ours_delta(ours, "p")
    atol = ATOL.get(combination_type, 1e-6)
    for ln in pd:
        np.testing.assert_allclose(like[ln], pd[ln], rtol=0, atol=atol * math.sqrt(R))  # PEFT reproduced
        np.testing.assert_allclose(pd[ln], math.sqrt(R) * od[ln], rtol=1e-5, atol=atol)  # PEFT = √R × correct
    if combination_type in ("cat", "svd"):  # ours is the weighted sum of the sources (v_proj has both)
        want = 0.7 * src["t1"]["v_proj"].astype(np.float64) - 0.3 * src["t2"]["v_proj"]
        np.testing.assert_allclose(od["v_proj"], want, rtol=0, atol=1e-5)
        assert np.abs(pd["v_proj"] - want).max() > 0.5 * np.abs(want).max()


def test_lora_bias_peft_drops_it():
    import torch

    specs = {n: dict(s, lora_bias=True) for n, s in TWO.items()}
    peft_model, ours = build(specs, bias=True)
    x = np.random.default_rng(1).normal(size=(3, 12)).astype(np.float32)
    peft_model.add_weighted_adapter(["t1", "t2"], [0.7, -0.3], "m", combination_type="cat")
    M.add_weighted_adapter(ours, ["t1", "t2"], [0.7, -0.3], "m", combination_type="cat")
    M.add_weighted_adapter_like_peft(ours, ["t1", "t2"], [0.7, -0.3], "p", combination_type="cat")
    q = peft_model.base_model.model.q_proj
    peft_model.set_adapter("m")
    with torch.no_grad():
        y_peft = peft_model.base_model.model.q_proj(torch.from_numpy(x)).numpy()
    layer = ours.q_proj
    set_adapter(ours, "p")
    y_like = np.asarray(layer(x))
    set_adapter(ours, "m")
    y_ours = np.asarray(layer(x))
    np.testing.assert_allclose(y_like, y_peft, rtol=0, atol=1e-5)
    b_a = q.lora_B["t1"].bias.detach().numpy()  # only adapter t1 targets q_proj
    np.testing.assert_allclose(y_ours - y_peft, np.broadcast_to(0.7 * q.scaling["t1"] * b_a, y_ours.shape),
                               rtol=0, atol=1e-5)
    assert np.abs(b_a).max() > 0


def test_unknown_or_incompatible_adapters_raise():
    peft_model, ours = build(TWO_RANKS)
    with pytest.raises(ValueError, match="equal rank"):
        M.add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "m", combination_type="linear")
    with pytest.raises(ValueError, match="does not exist"):
        M.add_weighted_adapter(ours, ["t1", "zzz"], [1, 1], "m", combination_type="cat")
    with pytest.raises(ValueError, match="already exists"):
        M.add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "t1", combination_type="cat")
    assert set(ours.peft_config) == {"t1", "t2"}  # nothing was added by the failures
