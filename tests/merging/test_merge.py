"""Properties of lora_ref.merging.combine's pure array math: combinations of LoRA factors and the merging papers' rules.

Every adapter here has B ≠ 0 (a zero B makes every merge property hold trivially). Expected values are computed
independently of the code under test: Σ wᵢ·sᵢ·BᵢAᵢ in float64, Eckart–Young for truncated SVD, hand-worked
examples for TIES, and sample means for DARE's unbiasedness.
"""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.merging import combine as M

F32_RTOL = 2e-5  # float32 results against float64 references


@st.composite
def adapter_sets(draw, equal_ranks=False, max_n=3, min_n=1):
    """A layer (out, in), both sides ≥ 2, and n adapters (A (r, in), B (out, r), scaling s, weight w): independent
    normal entries from a drawn seed (full rank almost surely, B ≠ 0), each factor times its own scale 10^k."""
    out = draw(st.integers(2, 12))
    inp = draw(st.integers(2, 12))
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    r0 = draw(st.integers(1, 5))
    ranks = [r0] * n if equal_ranks else [draw(st.integers(1, 5)) for _ in range(n)]
    As = [(rng.normal(0, 1, (r, inp)) * 10.0 ** rng.integers(-1, 2)).astype(np.float32) for r in ranks]
    Bs = [(rng.normal(0, 1, (out, r)) * 10.0 ** rng.integers(-1, 2)).astype(np.float32) for r in ranks]
    scalings = [draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 16 / math.sqrt(r)])) for r in ranks]
    weights = [draw(st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3)) for _ in ranks]
    return As, Bs, scalings, weights


def reference_sum(As, Bs, scalings, weights):
    """Σ wᵢ·sᵢ·BᵢAᵢ in float64."""
    return sum(w * s * (b.astype(np.float64) @ a.astype(np.float64)) for a, b, s, w in zip(As, Bs, scalings, weights))


def close(x, ref, rtol=F32_RTOL):
    scale = max(np.abs(ref).max(), 1e-30)
    return np.abs(np.asarray(x, np.float64) - ref).max() <= rtol * scale


# ------------------------------------------------------------------------------------------------ cat and svd


@given(adapter_sets())
def test_cat_equals_weighted_sum_of_deltas(case):
    As, Bs, scalings, weights = case
    c = M.combine_lora(As, Bs, scalings, weights, "cat")
    ref = reference_sum(As, Bs, scalings, weights)
    if len(As) > 1:
        assert c.r == sum(a.shape[0] for a in As)
    assert c.scaling == 1.0
    assert close(c.delta_weight(), ref)


@given(adapter_sets(min_n=2))
def test_svd_with_rank_at_least_total_rank_is_exact(case):
    """Two or more adapters (one adapter makes PEFT force "linear": test_one_adapter_is_reproduced_by_...)."""
    As, Bs, scalings, weights = case
    total = sum(a.shape[0] for a in As)
    c = M.combine_lora(As, Bs, scalings, weights, "svd", svd_rank=total)
    ref = reference_sum(As, Bs, scalings, weights)
    assert c.lora_A.shape == (total, As[0].shape[1]) and c.lora_B.shape == (Bs[0].shape[0], total)
    assert close(c.delta_weight(), ref, rtol=1e-4)


@given(adapter_sets(max_n=3, min_n=2), st.integers(1, 3))
def test_truncated_svd_error_is_the_eckart_young_optimum(case, R):
    As, Bs, scalings, weights = case
    c = M.combine_lora(As, Bs, scalings, weights, "svd", svd_rank=R)
    ref = reference_sum(As, Bs, scalings, weights)
    sigma = np.linalg.svd(ref, compute_uv=False)
    optimum = math.sqrt(float(np.sum(sigma[R:] ** 2)))
    err = np.linalg.norm(c.delta_weight().astype(np.float64) - ref)
    assert abs(err - optimum) <= 1e-4 * max(sigma[0], 1e-30)
    assert np.linalg.matrix_rank(c.delta_weight().astype(np.float64), tol=1e-5 * max(sigma[0], 1e-30)) <= R


