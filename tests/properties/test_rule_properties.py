"""Properties whose expected values are written out independently here, for rules the older properties left open.

- TIES' sign election by *mass* (Yadav et al. 2023, §3 "Elect": γ_p = sgn(Σ_t τ̂_t^p)), against an entry-by-entry
  loop. The hand example in ``test_merge.py`` elects the same signs by mass and by count, so it cannot tell them
  apart; drawn task vectors whose scales differ by orders of magnitude can.
- DARE's rescaling (Yu et al. 2024, Eq. 2): with a generator whose mask we can replay, every kept entry is x/p.
- The gradients of a float32 LoRA layer, through the fused ``lora_add`` node (the fast path) and through the
  composed nodes (the readable path), against dL/dA = s·(G·B)ᵀ·x, dL/dB = s·Gᵀ·(x·Aᵀ), dL/dx = G·W + s·G·B·A in
  float64 (Hu et al. 2021, Eq. 3 differentiated by hand).
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.autograd.tensor import Tensor
from lora_ref.kernels import switch as fast
from lora_ref.merging import combine as M
from lora_ref.testing import adapters, seeds

F32_U = 2.0 ** -24


@st.composite
def task_vectors(draw, max_n=4):
    """2-4 task vectors of one shape (both sides ≥ 2), independent normal entries, each times its own 10^k."""
    n = draw(st.integers(2, max_n))
    shape = (draw(st.integers(2, 8)), draw(st.integers(2, 8)))
    rng = np.random.default_rng(draw(seeds()))
    ts = [(rng.standard_normal(shape) * 10.0 ** rng.integers(-1, 2)).astype(np.float32) for _ in range(n)]
    weights = [float(np.float32(w)) for w in rng.uniform(0.2, 2.0, n)]
    return ts, weights


def ties_by_hand(ts, weights, density):
    """TIES entry by entry: trim each task to its top ⌊density·size⌋ |values|, elect the sign of the summed trimmed
    mass (0 → +), then average the weighted entries that agree with it."""
    k = int(density * ts[0].size)
    trimmed = []
    for t in ts:
        flat = t.astype(np.float64).ravel()
        keep = set(sorted(range(flat.size), key=lambda i: -abs(flat[i]))[:k])
        trimmed.append([flat[i] if i in keep else 0.0 for i in range(flat.size)])
    out = []
    for i in range(ts[0].size):
        mass = sum(tr[i] for tr in trimmed)
        elected = 1.0 if mass >= 0 else -1.0
        agree = [(w, tr[i]) for w, tr in zip(weights, trimmed) if tr[i] != 0 and math.copysign(1.0, tr[i]) == elected]
        out.append(sum(w * v for w, v in agree) / max(len(agree), 1))
    return np.array(out).reshape(ts[0].shape)


@given(task_vectors(), st.sampled_from([0.3, 0.5, 0.8, 1.0]))
def test_ties_elects_signs_by_mass(case, density):
    ts, weights = case
    got = M.ties(ts, weights, density, "total").astype(np.float64)
    ref = ties_by_hand(ts, weights, density)
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


@given(task_vectors(), st.sampled_from([0.2, 0.5, 0.9]), seeds())
def test_dare_linear_keeps_rescaled_entries(case, density, seed):
    """dare_linear = Σ_t w_t·m_t⊙τ_t/p, with the masks m_t replayed from the same generator state."""
    ts, weights = case
    got = M.dare_linear(ts, weights, density, np.random.default_rng(seed)).astype(np.float64)
    rng = np.random.default_rng(seed)
    masks = [rng.random(t.shape) < density for t in ts]  # the documented mask: rng.random(shape) < density
    ref = sum(w * m * t.astype(np.float64) / density for w, m, t in zip(weights, masks, ts))
    assert np.allclose(got, ref, rtol=1e-5, atol=1e-6 * max(np.abs(ref).max(), 1e-30))


@pytest.mark.parametrize("fast_path", [True, False], ids=["fused", "composed"])
@given(ad=adapters(dtype=np.float32, use_rslora=None), seed=seeds())
def test_lora_gradients_equal_the_formulas(fast_path, ad, seed):
    rng = np.random.default_rng(seed)
    out_f, in_f = ad.W.shape
    x = rng.standard_normal((3, in_f)).astype(np.float32)
    G = rng.standard_normal((3, out_f)).astype(np.float32)  # dL/dy for L = Σ y ⊙ G
    layer = ad.to_layer()
    prev = fast.set_enabled(fast_path)
    try:
        xt = Tensor(x, requires_grad=True)
        (layer(xt) * Tensor(G)).sum().backward()
    finally:
        fast.set_enabled(prev)
    s = ad.lora_alpha / (math.sqrt(ad.r) if ad.use_rslora else ad.r)
    x64, G64, A64, B64, W64 = (a.astype(np.float64) for a in (x, G, ad.A, ad.B, ad.W))
    expected = {
        "A": s * (G64 @ B64).T @ x64,
        "B": s * G64.T @ (x64 @ A64.T),
        "x": G64 @ W64 + s * (G64 @ B64) @ A64,
    }
    aG, aB, aA, aW, ax = (np.abs(a) for a in (G64, B64, A64, W64, x64))
    scale = {"A": s * (aG @ aB).T @ ax, "B": s * aG.T @ (ax @ aA.T), "x": aG @ aW + s * (aG @ aB) @ aA}
    got = {"A": layer.lora_A["default"].weight.grad, "B": layer.lora_B["default"].weight.grad, "x": xt.grad}
    n = in_f + out_f + ad.r + 4
    for k in expected:
        assert got[k] is not None, k
        assert np.all(np.abs(got[k] - expected[k]) <= 8 * n * F32_U * scale[k] + 1e-30), k
