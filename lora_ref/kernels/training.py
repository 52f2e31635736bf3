"""Fused Numba kernels of the training step (the fast paths), on arrays, and their chooser :func:`pick`.

Each public function here has a readable twin with the same name and signature in :mod:`lora_ref.kernels.reference`
(the contract: :mod:`lora_ref.kernels.switch`): ``rms_norm_forward`` / ``rms_norm_backward``, ``swiglu_*``,
``rotary_*``, ``attention_softmax`` / ``attention_softmax_backward``, ``cross_entropy_*``, ``embedding_grad`` and
``adamw_update``. They take and return arrays; the graph nodes are built by the composites of
:mod:`lora_ref.autograd.functional` and :mod:`lora_ref.autograd.ops` (and AdamW's update by
:class:`lora_ref.training.optim.AdamW`), which ask :func:`pick` which twin fills the node. The twins compute the
same formulas in the same order of operations; they differ only where a compiled ``exp`` or a sum's order rounds
differently (a few float32 ulps), which ``tests/kernels/test_fast_paths.py`` bounds.

What the fusion buys, on the tutorial model's batch (B·T = 4096 rows):

- one pass over each row instead of one NumPy temporary per operator: RMSNorm's backward is 7 NumPy operations
  over (B, T, D), SwiGLU's 9 over (B, T, F), the masked softmax 6 over (B, H, T, T);
- less kept for backward: RMSNorm keeps ``1/rms`` (B·T floats) instead of x̂ (B·T·D), SwiGLU keeps nothing
  beyond its inputs (σ(gate) is recomputed), the masked attention rows are never filled with −∞;
- layouts: the rotary gradient is written in the layout of its input (the projection's (B, T, H, E) memory seen
  as (B, H, T, E)), so the transposes and reshapes on the way back to the projection are free views.

Kernels are float32 only (constants are float32, so nothing is silently computed in float64), parallel over rows
(``prange``), and cached on disk (``cache=True``). Reductions whose result is summed across rows (RMSNorm's weight
gradient) use a fixed number of row chunks, so results do not depend on the thread count.

Four kernels whose loops compute exponentials (SwiGLU both ways, the attention softmax, the cross-entropy forward) ask
LLVM for 512-bit vectors (:func:`lora_ref.kernels.jit.prefer_wide_vectors`; LLVM's tuning for Intel server cores
stays at 256 bits otherwise). The same operations on more lanes give the same results: bit for bit against the
256-bit build on finite inputs, only a NaN's sign bit can differ (``tests/kernels/test_fast_paths.py``). Against
that build, one thread, interleaved: SwiGLU forward 0.58-0.75 and backward 0.18-0.69 of the time; the softmax
0.63-0.91 on most shapes but no gain on 4096 causal rows of 128 keys in groups of T = 64 (0.96-1.03); the
cross-entropy forward 0.80. RMSNorm and the cross-entropy backward got slower with wide vectors (1.1-1.5 and 1.9-2.8
of the time) and keep LLVM's choice. The softmax's rows (forward and backward) run to the causal limit rounded up
to a multiple of 64 keys, which LLVM's 512-bit loops take at a time, so a row whose keys are a multiple of 64 ends
in no scalar tail (it was 16).
"""

from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba import config, njit, prange, types
from numba.extending import intrinsic

from lora_ref.kernels import reference, switch
from lora_ref.kernels.jit import prefer_wide_vectors

__all__ = [
    "swiglu_forward", "swiglu_backward", "rms_norm_forward", "rms_norm_backward", "rotary_forward",
    "rotary_backward", "attention_softmax", "attention_softmax_backward", "cross_entropy_forward",
    "cross_entropy_backward", "embedding_grad", "adamw_update", "exp32", "pick", "PICK",
]

F32 = np.float32
_CHUNKS = 64  # row chunks of a cross-row reduction: a constant, so the sum's order does not depend on threads


