"""Primitive operations, each with its forward and one local backward rule.

Every function takes Tensors (or arrays / Python numbers, treated as constants) and returns a Tensor. The backward
rule receives ``g`` = dL/d(out) and returns dL/d(input) for each input, summed back over broadcast dimensions
(:func:`unbroadcast`). Taught in ``notebooks/01_autograd.ipynb``; every rule is checked by ``lora_ref.autograd.numerical``
in ``tests/autograd/test_autograd.py``.

The end of this module installs the primitives as Tensor's operators and methods (``a + b`` is :func:`add`,
``a.sum()`` is :func:`sum` …), so :mod:`lora_ref.autograd.tensor` imports nothing from here.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lora_ref.autograd.tensor import Tensor
from lora_ref.kernels import blas, switch
from lora_ref.kernels import training as kernels
from lora_ref.kernels.reference import sigmoid as _sigmoid

__all__ = [
    "unbroadcast", "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "rsqrt", "matmul", "linear",
    "sum", "mean", "max", "reshape", "transpose", "getitem", "embedding", "concatenate", "stack", "where",
    "sigmoid", "silu", "tanh", "relu", "astype",
]


def _t(x, like: Tensor | None = None) -> Tensor:
    """Wrap a constant. Python numbers take the dtype of ``like`` so float32 graphs stay float32."""
    if isinstance(x, Tensor):
        return x
    if like is not None and not isinstance(x, np.ndarray) and like.data.dtype.kind == "f":
        return Tensor(np.asarray(x, dtype=like.data.dtype))
    return Tensor(x)


def _pair(a, b) -> tuple[Tensor, Tensor]:
    if isinstance(a, Tensor):
        return a, _t(b, a)
    b = _t(b)
    return _t(a, b), b


def unbroadcast(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``g`` over the dimensions that broadcasting added or stretched, so it has ``shape``."""
    if g.shape == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


# --------------------------------------------------------------------------------------------- arithmetic
def add(a, b) -> Tensor:
    """a + b; d/da = 1, d/db = 1."""
    a, b = _pair(a, b)
    sa, sb = a.shape, b.shape
    return Tensor._make(a.data + b.data, (a, b), lambda g: (unbroadcast(g, sa), unbroadcast(g, sb)))


def sub(a, b) -> Tensor:
    """a − b; d/da = 1, d/db = −1."""
    a, b = _pair(a, b)
    sa, sb = a.shape, b.shape
    return Tensor._make(a.data - b.data, (a, b), lambda g: (unbroadcast(g, sa), unbroadcast(-g, sb)))


def mul(a, b) -> Tensor:
    """a · b (elementwise); d/da = b, d/db = a."""
    a, b = _pair(a, b)
    ad, bd = a.data, b.data

    def backward(g):
        return (unbroadcast(g * bd, ad.shape) if a.requires_grad else None,
                unbroadcast(g * ad, bd.shape) if b.requires_grad else None)

    return Tensor._make(ad * bd, (a, b), backward)


def div(a, b) -> Tensor:
    """a / b; d/da = 1/b, d/db = −a/b²."""
    a, b = _pair(a, b)
    ad, bd = a.data, b.data

    def backward(g):
        return (unbroadcast(g / bd, ad.shape) if a.requires_grad else None,
                unbroadcast(-g * ad / (bd * bd), bd.shape) if b.requires_grad else None)

    return Tensor._make(ad / bd, (a, b), backward)


def neg(a) -> Tensor:
    """−a."""
    a = _t(a)
    return Tensor._make(-a.data, (a,), lambda g: (-g,))


def pow(a, b) -> Tensor:
    """a ** b; d/da = b·a^(b−1), d/db = a^b · ln a (b may be a number or a Tensor)."""
    a, b = _pair(a, b)
    ad, bd = a.data, b.data
    out = ad ** bd

    def backward(g):
        ga = unbroadcast(g * bd * ad ** (bd - 1), ad.shape) if a.requires_grad else None
        gb = None
        if b.requires_grad:
            with np.errstate(divide="ignore", invalid="ignore"):
                gb = unbroadcast(g * out * np.log(ad), bd.shape)
        return ga, gb

    return Tensor._make(out, (a, b), backward)


def exp(a) -> Tensor:
    """e^a; d/da = e^a."""
    a = _t(a)
    out = np.exp(a.data)
    return Tensor._make(out, (a,), lambda g: (g * out,))


