"""PEFT's fast PiSSA, ``init_lora_weights="pissa_niter_N"``: PiSSA from a randomized SVD with N subspace iterations.

PEFT calls ``torch.svd_lowrank``, whose Gaussian test matrix comes from torch's global generator; lora_ref draws it
from an explicit ``rng``. The two cannot agree bit for bit, so the comparison with PEFT is of what the
initialization is *for*: the subspace the adapter holds and the function it computes (s·B·A and the residual base),
on weights whose top-r singular values stand clear of the rest, where both converge to the exact PiSSA split.
"""

from __future__ import annotations

import numpy as np
import pytest

from lora_ref.adapters.lora import LoraConfig, LoraLinear, svd_lowrank
from lora_ref.modeling.nn import Linear


def gapped(out=48, inp=40, top=(8.0, 6.0, 5.0, 4.0), tail=0.05, seed=0) -> np.ndarray:
    """A weight (out, in) with singular values ``top`` and then ``tail`` for the rest (a clear gap after r=4)."""
    g = np.random.default_rng(seed)
    U, _ = np.linalg.qr(g.standard_normal((out, out)))
    V, _ = np.linalg.qr(g.standard_normal((inp, inp)))
    k = min(out, inp)
    s = np.full(k, tail)
    s[:len(top)] = top
    return ((U[:, :k] * s) @ V[:, :k].T).astype(np.float32)


def layer_with(W, init, rng=None, r=4, alpha=8):
    base = Linear(W.shape[1], W.shape[0], bias=False)
    base.weight.data[...] = W
    return LoraLinear(base, r=r, lora_alpha=alpha, init_lora_weights=init, rng=rng)


def largest_principal_angle_cos(X, Y) -> float:
    """Cosine of the largest principal angle between the column spaces of X and Y (1 = the same subspace)."""
    qx, _ = np.linalg.qr(np.asarray(X, np.float64))
    qy, _ = np.linalg.qr(np.asarray(Y, np.float64))
    return float(np.linalg.svd(qx.T @ qy, compute_uv=False).min())


def test_svd_lowrank_finds_the_top_triplets():
    W = gapped()
    U, S, V = svd_lowrank(W, 4, 4, np.random.default_rng(1))
    s_exact = np.linalg.svd(W.astype(np.float64), compute_uv=False)
    assert np.allclose(S, s_exact[:4], rtol=1e-4)
    assert np.allclose(U.T @ U, np.eye(4), atol=1e-5) and np.allclose(V.T @ V, np.eye(4), atol=1e-5)
    Ue, _, Vhe = np.linalg.svd(W.astype(np.float64))
    assert largest_principal_angle_cos(U, Ue[:, :4]) > 1 - 1e-6
    assert largest_principal_angle_cos(V, Vhe[:4].T) > 1 - 1e-6


def test_more_iterations_get_closer_on_a_flat_spectrum():
    """Without a gap one random projection is rough; the subspace iterations converge to the exact top-r part."""
    W = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    exact = np.linalg.svd(W.astype(np.float64), compute_uv=False)[:4].sum()
    errs = [exact - svd_lowrank(W, 4, n, np.random.default_rng(3))[1].sum() for n in (0, 2, 16)]
    assert errs[0] > errs[1] > errs[2] >= -1e-3


def test_pissa_niter_keeps_the_function_and_matches_full_pissa():
    W = gapped()
    fast = layer_with(W, "pissa_niter_4", np.random.default_rng(4))
    full = layer_with(W, "pissa")
    x = np.random.default_rng(5).standard_normal((6, W.shape[1])).astype(np.float32)
    assert np.allclose(fast(x).data, x @ W.T, atol=1e-5)  # residual + s·BA = W: the output is unchanged at init
    assert np.allclose(fast.get_delta_weight("default"), full.get_delta_weight("default"), atol=1e-4)
    assert np.allclose(fast.weight.data, full.weight.data, atol=1e-4)


def test_pissa_niter_bad_input():
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraConfig(r=4, init_lora_weights="pissa_niter_x")
    assert LoraConfig(r=4, init_lora_weights="pissa_niter_16").init_lora_weights == "pissa_niter_16"
    with pytest.raises(ValueError, match="rng"):
        layer_with(gapped(), "pissa_niter_4")


@pytest.mark.interop
@pytest.mark.parametrize("niter", [1, 4])
def test_pissa_niter_equals_peft_in_subspace_and_function(niter):
    """PEFT 0.21.2 on CPU, ``init_lora_weights="pissa_niter_N"``: the same subspace in B and A, the same s·B·A and
    residual (to the randomized SVD's accuracy on a gapped spectrum), though not the same bits (torch's RNG)."""
    import peft
    import torch

    W = gapped(seed=niter)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(torch.from_numpy(W))

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                     init_lora_weights=f"pissa_niter_{niter}"))
    sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    A_p, B_p = sd["base_model.model.proj.lora_A.default.weight"], sd["base_model.model.proj.lora_B.default.weight"]
    residual_p = sd["base_model.model.proj.base_layer.weight"]
    ours = layer_with(W, f"pissa_niter_{niter}", np.random.default_rng(10))
    A, B = ours.lora_A["default"].weight.data, ours.lora_B["default"].weight.data
    assert largest_principal_angle_cos(B, B_p) > 1 - 1e-5
    assert largest_principal_angle_cos(A.T, A_p.T) > 1 - 1e-5
    delta_p = 2.0 * B_p.astype(np.float64) @ A_p
    assert np.linalg.norm(ours.get_delta_weight("default") - delta_p) / np.linalg.norm(delta_p) < 1e-4
    assert np.abs(ours.weight.data - residual_p).max() < 1e-4
