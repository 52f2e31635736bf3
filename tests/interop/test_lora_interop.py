"""lora_ref against PEFT 0.21.2 on random tiny Llamas, with adapters whose B is not zero.

- a PEFT adapter (``init_lora_weights=False``) saved with ``save_pretrained`` and read by ``load_adapter`` gives
  PEFT's logits (1e-4);
- an adapter trained here and written by ``save_adapter`` gives the same logits in ``PeftModel.from_pretrained``;
- merges equal PEFT's ``merge_and_unload`` weights (1e-6 in float32; bit for bit in bfloat16, safe and unsafe);
- target matching equals PEFT's ``check_target_module_exists`` on random names.
"""

import json

import numpy as np
import peft  # noqa: E402
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.adapters.lora import (  # noqa: E402
    LoraConfig,
    as_bfloat16,
    inject_lora,
    lora_layers,
    matches_target,
    merge_and_unload,
    set_adapter,
)
from lora_ref.adapters.peft_files import PEFT_CONFIG_DEFAULTS, load_adapter, save_adapter  # noqa: E402
from lora_ref.autograd import functional as F  # noqa: E402
from lora_ref.autograd.tensor import no_grad  # noqa: E402
from lora_ref.modeling.llama import Llama  # noqa: E402
from lora_ref.testing import tiny_llama_config

pytestmark = pytest.mark.interop
torch.set_num_threads(1)

LOGIT_TOL = 1e-4
MERGE_TOL = 1e-6

CONFIGS = {
    "q,v": dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
    "all-linear+rslora": dict(target_modules="all-linear", r=4, lora_alpha=16, use_rslora=True),
    "mlp": dict(target_modules=["gate_proj", "up_proj", "down_proj"], r=3, lora_alpha=5),
    "dora": dict(target_modules=["q_proj", "v_proj", "o_proj"], r=4, lora_alpha=8, use_dora=True),
    "patterns": dict(target_modules=r".*\.(q_proj|k_proj|down_proj)", r=4, lora_alpha=8,
                     rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3}),
}


def tiny_config(**kw):
    return transformers.LlamaConfig(**tiny_llama_config(**{"hidden_size": 32, "intermediate_size": 48, **kw}))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_llama")
    transformers.LlamaForCausalLM(tiny_config()).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 64, size=(2, 9))


def hf_model(path, dtype=torch.float32):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()


def peft_logits(pm, ids):
    with torch.no_grad():
        return pm(torch.from_numpy(ids)).logits.float().numpy()


def peft_adapter(base_dir, tmp_path, kw, seed=0):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(init_lora_weights=False, **kw)).eval()
    out = tmp_path / "peft_adapter"
    pm.save_pretrained(out)
    return pm, out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_adapter_gives_peft_logits_here(base_dir, ids, tmp_path, name):
    pm, adir = peft_adapter(base_dir, tmp_path, CONFIGS[name])
    ours = load_adapter(Llama.from_pretrained(base_dir), adir)
    assert any(np.any(l.lora_B["default"].weight.data != 0) for _, l in lora_layers(ours))
    expected = peft_logits(pm, ids)
    with no_grad():
        got = ours(ids).data
    assert np.abs(got - expected).max() <= LOGIT_TOL
    # and the adapter is not a no-op, so the comparison means something
    assert np.abs(expected - peft_logits(hf_model(base_dir), ids)).max() > 100 * LOGIT_TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_equals_peft_merge_and_unload(base_dir, tmp_path, name):
    pm, adir = peft_adapter(base_dir, tmp_path, CONFIGS[name])
    theirs = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    ours = merge_and_unload(load_adapter(Llama.from_pretrained(base_dir), adir)).state_dict()
    base = hf_model(base_dir).state_dict()
    changed = 0
    for k, v in theirs.items():
        assert np.abs(ours[k] - v).max() <= MERGE_TOL, k
        changed += not np.array_equal(v, base[k].numpy())
    assert changed >= 4  # the merge did change the targeted weights


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("name", ["q,v", "all-linear+rslora", "dora"])
def test_bfloat16_merge_equals_peft_bit_for_bit(base_dir, tmp_path, name, safe):
    """bf16 base, float32 adapter: unsafe = round(W + ΔW), safe = round(W + round(ΔW)); DoRA rounds once."""
    torch.manual_seed(1)
    hf16 = hf_model(base_dir, torch.bfloat16)
    d16 = tmp_path / "bf16_base"
    hf16.save_pretrained(d16)
    pm = peft.get_peft_model(hf16, peft.LoraConfig(init_lora_weights=False, **CONFIGS[name])).eval()
    adir = tmp_path / "adapter"
    pm.save_pretrained(adir)
    theirs = {k: v.float().numpy() for k, v in pm.merge_and_unload(safe_merge=safe).state_dict().items()}
    model = as_bfloat16(Llama.from_pretrained(d16))
    ours = merge_and_unload(load_adapter(model, adir), safe_merge=safe).state_dict()
    for k, v in theirs.items():
        assert np.array_equal(ours[k], v), (k, int(np.sum(ours[k] != v)))