def test_svd_default_rank_is_max_rank_and_clamp_clips_factors():
    rng = np.random.default_rng(3)
    As = [rng.normal(size=(2, 7)).astype(np.float32), rng.normal(size=(4, 7)).astype(np.float32)]
    Bs = [rng.normal(size=(6, 2)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)]
    c = M.combine_lora(As, Bs, [1.0, 1.0], [1.0, 1.0], "svd")
    assert c.r == 4
    clamped = M.combine_lora(As, Bs, [1.0, 1.0], [1.0, 1.0], "svd", svd_clamp=0.5)
    hi = np.quantile(np.concatenate([c.lora_B.ravel(), c.lora_A.ravel()]), 0.5)
    assert np.abs(clamped.lora_A).max() <= abs(hi) + 1e-6 and np.abs(clamped.lora_B).max() <= abs(hi) + 1e-6


def test_svd_rank_beyond_the_matrix_is_zero_padded_and_exact():
    rng = np.random.default_rng(4)
    As = [rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(3, 2)).astype(np.float32)]
    Bs = [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)]
    c = M.combine_lora(As, Bs, [1.0, 0.5], [1.0, -1.0], "svd", svd_rank=6)
    assert c.lora_A.shape == (6, 2) and c.lora_B.shape == (5, 6)
    assert close(c.delta_weight(), reference_sum(As, Bs, [1.0, 0.5], [1.0, -1.0]))


# ------------------------------------------------------------------------------------------------ linear family


@given(adapter_sets(max_n=1))
def test_one_adapter_is_reproduced_by_linear_cat_and_full_rank_svd(case):
    As, Bs, scalings, weights = case
    r = As[0].shape[0]
    for ct, kw in (("linear", {}), ("cat", {}), ("svd", {"svd_rank": r}), ("ties", {"density": 1.0})):
        c = M.combine_lora(As, Bs, scalings, weights, ct, **kw)
        assert c.r == r
        assert close(c.delta_weight(), reference_sum(As, Bs, scalings, weights), rtol=1e-4)


def test_linear_has_cross_terms():
    """'linear' gives (Σ√wᵢsᵢ Bᵢ)(Σ√wⱼsⱼ Aⱼ), not Σ wᵢsᵢBᵢAᵢ: the difference is exactly the cross terms."""
    rng = np.random.default_rng(5)
    As = [rng.normal(size=(2, 4)).astype(np.float32) for _ in range(2)]
    Bs = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(2)]
    s, w = [2.0, 0.5], [0.7, -0.3]
    c = M.combine_lora(As, Bs, s, w, "linear")
    a = [math.sqrt(abs(wi * si)) for wi, si in zip(w, s)]
    sign = [1.0 if wi * si >= 0 else -1.0 for wi, si in zip(w, s)]
    cross = sum(a[i] * a[j] * sign[j] * (Bs[i].astype(np.float64) @ As[j]) for i in range(2) for j in range(2) if i != j)
    assert close(c.delta_weight(), reference_sum(As, Bs, s, w) + cross)
    assert not close(c.delta_weight(), reference_sum(As, Bs, s, w), rtol=1e-2)


def test_ties_hand_example():
    x1 = np.array([[3.0, -1.0, 0.5, 2.0]], np.float32)
    x2 = np.array([[-1.0, -4.0, 0.25, 1.5]], np.float32)
    # density 0.5 keeps 2 of 4: x1 → [3, 0, 0, 2], x2 → [0, -4, 0, 1.5]
    # total-mass signs: [+, -, +(0 sum → +1), +]; agreeing entries weighted by w = (2, 1):
    # col0: 2·3 / 1 = 6; col1: 1·(−4) / 1 = −4; col2: 0; col3: (2·2 + 1·1.5) / 2 = 2.75
    got = M.ties([x1, x2], [2.0, 1.0], 0.5, "total")
    np.testing.assert_array_equal(got, np.array([[6.0, -4.0, 0.0, 2.75]], np.float32))
    # frequency: signs counted; col0: +1 −0 → +; col1: −; col3: +; same result here
    np.testing.assert_array_equal(M.ties([x1, x2], [2.0, 1.0], 0.5, "frequency"), got)


