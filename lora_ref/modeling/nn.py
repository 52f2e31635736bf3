"""Modules and parameters: the containers a model is built from.

A :class:`Module` registers the :class:`Parameter`\\ s and sub-modules assigned to it, in assignment order, so
``named_parameters()`` yields dotted names (``model.layers.0.self_attn.q_proj.weight``) that equal transformers'
state-dict keys when the attributes are named as in transformers.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np

from lora_ref.autograd import functional as F
from lora_ref.autograd import ops
from lora_ref.autograd.tensor import Tensor

__all__ = ["Parameter", "Module", "ModuleList", "ModuleDict", "Linear", "Embedding", "RMSNorm", "placeholders"]

_PLACEHOLDERS = False


@contextlib.contextmanager
def placeholders():
    """Build modules whose un-initialized parameters take no memory: inside this block, ``Linear``, ``Embedding``
    and ``RMSNorm`` built without ``rng`` get read-only zero-stride views of a single value (``np.broadcast_to``)
    of the right shape and dtype instead of allocated arrays.

    A checkpoint loader builds the model this way and then gives each parameter its real array as it reads it
    (:meth:`lora_ref.modeling.llama.Llama.from_pretrained`), so loading never holds an array of zeros *and* the weights, and
    a model that is only a skeleton (shapes for LoRA layers, e.g. the streaming ``lora-ref merge``) costs nothing.
    """
    global _PLACEHOLDERS
    prev, _PLACEHOLDERS = _PLACEHOLDERS, True
    try:
        yield
    finally:
        _PLACEHOLDERS = prev


def _filled(shape, dtype, value: float, rng) -> np.ndarray:
    if _PLACEHOLDERS and rng is None:
        return np.broadcast_to(np.full((), value, dtype=dtype), shape)
    return np.full(shape, value, dtype=dtype) if value else np.zeros(shape, dtype=dtype)


def _normal(shape, dtype, std: float, rng) -> np.ndarray:
    """W ~ N(0, std²) drawn from ``rng`` in ``dtype``; zeros (a placeholder under :func:`placeholders`) when ``rng``
    is None, for weights that are loaded next."""
    w = _filled(shape, dtype, 0.0, rng)
    if rng is not None:
        w[...] = rng.normal(0.0, std, size=w.shape)
    return w


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (``requires_grad=True`` unless frozen)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad)

    def __repr__(self) -> str:
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"


class Module:
    """Base class: holds parameters and sub-modules; ``module(x)`` calls ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params, mods = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if params is None:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        # replacing an entry keeps its place (dict assignment to an existing key), so swapping a layer for a LoRA or
        # 4-bit one leaves the order of named_modules() / named_parameters() unchanged
        if isinstance(value, Parameter):
            mods.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            mods[name] = value
        else:
            params.pop(name, None)
            mods.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    # ---------------------------------------------------------------------------------------- traversal
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from self._modules.items()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """(dotted name, module) for this module ("" or ``prefix``) and every descendant, depth first."""
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "", remove_duplicate: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) pairs; a parameter shared by two modules (tied weights) is yielded once."""
        seen: set[int] = set()
        for mname, m in self.named_modules(prefix):
            for pname, p in m._parameters.items():
                if remove_duplicate:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                yield (f"{mname}.{pname}" if mname else pname), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def num_parameters(self, trainable_only: bool = False) -> int:
        return int(sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only))

    def get_submodule(self, name: str) -> "Module":
        """The module at a dotted path (``"model.layers.0.mlp"``); ``""`` is this module."""
        m: Module = self
        if not name:
            return m
        for part in name.split("."):
            if part not in m._modules:
                raise ValueError(f"no submodule '{name}' in {type(self).__name__} (missing '{part}')")
            m = m._modules[part]
        return m

    def set_submodule(self, name: str, module: "Module") -> None:
        """Replace the module at a dotted path (how LoRA and 4-bit layers are swapped in)."""
        parent_name, _, leaf = name.rpartition(".")
        parent = self.get_submodule(parent_name)
        if leaf not in parent._modules:
            raise ValueError(f"no submodule '{name}' in {type(self).__name__}")
        if isinstance(parent, ModuleList):
            parent[int(leaf)] = module
        else:
            setattr(parent, leaf, module)

    # ---------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, np.ndarray]:
        """{dotted name: array} for every parameter, tied ones under each of their names."""
        return {name: p.data for name, p in self.named_parameters(remove_duplicate=False)}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters (in place, so tied parameters stay tied).

        Raises ``ValueError`` naming the key and both shapes on a shape mismatch, and (``strict``) on missing or
        unexpected keys.
        """
        own = dict(self.named_parameters(remove_duplicate=False))
        if strict:
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            if missing or unexpected:
                parts = []
                if missing:
                    parts.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
                if unexpected:
                    parts.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
                raise ValueError("state dict does not fit the model: " + "; ".join(parts))
        for k, p in own.items():
            if k not in state:
                continue
            v = np.asarray(state[k])
            if v.shape != p.shape:
                raise ValueError(f"shape mismatch for {k}: checkpoint has shape {v.shape}, model expects {p.shape}")
            p.data[...] = v.astype(p.dtype, copy=False)

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def requires_grad_(self, flag: bool = True) -> "Module":
        for p in self.parameters():
            p.requires_grad = bool(flag)
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, m in self._modules.items():
            sub = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        return lines[0] + ")" if len(lines) == 1 else "\n".join(lines) + "\n)"


