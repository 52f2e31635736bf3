"""Composite operations. Where speed matters they are one graph node with a fused backward rule.

Each fused rule is derived in its docstring and verified against finite differences (``lora_ref.gradcheck``) and
against the same function composed from primitives in ``tests/test_autograd.py``.
"""

from __future__ import annotations

import numpy as np

from lora_ref import ops
from lora_ref.ops import linear, silu  # noqa: F401  (re-exported: F.linear, F.silu)
from lora_ref.tensor import Tensor

__all__ = ["softmax", "log_softmax", "cross_entropy", "rms_norm", "linear", "silu", "dropout", "logsumexp"]


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def logsumexp(x, axis: int = -1, keepdims: bool = False) -> Tensor:
    """log Σ exp(x) along ``axis`` (stable); d/dx = softmax(x)."""
    x = ops._t(x)
    lse = _logsumexp(x.data, axis)

    def backward(g):
        gk = g if keepdims else np.expand_dims(g, axis)
        return (gk * np.exp(x.data - lse),)

    return Tensor._make(lse if keepdims else np.squeeze(lse, axis=axis), (x,), backward)


def softmax(x, axis: int = -1) -> Tensor:
    """softmax(x)ᵢ = e^{xᵢ} / Σⱼ e^{xⱼ}; entries equal to −inf get probability 0 (attention masks).

    Backward (one node): with p = softmax(x), dL/dx = p ⊙ (g − Σⱼ gⱼ pⱼ).
    """
    x = ops._t(x)
    xd = x.data
    m = np.max(xd, axis=axis, keepdims=True)
    e = np.exp(xd - m)
    p = e / np.sum(e, axis=axis, keepdims=True)

    def backward(g):
        return (p * (g - np.sum(g * p, axis=axis, keepdims=True)),)

    return Tensor._make(p, (x,), backward)


def log_softmax(x, axis: int = -1) -> Tensor:
    """log softmax(x) = x − logsumexp(x); backward: g − softmax(x) · Σ g."""
    x = ops._t(x)
    out = x.data - _logsumexp(x.data, axis)

    def backward(g):
        return (g - np.exp(out) * np.sum(g, axis=axis, keepdims=True),)

    return Tensor._make(out, (x,), backward)


def cross_entropy(logits, targets, ignore_index: int = -100) -> Tensor:
    """Mean negative log-likelihood of integer ``targets`` under ``softmax(logits)``.

    logits: (N, V) or (B, T, V); targets: int array (N,) or (B, T). Targets equal to ``ignore_index`` are left out
    of the mean (as in ``torch.nn.functional.cross_entropy``).

    Backward (one node): dL/dlogits = (softmax(logits) − onehot(targets)) / n_kept, zero on ignored rows.
    """
    logits = ops._t(logits)
    t = np.asarray(targets.data if isinstance(targets, Tensor) else targets)
    if t.dtype.kind not in "iu":
        raise ValueError(f"cross_entropy targets must be integers, got dtype {t.dtype}")
    V = logits.shape[-1]
    if logits.shape[:-1] != t.shape:
        raise ValueError(f"cross_entropy: logits shape {logits.shape} does not fit targets shape {t.shape}")
    z = logits.data.reshape(-1, V)  # (N, V)
    t = t.reshape(-1)  # (N,)
    keep = t != ignore_index
    if np.any((t[keep] < 0) | (t[keep] >= V)):
        raise ValueError(f"cross_entropy: targets must lie in [0, {V}) or equal ignore_index={ignore_index}")
    n = int(keep.sum())
    if n == 0:
        raise ValueError("cross_entropy: every target is ignore_index")
    rows = np.nonzero(keep)[0]
    lse = _logsumexp(z, axis=-1)[:, 0]  # (N,)
    loss = (lse[rows] - z[rows, t[rows]]).sum() / n
    dt = z.dtype

    def backward(g):
        grad = np.exp(z - lse[:, None])  # softmax, (N, V)
        grad[rows, t[rows]] -= 1
        if n != len(t):
            grad[~keep] = 0
        grad *= dt.type(g) / dt.type(n)
        return (grad.reshape(logits.shape),)

    return Tensor._make(np.asarray(loss, dtype=dt), (logits,), backward)


def rms_norm(x, weight, eps: float = 1e-6) -> Tensor:
    """RMSNorm as in Llama (Zhang & Sennrich 2019): y = w ⊙ x / √(mean(x²) + ε), over the last axis.

    x: (…, D), weight: (D,). Computed like transformers' ``LlamaRMSNorm`` (x · rsqrt(mean(x²) + ε) · w).
    Backward (one node), with r = 1/√(mean(x²)+ε) and x̂ = x·r:
    dL/dw = Σ_{…} g ⊙ x̂;   dL/dx = r ⊙ (h − x̂ · mean(h ⊙ x̂)), where h = g ⊙ w.
    """
    x = ops._t(x)
    weight = ops._t(weight, x)
    xd, wd = x.data, weight.data
    dt = xd.dtype
    r = 1.0 / np.sqrt(np.mean(xd * xd, axis=-1, keepdims=True) + dt.type(eps))  # (…, 1)
    xhat = xd * r  # (…, D)
    out = xhat * wd

    def backward(g):
        gx = gw = None
        if weight.requires_grad:
            gw = (g * xhat).reshape(-1, xd.shape[-1]).sum(axis=0)
        if x.requires_grad:
            h = g * wd
            gx = r * (h - xhat * np.mean(h * xhat, axis=-1, keepdims=True))
        return gx, gw

    return Tensor._make(out, (x, weight), backward)


def dropout(x, p: float, rng: np.random.Generator | None, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability ``p`` and scale the rest by 1/(1−p).

    Identity when ``p == 0`` or not ``training``. ``rng`` is required when dropout is active.
    """
    if not training or p == 0:
        return ops._t(x)
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
    if rng is None:
        raise ValueError("dropout needs an explicit rng (np.random.Generator) when active")
    x = ops._t(x)
    mask = (rng.random(x.shape) >= p).astype(x.dtype) / x.dtype.type(1 - p)
    return ops.mul(x, mask)