def test_bfloat16_safe_and_unsafe_differ_in_peft_and_here(base_dir, tmp_path):
    torch.manual_seed(1)
    hf16 = hf_model(base_dir, torch.bfloat16)
    hf16.save_pretrained(tmp_path / "b")
    kw = CONFIGS["q,v"]
    key = "model.layers.0.self_attn.q_proj.weight"
    merged, ours = [], []
    for safe in (False, True):
        torch.manual_seed(2)
        pm = peft.get_peft_model(hf_model(tmp_path / "b", torch.bfloat16), peft.LoraConfig(init_lora_weights=False,
                                                                                            **kw))
        pm.save_pretrained(tmp_path / f"adapter_{safe}")
        merged.append(pm.merge_and_unload(safe_merge=safe).state_dict()[key].float().numpy())
        model = as_bfloat16(Llama.from_pretrained(tmp_path / "b"))
        ours.append(merge_and_unload(load_adapter(model, tmp_path / f"adapter_{safe}"), safe_merge=safe).state_dict()[key])
    # lora_ref's two merges are PEFT's, bit for bit, so they differ in exactly the same weights
    assert np.array_equal(ours[0], merged[0]) and np.array_equal(ours[1], merged[1])
    assert (merged[0] != merged[1]).mean() > 0.05


def train_a_few_steps(model, ids, steps=3, lr=0.5):
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits, ids[:, 1:])
        model.zero_grad()
        loss.backward()
        with no_grad():
            for p in params:
                p.data -= lr * p.grad
    return float(loss.data)


@pytest.mark.parametrize("name", ["q,v", "all-linear+rslora", "dora"])
def test_adapter_trained_here_gives_equal_logits_in_peft(base_dir, ids, tmp_path, name):
    kw = dict(CONFIGS[name])
    model = Llama.from_pretrained(base_dir)
    inject_lora(model, LoraConfig(**kw), rng=np.random.default_rng(0))  # init True: B = 0 until trained
    train_a_few_steps(model, ids)
    assert all(np.any(l.lora_B["default"].weight.data != 0) for _, l in lora_layers(model))
    out = tmp_path / "ours"
    save_adapter(model, out)
    pm = peft.PeftModel.from_pretrained(hf_model(base_dir), out).eval()
    with no_grad():
        ours = model.eval()(ids).data
    assert np.abs(peft_logits(pm, ids) - ours).max() <= LOGIT_TOL
    # PEFT reads back every field we wrote
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg) == sorted(PEFT_CONFIG_DEFAULTS) and len(cfg) == 41
    pc = peft.LoraConfig.from_pretrained(out)
    assert (pc.r, pc.lora_alpha, pc.use_rslora, pc.use_dora) == (kw["r"], kw["lora_alpha"],
                                                                 kw.get("use_rslora", False), kw.get("use_dora", False))


