"""PEFT adapter files without torch: round trips, the written format, and one-line errors for bad folders."""

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.adapters.lora import LoraConfig, inject_lora, lora_layers
from lora_ref.adapters.peft_files import PEFT_CONFIG_DEFAULTS, load_adapter, read_adapter_config, save_adapter
from lora_ref.modeling.nn import Linear, Module, ModuleList
from lora_ref.testing import lora_configs


class Attn(Module):
    def __init__(self, d, rng):
        super().__init__()
        self.q_proj = Linear(d, d, rng=rng, std=0.3)
        self.v_proj = Linear(d, d // 2, rng=rng, std=0.3)

    def forward(self, x):
        return self.q_proj(x) * self.v_proj(x).sum(axis=-1, keepdims=True)  # (B, d)


class Net(Module):
    def __init__(self, d=6, rng=None):
        super().__init__()
        rng = rng or np.random.default_rng(0)
        self.layers = ModuleList([Attn(d, rng) for _ in range(2)])
        self.lm_head = Linear(d, 4, rng=rng, std=0.3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)  # (B, d)
        return self.lm_head(x)  # (B, 4)


X = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)


@pytest.fixture
def saved(tmp_path):
    model = inject_lora(Net(), LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False, use_dora=True), rng=np.random.default_rng(0))
    out = tmp_path / "adapter"
    save_adapter(model, out)
    return model, out


def test_round_trip_gives_same_outputs_and_tensors(saved):
    model, out = saved
    loaded = load_adapter(Net(), out)
    assert np.array_equal(loaded(X).data, model(X).data)
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and np.array_equal(p1.data, p2.data)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded frozen, as PEFT's from_pretrained
    trainable = load_adapter(Net(), out, is_trainable=True)
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainable.named_parameters())


def test_written_format(saved):
    _, out = saved
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg) == sorted(PEFT_CONFIG_DEFAULTS) and len(cfg) == 41
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["peft_type"] == "LORA"
    assert cfg["inference_mode"] is True and cfg["use_dora"] is True and cfg["r"] == 2 and cfg["lora_alpha"] == 6
    tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.layers.{i}.{m}.{t}" for i in (0, 1) for m in ("q_proj", "v_proj")
        for t in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    assert tensors["base_model.model.layers.0.v_proj.lora_A.weight"].shape == (2, 6)
    assert tensors["base_model.model.layers.0.v_proj.lora_B.weight"].shape == (3, 2)
    assert tensors["base_model.model.layers.0.v_proj.lora_magnitude_vector"].shape == (3,)
    assert all(t.dtype == np.float32 for t in tensors.values())
    n = struct.unpack("<Q", (out / "adapter_model.safetensors").read_bytes()[:8])[0]
    header = json.loads((out / "adapter_model.safetensors").read_bytes()[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}


def test_all_linear_is_saved_expanded_and_sorted(tmp_path):
    model = inject_lora(Net(), LoraConfig(target_modules="all-linear", init_lora_weights=False),
                        rng=np.random.default_rng(0))
    save_adapter(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]
    assert np.array_equal(load_adapter(Net(), tmp_path / "a")(X).data, model(X).data)


def test_second_named_adapter_loads_inactive(saved, tmp_path):
    model, out = saved
    net = load_adapter(Net(), out)
    y = net(X).data
    load_adapter(net, out, name="other")
    assert np.array_equal(net(X).data, y)
    assert {n for n in net.peft_config} == {"default", "other"}
    with pytest.raises(ValueError, match="already has an adapter named"):
        load_adapter(net, out, name="other")


def test_save_refuses_non_empty_folder_and_unknown_adapter(saved, tmp_path):
    model, out = saved
    with pytest.raises(ValueError, match="not empty"):
        save_adapter(model, out)
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        save_adapter(model, tmp_path / "x", name="nope")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors not found"),
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json not found"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "corrupt adapter_config.json"),
    (lambda d: (d / "adapter_config.json").write_text("[1, 2]"), "corrupt adapter_config.json"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-7]), "corrupt safetensors.*adapter_model.safetensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\x01\x02"), "corrupt.*adapter_model.safetensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(b"\xff" * 64), "corrupt.*adapter_model.safetensors"),
])
def test_damaged_folders_give_value_errors_naming_the_file(saved, tmp_path, damage, match):
    _, out = saved
    d = _copy(out, tmp_path / "damaged")
    damage(d)
    net = Net()
    before = {n: p.data.copy() for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=match):
        load_adapter(net, d)
    assert not list(lora_layers(net))  # the model was not touched
    assert all(np.array_equal(p.data, before[n]) for n, p in net.named_parameters())


