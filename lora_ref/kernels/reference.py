"""The readable NumPy twins of the compiled kernels in :mod:`lora_ref.kernels.training` and :mod:`lora_ref.kernels.matmul`.

Every function here has a compiled twin with the same name and signature (:mod:`lora_ref.kernels.switch` states the
contract; ``tests/kernels/test_twin_registry.py`` checks it). These are the versions taught in the notebooks and the
ones the reference vectors are computed with: NumPy written the way the equation reads, one operator per line.

Twins take and return arrays; they never build graph nodes. A forward function returns ``(out, saved)``: ``saved``
is what its own backward needs, in the form that backward reads (the twins keep different things: the readable
RMSNorm keeps x̂, the kernel only 1/rms), so a node is always filled by the forward *and* the backward of the same
twin (the composites in :mod:`lora_ref.autograd.functional` choose once per node). Backward functions return the
input gradients (``None`` where one is not needed).
"""

from __future__ import annotations

import numpy as np

from lora_ref.kernels.jit import HAS_AVX512

__all__ = [
    "sigmoid", "log_sum_exp", "causal_mask", "rotate_half",
    "swiglu_forward", "swiglu_backward", "rms_norm_forward", "rms_norm_backward", "rotary_forward",
    "rotary_backward", "attention_softmax", "attention_softmax_backward", "cross_entropy_forward",
    "cross_entropy_backward", "embedding_grad", "adamw_update",
    "MR", "NR", "KC", "check_matmul_operands", "matmul", "check_attention_rows",
]


# ================================================================================================ helpers
def sigmoid(x: np.ndarray) -> np.ndarray:
    """σ(x) = 1 / (1 + e^−x), computed from e^−|x| only, so no overflow for either sign; x's dtype."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def log_sum_exp(x: np.ndarray, axis: int) -> np.ndarray:
    """log Σ exp(x) along ``axis`` (kept as a length-1 axis), shifted by the maximum; rows of −inf give −inf."""
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    return m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


def causal_mask(T: int, S: int) -> np.ndarray:
    """Boolean (T, S) mask of allowed positions: query i (the last T of S positions) sees keys j <= i + S − T."""
    return np.arange(S)[None, :] <= (np.arange(T)[:, None] + (S - T))


def rotate_half(x: np.ndarray) -> np.ndarray:
    """[x1, x2] → [−x2, x1] over the last axis split in halves (the convention of transformers' Llama)."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


# ================================================================================================ SwiGLU
def swiglu_forward(a: np.ndarray, u: np.ndarray):
    """out = silu(a) ⊙ u = a·σ(a)·u (Shazeer 2020). Keeps σ(a) and silu(a) for backward."""
    s = sigmoid(a)
    act = a * s
    return act * u, (s, act)


def swiglu_backward(g, a, u, saved, need_a: bool, need_u: bool):
    """d/da = g ⊙ u ⊙ σ(a)(1 + a(1 − σ(a))),  d/du = g ⊙ silu(a)."""
    s, act = saved
    ga = (g * u * (s * (1 + a * (1 - s)))) if need_a else None
    gu = (g * act) if need_u else None
    return ga, gu


# ================================================================================================ RMSNorm
def rms_norm_forward(x: np.ndarray, w: np.ndarray, eps: float):
    """y = x̂ ⊙ w with x̂ = x·r, r = 1/√(mean(x²) + ε) over the last axis (transformers' ``LlamaRMSNorm``).
    Keeps r (…, 1) and x̂ (…, D)."""
    dt = x.dtype
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + dt.type(eps))  # (…, 1)
    xhat = x * r  # (…, D)
    return xhat * w, (r, xhat)


def rms_norm_backward(g, x, w, saved, need_x: bool, need_w: bool):
    """dL/dw = Σ_{…} g ⊙ x̂;  dL/dx = r ⊙ (h − x̂ · mean(h ⊙ x̂)) with h = g ⊙ w."""
    r, xhat = saved
    gx = gw = None
    if need_w:
        gw = (g * xhat).reshape(-1, x.shape[-1]).sum(axis=0)
    if need_x:
        h = g * w
        gx = r * (h - xhat * np.mean(h * xhat, axis=-1, keepdims=True))
    return gx, gw


# ================================================================================================ rotary
def rotary_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray):
    """RoPE (Su et al. 2021): x·cos + rotate_half(x)·sin. Keeps nothing (cos and sin are constants)."""
    return x * cos + rotate_half(x) * sin, ()


def rotary_backward(g, x, cos, sin, saved):
    """rotate_half is a linear map R with Rᵀ[y1, y2] = [y2, −y1], so dL/dx = g·cos + Rᵀ(g·sin)."""
    h = x.shape[-1] // 2
    gs = g * sin
    return g * cos + np.concatenate([gs[..., h:], -gs[..., :h]], axis=-1)


# ================================================================================================ attention softmax
def check_attention_rows(shape: tuple, T: int, causal: bool) -> None:
    """``ValueError`` unless attention scores of ``shape`` (…, G·T, S) fit the ``causal`` mask: whole groups of T
    queries, the last T of S positions (1 <= T <= S). Without the mask T plays no part and any (…, R, S) is
    accepted. Both twins check it (the compiled one would otherwise index outside a row)."""
    if len(shape) < 2:
        raise ValueError(f"attention softmax: scores of shape {tuple(shape)} are not (..., rows, keys)")
    R, S = shape[-2], shape[-1]
    if causal and (not 1 <= T <= S or R % T):
        raise ValueError(f"attention softmax: causal scores of shape {tuple(shape)} are not (..., G*T, S) with "
                         f"T = {T} queries, the last T of S positions (1 <= T <= S)")