class ModuleList(Module):
    """A list of modules, registered under "0", "1", …"""

    row_parallel = True  # each row of the output from that row alone, no state changed (llama.row_parts)

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> "ModuleList":
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i: int) -> Module:
        return self._modules[str(i % len(self._modules))]

    def __setitem__(self, i: int, module: Module) -> None:
        setattr(self, str(i % len(self._modules)), module)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ModuleDict(Module):
    """Modules by name (PEFT keeps one ``lora_A`` per adapter name in one: ``lora_A.default.weight``)."""

    row_parallel = True  # each row of the output from that row alone, no state changed (llama.row_parts)

    def __init__(self, modules: dict | None = None):
        super().__init__()
        for k, m in (modules or {}).items():
            self[k] = m

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, module: Module) -> None:
        setattr(self, key, module)

    def __delitem__(self, key: str) -> None:
        delattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in self._modules

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()


class Linear(Module):
    """y = x @ Wᵀ (+ b), weight (out_features, in_features) as in torch and transformers.

    ``rng`` None leaves the weight at zero (to be loaded); otherwise W ~ N(0, std²) like transformers' Llama init.
    """

    row_parallel = True  # each row of the output from that row alone, no state changed (llama.row_parts)

    #: forward returns a new array that backward does not read, so a LoRA wrapper may add into it in place
    fresh_output = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 rng: np.random.Generator | None = None, std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = Parameter(_normal((out_features, in_features), dtype, std, rng))
        self.bias = Parameter(_filled((out_features,), dtype, 0.0, rng)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """Lookup table (num_embeddings, embedding_dim); forward gathers rows at integer ids."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, rng: np.random.Generator | None = None,
                 std: float = 0.02, dtype=np.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.weight = Parameter(_normal((num_embeddings, embedding_dim), dtype, std, rng))

    def forward(self, ids):
        return ops.embedding(self.weight, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class RMSNorm(Module):
    """RMSNorm over the last axis with a learned gain (initialized to 1)."""

    row_parallel = True  # each row of the output from that row alone, no state changed (llama.row_parts)

    def __init__(self, dim: int, eps: float = 1e-6, dtype=np.float32):
        super().__init__()
        self.eps = float(eps)
        self.weight = Parameter(_filled((dim,), dtype, 1.0, None))

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