def test_saved_files_match_peft_layout(base_dir, tmp_path):
    """Same tensor names, shapes, dtypes and metadata, and the same config keys and values, as PEFT's own save."""
    from safetensors import safe_open

    kw = CONFIGS["dora"]
    pm, adir = peft_adapter(base_dir, tmp_path, kw)
    ours = load_adapter(Llama.from_pretrained(base_dir), adir)
    out = tmp_path / "resaved"
    save_adapter(ours, out)
    with safe_open(adir / "adapter_model.safetensors", "np") as a, safe_open(out / "adapter_model.safetensors",
                                                                             "np") as b:
        assert sorted(a.keys()) == sorted(b.keys()) and b.metadata() == {"format": "pt"}
        for k in a.keys():
            assert np.array_equal(a.get_tensor(k), b.get_tensor(k)) and b.get_tensor(k).dtype == np.float32
    theirs = json.loads((adir / "adapter_config.json").read_text())
    mine = json.loads((out / "adapter_config.json").read_text())
    theirs["target_modules"] = sorted(theirs["target_modules"])
    assert mine == theirs


# ----------------------------------------------------------------------------------------- target matching
component = st.sampled_from(["model", "layers", "0", "1", "12", "self_attn", "mlp", "q_proj", "v_proj", "o_proj",
                             "down_proj", "proj", "lm_head", "experts"])
module_names = st.lists(component, min_size=1, max_size=6).map(".".join)


@given(names=st.lists(module_names, min_size=1, max_size=8),
       targets=st.one_of(st.lists(st.one_of(component, module_names), min_size=1, max_size=3),
                         st.sampled_from([r".*q_proj", r"model\.layers\.\d+\..*", r".*\.(v|o)_proj", "q_proj"])),
       exclude=st.one_of(st.none(), st.lists(component, min_size=1, max_size=2), st.just(r".*layers\.1\..*")),
       layers=st.one_of(st.none(), st.lists(st.sampled_from([0, 1, 12]), min_size=1, max_size=2),
                        st.sampled_from([0, 1])),
       pattern=st.one_of(st.none(), st.just("layers"), st.just(["layers", "experts"])))
@settings(max_examples=200)
def test_target_matching_equals_peft(names, targets, exclude, layers, pattern):
    from peft.tuners.tuners_utils import check_target_module_exists

    kw = dict(target_modules=targets, exclude_modules=exclude, layers_to_transform=layers, layers_pattern=pattern)
    try:
        theirs = peft.LoraConfig(**kw)
    except ValueError:  # e.g. layers_to_transform with a regex target: refused by both
        theirs = None
    if theirs is None:
        with pytest.raises(ValueError):
            LoraConfig(**kw)
    else:
        ours = LoraConfig(**kw)
        for n in names:
            assert matches_target(ours, n) == bool(check_target_module_exists(theirs, n)), n


