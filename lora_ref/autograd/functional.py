"""Composite operations. Where speed matters they are one graph node with a fused backward rule.

Each fused rule is derived in its docstring and verified against finite differences (``lora_ref.autograd.numerical``) and
against the same function composed from primitives in ``tests/autograd/test_autograd.py``.

rms_norm, swiglu, rotary, cross_entropy and the attention softmax have two implementations on arrays (the contract
is in :mod:`lora_ref.kernels.switch`): the readable NumPy twins of :mod:`lora_ref.kernels.reference` and the compiled
kernels of :mod:`lora_ref.kernels.training` (the same formulas in one pass per row). Each composite here validates
its inputs, builds one node and asks the chooser ``kernels.pick`` once which twin fills it — forward and backward
— (``tests/kernels/test_fast_paths.py`` holds the twins equal).
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np

from lora_ref.autograd import ops
from lora_ref.autograd.ops import linear, silu  # noqa: F401  (re-exported: F.linear, F.silu)
from lora_ref.autograd.tensor import Tensor
from lora_ref.kernels import blas, switch
from lora_ref.kernels import training as kernels
from lora_ref.kernels.reference import causal_mask, rotate_half  # noqa: F401  (re-exported: F.causal_mask, …)
from lora_ref.kernels.reference import log_sum_exp as _logsumexp
from lora_ref.threads import one_blas_thread

__all__ = ["softmax", "log_softmax", "cross_entropy", "rms_norm", "linear", "silu", "dropout", "logsumexp", "swiglu",
           "causal_mask", "scaled_dot_product_attention", "rotate_half", "rotary", "lora_add"]


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
    impl = kernels.pick("cross_entropy", z)
    loss, saved = impl.cross_entropy_forward(z, t, ignore_index, n)

    def backward(g):
        return (impl.cross_entropy_backward(g, z, t, ignore_index, n, saved).reshape(logits.shape),)

    return Tensor._make(loss, (logits,), backward)


def rms_norm(x, weight, eps: float = 1e-6) -> Tensor:
    """RMSNorm as in Llama (Zhang & Sennrich 2019): y = w ⊙ x / √(mean(x²) + ε), over the last axis.

    x: (…, D), weight: (D,). Computed like transformers' ``LlamaRMSNorm`` (x · rsqrt(mean(x²) + ε) · w).
    Backward (one node), with r = 1/√(mean(x²)+ε) and x̂ = x·r:
    dL/dw = Σ_{…} g ⊙ x̂;   dL/dx = r ⊙ (h − x̂ · mean(h ⊙ x̂)), where h = g ⊙ w.
    """
    x = ops._t(x)
    weight = ops._t(weight, x)
    xd, wd = x.data, weight.data
    impl = kernels.pick("rms_norm", xd, wd)
    out, saved = impl.rms_norm_forward(xd, wd, eps)

    def backward(g):
        return impl.rms_norm_backward(g, xd, wd, saved, x.requires_grad, weight.requires_grad)

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


def swiglu(gate, up) -> Tensor:
    """SwiGLU's gating, silu(gate) ⊙ up, as one node (Shazeer 2020; Llama's MLP before ``down_proj``).

    Backward: with s = σ(gate), d/dgate = g ⊙ up ⊙ s(1 + gate(1 − s)), d/dup = g ⊙ gate ⊙ s.
    """
    gate, up = ops._pair(gate, up)
    a, u = gate.data, up.data
    impl = kernels.pick("swiglu", a, u)
    out, saved = impl.swiglu_forward(a, u)

    def backward(g):
        return impl.swiglu_backward(g, a, u, saved, gate.requires_grad, up.requires_grad)

    return Tensor._make(out, (gate, up), backward)


ATTENTION_BLOCK = 32
"""Query positions per block of causal attention, at least (:func:`_query_blocks`); with the fast paths on and
``causal``, attention over T >= 2 · ATTENTION_BLOCK new positions runs block by block and skips the masked keys.
32 rather than 64: the tutorial model's 128 positions then make 4 blocks (work 1 : 2 : 3 : 4, which two threads
share evenly, longest first) instead of 2 (work 1 : 2, one thread idle a third of the time): its training step
measured 3 % faster, interleaved in one process (median of 24 paired steps); SmolLM2's LoRA step (256 positions, 8
blocks instead of 4) the same within noise."""

MAX_ATTENTION_BLOCKS = 8


def scaled_dot_product_attention(q, k, v, causal: bool = True, scale: float | None = None) -> Tensor:
    """Attention softmax(q kᵀ · scale + mask) v with grouped-query heads, as one node.

    q: (B, H, T, E); k, v: (B, K, S, E) with H a multiple of K (GQA: each group of H/K query heads shares one
    key/value head, Ainslie et al. 2023). With ``causal``, query t (the last T of S positions, so a KV cache of
    S − T earlier positions works) attends to keys s <= t + S − T. Returns (B, H, T, E).

    Backward, with P the attention probabilities and dO the output gradient:
    dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ⊙ (dP − Σ_s dP ⊙ P),  dQ = dS K · scale,  dK = dSᵀ Q · scale
    (summed over the query heads of a group for dK and dV).

    **Causal blocks.** Query t sees only the first t + S − T + 1 keys, so for a block of queries [t0, t1) every
    key past t1 + S − T is masked for all of them: its scores, probabilities and products are never needed. With
    the fast paths on, causal attention over enough positions (:func:`_query_blocks`) runs block by block, each
    block against only the keys its last query sees, forward and backward; the probabilities kept for backward
    are the blocks on and below the diagonal (for n blocks, (n + 1) / 2n of the full T × S matrix), never the full
    matrix. With n = 8 blocks this computes 56 % of the scores, softmax and products of the full version. Each
    block is the same computation as the full one restricted to the keys it sees (the masked keys contribute
    exact zeros there), so the results agree to float32 rounding (the products' summation may be grouped
    differently by the BLAS); ``tests/kernels/test_fast_paths.py`` holds the two equal. The blocks are independent
    tasks: with two or more threads each thread takes whole blocks, the longest first, and runs a block's products
    and softmax on its own (:func:`lora_ref.kernels.blas.run_parallel`) — one hand-over between threads per
    attention forward and one per backward, instead of one per product — with the same bits as on one thread
    (dK and dV are summed over the blocks in a fixed order). FlashAttention (Dao et al. 2022) goes further and
    keeps no probabilities at all, recomputing each block in backward from the rows' log-sum-exp at the cost of one
    more product per block; we keep the blocks (not measured against recomputation).
    """
    q, k, v = ops._t(q), ops._t(k), ops._t(v)
    B, H, T, E = q.shape
    _, K, S, _ = k.shape
    if H % K:
        raise ValueError(f"attention: {H} query heads is not a multiple of {K} key/value heads")
    G = H // K
    dt = q.dtype
    sc = dt.type(1.0 / np.sqrt(E) if scale is None else scale)
    kd, vd = k.data, v.data
    # B·K products of (G·T, E) · (E, S), each too small to split between BLAS threads: with the fast paths on,
    # whole products and row chunks of them go to the threads in turn (lora_ref.kernels.blas; same bits)
    fast = switch.enabled()
    bmm = blas.batched_matmul if fast else _one_thread_matmul
    blocks = _query_blocks(T, S) if (fast and causal) else [(0, T)]
    q5 = q.data.reshape(B, K, G, T, E)  # the G query heads of a group: (B, K, G, T, E)
    out = np.empty((B, K, G, T, E), dtype=np.result_type(q.data, vd))
    saved: list = [None] * len(blocks)  # per block: (t0, t1, keys seen, its queries (B, K, G·tb, E), probabilities)
    picked: list = []

    def block(i: int, matmul) -> None:
        t0, t1 = blocks[i]
        tb, Sb = t1 - t0, S - T + t1  # the block's queries and the keys its last query sees
        qb = q5[:, :, :, t0:t1].reshape(B, K, G * tb, E)  # G heads stacked along time (a copy unless one block)
        scores = matmul(qb, kd[:, :, :Sb].swapaxes(-1, -2))  # (B, K, G·tb, Sb)
        impl = kernels.pick("attention_softmax", scores, tb)
        p = impl.attention_softmax(scores, sc, tb, causal)  # the kernel scales, masks and normalises in place
        del scores  # the readable twin's masked copy replaces it
        out[:, :, :, t0:t1] = matmul(p, vd[:, :, :Sb]).reshape(B, K, G, tb, E)
        saved[i] = (t0, t1, Sb, qb, p)
        picked.append(impl)

    if len(blocks) > 1 and blas.blas_threads() > 1:
        # the blocks are independent: the threads take whole blocks, the longest (last) first, each block's products
        # and softmax on one thread; one hand-over per attention instead of one per product (the same bits)
        blas.run_parallel([partial(block, i, np.matmul) for i in reversed(range(len(blocks)))])
    else:
        for i in range(len(blocks)):
            block(i, bmm)
    impl = picked[0]

    def backward(g):
        g5 = g.reshape(B, K, G, T, E)
        gq = np.empty((B, K, G, T, E), dtype=g.dtype) if q.requires_grad else None
        parts: list = [None] * len(saved)  # per block: its dK and dV over the keys it sees

        def block_grad(i: int, matmul) -> None:
            t0, t1, Sb, qb, p = saved[i]
            tb = t1 - t0
            gb = g5[:, :, :, t0:t1].reshape(B, K, G * tb, E)
            gv = matmul(p.swapaxes(-1, -2), gb) if v.requires_grad else None  # dV = Pᵀ dO over these keys
            dp = matmul(gb, vd[:, :, :Sb].swapaxes(-1, -2))  # (B, K, G·tb, Sb)
            ds = impl.attention_softmax_backward(dp, p, sc, tb, causal)  # the kernel turns dp into dS in place
            if gq is not None:
                gq[:, :, :, t0:t1] = matmul(ds, kd[:, :, :Sb]).reshape(B, K, G, tb, E)
            gk = matmul(ds.swapaxes(-1, -2), qb) if k.requires_grad else None
            parts[i] = (gk, gv)

        order = list(reversed(range(len(saved))))  # the last block sees every key: its dK, dV start the sums
        if len(saved) > 1 and blas.blas_threads() > 1:
            blas.run_parallel([partial(block_grad, i, np.matmul) for i in order])
        else:
            for i in order:
                block_grad(i, bmm)
        gk = gv = None
        for i in order:  # earlier blocks add to the first keys, in the same order on any number of threads
            gk = _accumulate(gk, parts[i][0]) if k.requires_grad else None
            gv = _accumulate(gv, parts[i][1]) if v.requires_grad else None
            parts[i] = None
        return (gq.reshape(B, H, T, E) if gq is not None else None), gk, gv

    return Tensor._make(out.reshape(B, H, T, E), (q, k, v), backward)


def _query_blocks(T: int, S: int) -> list[tuple[int, int]]:
    """Blocks [t0, t1) of the T query positions for causal attention: one block below 2 · ATTENTION_BLOCK
    positions; else up to MAX_ATTENTION_BLOCKS blocks of about equal size (at least ATTENTION_BLOCK positions),
    inner edges on multiples of 16 (whole 512-bit vectors of keys for the softmax kernel). More blocks skip more
    masked keys but make smaller products."""
    n = min(MAX_ATTENTION_BLOCKS, T // ATTENTION_BLOCK)
    if n < 2:
        return [(0, T)]
    edges = [0] + [min(T, (i * T // n + 8) // 16 * 16) for i in range(1, n)] + [T]  # nearest multiple of 16
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _accumulate(acc: np.ndarray | None, part: np.ndarray) -> np.ndarray:
    """acc[:, :, :n] += part, part (B, K, n, E) one block's dK or dV over the n keys it sees; the first part (the
    last block's, over every key) becomes the sum."""
    if acc is None:
        return part
    acc[:, :, :part.shape[2]] += part
    return acc


