"""The readable NumPy twins of the one-token decode kernels in :mod:`lora_ref.kernels.decode`.

Generating text feeds one token at a time through the model (:mod:`lora_ref.modeling.decode`). For that one row
every weight matrix is read once and used for one matrix-vector product (a GEMV): the step is bound by memory
bandwidth, not arithmetic. These functions say what one decoder layer and the head compute for one position, one
NumPy line per equation; the compiled twins compute the same in fewer passes over memory (and without temporary
arrays): the order of float32 additions differs, and on AVX2 CPUs without AVX-512 a 4-bit block's scale
multiplies the block's partial sum instead of each weight, so the results agree within float32 rounding.

Weights come in two kinds, a float32 matrix (N, K) or a 4-bit one (:class:`Weight4bit`: bitsandbytes' packed
NF4/FP4 codes, blockwise scales, optionally double-quantized scales [QLoRA] Dettmers et al. 2023, Eq. 5-6); a layer
takes seven of one kind, in the order q, k, v, o, gate, up, down. The key/value cache of a layer is a preallocated
pair of arrays (K heads, capacity, Dh): the step writes position ``pos`` and attends over positions 0 … pos.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Weight4bit", "dequantize_weight4bit", "layer_step", "head_step", "decode_step"]


class Weight4bit(NamedTuple):
    """A 4-bit weight W (N, K) as the decode kernels read it: every field a plain array or number.

    ``packed`` uint8[N·K/2] (first element in the high nibble), ``code`` the 16 float32 values of the quant type,
    ``blocksize``. The block scales are either ``absmax`` float32[N·K/blocksize] (``nested`` False), or
    double-quantized (``nested`` True): scale_b = code2[qabsmax_b] · absmax2[b // blocksize2] + offset, each step in
    float32 as bitsandbytes dequantizes them (``absmax`` is then empty).
    """

    packed: np.ndarray
    absmax: np.ndarray
    qabsmax: np.ndarray
    absmax2: np.ndarray
    code2: np.ndarray
    offset: np.float32
    blocksize2: int
    code: np.ndarray
    blocksize: int
    nested: bool
    n: int
    k: int


def _block_scales(w: Weight4bit) -> np.ndarray:
    """float32[N·K/blocksize]: the scale of every block (dequantized from the nested state when double-quantized)."""
    if not w.nested:
        return w.absmax
    nb = w.qabsmax.shape[0]
    return w.code2[w.qabsmax] * w.absmax2[np.arange(nb) // w.blocksize2] + np.float32(w.offset)


def dequantize_weight4bit(w: Weight4bit) -> np.ndarray:
    """float32 (N, K): element i is code[c_i] · scale[i // blocksize], c_i the i-th nibble, high first."""
    n = w.n * w.k
    codes = np.stack([w.packed >> 4, w.packed & 15], axis=1).reshape(-1)[:n]  # (N·K,) one code per element
    scales = _block_scales(w)[np.arange(n) // w.blocksize]                   # (N·K,) each element's block scale
    flat = w.code[codes] * scales                                            # (N·K,) float32 products
    return flat.reshape(w.n, w.k)


def _matvec(w, x: np.ndarray) -> np.ndarray:
    """W x for one vector x (K,): W float32 (N, K) or a :class:`Weight4bit`."""
    if isinstance(w, Weight4bit):
        w = dequantize_weight4bit(w)
    return w @ x                                                             # (N,)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """x / √(mean(x²) + ε) ⊙ w, one vector (transformers' ``LlamaRMSNorm``)."""
    r = np.float32(1.0) / np.sqrt(np.mean(x * x) + np.float32(eps))
    return (x * r) * w


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each head of x (heads, Dh) at one position: x ⊙ cos + rotate_half(x) ⊙ sin."""
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[:, h:], x[:, :h]], axis=-1) * sin


def layer_step(x, norms, weights, cache_k, cache_v, pos, cos, sin, eps, scale) -> None:
    """One decoder layer for the token at position ``pos``: updates ``x`` (D,) and the cache in place.

    ``norms`` (input_layernorm, post_attention_layernorm) float32 (D,) each; ``weights`` the seven projections
    (q, k, v, o, gate, up, down), all float32 matrices or all :class:`Weight4bit`; ``cache_k`` / ``cache_v``
    float32 (K, capacity, Dh), positions < ``pos`` already filled; ``cos`` / ``sin`` (Dh,) of position ``pos``;
    ``scale`` = 1/√Dh. Query head h reads key/value head h // (H/K) (grouped-query attention)::

        h = RMSNorm(x);  q, k, v = Wq h, Wk h, Wv h;  rotate q and k;  cache[pos] = k, v
        x += Wo · concat_h softmax(q_h · K_{0..pos}ᵀ · scale) V_{0..pos}
        h = RMSNorm(x);  x += Wdown (silu(Wgate h) ⊙ Wup h)
    """
    wq, wk, wv, wo, wg, wu, wd = weights
    KV, _, Dh = cache_k.shape
    h = _rms_norm(x, norms[0], eps)                                         # (D,)
    q = _matvec(wq, h).reshape(-1, Dh)                                      # (H, Dh)
    k = _matvec(wk, h).reshape(KV, Dh)                                      # (K, Dh)
    v = _matvec(wv, h).reshape(KV, Dh)                                      # (K, Dh)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    cache_k[:, pos] = k
    cache_v[:, pos] = v
    H = q.shape[0]
    keys = np.repeat(cache_k[:, :pos + 1], H // KV, axis=0)                 # (H, S, Dh): head h reads h // G
    values = np.repeat(cache_v[:, :pos + 1], H // KV, axis=0)               # (H, S, Dh)
    scores = np.einsum("hd,hsd->hs", q, keys) * np.float32(scale)           # (H, S)
    p = np.exp(scores - scores.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)                                       # softmax over the S positions
    attn = np.einsum("hs,hsd->hd", p, values).reshape(-1)                   # (H·Dh,) heads side by side
    x += _matvec(wo, attn)
    h = _rms_norm(x, norms[1], eps)
    g, u = _matvec(wg, h), _matvec(wu, h)                                   # (F,) each
    x += _matvec(wd, g / (np.float32(1.0) + np.exp(-g)) * u)                # SwiGLU: silu(g) ⊙ u, then down


def head_step(x, norm, eps, weight, out) -> None:
    """The logits of one position: ``out`` (V,) = W · RMSNorm(x), W the head (V, D) float32 or 4-bit."""
    out[:] = _matvec(weight, _rms_norm(x, norm, eps))


def decode_step(x, norms, weights, cache_k, cache_v, pos, cos, sin, eps, scale, final_norm, head, out) -> None:
    """One token through every layer and the head: layer l is :func:`layer_step` with ``norms[l]`` (2, D),
    ``weights[7l:7l + 7]``, ``cache_k[l]`` and ``cache_v[l]`` (the caches (L, K, capacity, Dh)); then
    :func:`head_step` writes the logits into ``out`` (V,)."""
    for layer in range(norms.shape[0]):
        seven = [weights[i] for i in range(7 * layer, 7 * layer + 7)]
        layer_step(x, norms[layer], seven, cache_k[layer], cache_v[layer], pos, cos, sin, eps, scale)
    head_step(x, final_norm, eps, head, out)
