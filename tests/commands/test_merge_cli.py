"""``lora-ref merge``: bad input gives one-line errors and writes nothing; the merged checkpoint equals PEFT's
``merge_and_unload`` (and ``add_weighted_adapter`` + merge for several adapters) and loads in transformers."""

import hashlib
import json
import struct

import numpy as np
import pytest

from lora_ref.adapters.lora import LoraConfig, inject_lora
from lora_ref.adapters.peft_files import save_adapter
from lora_ref.cli import main
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.testing import tiny_llama_config

TINY = tiny_llama_config(hidden_size=32, intermediate_size=48)


def our_base(path, seed=0, **kw):
    Llama(LlamaConfig(**{**TINY, **kw}), rng=np.random.default_rng(seed)).save_pretrained(path)
    return path


def our_adapter(base, path, seed=0, **kw):
    model = Llama.from_pretrained(base)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    cfg.update(kw)
    inject_lora(model, LoraConfig(**cfg), rng=np.random.default_rng(seed))
    save_adapter(model, path)
    return path


def tree_digest(*folders):
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(str(f).encode() + f.read_bytes())
    return h.hexdigest()


def run_cli(capsys, *argv):
    code = main(["merge", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path):
    base = our_base(tmp_path / "base")
    a = our_adapter(base, tmp_path / "a", seed=1)
    b = our_adapter(base, tmp_path / "b", seed=2, r=2, lora_alpha=4, target_modules=["v_proj", "down_proj"])
    return base, a, b


# ------------------------------------------------------------------------------------------------ bad input


def test_refuses_non_empty_out_and_keeps_it(files, tmp_path, capsys):
    base, a, _ = files
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--base", base, "--adapter", a, "--out", out)
    assert code == 1 and "not empty" in err and str(out) in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("what", ["base", "adapter", "base_weights", "adapter_weights"])
def test_missing_files_are_named(files, tmp_path, capsys, what):
    base, a, _ = files
    if what == "base":
        base = tmp_path / "nope"
    elif what == "adapter":
        a = tmp_path / "nope"
    elif what == "base_weights":
        (base / "model.safetensors").unlink()
    else:
        (a / "adapter_model.safetensors").unlink()
    code, _, err = run_cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1
    assert ("nope" in err) if what in ("base", "adapter") else ("model.safetensors" in err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_corrupt_safetensors_names_the_file(files, tmp_path, capsys, which):
    base, a, _ = files
    f = base / "model.safetensors" if which == "base" else a / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # truncated
    code, _, err = run_cli(capsys, "--base", base, "--adapter", a, "--out", tmp_path / "out")
    assert code == 1 and "corrupt" in err and str(f) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_adapter_that_does_not_fit_names_tensor_and_both_shapes(files, tmp_path, capsys):
    base, _, _ = files
    other = our_base(tmp_path / "other", hidden_size=16, intermediate_size=24)
    wrong = our_adapter(other, tmp_path / "wrong")
    code, _, err = run_cli(capsys, "--base", base, "--adapter", wrong, "--out", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in err and "(4, 16)" in err and "(4, 32)" in err
    assert not (tmp_path / "out").exists()


def test_adapters_that_cannot_be_combined(files, tmp_path, capsys):
    base, a, b = files  # ranks 4 and 2
    code, _, err = run_cli(capsys, "--base", base, "--adapter", a, "--adapter", b, "--combination", "linear",
                           "--out", tmp_path / "out")
    assert code == 1 and "cannot be combined" in err and "rank" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,msg", [
    (["--weights", "1,2,3"], "3 value(s) for 2 adapter(s)"),
    (["--weights", "1,x"], "comma-separated"),
    (["--combination", "ties"], "needs --density"),
    (["--combination", "ties", "--density", "1.5"], "[0, 1]"),
    (["--combination", "cat", "--svd-rank", "4"], "svd"),
    (["--combination", "average"], "invalid choice"),
])
def test_bad_flag_values_exit_2(files, tmp_path, capsys, extra, msg):
    base, a, b = files
    code, _, err = run_cli(capsys, "--base", base, "--adapter", a, "--adapter", b, *extra, "--out", tmp_path / "out")
    assert code == 2 and msg in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_merge_writes_a_loadable_checkpoint_and_leaves_inputs_alone(files, tmp_path, capsys):
    base, a, b = files
    before = tree_digest(base, a, b)
    code, out, _ = run_cli(capsys, "--base", base, "--adapter", a, "--adapter", b, "--weights", "0.5,-1",
                           "--combination", "cat", "--out", tmp_path / "m", "--json")
    assert code == 0 and tree_digest(base, a, b) == before
    doc = json.loads(out)
    assert doc["merged_layers"] == 6 and doc["dtype"] == "float32" and doc["combination"] == "cat"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    merged = Llama.from_pretrained(tmp_path / "m")
    plain = Llama.from_pretrained(base)
    sd, sd0 = merged.state_dict(), plain.state_dict()
    changed = {k for k in sd if not np.array_equal(sd[k], sd0[k])}
    assert changed == {f"model.layers.{i}.{m}.weight" for i in range(2)
                       for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}


def _header_dtypes(path):
    buf = path.read_bytes()
    (n,) = struct.unpack("<Q", buf[:8])
    return {v["dtype"] for k, v in json.loads(buf[8:8 + n]).items() if k != "__metadata__"}


# ------------------------------------------------------------------------------------------------ against PEFT


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    import torch
    import transformers

    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf_base")
    cfg = transformers.LlamaConfig(**TINY)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    d16 = tmp_path_factory.mktemp("hf_base16")
    transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16).save_pretrained(d16)
    return d, d16