@pytest.mark.parametrize("dora1, dora2", [(False, True), (True, True), (True, False)])
def test_two_active_adapters_forward_and_merge_equal_peft(base_dir, ids, tmp_path, dora1, dora2):
    """Two adapters active at once (one or both DoRA, overlapping targets), then merged one after the other:
    DoRA's norm must come from the weight with the earlier merges taken out, as PEFT computes it."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(init_lora_weights=False, r=4, use_dora=dora1,
                                                                 target_modules=["q_proj", "v_proj"]))
    pm.add_adapter("two", peft.LoraConfig(init_lora_weights=False, r=3, lora_alpha=5, use_dora=dora2,
                                          target_modules=["q_proj", "o_proj"]))
    pm.save_pretrained(tmp_path / "a")  # "default" at a/, "two" at a/two/ (PEFT's layout)
    pm.base_model.set_adapter(["default", "two"])
    expected = peft_logits(pm, ids)
    theirs = {k: v.numpy() for k, v in pm.merge_and_unload(adapter_names=["default", "two"]).state_dict().items()}

    model = load_adapter(Llama.from_pretrained(base_dir), tmp_path / "a")
    load_adapter(model, tmp_path / "a" / "two", name="two")
    set_adapter(model, ["default", "two"])
    with no_grad():
        assert np.abs(model(ids).data - expected).max() <= LOGIT_TOL
    ours = merge_and_unload(model, adapter_names=["default", "two"]).state_dict()
    for k, v in theirs.items():
        assert np.abs(ours[k] - v).max() <= MERGE_TOL, k


@pytest.mark.parametrize("kw", [dict(bias="all"), dict(bias="lora_only"), dict(lora_bias=True)],
                         ids=["bias=all", "bias=lora_only", "lora_bias"])
def test_biases_both_ways(tmp_path, ids, kw):
    """A Llama with attention biases: trained base biases (bias="all"/"lora_only") and lora_B biases (scaled by s)
    travel in the adapter file, in both directions, and merge as PEFT merges them."""
    torch.manual_seed(4)
    d = tmp_path / "biased"
    transformers.LlamaForCausalLM(tiny_config(attention_bias=True)).save_pretrained(d)
    cfg = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, **kw)
    pm = peft.get_peft_model(hf_model(d), peft.LoraConfig(init_lora_weights=False, **cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if n.endswith("bias") and p.requires_grad:
                p.add_(0.1)  # as if trained
    pm.save_pretrained(tmp_path / "theirs")
    expected = peft_logits(pm.eval(), ids)
    ours = load_adapter(Llama.from_pretrained(d), tmp_path / "theirs", is_trainable=True)
    with no_grad():
        assert np.abs(ours(ids).data - expected).max() <= LOGIT_TOL
    # the trainable set is PEFT's
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n.removeprefix("base_model.model.") for n, p in pm.named_parameters() if p.requires_grad)
    # ours → PEFT
    for n, p in ours.named_parameters():
        if n.endswith("bias") and p.requires_grad:
            p.data += np.float32(0.05)
    with no_grad():
        mine = ours(ids).data
    save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(hf_model(d), tmp_path / "ours").eval()
    assert np.abs(peft_logits(back, ids) - mine).max() <= LOGIT_TOL
    theirs = {k: v.numpy() for k, v in back.merge_and_unload().state_dict().items()}
    merged = merge_and_unload(ours).state_dict()
    for k, v in theirs.items():
        assert np.abs(merged[k] - v).max() <= MERGE_TOL, k


def test_pissa_init_equals_peft(base_dir):
    """PiSSA: the residual base weights and s·B·A equal PEFT's (A and B themselves only up to the SVD's signs)."""
    kw = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights="pissa")
    pm = peft.get_peft_model(hf_model(base_dir), peft.LoraConfig(**kw))
    theirs = {k.removeprefix("base_model.model."): v.detach().numpy() for k, v in pm.state_dict().items()}
    model = inject_lora(Llama.from_pretrained(base_dir), LoraConfig(**kw))
    n = 0
    for name, layer in lora_layers(model):
        residual = theirs[f"{name}.base_layer.weight"]
        assert np.abs(layer.weight.data - residual).max() <= 1e-5, name
        delta = 2.0 * theirs[f"{name}.lora_B.default.weight"] @ theirs[f"{name}.lora_A.default.weight"]
        assert np.abs(layer.get_delta_weight("default") - delta).max() <= 1e-5, name
        assert np.abs(delta).max() > 0.01  # the top singular directions moved into the adapter
        n += 1
    assert n == 4


@pytest.mark.parametrize("name", ["q,v", "all-linear+rslora", "dora"])
def test_adapter_gradients_equal_peft(base_dir, ids, tmp_path, name):
    """The gradients of the cross-entropy with respect to every adapter parameter equal torch autograd through
    PEFT (DoRA: the norm detached on both sides); the frozen base gets none on either side."""
    pm, adir = peft_adapter(base_dir, tmp_path, CONFIGS[name])
    pm.train()
    t_ids = torch.from_numpy(ids)
    loss = torch.nn.functional.cross_entropy(pm(t_ids[:, :-1]).logits.reshape(-1, 64), t_ids[:, 1:].reshape(-1))
    loss.backward()
    theirs = {n.removeprefix("base_model.model."): p.grad.numpy() for n, p in pm.named_parameters()
              if p.requires_grad}
    model = load_adapter(Llama.from_pretrained(base_dir), adir, is_trainable=True)
    ours_loss = F.cross_entropy(model(ids[:, :-1]), ids[:, 1:])
    ours_loss.backward()
    assert abs(float(ours_loss.data) - loss.item()) <= 1e-5
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    for n, g in theirs.items():
        assert np.abs(ours[n] - g).max() <= 1e-5 * max(1.0, np.abs(g).max()), n
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
