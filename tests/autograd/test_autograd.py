"""Every primitive and composite passes gradcheck in float64 on hypothesis-drawn shapes, broadcasting included."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lora_ref import Tensor, no_grad
from lora_ref.autograd import functional as F
from lora_ref.autograd import ops
from lora_ref.autograd.numerical import gradcheck

shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)
seeds = st.integers(0, 2**31 - 1)


def rand(rng, shape, low=-2.0, high=2.0):
    return Tensor(rng.uniform(low, high, size=shape), requires_grad=True)


def positive(rng, shape):
    return Tensor(rng.uniform(0.5, 2.0, size=shape), requires_grad=True)


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast together: one drawn, the other with some axes dropped or set to 1."""
    a = draw(shapes)
    b = list(a)
    for i in range(len(b)):
        if draw(st.booleans()):
            b[i] = 1
    drop = draw(st.integers(0, len(b) - 1))
    b = tuple(b[drop:])
    return (a, b) if draw(st.booleans()) else (b, a)


@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div])
@given(pair=broadcast_pair(), seed=seeds)
def test_binary_arithmetic_with_broadcasting(op, pair, seed):
    rng = np.random.default_rng(seed)
    a = rand(rng, pair[0])
    b = positive(rng, pair[1]) if op is ops.div else rand(rng, pair[1])
    assert gradcheck(op, [a, b])


@pytest.mark.parametrize("name", ["exp", "log", "sqrt", "rsqrt", "sigmoid", "silu", "tanh", "neg", "relu"])
@given(shape=shapes, seed=seeds)
def test_unary(name, shape, seed):
    rng = np.random.default_rng(seed)
    x = positive(rng, shape) if name in ("log", "sqrt", "rsqrt") else rand(rng, shape)
    if name == "relu":  # keep away from the kink, where the derivative does not exist
        x.data[np.abs(x.data) < 1e-3] = 0.5
    assert gradcheck(getattr(ops, name), [x])


@given(shape=shapes, seed=seeds, p=st.sampled_from([2.0, 3.0, 0.5, -1.0, -0.5]))
def test_pow_scalar_and_tensor_exponent(shape, seed, p):
    rng = np.random.default_rng(seed)
    x = positive(rng, shape)
    assert gradcheck(lambda a: a ** p, [x])
    e = rand(rng, shape, -1, 1)
    assert gradcheck(lambda a, b: a ** b, [x, e])


@given(data=st.data(), seed=seeds)
def test_matmul_batched_and_broadcast(data, seed):
    rng = np.random.default_rng(seed)
    n, k, m = (data.draw(st.integers(1, 4)) for _ in range(3))
    batch = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    b_batch = data.draw(st.sampled_from([(), batch[-1:] if batch else (), batch]))
    a = rand(rng, batch + (n, k))
    b = rand(rng, tuple(b_batch) + (k, m))
    assert gradcheck(ops.matmul, [a, b])


def test_matmul_vectors():
    rng = np.random.default_rng(0)
    assert gradcheck(ops.matmul, [rand(rng, (3,)), rand(rng, (3, 2))])
    assert gradcheck(ops.matmul, [rand(rng, (2, 3)), rand(rng, (3,))])
    assert gradcheck(ops.matmul, [rand(rng, (4, 2, 3)), rand(rng, (3,))])


@given(lead=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3), i=st.integers(1, 4),
       o=st.integers(1, 4), bias=st.booleans(), seed=seeds)
def test_linear(lead, i, o, bias, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, lead + (i,)), rand(rng, (o, i))
    inputs = [x, w] + ([rand(rng, (o,))] if bias else [])
    assert gradcheck(ops.linear, inputs)
    expected = x.data @ w.data.T + (inputs[2].data if bias else 0)
    np.testing.assert_allclose(ops.linear(*inputs).data, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("red", ["sum", "mean", "max"])
@given(shape=shapes, data=st.data(), keepdims=st.booleans(), seed=seeds)
def test_reductions(red, shape, data, keepdims, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape)
    axis = data.draw(st.sampled_from([None] + list(range(-len(shape), len(shape)))))
    assert gradcheck(lambda a: getattr(ops, red)(a, axis, keepdims), [x])


def test_max_ties_split_gradient():
    x = Tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    ops.max(x).backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.5, 0.5])


@given(shape=hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=3), seed=seeds, data=st.data())
def test_reshape_transpose_swapaxes(shape, seed, data):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape)
    perm = tuple(data.draw(st.permutations(range(len(shape)))))
    assert gradcheck(lambda a: a.transpose(perm) * 1.0, [x])
    assert gradcheck(lambda a: a.reshape(-1) * 1.0, [x])
    assert gradcheck(lambda a: a.swapaxes(0, -1) * 1.0, [x])
    assert gradcheck(lambda a: a.T * 1.0, [x])


@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=2, max_side=4), seed=seeds)
def test_getitem_basic_and_advanced(shape, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape)
    assert gradcheck(lambda a: a[1:], [x])
    assert gradcheck(lambda a: a[..., ::-1], [x])
    idx = rng.integers(0, shape[0], size=5)  # repeats accumulate
    assert gradcheck(lambda a: a[idx], [x])