# ================================================================================================ exp and sums
# Numba calls libm's scalar expf, which LLVM cannot vectorize (and there is no SVML here): in the softmax and the
# sigmoid it cost more than the rest of the kernel. exp32 is Cephes' expf written so that it vectorizes:
#   e^x = 2^n · e^r,  n = round(x·log2 e),  r = x − n·ln 2 (ln 2 split in two for exactness),
#   e^r ≈ 1 + r + r²·P(r) (degree-5 minimax polynomial on |r| ≤ ln2/2),
# and 2^n built directly as float32 bit patterns ((m + 127) << 23 is 2^m), in two halves so that each is a normal
# float. Error ≤ 2 ulp (tested); 0 below −103.97 (where e^x rounds to 0), +inf above 88.72; NaN stays NaN.
def _bits_to_f32_py(n):
    return np.array(n, dtype=np.int32).view(np.float32)[()]


if config.DISABLE_JIT:
    _bits_to_f32 = _bits_to_f32_py
else:
    @intrinsic
    def _bits_to_f32(typingctx, n):
        """Reinterpret the low 32 bits of an integer as a float32 (an LLVM bitcast: vectorizes)."""
        def codegen(context, builder, signature, args):
            v = args[0]
            if v.type.width > 32:
                v = builder.trunc(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())
        return types.float32(n), codegen

_LOG2E, _LN2_HI, _LN2_LO = F32(1.44269504088896341), F32(0.693359375), F32(-2.12194440e-4)
_P = (F32(1.9875691500e-4), F32(1.3981999507e-3), F32(8.3334519073e-3), F32(4.1665795894e-2),
      F32(1.6666665459e-1), F32(5.0000001201e-1))
_EXP_LO, _EXP_HI = F32(-103.972084), F32(88.72284)  # e^x rounds to 0 below, overflows above


@njit(cache=True, inline="always")
def exp32(x):
    """e^x for a float32 x, in vectorizable float32 arithmetic (see the comment above)."""
    xc = min(max(x, _EXP_LO), _EXP_HI)
    fx = np.floor(xc * _LOG2E + F32(0.5))  # n, as a float
    r = (xc - fx * _LN2_HI) - fx * _LN2_LO
    z = r * r
    y = (((((_P[0] * r + _P[1]) * r + _P[2]) * r + _P[3]) * r + _P[4]) * r + _P[5]) * z + r + F32(1.0)
    n = np.int32(fx)
    n1 = n >> 1  # 2^n = 2^n1 · 2^(n − n1): both factors are normal floats for every n in [−150, 128]
    y = (y * _bits_to_f32((n1 + 127) << 23)) * _bits_to_f32((n - n1 + 127) << 23)
    if x < _EXP_LO:
        y = F32(0.0)
    if x > _EXP_HI:
        y = F32(np.inf)
    return y


@njit(cache=True, inline="always")
def _dot_row(a, b, i, n):
    """Σ_{j<n} a[i, j]·b[i, j] with eight running sums (breaks the add chain; pairs them like NumPy's sum)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = F32(0.0)
    k = 0
    while k + 8 <= n:
        s0 += a[i, k] * b[i, k]
        s1 += a[i, k + 1] * b[i, k + 1]
        s2 += a[i, k + 2] * b[i, k + 2]
        s3 += a[i, k + 3] * b[i, k + 3]
        s4 += a[i, k + 4] * b[i, k + 4]
        s5 += a[i, k + 5] * b[i, k + 5]
        s6 += a[i, k + 6] * b[i, k + 6]
        s7 += a[i, k + 7] * b[i, k + 7]
        k += 8
    tot = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    while k < n:
        tot += a[i, k] * b[i, k]
        k += 1
    return tot


@njit(cache=True, inline="always")
def _max_row(r, n):
    """max_{j<n} r[j] of a 1-D row with eight running maxima (a single running maximum does not vectorize)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = F32(-np.inf)
    k = 0
    while k + 8 <= n:
        m0 = max(m0, r[k])
        m1 = max(m1, r[k + 1])
        m2 = max(m2, r[k + 2])
        m3 = max(m3, r[k + 3])
        m4 = max(m4, r[k + 4])
        m5 = max(m5, r[k + 5])
        m6 = max(m6, r[k + 6])
        m7 = max(m7, r[k + 7])
        k += 8
    m = max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))
    while k < n:
        m = max(m, r[k])
        k += 1
    return m