def log(a) -> Tensor:
    """ln a; d/da = 1/a."""
    a = _t(a)
    ad = a.data
    return Tensor._make(np.log(ad), (a,), lambda g: (g / ad,))


def sqrt(a) -> Tensor:
    """√a; d/da = 1/(2√a)."""
    a = _t(a)
    out = np.sqrt(a.data)
    return Tensor._make(out, (a,), lambda g: (g * 0.5 / out,))


def rsqrt(a) -> Tensor:
    """1/√a; d/da = −½ a^(−3/2)."""
    a = _t(a)
    out = 1.0 / np.sqrt(a.data)
    return Tensor._make(out, (a,), lambda g: (g * (-0.5) * out * out * out,))


# --------------------------------------------------------------------------------------------- matrix products
def matmul(a, b) -> Tensor:
    """a @ b with NumPy's batching rules (1-D operands are promoted and squeezed like ``np.matmul``).

    Backward: dA = g @ Bᵀ, dB = Aᵀ @ g, summed over broadcast batch dimensions.
    """
    a, b = _pair(a, b)
    ad, bd = a.data, b.data
    out = np.matmul(ad, bd)
    a_vec, b_vec = ad.ndim == 1, bd.ndim == 1

    def backward(g):
        A = ad[None, :] if a_vec else ad
        B = bd[:, None] if b_vec else bd
        G = g
        if a_vec:
            G = np.expand_dims(G, -2)
        if b_vec:
            G = np.expand_dims(G, -1)
        ga = gb = None
        if a.requires_grad:
            ga = np.matmul(G, np.swapaxes(B, -1, -2))
            ga = unbroadcast(ga, A.shape).reshape(ad.shape)
        if b.requires_grad:
            if B.ndim == 2 and A.ndim > 2:  # (…, n, k)ᵀ @ (…, n, m) summed over the batch = one 2-D product
                gb = A.reshape(-1, A.shape[-1]).T @ G.reshape(-1, G.shape[-1])
            else:
                gb = np.matmul(np.swapaxes(A, -1, -2), G)
                gb = unbroadcast(gb, B.shape)
            gb = gb.reshape(bd.shape)
        return ga, gb

    return Tensor._make(out, (a, b), backward)


def _matmul():
    """The 2-D product of :func:`linear`: shared out in chunks between threads (:func:`lora_ref.kernels.blas.matmul`,
    the same bits) when the fast paths are on, else ``np.matmul``."""
    return blas.matmul if switch.enabled() else np.matmul


def linear(x, weight, bias=None) -> Tensor:
    """y = x @ Wᵀ (+ b) with W of shape (out, in), as in ``torch.nn.functional.linear``.

    One fused node: dx = g @ W, dW = gᵀ @ x (over all leading dimensions), db = Σ g.
    """
    x = _t(x)
    weight = _t(weight, x)
    xd, wd = x.data, weight.data
    lead = xd.shape[:-1]
    x2 = xd.reshape(-1, xd.shape[-1])  # (N, in): one 2-D GEMM (NumPy runs a stacked matmul slice by slice)
    mm = _matmul()
    out = mm(x2, wd.T).reshape(lead + (wd.shape[0],))  # (…, out)
    parents: tuple[Tensor, ...] = (x, weight)
    if bias is not None:
        bias = _t(bias, x)
        out = out + bias.data
        parents = (x, weight, bias)

    def backward(g):
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        if mm is blas.matmul and x.requires_grad and weight.requires_grad:  # both products, one hand-over
            gx, gw = blas.matmuls([(g2, wd), (g2.T, x2)])
            gx = gx.reshape(xd.shape)
        else:
            gx = mm(g2, wd).reshape(xd.shape) if x.requires_grad else None  # (…, in)
            gw = mm(g2.T, x2) if weight.requires_grad else None  # (out, in)
        if bias is None:
            return gx, gw
        return gx, gw, (g2.sum(axis=0) if bias.requires_grad else None)

    return Tensor._make(out, parents, backward)


# --------------------------------------------------------------------------------------------- reductions
def _axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    return tuple(sorted(a % ndim for a in axis))


def _expand(g: np.ndarray, axes: tuple[int, ...], keepdims: bool) -> np.ndarray:
    return g if keepdims else np.expand_dims(g, axes)