def test_magnitude_based_pruning_keeps_the_largest_k():
    x = np.array([0.1, -5.0, 2.0, -0.3, 4.0, 0.0], np.float32)
    np.testing.assert_array_equal(M.magnitude_based_pruning(x, 0.5), [0, -5.0, 2.0, 0, 4.0, 0])
    np.testing.assert_array_equal(M.magnitude_based_pruning(x, 0.0), np.zeros(6))
    np.testing.assert_array_equal(M.prune(x, 1.0, "magnitude"), x)


@given(st.integers(1, 40), st.floats(0.05, 0.95), st.integers(0, 2**31 - 1))
def test_dare_masks_keep_a_density_fraction_and_rescale(n, density, seed):
    x = np.linspace(1, 2, n).astype(np.float32)
    y = M.random_pruning(x, density, np.random.default_rng(seed), rescale=True)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / np.float32(density), rtol=1e-6)
    y2 = M.random_pruning(x, density, np.random.default_rng(seed), rescale=True)
    np.testing.assert_array_equal(y, y2)  # deterministic given the generator


def test_dare_is_unbiased():
    """E[dare(x)] = x: the mean over 4000 independent masks is within 5 standard errors of x."""
    x = np.array([1.0, -2.0, 0.5, 3.0], np.float64)
    p = 0.3
    rng = np.random.default_rng(11)
    draws = np.stack([M.random_pruning(x, p, rng, rescale=True) for _ in range(4000)])
    se = np.abs(x) * math.sqrt((1 - p) / p) / math.sqrt(4000)
    assert np.all(np.abs(draws.mean(axis=0) - x) < 5 * se)


def test_dare_linear_with_density_one_is_task_arithmetic():
    rng = np.random.default_rng(2)
    ts = [rng.normal(size=(3, 3)).astype(np.float32) for _ in range(2)]
    np.testing.assert_array_equal(M.dare_linear(ts, [0.5, 2.0], 1.0, rng), M.task_arithmetic(ts, [0.5, 2.0]))


# ------------------------------------------------------------------------------------------------ PEFT's bugs


def test_peft_bugs_rslora_scaling_and_dropped_bias():
    rng = np.random.default_rng(6)
    As = [rng.normal(size=(4, 5)).astype(np.float32) for _ in range(2)]
    Bs = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(2)]
    biases = [rng.normal(size=3).astype(np.float32) for _ in range(2)]
    s = [8 / math.sqrt(4)] * 2  # rsLoRA sources, α = 8, r = 4
    good = M.combine_lora(As, Bs, s, [1.0, 0.5], "cat", biases=biases, use_rslora=True)
    bad = M.combine_lora(As, Bs, s, [1.0, 0.5], "cat", biases=biases, use_rslora=True, peft_bugs=True)
    assert good.scaling == 1.0 and bad.scaling == pytest.approx(math.sqrt(8))
    np.testing.assert_allclose(bad.delta_weight(), math.sqrt(8) * good.delta_weight(), rtol=1e-5)
    np.testing.assert_allclose(good.bias, s[0] * biases[0] + 0.5 * s[1] * biases[1], rtol=1e-6)
    np.testing.assert_array_equal(bad.bias, np.zeros(3))


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_value_errors():
    a, b = np.ones((2, 3), np.float32), np.ones((4, 2), np.float32)
    a3, b3 = np.ones((3, 3), np.float32), np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="equal rank"):
        M.combine_lora([a, a3], [b, b3], [1, 1], [1, 1], "linear")
    with pytest.raises(ValueError, match="density"):
        M.combine_lora([a, a], [b, b], [1, 1], [1, 1], "ties")
    with pytest.raises(ValueError, match="rng"):
        M.combine_lora([a, a], [b, b], [1, 1], [1, 1], "dare_linear", density=0.5)
    with pytest.raises(ValueError, match="combination_type"):
        M.combine_lora([a, a], [b, b], [1, 1], [1, 1], "average")
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4, 3\)"):
        M.combine_lora([a, a], [b, np.ones((5, 2), np.float32)], [1, 1], [1, 1], "cat")
    with pytest.raises(ValueError, match="weights"):
        M.combine_lora([a, a], [b, b], [1, 1], [1], "cat")