@given(V=st.integers(1, 6), D=st.integers(1, 4), ids_shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=5),
       seed=seeds)
def test_embedding_gather(V, D, ids_shape, seed):
    rng = np.random.default_rng(seed)
    w = rand(rng, (V, D))
    ids = rng.integers(0, V, size=ids_shape)
    out = ops.embedding(w, ids)
    assert out.shape == ids_shape + (D,)
    assert gradcheck(lambda a: ops.embedding(a, ids), [w])


def test_embedding_rejects_out_of_range_ids():
    w = Tensor(np.zeros((4, 2)), requires_grad=True)
    with pytest.raises(ValueError, match="out of range"):
        ops.embedding(w, np.array([0, 4]))


@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3), n=st.integers(1, 3), seed=seeds,
       data=st.data())
def test_concatenate_stack(shape, n, seed, data):
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(0, len(shape) - 1))
    parts = []
    for _ in range(n):
        s = list(shape)
        s[axis] = data.draw(st.integers(1, 3))
        parts.append(rand(rng, tuple(s)))
    assert gradcheck(lambda *t: ops.concatenate(t, axis), parts)
    same = [rand(rng, shape) for _ in range(n)]
    assert gradcheck(lambda *t: ops.stack(t, axis), same)


@given(pair=broadcast_pair(), seed=seeds)
def test_where(pair, seed):
    rng = np.random.default_rng(seed)
    a, b = rand(rng, pair[0]), rand(rng, pair[1])
    cond = rng.random(np.broadcast_shapes(pair[0], pair[1])) > 0.5
    assert gradcheck(lambda x, y: ops.where(cond, x, y), [a, b])


def test_astype_gradient_returns_input_dtype():
    x = Tensor(np.ones(3, dtype=np.float64), requires_grad=True)
    ops.astype(x, np.float32).sum().backward()
    assert x.grad.dtype == np.float64


# ------------------------------------------------------------------------------------------------ composites
def softmax_composed(x, axis=-1):
    e = (x - Tensor(np.max(x.data, axis=axis, keepdims=True))).exp()
    return e / e.sum(axis=axis, keepdims=True)


@given(shape=shapes, seed=seeds)
def test_softmax_fused_equals_composed(shape, seed):
    rng = np.random.default_rng(seed)
    x = rand(rng, shape, -4, 4)
    assert gradcheck(lambda a: F.softmax(a, -1), [x])
    np.testing.assert_allclose(F.softmax(x).data, softmax_composed(x).data, rtol=1e-12)
    assert gradcheck(lambda a: F.log_softmax(a, 0), [x])
    np.testing.assert_allclose(F.log_softmax(x, 0).data, np.log(softmax_composed(x, 0).data), rtol=1e-9, atol=1e-12)
    assert gradcheck(lambda a: F.logsumexp(a, -1), [x])


def test_softmax_with_masked_entries():
    x = Tensor(np.array([[0.3, -np.inf, 1.0], [0.1, 0.2, -np.inf]]), requires_grad=True)
    p = F.softmax(x)
    assert p.data[0, 1] == 0 and p.data[1, 2] == 0
    np.testing.assert_allclose(p.data.sum(-1), 1.0)
    (p * Tensor(np.arange(6.0).reshape(2, 3))).sum().backward()
    assert np.all(np.isfinite(x.grad)) and x.grad[0, 1] == 0


@given(N=st.integers(1, 6), V=st.integers(2, 7), seed=seeds)
def test_cross_entropy(N, V, seed):
    rng = np.random.default_rng(seed)
    z = rand(rng, (N, V), -3, 3)
    t = rng.integers(0, V, size=N)
    assert gradcheck(lambda a: F.cross_entropy(a, t), [z])
    composed = -(F.log_softmax(z)[np.arange(N), t]).mean()
    np.testing.assert_allclose(F.cross_entropy(z, t).data, composed.data, rtol=1e-12)
    if N > 1:
        t2 = t.copy()
        t2[0] = -100
        assert gradcheck(lambda a: F.cross_entropy(a, t2), [z])
        kept = -(F.log_softmax(z)[np.arange(1, N), t[1:]]).mean()
        np.testing.assert_allclose(F.cross_entropy(z, t2).data, kept.data, rtol=1e-12)


def test_cross_entropy_against_a_hand_computation():
    z = Tensor(np.array([[0.0, 0.0, np.log(2.0)]]))
    # p = [1/4, 1/4, 1/2]; -log p[2] = log 2
    assert F.cross_entropy(z, np.array([2])).item() == pytest.approx(np.log(2.0), rel=1e-12)


@given(lead=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=3), D=st.integers(1, 6), seed=seeds)
def test_rms_norm_fused_equals_composed(lead, D, seed):
    rng = np.random.default_rng(seed)
    x, w = rand(rng, lead + (D,)), rand(rng, (D,))
    assert gradcheck(lambda a, b: F.rms_norm(a, b, 1e-5), [x, w])
    composed = x * ((x * x).mean(axis=-1, keepdims=True) + 1e-5).rsqrt() * w
    np.testing.assert_allclose(F.rms_norm(x, w, 1e-5).data, composed.data, rtol=1e-12)