def sum(a, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001 (shadows builtin inside this module only)
    """Σ over ``axis``; the gradient is broadcast back to every summed element."""
    a = _t(a)
    shape, axes = a.shape, _axes(axis, a.ndim)
    out = a.data.sum(axis=axes, keepdims=keepdims)
    return Tensor._make(np.asarray(out), (a,), lambda g: (np.broadcast_to(_expand(g, axes, keepdims), shape),))


def mean(a, axis=None, keepdims: bool = False) -> Tensor:
    """Mean over ``axis``; the gradient is g / (number of averaged elements), broadcast back."""
    a = _t(a)
    shape, axes = a.shape, _axes(axis, a.ndim)
    n = int(np.prod([shape[i] for i in axes])) if axes else 1
    out = a.data.mean(axis=axes, keepdims=keepdims)
    dt = a.data.dtype if a.data.dtype.kind == "f" else np.float32
    return Tensor._make(np.asarray(out), (a,),
                        lambda g: (np.broadcast_to(_expand(g, axes, keepdims) / dt.type(n), shape),))


def max(a, axis=None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """Max over ``axis``; the gradient goes to the maximal elements (split evenly between ties)."""
    a = _t(a)
    ad, axes = a.data, _axes(axis, a.ndim)
    out = ad.max(axis=axes, keepdims=True)

    def backward(g):
        mask = (ad == out).astype(ad.dtype)
        mask /= mask.sum(axis=axes, keepdims=True)
        return (_expand(g, axes, keepdims) * mask,)

    return Tensor._make(out if keepdims else np.squeeze(out, axis=axes), (a,), backward)


# --------------------------------------------------------------------------------------------- shapes
def reshape(a, shape: Sequence[int]) -> Tensor:
    """Same elements, new shape; the gradient is reshaped back."""
    a = _t(a)
    src = a.shape
    return Tensor._make(a.data.reshape(shape), (a,), lambda g: (g.reshape(src),))


def transpose(a, axes: Sequence[int] | None = None) -> Tensor:
    """Permute axes (reverse them when ``axes`` is None); the gradient is permuted back."""
    a = _t(a)
    if axes is None:
        axes = tuple(reversed(range(a.ndim)))
    axes = tuple(ax % a.ndim for ax in axes)
    inverse = tuple(np.argsort(axes))
    return Tensor._make(a.data.transpose(axes), (a,), lambda g: (g.transpose(inverse),))


def _is_advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (list, np.ndarray, Tensor)) for i in items)


def getitem(a, index) -> Tensor:
    """a[index] for basic and integer-array indexing; the gradient is scattered (and summed for repeats)."""
    a = _t(a)
    if isinstance(index, Tensor):
        index = index.data
    elif isinstance(index, tuple):
        index = tuple(i.data if isinstance(i, Tensor) else i for i in index)
    ad = a.data
    advanced = _is_advanced(index)

    def backward(g):
        full = np.zeros_like(ad)
        if advanced:
            np.add.at(full, index, g)
        else:
            full[index] = g
        return (full,)

    return Tensor._make(ad[index], (a,), backward)


def embedding(weight, ids) -> Tensor:
    """Rows of ``weight`` (V, D) at integer ``ids`` (any shape) → (*ids.shape, D); the embedding gather.

    Backward: the gradient rows are added into a zero (V, D) matrix at ``ids`` (repeated ids accumulate).
    """
    weight = _t(weight)
    ids = np.asarray(ids.data if isinstance(ids, Tensor) else ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"embedding ids must be integers, got dtype {ids.dtype}")
    V, D = weight.shape
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"token id out of range: ids must lie in [0, {V}), got min {ids.min()} max {ids.max()}")
    wd = weight.data

    def backward(g):
        impl = kernels.pick("embedding_grad", wd, g)  # the readable scatter or its kernel
        return (impl.embedding_grad(ids, g, V, wd.dtype),)

    return Tensor._make(wd[ids], (weight,), backward)


def concatenate(tensors: Sequence, axis: int = 0) -> Tensor:
    """Join along ``axis``; the gradient is split back at the same boundaries."""
    ts = [_t(t) for t in tensors]
    sizes = [t.shape[axis] for t in ts]
    cuts = np.cumsum(sizes)[:-1]
    return Tensor._make(np.concatenate([t.data for t in ts], axis=axis), tuple(ts),
                        lambda g: tuple(np.split(g, cuts, axis=axis)))