@njit(cache=True, inline="always")
def _sum_row(a, i, n):
    """Σ_{j<n} a[i, j] with eight running sums."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = F32(0.0)
    k = 0
    while k + 8 <= n:
        s0 += a[i, k]
        s1 += a[i, k + 1]
        s2 += a[i, k + 2]
        s3 += a[i, k + 3]
        s4 += a[i, k + 4]
        s5 += a[i, k + 5]
        s6 += a[i, k + 6]
        s7 += a[i, k + 7]
        k += 8
    tot = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
    while k < n:
        tot += a[i, k]
        k += 1
    return tot


# ================================================================================================ SwiGLU
@njit(cache=True, inline="always")
def _sigmoid32(x):
    """σ(x) = 1 / (1 + e^−x) in float32, with the vectorizable exp32."""
    return F32(1.0) / (F32(1.0) + exp32(-x))


@njit(cache=True, parallel=True, nogil=True)
def _swiglu_forward_kernel(a, u, out):
    """out = silu(a) ⊙ u = a·σ(a)·u.  a, u, out: float32 (N, F) C-contiguous."""
    N, Fd = a.shape
    for i in prange(N):
        prefer_wide_vectors()
        for j in range(Fd):
            x = a[i, j]
            out[i, j] = (x * _sigmoid32(x)) * u[i, j]


@njit(cache=True, parallel=True, nogil=True)
def _swiglu_backward_kernel(g, a, u, ga, gu):
    """ga = g ⊙ u ⊙ σ(a)(1 + a(1 − σ(a))),  gu = g ⊙ a·σ(a) (σ recomputed, not stored).  All (N, F)."""
    N, Fd = a.shape
    one = F32(1.0)
    for i in prange(N):
        prefer_wide_vectors()
        for j in range(Fd):
            x = a[i, j]
            s = _sigmoid32(x)
            gij = g[i, j]
            ga[i, j] = gij * u[i, j] * (s * (one + x * (one - s)))
            gu[i, j] = gij * (x * s)


def swiglu_forward(a: np.ndarray, u: np.ndarray):
    """out = silu(a) ⊙ u (float32, a and u of one shape); keeps only a and u as (N, F) rows (σ is recomputed)."""
    shape = a.shape
    Fd = shape[-1]
    a2 = np.ascontiguousarray(a).reshape(-1, Fd)  # (N, F)
    u2 = np.ascontiguousarray(u).reshape(-1, Fd)  # (N, F)
    out = np.empty_like(a2)
    _swiglu_forward_kernel(a2, u2, out)
    return out.reshape(shape), (a2, u2)


def swiglu_backward(g, a, u, saved, need_a: bool, need_u: bool):
    """(d/da, d/du) of silu(a) ⊙ u in one pass (None where not needed)."""
    a2, u2 = saved
    shape = a.shape
    g2 = np.ascontiguousarray(g).reshape(-1, shape[-1])
    ga, gu = np.empty_like(a2), np.empty_like(u2)
    _swiglu_backward_kernel(g2, a2, u2, ga, gu)
    return (ga.reshape(shape) if need_a else None, gu.reshape(shape) if need_u else None)


# ================================================================================================ RMSNorm
@njit(cache=True, parallel=True, nogil=True)
def _rms_norm_forward_kernel(x, w, eps, out, r):
    """r = 1/√(mean(x²) + ε) per row, out = (x·r) ⊙ w.  x, out (N, D); w (D,); r (N,); float32."""
    N, D = x.shape
    one = F32(1.0)
    d = F32(D)
    for i in prange(N):
        ri = one / np.sqrt(_dot_row(x, x, i, D) / d + eps)
        r[i] = ri
        for j in range(D):
            out[i, j] = (x[i, j] * ri) * w[j]


@njit(cache=True, parallel=True, nogil=True)
def _rms_norm_backward_kernel(g, x, w, r, gx, gw_parts, want_gw):
    """gx = r ⊙ (h − x̂ · mean(h ⊙ x̂)) with h = g ⊙ w, x̂ = x·r; gw_parts[c] = Σ_{rows of chunk c} g ⊙ x̂.

    g, x, gx (N, D); w (D,); r (N,); gw_parts (C, D), summed over C by the caller (C fixed: deterministic).
    """
    N, D = x.shape
    C = gw_parts.shape[0]
    d = F32(D)
    for c in prange(C):
        lo = c * N // C
        hi = (c + 1) * N // C
        if want_gw:
            for j in range(D):
                gw_parts[c, j] = F32(0.0)
        for i in range(lo, hi):
            ri = r[i]
            dot = F32(0.0)
            for j in range(D):
                xh = x[i, j] * ri
                dot += (g[i, j] * w[j]) * xh
            if want_gw:
                for j in range(D):
                    gw_parts[c, j] += g[i, j] * (x[i, j] * ri)
            mean = dot / d
            for j in range(D):
                xh = x[i, j] * ri
                gx[i, j] = ri * ((g[i, j] * w[j]) - xh * mean)


def rms_norm_forward(x: np.ndarray, w: np.ndarray, eps: float):
    """RMSNorm over the last axis of float32 x (…, D) with w (D,); keeps only 1/rms (N,) for backward."""
    shape = x.shape
    D = shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)  # (N, D)
    w2 = np.ascontiguousarray(w)
    out = np.empty_like(x2)
    r = np.empty(x2.shape[0], F32)  # (N,)
    _rms_norm_forward_kernel(x2, w2, F32(eps), out, r)
    return out.reshape(shape), (x2, w2, r)


def rms_norm_backward(g, x, w, saved, need_x: bool, need_w: bool):
    """(dL/dx, dL/dw) of RMSNorm; the weight gradient summed over a fixed number of row chunks (deterministic)."""
    x2, w2, r = saved
    D = x2.shape[1]
    g2 = np.ascontiguousarray(g).reshape(-1, D)
    gx = np.empty_like(x2)
    chunks = min(_CHUNKS, max(1, x2.shape[0]))
    parts = np.empty((chunks, D if need_w else 0), F32)
    _rms_norm_backward_kernel(g2, x2, w2, r, gx, parts, need_w)
    gw = parts.sum(axis=0) if need_w else None
    return (gx.reshape(x.shape) if need_x else None), gw


# ================================================================================================ rotary
@njit(cache=True, parallel=True, nogil=True)
def _rotary_forward_kernel(x, cos, sin, out):
    """out = x·cos + rotate_half(x)·sin.  x, out (B, H, T, E) (any strides); cos, sin (T, E)."""
    B, H, T, E = x.shape
    h = E // 2
    for bh in prange(B * H):
        b = bh // H
        k = bh - b * H
        for t in range(T):
            for j in range(h):
                x1 = x[b, k, t, j]
                x2 = x[b, k, t, j + h]
                out[b, k, t, j] = x1 * cos[t, j] - x2 * sin[t, j]
                out[b, k, t, j + h] = x2 * cos[t, j + h] + x1 * sin[t, j + h]


def _rotary_fits(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> bool:
    """The kernel takes x (B, H, T, E) with E even and cos, sin exactly (T, E)."""
    return (x.ndim == 4 and x.shape[-1] % 2 == 0 and np.shape(cos) == x.shape[-2:]
            and np.shape(sin) == x.shape[-2:])


def rotary_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray):
    """x·cos + rotate_half(x)·sin for float32 x (B, H, T, E), any strides; the output is contiguous."""
    cos = np.ascontiguousarray(cos, dtype=F32)  # (T, E)
    sin = np.ascontiguousarray(sin, dtype=F32)
    out = np.empty(x.shape, F32)  # (B, H, T, E) contiguous, as attention wants it
    _rotary_forward_kernel(x, cos, sin, out)
    return out, (cos, sin)


def rotary_backward(g, x, cos, sin, saved):
    """dL/dx = g·cos + Rᵀ(g·sin), written in the memory layout of ``x`` (e.g. the (B, T, H, E) projection)."""
    cos, sin = saved
    # Rᵀ[y1, y2] = [y2, −y1], so g·cos + Rᵀ(g·sin) is the forward kernel with sin' = [−sin₂, −sin₁]:
    # gx₁ = g₁·cos₁ − g₂·(−sin₂), gx₂ = g₂·cos₂ + g₁·(−sin₁) (negation is exact, so the bits are the same)
    h = sin.shape[-1] // 2
    back_sin = -np.concatenate([sin[:, h:], sin[:, :h]], axis=1)  # (T, E)
    gx = np.empty_like(x)  # order "K": strides like x
    _rotary_forward_kernel(g, cos, back_sin, gx)
    return gx


# ================================================================================================ attention softmax
_LANES = 64  # a row's loops run to a multiple of this (LLVM's 512-bit loops take 16 lanes × 4 at a time)


@njit(cache=True, parallel=True, nogil=True)  # nogil: attention blocks run it from two threads at once
def _causal_softmax_kernel(s, scale, T, causal):
    """In place: s ← softmax(s·scale) over each row, keys past the causal limit set to 0.

    s: float32 (R, S), rows in (…, T) order: row i is query t = i mod T of the last T of S positions and sees
    keys j ≤ t + S − T. Masked keys up to the loops' end L are set to −∞ before the exponentials (e^−∞ = 0), as
    the twin does; those past L are written as 0 directly. A row with a NaN or +∞ score comes out NaN (so do the
    twin's), masked keys below L included.
    """
    R, S = s.shape
    for i in prange(R):
        prefer_wide_vectors()
        lim = (i % T) + S - T + 1 if causal else S
        # loops run to L, lim rounded up to _LANES (or the row's end), the masked keys selected away: a vectorized
        # loop ends in a scalar tail of up to _LANES − 1 elements, which cost more than the masked work
        L = min(S, (lim + _LANES - 1) // _LANES * _LANES)
        row = s[i]  # (S,)
        for j in range(L):
            row[j] = row[j] * scale if j < lim else F32(-np.inf)
        m = _max_row(row, L)
        for j in range(L):
            row[j] = exp32(row[j] - m)  # e^(−∞) = 0 at the masked keys
        tot = _sum_row(s, i, L)
        for j in range(L):
            row[j] = row[j] / tot
        for j in range(L, S):
            row[j] = F32(0.0)


@njit(cache=True, parallel=True, nogil=True)
def _softmax_backward_kernel(dp, p, scale, T, causal):
    """In place: dp ← p ⊙ (dp − Σ_j dp_j p_j) · scale (the scores' gradient), ±0 at masked keys.  (R, S) each.

    Masked keys below the loops' end L get p·(…) = ±0 (the sign of dp − c, as in the twin); those past L get +0.
    Its loops are not on 512-bit vectors: with them (and rows to 64 keys) it took 0.93-1.17 of the old time."""
    R, S = dp.shape
    for i in prange(R):
        lim = (i % T) + S - T + 1 if causal else S
        L = min(S, (lim + _LANES - 1) // _LANES * _LANES)  # p is 0 at the masked keys in [lim, L): their product is 0
        c = _dot_row(dp, p, i, L)
        for j in range(L):
            dp[i, j] = (p[i, j] * (dp[i, j] - c)) * scale
        for j in range(L, S):
            dp[i, j] = F32(0.0)


def attention_softmax(scores: np.ndarray, scale, T: int, causal: bool) -> np.ndarray:
    """Scale, mask and softmax the float32 attention scores (…, T', S) in place (T' a multiple of T); returns them."""
    reference.check_attention_rows(scores.shape, T, causal)
    S = scores.shape[-1]
    _causal_softmax_kernel(scores.reshape(-1, S), F32(scale), T, causal)
    return scores


def attention_softmax_backward(dp: np.ndarray, p: np.ndarray, scale, T: int, causal: bool) -> np.ndarray:
    """The scores' gradient from dP, computed in place in ``dp`` and returned."""
    reference.check_attention_rows(p.shape, T, causal)
    if dp.shape != p.shape:
        raise ValueError(f"attention softmax backward: dP {dp.shape} and P {p.shape} differ in shape")
    S = p.shape[-1]
    _softmax_backward_kernel(dp.reshape(-1, S), p.reshape(-1, S), F32(scale), T, causal)
    return dp


# ================================================================================================ cross-entropy
_CE_CHUNKS = 64  # row chunks of the cross-entropy forward (one scratch row each)


@njit(cache=True, parallel=True, nogil=True)
def _cross_entropy_forward_kernel(z, t, ignore_index, lse, nll):
    """lse[i] = log Σ_j exp z[i, j]; nll[i] = lse[i] − z[i, t[i]] (0 where t[i] == ignore_index).  z (N, V)."""
    N, V = z.shape
    C = min(N, _CE_CHUNKS)
    for c in prange(C):  # chunks of rows, each with one scratch row; a row's result does not depend on the chunks
        prefer_wide_vectors()
        e = np.empty((1, V), F32)
        for i in range(c * N // C, (c + 1) * N // C):
            m = _max_row(z[i], V)
            if not np.isfinite(m):
                m = F32(0.0)
            for j in range(V):  # the exponentials first, as one vectorized loop ...
                e[0, j] = exp32(z[i, j] - m)
            tot = _sum_row(e, 0, V)  # ... then their sum in eight lanes (one running sum would run one at a time)
            li = m + np.log(tot)
            lse[i] = li
            nll[i] = F32(0.0) if t[i] == ignore_index else li - z[i, t[i]]


@njit(cache=True, parallel=True, nogil=True)
def _cross_entropy_backward_kernel(z, t, ignore_index, lse, scale, grad):
    """grad[i] = (softmax(z[i]) − onehot(t[i])) · scale, 0 on ignored rows.  z, grad (N, V)."""
    N, V = z.shape
    one = F32(1.0)
    for i in prange(N):
        if t[i] == ignore_index:
            for j in range(V):
                grad[i, j] = F32(0.0)
            continue
        li = lse[i]
        for j in range(V):
            grad[i, j] = exp32(z[i, j] - li) * scale
        ti = t[i]
        grad[i, ti] = (exp32(z[i, ti] - li) - one) * scale


def cross_entropy_forward(z: np.ndarray, t: np.ndarray, ignore_index: int, n: int):
    """Mean NLL over the n kept rows of float32 logits z (N, V), targets t (N,); returns (0-d loss, saved)."""
    z = np.ascontiguousarray(z)
    t = np.ascontiguousarray(t, dtype=np.int64)
    N = z.shape[0]
    lse, nll = np.empty(N, F32), np.empty(N, F32)
    _cross_entropy_forward_kernel(z, t, ignore_index, lse, nll)
    loss = F32(nll.sum(dtype=np.float64) / n)
    return np.asarray(loss, dtype=F32), (z, t, lse)


def cross_entropy_backward(g, z, t, ignore_index: int, n: int, saved) -> np.ndarray:
    """(softmax(z) − onehot(t)) · g / n, zero on ignored rows, in one pass per row; (N, V)."""
    z, t, lse = saved
    grad = np.empty_like(z)
    _cross_entropy_backward_kernel(z, t, ignore_index, lse, F32(g) / F32(n), grad)
    return grad


# ================================================================================================ embedding
@njit(cache=True)
def _embedding_backward_kernel(ids, g, out):
    """out[ids[i]] += g[i] for i in order (repeats accumulate, as np.add.at does).  ids (N,), g (N, D), out (V, D)."""
    N, D = g.shape
    for i in range(N):
        r = ids[i]
        for j in range(D):
            out[r, j] += g[i, j]


def embedding_grad(ids: np.ndarray, g: np.ndarray, V: int, dtype) -> np.ndarray:
    """The (V, D) gradient of an embedding gather at ``ids`` given the output gradient ``g`` (…, D) (float32)."""
    D = g.shape[-1]
    out = np.zeros((V, D), dtype)
    _embedding_backward_kernel(np.ascontiguousarray(ids.reshape(-1), dtype=np.int64),
                               np.ascontiguousarray(g).reshape(-1, D), out)
    return out


# ================================================================================================ AdamW
@njit(cache=True)
def _adamw_kernel(w, g, m, v, decay, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, step):
    """One AdamW step in one pass, in place (1-D float32 views of the parameter, its gradient and state)::

        w ← w·decay;  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;  w ← w − (m / (√v / √(1 − β2ᵗ) + ε)) · step

    with ``decay = 1 − lr·λ`` and ``step = lr / (1 − β1ᵗ)``: the operations of the readable twin, in its order.
    """
    for i in range(w.shape[0]):
        gi = g[i]
        mi = m[i] * b1 + one_minus_b1 * gi
        vi = v[i] * b2 + (one_minus_b2 * gi) * gi
        m[i] = mi
        v[i] = vi
        denom = np.sqrt(vi) / bc2_sqrt + eps
        w[i] = w[i] * decay - (mi / denom) * step


def adamw_update(w, g, m, v, decay, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, step) -> None:
    """One AdamW step in place on C-contiguous float32 w, m, v (g any layout), float32 scalars."""
    _adamw_kernel(w.reshape(-1), np.ascontiguousarray(g).reshape(-1), m.reshape(-1), v.reshape(-1),
                  decay, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, step)


# ================================================================================================ the chooser
def _same_shape(a, b) -> bool:
    return switch.float32_arrays(a, b) and a.shape == b.shape


PICK = switch.Twins(sys.modules[__name__], {
    "swiglu": switch.Operation(("swiglu_forward", "swiglu_backward"), reference, _same_shape),
    "rms_norm": switch.Operation(("rms_norm_forward", "rms_norm_backward"), reference,
                                 lambda x, w: switch.float32_arrays(x, w) and w.shape == x.shape[-1:]),
    "rotary": switch.Operation(("rotary_forward", "rotary_backward"), reference,
                               lambda x, cos, sin: switch.float32_arrays(x) and _rotary_fits(x, cos, sin)),
    "attention_softmax": switch.Operation(("attention_softmax", "attention_softmax_backward"), reference,
                                          lambda scores, T: switch.float32_arrays(scores) and scores.shape[-1] >= T),
    "cross_entropy": switch.Operation(("cross_entropy_forward", "cross_entropy_backward"), reference,
                                      switch.float32_arrays),
    "embedding_grad": switch.Operation(("embedding_grad",), reference, switch.float32_arrays),
    "adamw_update": switch.Operation(("adamw_update",), reference,
                                     lambda w, m, v: switch.float32_arrays(w)
                                     and w.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous),
})
pick = PICK.pick
"""``pick(operation, *arrays, impl="auto")``: the module (this one or :mod:`lora_ref.kernels.reference`) whose
twins fill a node of ``operation`` ("swiglu", "rms_norm", "rotary", "attention_softmax", "cross_entropy",
"embedding_grad", "adamw_update"); see :class:`lora_ref.kernels.switch.Twins`."""