def _one_thread_matmul(a, b):
    """``np.matmul`` on one BLAS thread (attention's products with the fast paths off)."""
    with one_blas_thread():
        return np.matmul(a, b)


def rotary(x, cos: np.ndarray, sin: np.ndarray) -> Tensor:
    """Apply rotary position embedding (RoPE, Su et al. 2021) as one node: x·cos + rotate_half(x)·sin.

    x: (B, H, T, E); cos, sin: (T, E) or broadcastable, constants (see ``lora_ref.modeling.llama`` for how they are made).
    Backward: rotate_half is a linear map R with Rᵀ[y1, y2] = [y2, −y1], so dL/dx = g·cos + Rᵀ(g·sin).
    """
    x = ops._t(x)
    xd = x.data
    cos = np.asarray(cos, dtype=xd.dtype)
    sin = np.asarray(sin, dtype=xd.dtype)
    impl = kernels.pick("rotary", xd, cos, sin)
    out, saved = impl.rotary_forward(xd, cos, sin)

    def backward(g):
        return (impl.rotary_backward(g, xd, cos, sin, saved),)

    return Tensor._make(out, (x,), backward)



def lora_add(base_out, x, lora_A, lora_B, scaling: float) -> Tensor:
    """base_out + s·(x·Aᵀ)·Bᵀ as one node: a LoRA layer's output (Hu et al. 2021, Eq. 3; PEFT's order: A, then B,
    then × s, then added to the base layer's output).

    base_out: (…, out); x: (…, in); lora_A: (R, in); lora_B: (out, R). The same products and additions as
    ``base_out + B(A(x)) * s`` composed from four nodes, in the same order (so the same float32 results), but the
    sum is written into ``base_out``'s buffer and only x·Aᵀ (…, R) is kept for backward; the composed version keeps
    two more (…, out) arrays per layer until backward. The caller guarantees that nothing needs ``base_out``'s
    values any more (a Linear or 4-bit layer's backward does not read its output). Backward, with gs = s·g:
    d(base_out) = g,  dB = gsᵀ (x Aᵀ),  d(xAᵀ) = gs B,  dA = d(xAᵀ)ᵀ x,  dx = d(xAᵀ) A.
    """
    x = ops._t(x)
    A, B = ops._t(lora_A, x), ops._t(lora_B, x)
    xd, ad, bd = x.data, A.data, B.data
    out = base_out.data
    x2 = xd.reshape(-1, xd.shape[-1])  # (N, in)
    s = out.dtype.type(scaling)
    # s a power of two (α/r = 2 by default): multiplying by it is exact, so s may scale the small (N, R) and (out, R)
    # arrays instead of the (N, out) ones, with the same bits (short of subnormal numbers) and one pass less over
    # (N, out) forward and one backward
    exact = math.frexp(float(scaling))[0] == 0.5
    with one_blas_thread():  # rank-R products: a second BLAS thread costs more than it saves
        xa = x2 @ ad.T  # (N, R)
        delta = ((xa * s) if exact else xa) @ bd.T  # (N, out)
    if not exact:
        delta *= s
    out += delta.reshape(out.shape)  # (…, out), in place

    def backward(g):
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gs = g2 if exact else g2 * s  # s·g, or s applied to the products below when that is exact
        with one_blas_thread():
            gb = (gs.T @ xa) if B.requires_grad else None  # (out, R)
            gxa = gs @ bd  # (N, R)
            if exact:
                gb = gb * s if gb is not None else None
                gxa *= s
            ga = (gxa.T @ x2) if A.requires_grad else None  # (R, in)
            gx = (gxa @ ad).reshape(xd.shape) if x.requires_grad else None  # (…, in)
        return g, gx, ga, gb

    return Tensor._make(out, (base_out, x, A, B), backward)