# ------------------------------------------------------------------------------------------------ the papers


@given(st.integers(0, 2**31 - 1))
def test_paper_task_arithmetic_on_model_dicts(seed):
    rng = np.random.default_rng(seed)
    tasks = [{"w": rng.normal(size=(2, 3)), "b": rng.normal(size=4)} for _ in range(3)]
    out = M.paper_task_arithmetic(tasks, lam=0.5, weights=[1.0, -1.0, 2.0])
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], 0.5 * (tasks[0][k] - tasks[1][k] + 2 * tasks[2][k]), rtol=1e-12)


def test_paper_ties_trims_over_the_whole_model():
    """Trim is global over the task vector: a model whose large entries all sit in one tensor keeps none of the other."""
    t1 = {"big": np.array([10.0, -9.0]), "small": np.array([0.1, 0.2])}
    t2 = {"big": np.array([8.0, 7.0]), "small": np.array([-0.3, 0.4])}
    out = M.paper_ties([t1, t2], density=0.5, lam=1.0)
    # t1 keeps big only; t2 keeps big only; signs: col0 +, col1 −9+7 = −2 → −; col1 mean of agreeing = −9
    np.testing.assert_array_equal(out["big"], [9.0, -9.0])
    np.testing.assert_array_equal(out["small"], [0.0, 0.0])
    # PEFT's ties on the same tensors trims per tensor and so keeps "small" entries
    assert np.any(M.ties([t1["small"], t2["small"]], [1.0, 1.0], 0.5) != 0)


def test_paper_dare_then_ties_and_unbiased_task_arithmetic():
    rng = np.random.default_rng(8)
    tv = [np.full(2000, 1.0), np.full(2000, 3.0)]
    out = M.paper_dare(tv, drop_rate=0.9, rng=rng)
    # E = 1 + 3; each entry has variance 10²·0.1·0.9·(1² + 3²) = 90: within 5 standard errors of the mean
    assert abs(out.mean() - 4.0) < 5 * math.sqrt(90 / 2000)
    assert np.all(np.isclose(out[:, None], [0.0, 10.0, 30.0, 40.0], rtol=1e-12).any(axis=1))
    t = M.paper_dare([np.array([1.0, -1.0]), np.array([2.0, 2.0])], drop_rate=0.0, rng=rng, merge="ties")
    np.testing.assert_array_equal(t, [1.5, 2.0])


# ------------------------------------------------------------------------------------------------ interop


@pytest.mark.interop
def test_per_tensor_rules_equal_peft_merge_utils():
    import torch
    from peft.utils import merge_utils as PU

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    ts = [rng.normal(size=(6, 5)).astype(np.float32) for _ in range(3)]
    w = np.array([0.7, -0.3, 0.5], np.float32)
    tt, tw = [torch.from_numpy(t) for t in ts], torch.from_numpy(w)
    np.testing.assert_array_equal(M.task_arithmetic(ts, w), PU.task_arithmetic(tt, tw).numpy())
    for density in (0.0, 0.3, 0.5, 1.0):
        np.testing.assert_array_equal(M.magnitude_prune(ts, w, density), PU.magnitude_prune(tt, tw, density).numpy())
        for method in ("total", "frequency"):
            np.testing.assert_array_equal(M.ties(ts, w, density, method), PU.ties(tt, tw, density, method).numpy())