def _peft(base, tmp_path, specs, dtype):
    import peft
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(base, dtype=dtype)
    pm = None
    for i, (name, kw) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(init_lora_weights=False, **kw)
        pm = peft.get_peft_model(model, cfg, adapter_name=name) if pm is None else pm
        if i:
            pm.add_adapter(name, cfg)
        # init_lora_weights=False leaves nn.Linear's init: B ≠ 0
    pm.save_pretrained(tmp_path / "saved")  # "default" at the folder itself, other names in subfolders
    return pm


SPECS = {"t1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
         "t2": dict(r=2, lora_alpha=16, target_modules=["v_proj", "down_proj"], use_rslora=True)}


@pytest.mark.interop
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_single_adapter_equals_peft_merge_and_unload(hf_base, tmp_path, capsys, dtype):
    import torch
    import transformers

    base = hf_base[0] if dtype == "float32" else hf_base[1]
    pm = _peft(base, tmp_path, {"default": SPECS["t1"]}, getattr(torch, dtype))
    adir = tmp_path / "saved"
    code, _, err = run_cli(capsys, "--base", base, "--adapter", adir, "--out", tmp_path / "m")
    assert code == 0, err
    assert _header_dtypes(tmp_path / "m" / "model.safetensors") == {"F32" if dtype == "float32" else "BF16"}
    merged_hf = pm.merge_and_unload()
    theirs = {k: v.float().numpy() for k, v in merged_hf.state_dict().items()}
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=getattr(torch, dtype))
    ours = {k: v.float().numpy() for k, v in loaded.state_dict().items()}
    assert set(ours) == set(theirs)
    for k in theirs:
        if dtype == "bfloat16":
            assert np.array_equal(ours[k], theirs[k]), k  # one rounding of W + ΔW, as PEFT's unsafe merge
        else:
            assert np.abs(ours[k] - theirs[k]).max() <= 1e-6, k
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 64, size=(2, 7)))
    with torch.no_grad():
        np.testing.assert_allclose(loaded(ids).logits.float().numpy(), merged_hf(ids).logits.float().numpy(),
                                   rtol=0, atol=1e-5)


@pytest.mark.interop
@pytest.mark.parametrize("combination,extra,peft_kwargs", [
    ("cat", [], {}),
    ("svd", ["--svd-rank", "6"], {"svd_rank": 6}),
    ("ties", ["--density", "0.5"], {"density": 0.5}),
])
def test_two_adapters_equal_peft_add_weighted_adapter(hf_base, tmp_path, capsys, combination, extra, peft_kwargs):
    """Non-rsLoRA first adapter, so PEFT's √r over-scaling does not apply and the results must agree."""
    import torch

    specs = {"t1": SPECS["t1"], "t2": dict(SPECS["t2"], r=4) if combination == "ties" else SPECS["t2"]}
    base = hf_base[0]
    pm = _peft(base, tmp_path, specs, torch.float32)
    dirs = [tmp_path / "saved" / "t1", tmp_path / "saved" / "t2"]
    code, _, err = run_cli(capsys, "--base", base, "--adapter", dirs[0], "--adapter", dirs[1], "--weights", "0.7,-0.3",
                           "--combination", combination, *extra, "--out", tmp_path / "m")
    assert code == 0, err
    pm.add_weighted_adapter(["t1", "t2"], [0.7, -0.3], "m", combination_type=combination, **peft_kwargs)
    pm.set_adapter("m")
    theirs = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    ours = Llama.from_pretrained(tmp_path / "m").state_dict()
    atol = 2e-5 if combination == "svd" else 1e-6
    for k in theirs:
        assert np.abs(ours[k] - theirs[k]).max() <= atol, k