def test_dropout_needs_rng_and_scales():
    x = Tensor(np.ones((1000,), dtype=np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="rng"):
        F.dropout(x, 0.5, None)
    y = F.dropout(x, 0.25, np.random.default_rng(0))
    kept = y.data != 0
    np.testing.assert_allclose(y.data[kept], 1 / 0.75, rtol=1e-6)
    assert 0.7 < kept.mean() < 0.8
    assert F.dropout(x, 0.25, None, training=False) is x
    y.sum().backward()
    np.testing.assert_allclose(x.grad, y.data)


# ------------------------------------------------------------------------------------------------ the engine
def test_gradients_accumulate_over_reused_nodes_and_calls():
    x = Tensor(np.array([2.0]), requires_grad=True)
    y = x * x + x  # x used three times
    y.sum().backward()
    assert x.grad[0] == pytest.approx(5.0)
    (x * 3.0).sum().backward()  # accumulates like torch
    assert x.grad[0] == pytest.approx(8.0)


def test_no_grad_records_nothing():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        y = x * 2
    assert not y.requires_grad
    with pytest.raises(ValueError):
        y.sum().backward()


def test_float32_stays_float32_with_python_scalars():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = (x * 0.5 + 1.0) / 3.0 - 2.0
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32


def test_array_protocol():
    t = Tensor(np.arange(3, dtype=np.float32))
    assert np.asarray(t).dtype == np.float32
    assert np.asarray(t, dtype=np.float64).dtype == np.float64
    assert Tensor([1.5, 2.5]).dtype == np.float32
    assert Tensor(np.array([1, 2])).dtype.kind == "i"


def test_gradcheck_catches_a_wrong_rule():
    def wrong_square(a):
        return Tensor._make(a.data ** 2, (a,), lambda g: (g * a.data,))  # should be 2·a

    x = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    with pytest.raises(AssertionError, match="gradcheck failed"):
        gradcheck(wrong_square, [x])


def test_deep_graph_does_not_recurse():
    x = Tensor(np.ones(2), requires_grad=True)
    y = x
    for _ in range(5000):
        y = y + 1.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0, 1.0])


@given(shape=shapes, seed=seeds)
def test_swiglu_fused_equals_composed(shape, seed):
    rng = np.random.default_rng(seed)
    a, u = rand(rng, shape, -4, 4), rand(rng, shape)
    assert gradcheck(F.swiglu, [a, u])
    np.testing.assert_allclose(F.swiglu(a, u).data, (ops.silu(a) * u).data, rtol=1e-12)


def attention_composed(q, k, v, causal=True):
    """Attention from primitives: repeat the kv heads, mask with where, softmax, weighted sum."""
    B, H, T, E = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    k = ops.concatenate([k[:, j:j + 1] for j in range(K) for _ in range(G)], axis=1)
    v = ops.concatenate([v[:, j:j + 1] for j in range(K) for _ in range(G)], axis=1)
    s = (q @ k.swapaxes(-1, -2)) * (1.0 / np.sqrt(E))
    if causal:
        s = ops.where(F.causal_mask(T, S), s, -np.inf)
    return F.softmax(s, -1) @ v


@given(B=st.integers(1, 2), K=st.integers(1, 2), G=st.integers(1, 3), T=st.integers(1, 4), extra=st.integers(0, 3),
       E=st.integers(1, 4), causal=st.booleans(), seed=seeds)
def test_attention_fused_equals_composed_with_gqa_and_cache_offset(B, K, G, T, extra, E, causal, seed):
    rng = np.random.default_rng(seed)
    S = T + extra  # a cache of `extra` earlier positions
    q, k, v = rand(rng, (B, K * G, T, E)), rand(rng, (B, K, S, E)), rand(rng, (B, K, S, E))
    np.testing.assert_allclose(F.scaled_dot_product_attention(q, k, v, causal).data,
                               attention_composed(q, k, v, causal).data, rtol=1e-10, atol=1e-12)
    assert gradcheck(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, causal), [q, k, v])


def test_causal_mask_with_offset():
    m = F.causal_mask(2, 4)  # two new queries after a cache of two
    np.testing.assert_array_equal(m, [[1, 1, 1, 0], [1, 1, 1, 1]])


@given(T=st.integers(1, 4), half=st.integers(1, 3), seed=seeds)
def test_rotary_fused_equals_composed(T, half, seed):
    rng = np.random.default_rng(seed)
    E = 2 * half
    x = rand(rng, (2, 3, T, E))
    ang = rng.uniform(-3, 3, size=(T, half))
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    composed = x * cos + ops.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin
    np.testing.assert_allclose(F.rotary(x, cos, sin).data, composed.data, rtol=1e-12)
    assert gradcheck(lambda a: F.rotary(a, cos, sin), [x])
    # a rotation keeps the norm of each (i, i + half) pair
    np.testing.assert_allclose(np.linalg.norm(F.rotary(x, cos, sin).data, axis=-1),
                               np.linalg.norm(x.data, axis=-1), rtol=1e-12)