def attention_softmax(scores: np.ndarray, scale, T: int, causal: bool) -> np.ndarray:
    """softmax(scores · scale) over the last axis, masked keys (``causal``) at −∞ before it, so at 0 after.

    scores (…, G·T, S): G query heads stacked along time, each of T queries (the last T of S positions).
    May scale ``scores`` in place; returns the probabilities.
    """
    check_attention_rows(scores.shape, T, causal)
    scores *= scale
    if causal:
        S = scores.shape[-1]
        allowed = np.tile(causal_mask(T, S), (scores.shape[-2] // T, 1))  # (G·T, S)
        scores = np.where(allowed, scores, scores.dtype.type(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def attention_softmax_backward(dp: np.ndarray, p: np.ndarray, scale, T: int, causal: bool) -> np.ndarray:
    """The scores' gradient dS = P ⊙ (dP − Σ_s dP ⊙ P) · scale (0 at masked keys, where P is 0)."""
    check_attention_rows(p.shape, T, causal)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    ds *= scale
    return ds


# ================================================================================================ cross-entropy
def cross_entropy_forward(z: np.ndarray, t: np.ndarray, ignore_index: int, n: int):
    """Mean over the n kept rows of log Σ_j e^{z_ij} − z_{i,t_i}; z (N, V), t (N,). Returns (0-d loss, saved)."""
    keep = t != ignore_index
    rows = np.nonzero(keep)[0]
    lse = log_sum_exp(z, axis=-1)[:, 0]  # (N,)
    loss = (lse[rows] - z[rows, t[rows]]).sum() / n
    return np.asarray(loss, dtype=z.dtype), (lse, rows, keep)


def cross_entropy_backward(g, z, t, ignore_index: int, n: int, saved) -> np.ndarray:
    """dL/dz = (softmax(z) − onehot(t)) · g / n, zero on ignored rows; (N, V)."""
    lse, rows, keep = saved
    dt = z.dtype
    grad = np.exp(z - lse[:, None])  # softmax, (N, V)
    grad[rows, t[rows]] -= 1
    if n != len(t):
        grad[~keep] = 0
    grad *= dt.type(g) / dt.type(n)
    return grad


# ================================================================================================ embedding
def embedding_grad(ids: np.ndarray, g: np.ndarray, V: int, dtype) -> np.ndarray:
    """The (V, D) gradient of an embedding gather at ``ids``: rows of g (…, D) added at their ids (repeats
    accumulate, in order)."""
    D = g.shape[-1]
    full = np.zeros((V, D), dtype)
    np.add.at(full, ids.reshape(-1), g.reshape(-1, D))
    return full


# ================================================================================================ AdamW
def adamw_update(w, g, m, v, decay, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, step) -> None:
    """One AdamW step in place (Loshchilov & Hutter, Algorithm 2; the order of ``torch.optim.AdamW``)::

        w ← w·decay;  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;  w ← w − (m / (√v / √(1 − β2ᵗ) + ε)) · step

    with ``decay = 1 − lr·λ`` and ``step = lr / (1 − β1ᵗ)``, every scalar in w's dtype.
    """
    if decay != 1:
        w *= decay  # p ← p − lr·λ·p
    m *= b1  # m ← β1·m + (1 − β1)·g
    m += one_minus_b1 * g
    v *= b2  # v ← β2·v + (1 − β2)·g²
    v += one_minus_b2 * g * g
    denom = np.sqrt(v)  # √v / √(1 − β2ᵗ) + ε
    denom /= bc2_sqrt
    denom += eps
    upd = np.divide(m, denom)
    upd *= step
    w -= upd


# ================================================================================================ matmul
MR = 6     # rows of the register tile
NR = 64 if HAS_AVX512 else 16
"""Columns of the register tile: 4 AVX-512 vectors of 16 float32 (6 × 64 = 24 of the 32 registers), or, on CPUs
without AVX-512 (and under ``NUMBA_DISABLE_JIT=1``), 2 AVX2 vectors of 8 (6 × 16 = 12 of the 16 registers)."""
KC = 1024  # length of a K chunk: a B micro-panel is KC·NR·4 bytes (256 KiB, 64 KiB with NR = 16), kept in the L2 cache


def check_matmul_operands(a: np.ndarray, b: np.ndarray) -> None:
    """``ValueError`` unless a (M, K) and b (K, N) are 2-D float32 arrays."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, np.ndarray) or t.dtype != np.float32 or t.ndim != 2:
            raise ValueError(f"matmul: {name} must be a 2-D float32 array, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} with shape {getattr(t, 'shape', None)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: inner dimensions differ: a {a.shape} @ b {b.shape}")


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C = A @ B computed tile by tile with NumPy: the readable twin of :func:`lora_ref.kernels.matmul.matmul`.

    Parameters: ``a`` (M, K) float32, ``b`` (K, N) float32. Returns (M, N) float32.
    The loops are the kernel's loops (K chunks of ``KC``, column panels of ``NR``, row panels of ``MR``);
    each tile product is one ``np.matmul``.
    """
    check_matmul_operands(a, b)
    M, K = a.shape
    N = b.shape[1]
    c = np.zeros((M, N), np.float32)                                # (M, N)
    for k0 in range(0, K, KC):
        for j0 in range(0, N, NR):
            bp = b[k0:k0 + KC, j0:j0 + NR]                          # (kc, nr) micro-panel of B
            for i0 in range(0, M, MR):
                ap = a[i0:i0 + MR, k0:k0 + KC]                      # (mr, kc) micro-panel of A
                c[i0:i0 + MR, j0:j0 + NR] += ap @ bp                # (mr, nr) tile
    return c