def test_missing_folder():
    with pytest.raises(ValueError, match="adapter folder not found"):
        load_adapter(Net(), "/nonexistent/adapter")


def _edit_config(d, **changes):
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


def test_shape_mismatch_names_tensor_and_both_shapes(saved, tmp_path):
    _, out = saved
    with pytest.raises(ValueError, match=r"base_model\.model\.layers\.0\.q_proj\.lora_A\.weight.*shape \(2, 6\).*"
                                         r"shape \(2, 8\)"):
        load_adapter(Net(d=8), out)
    d = _copy(out, tmp_path / "rank")
    _edit_config(d, r=3)  # the config says r=3, the tensors have r=2 (peft #554)
    with pytest.raises(ValueError, match=r"lora_A\.weight.*has shape \(2, 6\).*expects shape \(3, 6\)"):
        load_adapter(Net(), d)


def test_config_problems(saved, tmp_path):
    _, out = saved
    for i, (changes, match) in enumerate([
        (dict(target_modules=["nothing_here"]), "does not fit the model.*not found"),
        (dict(peft_type="IA3"), "only LORA"),
        (dict(use_qalora=True), "use_qalora"),
        (dict(r=0), "invalid adapter_config.json.*r must be"),
    ]):
        d = _copy(out, tmp_path / f"c{i}")
        _edit_config(d, **changes)
        with pytest.raises(ValueError, match=match):
            load_adapter(Net(), d)


def test_unexpected_and_missing_tensors(saved, tmp_path):
    _, out = saved
    tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")
    d = _copy(out, tmp_path / "extra")
    extra = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((2, 3), np.float32)})
    (d / "adapter_model.safetensors").write_bytes(safetensors.numpy.save(extra))
    with pytest.raises(ValueError, match="lm_head.lora_A.weight"):
        load_adapter(Net(), d)
    d = _copy(out, tmp_path / "missing")
    fewer = {k: v for k, v in tensors.items() if "layers.1.v_proj.lora_B" not in k}
    (d / "adapter_model.safetensors").write_bytes(safetensors.numpy.save(fewer))
    with pytest.raises(ValueError, match=r"no tensor base_model\.model\.layers\.1\.v_proj\.lora_B\.weight"):
        load_adapter(Net(), d)


def test_read_adapter_config_defaults(saved):
    _, out = saved
    cfg = read_adapter_config(out)
    assert (cfg.r, cfg.lora_alpha, cfg.use_dora, cfg.target_modules) == (2, 6, True, ["q_proj", "v_proj"])


@given(lora_configs(target_names=("q_proj", "v_proj", "lm_head"), use_dora=None), st.integers(0, 2 ** 32 - 1))
@settings(max_examples=20)
def test_save_then_load_reproduces_outputs(cfg, seed):
    import tempfile
    from pathlib import Path

    model = inject_lora(Net(rng=np.random.default_rng(seed)), cfg, rng=np.random.default_rng(seed))
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "a")
        loaded = load_adapter(Net(rng=np.random.default_rng(seed)), Path(tmp) / "a")
    assert np.array_equal(loaded(X).data, model(X).data)
    assert loaded.peft_config["default"].target_modules == sorted(cfg.target_modules)