def stack(tensors: Sequence, axis: int = 0) -> Tensor:
    """Stack along a new ``axis``; the gradient is unstacked."""
    ts = [_t(t) for t in tensors]
    out = np.stack([t.data for t in ts], axis=axis)
    ax = axis % out.ndim
    return Tensor._make(out, tuple(ts), lambda g: tuple(np.take(g, i, axis=ax) for i in range(len(ts))))


def where(cond, a, b) -> Tensor:
    """Elementwise ``cond ? a : b`` (cond a boolean array, a constant); gradients flow to the chosen side."""
    cond = np.asarray(cond.data if isinstance(cond, Tensor) else cond, dtype=bool)
    a, b = _pair(a, b)
    sa, sb = a.shape, b.shape

    def backward(g):
        return (unbroadcast(np.where(cond, g, 0).astype(g.dtype), sa) if a.requires_grad else None,
                unbroadcast(np.where(cond, 0, g).astype(g.dtype), sb) if b.requires_grad else None)

    return Tensor._make(np.where(cond, a.data, b.data), (a, b), backward)


# --------------------------------------------------------------------------------------------- activations
def sigmoid(a) -> Tensor:
    """σ(a) = 1 / (1 + e^−a); dσ/da = σ(1 − σ)."""
    a = _t(a)
    out = _sigmoid(a.data)
    return Tensor._make(out, (a,), lambda g: (g * out * (1 - out),))


def silu(a) -> Tensor:
    """SiLU(a) = a·σ(a) (Llama's MLP activation); d/da = σ(a)·(1 + a·(1 − σ(a)))."""
    a = _t(a)
    ad = a.data
    s = _sigmoid(ad)
    return Tensor._make(ad * s, (a,), lambda g: (g * (s * (1 + ad * (1 - s))),))


def tanh(a) -> Tensor:
    """tanh(a); d/da = 1 − tanh²."""
    a = _t(a)
    out = np.tanh(a.data)
    return Tensor._make(out, (a,), lambda g: (g * (1 - out * out),))


def relu(a) -> Tensor:
    """max(a, 0); d/da = 1 where a > 0."""
    a = _t(a)
    ad = a.data
    return Tensor._make(np.maximum(ad, 0), (a,), lambda g: (g * (ad > 0),))


def astype(a, dtype) -> Tensor:
    """Cast; the gradient is cast back to the input's dtype."""
    a = _t(a)
    src = a.data.dtype
    return Tensor._make(a.data.astype(dtype), (a,), lambda g: (g.astype(src),))


# --------------------------------------------------------------------------------------------- Tensor's operators
def _reshape_method(self, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return reshape(self, shape)


def _transpose_method(self, *axes):
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    return transpose(self, axes or None)


def _swapaxes_method(self, a: int, b: int):
    axes = list(range(self.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return transpose(self, tuple(axes))


_OPERATORS = {
    "__add__": add, "__radd__": lambda self, other: add(other, self),
    "__sub__": sub, "__rsub__": lambda self, other: sub(other, self),
    "__mul__": mul, "__rmul__": lambda self, other: mul(other, self),
    "__truediv__": div, "__rtruediv__": lambda self, other: div(other, self),
    "__pow__": pow, "__rpow__": lambda self, base: pow(base, self),
    "__matmul__": matmul, "__rmatmul__": lambda self, other: matmul(other, self),
    "__neg__": neg, "__getitem__": getitem,
    "sum": lambda self, axis=None, keepdims=False: sum(self, axis, keepdims),
    "mean": lambda self, axis=None, keepdims=False: mean(self, axis, keepdims),
    "max": lambda self, axis=None, keepdims=False: max(self, axis, keepdims),
    "reshape": _reshape_method, "transpose": _transpose_method, "permute": _transpose_method,
    "swapaxes": _swapaxes_method, "T": property(lambda self: transpose(self, None)),
    "exp": exp, "log": log, "sqrt": sqrt, "rsqrt": rsqrt, "sigmoid": sigmoid, "silu": silu, "tanh": tanh,
    "relu": relu, "astype": astype,
}
"""Tensor's operators and methods, each one primitive of this module."""

for _name, _fn in _OPERATORS.items():
    setattr(Tensor, _name, _fn)
