"""Module bookkeeping: names, state dicts, freezing, swapping submodules."""

import numpy as np
import pytest

from lora_ref import Tensor
from lora_ref.autograd.numerical import gradcheck
from lora_ref.modeling.nn import Embedding, Linear, Module, ModuleList, Parameter, RMSNorm


class Block(Module):
    def __init__(self, rng):
        super().__init__()
        self.q_proj = Linear(4, 4, rng=rng)
        self.norm = RMSNorm(4)

    def forward(self, x):
        return self.q_proj(self.norm(x))


class Net(Module):
    def __init__(self, rng, tie=False):
        super().__init__()
        self.embed_tokens = Embedding(10, 4, rng=rng)
        self.layers = ModuleList([Block(rng), Block(rng)])
        self.lm_head = Linear(4, 10, rng=rng)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, ids):
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def test_dotted_names_in_assignment_order():
    names = [n for n, _ in Net(np.random.default_rng(0)).named_parameters()]
    assert names == ["embed_tokens.weight", "layers.0.q_proj.weight", "layers.0.norm.weight",
                     "layers.1.q_proj.weight", "layers.1.norm.weight", "lm_head.weight"]


def test_tied_weights_are_one_parameter_but_two_state_dict_keys():
    net = Net(np.random.default_rng(0), tie=True)
    assert "lm_head.weight" not in dict(net.named_parameters())
    sd = net.state_dict()
    assert sd["lm_head.weight"] is sd["embed_tokens.weight"]
    new = {k: np.full_like(v, 0.5) for k, v in sd.items()}
    net.load_state_dict(new)
    assert np.all(net.lm_head.weight.data == 0.5)


def test_load_state_dict_errors_name_key_and_shapes():
    net = Net(np.random.default_rng(0))
    sd = {k: v.copy() for k, v in net.state_dict().items()}
    sd["lm_head.weight"] = np.zeros((10, 5), np.float32)
    with pytest.raises(ValueError, match=r"lm_head.weight.*\(10, 5\).*\(10, 4\)"):
        net.load_state_dict(sd)
    sd.pop("lm_head.weight")
    with pytest.raises(ValueError, match="missing keys.*lm_head.weight"):
        net.load_state_dict(sd)


def test_freeze_and_gradients_only_to_trainable():
    rng = np.random.default_rng(0)
    net = Net(rng)
    net.requires_grad_(False)
    net.lm_head.weight.requires_grad = True
    out = net(np.array([[1, 2, 3]]))
    out.sum().backward()
    for name, p in net.named_parameters():
        assert (p.grad is not None) == (name == "lm_head.weight"), name


def test_set_submodule_and_get_submodule():
    rng = np.random.default_rng(0)
    net = Net(rng)
    new = Linear(4, 4, rng=rng)
    net.set_submodule("layers.1.q_proj", new)
    assert net.get_submodule("layers.1.q_proj") is new
    assert net.layers[1].q_proj is new
    with pytest.raises(ValueError, match="no submodule"):
        net.get_submodule("layers.1.k_proj")


def test_train_eval_propagates():
    net = Net(np.random.default_rng(0))
    net.eval()
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())


def test_whole_network_gradcheck_in_float64():
    rng = np.random.default_rng(0)
    net = Net(rng)
    for p in net.parameters():
        p.data = p.data.astype(np.float64)
    ids = np.array([[1, 2, 3, 2]])
    params = list(net.parameters())
    assert gradcheck(lambda *ps: _forward_with(net, ps, ids), [Tensor(p.data, requires_grad=True) for p in params])


def _forward_with(net, ps, ids):
    """Run ``net`` with its parameters temporarily replaced by the tensors ``ps`` (which carry the graph)."""
    params = [(m, name) for _, m in net.named_modules() for name in m._parameters]
    saved = [getattr(m, name) for m, name in params]
    try:
        for (m, name), t in zip(params, ps):
            object.__setattr__(m, name, t)
        return net(ids)
    finally:
        for (m, name), p in zip(params, saved):
            object.__setattr__(m, name, p)


def test_parameter_is_tensor_requiring_grad():
    p = Parameter(np.zeros(3))
    assert isinstance(p, Tensor) and p.requires_grad and p.dtype == np.float64


def test_replacing_a_submodule_keeps_its_place_in_the_order():
    rng = np.random.default_rng(0)
    net = Net(rng)
    before = [n for n, _ in net.named_modules()]
    net.set_submodule("embed_tokens", Embedding(10, 4, rng=rng))
    net.set_submodule("layers.0.q_proj", Linear(4, 4, rng=rng))
    assert [n for n, _ in net.named_modules()] == before
