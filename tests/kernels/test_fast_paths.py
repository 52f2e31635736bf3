"""The fast paths (lora_ref.kernels.training) equal their readable NumPy twins (lora_ref.kernels.reference).

Each fused operation is run twice on the same inputs, once with ``fast.readable()`` and once with
``fast.fast_paths()``, and its output and its gradients (of sum(out · w) for a fixed random w) are compared; then
a whole model's loss and every parameter gradient, and AdamW steps. The twins compute the same formulas in the same
order, except that the kernels' exp is a polynomial (≤ 2 ulp) and some row sums run in eight lanes, so float32
results agree to a few ulps: the tolerances below. Spies check that the kernels really ran (a silent fallback to the
twin would make every comparison pass). ``test_fast_paths_without_jit`` runs this file again with
``NUMBA_DISABLE_JIT=1``.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.autograd import functional as F
from lora_ref.autograd import ops
from lora_ref.autograd.tensor import Tensor
from lora_ref.kernels import blas
from lora_ref.kernels import switch as fast
from lora_ref.kernels import training as train_kernels

ROOT = Path(__file__).resolve().parents[2]

# float32 tolerances, in one place: a few ulps (2^-23 ≈ 1.2e-7) per element after a handful of roundings that
# differ between the twins; atol for values that cancel to near zero (gradients of a mean over many rows).
TOL32 = {"rtol": 2e-5, "atol": 1e-6}
# a whole model: differences pass through a dozen layers of matmuls and normalisations
MODEL_TOL32 = {"rtol": 1e-4, "atol": 1e-6}


def _run(fn, inputs: dict, *, fast_on: bool, seed: int = 0):
    """Output and gradients of sum(fn(**inputs) · w) with the fast paths on or off."""
    ctx = fast.fast_paths() if fast_on else fast.readable()
    with ctx:
        ts = {k: Tensor(v.copy(), requires_grad=v.dtype.kind == "f") for k, v in inputs.items()}
        out = fn(**ts)
        w = np.random.default_rng(seed).standard_normal(out.shape).astype(out.data.dtype)
        (out * Tensor(w)).sum().backward()
    return out.data, {k: t.grad for k, t in ts.items() if t.requires_grad}


def _assert_twins_equal(fn, inputs: dict, tol=TOL32):
    out_r, g_r = _run(fn, inputs, fast_on=False)
    out_f, g_f = _run(fn, inputs, fast_on=True)
    assert out_f.dtype == out_r.dtype == np.float32
    np.testing.assert_allclose(out_f, out_r, **tol)
    assert g_f.keys() == g_r.keys()
    for k in g_r:
        assert g_f[k].dtype == np.float32, k
        np.testing.assert_allclose(g_f[k], g_r[k], **tol, err_msg=f"gradient of {k}")


@contextlib.contextmanager
def _spy(name: str):
    """Count the calls of a kernel twin inside the block (proves the chooser picked the fast path)."""
    calls: list[int] = []
    inner = getattr(train_kernels, name)

    def wrapper(*a, **k):
        calls.append(1)
        return inner(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_kernels, name, wrapper)
        yield calls


def _f32(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ exp
def test_exp32_within_two_ulp_of_exp():
    x = np.linspace(-103.9, 88.72, 200_001, dtype=np.float32)
    if numba.config.DISABLE_JIT:
        x = x[::997]  # Python loops: a sample
    got = _exp32_array(x).astype(np.float64)
    ref = np.exp(x.astype(np.float64))
    ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)  # subnormal spacing below e^-87.3
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - ref) / ulp) <= 2.0


def _exp32_array(x):
    out = np.empty_like(x)
    _exp_loop(x, out)
    return out


@numba.njit
def _exp_loop(x, out):
    for i in range(x.shape[0]):
        out[i] = train_kernels.exp32(x[i])


def test_exp32_edges():
    f = train_kernels.exp32
    assert f(np.float32(0.0)) == 1.0
    assert f(np.float32(-np.inf)) == 0.0 and f(np.float32(-104.0)) == 0.0
    assert f(np.float32(np.inf)) == np.inf and f(np.float32(88.73)) == np.inf
    assert np.isnan(f(np.float32(np.nan)))
    assert np.float32(f(np.float32(1.0))).dtype == np.float32


# ------------------------------------------------------------------------------------------------ each operation
dims = st.integers(1, 9)


@given(n=dims, d=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_rms_norm_twins(n, d, seed):
    rng = np.random.default_rng(seed)
    with _spy("rms_norm_forward") as calls:
        _assert_twins_equal(lambda x, weight: F.rms_norm(x, weight, 1e-5),
                            {"x": _f32(rng, (2, n, d)), "weight": 1 + _f32(rng, (d,), 0.1)})
    assert len(calls) == 1


def test_rms_norm_frozen_weight_has_no_gradient():
    rng = np.random.default_rng(0)
    x = Tensor(_f32(rng, (3, 5, 16)), requires_grad=True)
    w = Tensor(np.ones(16, np.float32))  # frozen, as in LoRA
    with fast.fast_paths():
        F.rms_norm(x, w, 1e-6).sum().backward()
    assert w.grad is None and x.grad.shape == (3, 5, 16)


@given(n=dims, f=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_swiglu_twins(n, f, seed):
    rng = np.random.default_rng(seed)
    with _spy("swiglu_forward") as calls:
        gate = _f32(rng, (n, 3, f), 4.0)
        gate.flat[0] = -120.0  # e^120 overflows: σ = 0 on both sides
        _assert_twins_equal(F.swiglu, {"gate": gate, "up": _f32(rng, (n, 3, f))})
    assert len(calls) == 1


@given(b=st.integers(1, 3), h=st.integers(1, 3), t=dims, e=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_rotary_twins_and_gradient_layout(b, h, t, e, seed):
    rng = np.random.default_rng(seed)
    E = 2 * e
    with _spy("rotary_forward") as calls:
        cos, sin = _f32(rng, (t, E)), _f32(rng, (t, E))
        x_bthe = _f32(rng, (b, t, h, E))  # a projection's output, seen as (B, H, T, E) through a transpose

        def fn(x):
            return F.rotary(x.transpose(0, 2, 1, 3), cos, sin)

        _assert_twins_equal(fn, {"x": x_bthe})
    assert len(calls) == 1
    with fast.fast_paths():
        xt = Tensor(x_bthe.transpose(0, 2, 1, 3), requires_grad=True)
        F.rotary(xt, cos, sin).sum().backward()
    assert xt.grad.transpose(0, 2, 1, 3).flags.c_contiguous  # written in the projection's layout


@given(b=st.integers(1, 2), k=st.integers(1, 2), g=st.integers(1, 3), t=st.integers(1, 20),
       past=st.integers(0, 5), e=st.integers(1, 9), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_twins(b, k, g, t, past, e, causal, seed):
    rng = np.random.default_rng(seed)
    S = t + past  # a KV cache of `past` earlier positions
    with _spy("attention_softmax") as calls:
        _assert_twins_equal(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal),
                            {"q": _f32(rng, (b, k * g, t, e), 2.0), "k": _f32(rng, (b, k, S, e), 2.0),
                             "v": _f32(rng, (b, k, S, e))})
    assert len(calls) == 1


@given(g=st.integers(1, 3), t=st.integers(1, 150), past=st.integers(0, 200), causal=st.booleans(),
       seed=st.integers(0, 2**16))
def test_attention_softmax_twins_on_long_rows(g, t, past, causal, seed):
    """The compiled softmax runs each row's loops to the causal limit rounded up to a multiple of 64 (or the row's
    end) and zeroes the rest: against the readable twin on rows up to 350 keys long, forward and backward."""
    from lora_ref.kernels import reference

    rng = np.random.default_rng(seed)
    S = t + past
    s = _f32(rng, (2, g * t, S), 4.0)
    dp = _f32(rng, (2, g * t, S))
    p_f = train_kernels.attention_softmax(s.copy(), np.float32(0.125), t, causal)
    p_r = reference.attention_softmax(s.copy(), np.float32(0.125), t, causal)
    np.testing.assert_allclose(p_f, p_r, **TOL32)
    if causal:  # every key past a query's limit is exactly 0
        lim = np.arange(g * t) % t + past + 1
        assert not p_f[:, np.arange(S)[None, :] >= lim[:, None]].any()
    ds_f = train_kernels.attention_softmax_backward(dp.copy(), p_r, np.float32(0.125), t, causal)
    ds_r = reference.attention_softmax_backward(dp.copy(), p_r, np.float32(0.125), t, causal)
    np.testing.assert_allclose(ds_f, ds_r, **TOL32)


def _assert_same_results(a, b):
    """Bit for bit (the sign of a zero included), except that a NaN may come out with the other sign bit."""
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    np.testing.assert_array_equal(a.view(np.uint32)[~nan], b.view(np.uint32)[~nan])


def _narrow_build(kernel):
    """The same kernel compiled without its request for 512-bit vectors (LLVM's default width here)."""
    import types

    from numba import njit

    def default_width():
        return None

    f = kernel.py_func
    g = dict(f.__globals__, prefer_wide_vectors=njit(inline="always")(default_width))
    narrow = types.FunctionType(f.__code__, g, f.__name__, f.__defaults__, f.__closure__)
    return njit(parallel=True, nogil=True)(narrow)


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="compares two compiled builds; without JIT both are Python")
def test_wide_vector_kernels_give_the_bits_of_the_default_width():
    """The kernels that ask for 512-bit vectors compute the same operations on more lanes: bit for bit what the
    default (256-bit) build gives (a NaN's sign bit aside), on rows whose lengths are and are not multiples of the
    vector width, with NaN, ±inf, very negative and very positive inputs."""
    rng = np.random.default_rng(11)
    names = ("_swiglu_forward_kernel", "_swiglu_backward_kernel", "_causal_softmax_kernel",
             "_cross_entropy_forward_kernel")
    both = {name: (getattr(train_kernels, name), _narrow_build(getattr(train_kernels, name))) for name in names}
    for n, m in ((37, 101), (64, 512), (5, 1536), (300, 100)):
        a, u, g = (_f32(rng, (n, m), 6.0) for _ in range(3))
        a[0, :4] = [np.nan, np.inf, -np.inf, -120.0]
        outs = [np.empty_like(a) for _ in range(2)]
        for out, k in zip(outs, both["_swiglu_forward_kernel"]):
            k(a, u, out)
        _assert_same_results(outs[0], outs[1])
        grads = [(np.empty_like(a), np.empty_like(a)) for _ in range(2)]
        for (ga, gu), k in zip(grads, both["_swiglu_backward_kernel"]):
            k(g, a, u, ga, gu)
        _assert_same_results(grads[0][0], grads[1][0])
        _assert_same_results(grads[0][1], grads[1][1])
        T = n if n <= m else m  # rows in whole groups of T queries, T <= S (n = 300 rows: 3 groups of 100)
        for T, causal in ((T, True), (1, True), (T, False)):
            probs = [a.copy() for _ in range(2)]
            for p, k in zip(probs, both["_causal_softmax_kernel"]):
                k(p, np.float32(0.3), T, causal)
            _assert_same_results(probs[0], probs[1])
        t = rng.integers(0, m, n)
        t[::3] = -100
        res = [(np.empty(n, np.float32), np.empty(n, np.float32)) for _ in range(2)]
        for (lse, nll), k in zip(res, both["_cross_entropy_forward_kernel"]):
            k(a, t, -100, lse, nll)
        _assert_same_results(res[0][0], res[1][0])
        _assert_same_results(res[0][1], res[1][1])


@pytest.mark.parametrize("shape, T", [((4, 6), 5), ((4, 6), 0), ((6, 4), 6), ((6,), 1)])
def test_causal_attention_softmax_refuses_rows_that_are_not_whole_query_groups(shape, T):
    """Causal scores (..., G·T, S) need 1 <= T <= S and whole groups of T rows; the compiled kernel would otherwise
    index outside a row, so both twins refuse other shapes."""
    from lora_ref.kernels import reference

    for impl in (train_kernels, reference):
        with pytest.raises(ValueError, match="attention softmax"):
            impl.attention_softmax(np.zeros(shape, np.float32), np.float32(1.0), T, True)
        with pytest.raises(ValueError, match="attention softmax"):
            impl.attention_softmax_backward(np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                                            np.float32(1.0), T, True)


def test_attention_without_mask_takes_more_queries_than_keys():
    """Without the causal mask T plays no part: 6 queries over 3 keys (cross-attention) work with the fast paths
    on and off, and agree."""
    from lora_ref.kernels import reference

    rng = np.random.default_rng(5)
    _assert_twins_equal(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False),
                        {"q": _f32(rng, (1, 2, 6, 4)), "k": _f32(rng, (1, 2, 3, 4)), "v": _f32(rng, (1, 2, 3, 4))})
    s = _f32(rng, (4, 6))  # 4 rows that are not whole groups of T = 5: no matter without the mask
    p = [impl.attention_softmax(s.copy(), np.float32(0.5), 5, False) for impl in (train_kernels, reference)]
    np.testing.assert_allclose(p[0], p[1], **TOL32)
    np.testing.assert_allclose(p[1], np.exp(s / 2) / np.exp(s / 2).sum(axis=-1, keepdims=True), rtol=1e-5)


@given(b=st.integers(1, 2), k=st.integers(1, 2), g=st.integers(1, 3), t=st.integers(1, 70),
       past=st.integers(0, 9), e=st.integers(1, 9), block=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_causal_attention_blocks_equal_the_full_computation(b, k, g, t, past, e, block, seed):
    """The block-by-block causal attention (fast paths on) against the readable full masked one, forward and
    every gradient, for any block size: the masked keys a block skips contribute nothing."""
    rng = np.random.default_rng(seed)
    S = t + past
    with pytest.MonkeyPatch.context() as mp, _spy("attention_softmax") as calls:
        mp.setattr(F, "ATTENTION_BLOCK", block)
        blocks = F._query_blocks(t, S)
        _assert_twins_equal(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
                            {"q": _f32(rng, (b, k * g, t, e), 2.0), "k": _f32(rng, (b, k, S, e), 2.0),
                             "v": _f32(rng, (b, k, S, e))})
    assert len(calls) == len(blocks)
    assert blocks[0][0] == 0 and blocks[-1][1] == t and all(a < b_ for a, b_ in blocks)
    assert all(x[1] == y[0] for x, y in zip(blocks, blocks[1:]))


def test_causal_attention_blocks_with_the_readable_twins(monkeypatch):
    """float64 runs the readable softmax twins, also block by block (fast paths on): the same values as the full
    masked computation, forward and gradients (no compiled code involved, so this holds under NUMBA_DISABLE_JIT)."""
    from lora_ref.autograd.tensor import Tensor

    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((2, 6, 37, 5)), rng.standard_normal((2, 2, 41, 5)), rng.standard_normal((2, 2, 41, 5))
    g = rng.standard_normal((2, 6, 37, 5))
    monkeypatch.setattr(F, "ATTENTION_BLOCK", 8)
    assert F._query_blocks(37, 41) == [(0, 16), (16, 32), (32, 37)]  # inner edges on multiples of 16
    from lora_ref.kernels import reference

    calls = []
    inner = reference.attention_softmax
    monkeypatch.setattr(reference, "attention_softmax", lambda s, *a: calls.append(s.shape) or inner(s, *a))
    results = []
    for on in (True, False):
        with (fast.fast_paths() if on else fast.readable()):
            ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
            out = F.scaled_dot_product_attention(*ts)
            (out * Tensor(g)).sum().backward()
        results.append([out.data] + [t.grad for t in ts])
    assert sorted(calls[:3]) == [(2, 2, 3 * 5, 41), (2, 2, 3 * 16, 20), (2, 2, 3 * 16, 36)]  # the blocks (any order)
    assert calls[3:] == [(2, 2, 3 * 37, 41)]  # then the full computation
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_causal_attention_blocks_same_bits_on_one_and_two_threads():
    """With two threads the blocks are shared out whole (each block's products and softmax on one thread); with one
    they run in order through the chunked products: the same bits, forward and backward."""
    from lora_ref.threads import limited

    rng = np.random.default_rng(5)
    q, kv = _f32(rng, (2, 6, 256, 16)), _f32(rng, (2, 2, 256, 16))
    g = _f32(rng, (2, 6, 256, 16))
    results = []
    for n in (1, 2):
        with limited(n), fast.fast_paths():
            ts = [Tensor(a.copy(), requires_grad=True) for a in (q, kv, kv)]
            out = F.scaled_dot_product_attention(*ts)
            (out * Tensor(g)).sum().backward()
        results.append([out.data] + [t.grad for t in ts])
    assert len(F._query_blocks(256, 256)) == 8
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_causal_attention_blocks_skip_the_masked_keys(monkeypatch):
    """T = 512 runs as 8 blocks of 64 queries, block i against the 64·(i+1) keys its last query sees: 56 % of
    the full score matrix (36 of 64 tiles), the probabilities kept for backward included."""
    shapes = []
    inner = train_kernels.attention_softmax

    def record(scores, *a):
        shapes.append(scores.shape)
        return inner(scores, *a)

    monkeypatch.setattr(train_kernels, "attention_softmax", record)
    rng = np.random.default_rng(0)
    q, kv = _f32(rng, (1, 6, 512, 8)), _f32(rng, (1, 2, 512, 8))
    with fast.fast_paths():
        F.scaled_dot_product_attention(q, kv, kv)
    assert F._query_blocks(512, 512) == [(64 * i, 64 * (i + 1)) for i in range(8)]
    assert sorted(shapes) == [(1, 2, 3 * 64, 64 * (i + 1)) for i in range(8)]  # taken longest first by 2 threads
    assert sum(a * b_ for _, _, a, b_ in shapes) / (3 * 512 * 512) == 36 / 64  # per key/value head


@given(n=st.integers(1, 30), v=st.integers(2, 50), seed=st.integers(0, 2**16), ignore=st.booleans())
def test_cross_entropy_twins(n, v, seed, ignore):
    rng = np.random.default_rng(seed)
    z = _f32(rng, (n, v), 3.0)
    t = rng.integers(0, v, n)
    if ignore and n > 1:
        t[rng.integers(0, n)] = -100
    with _spy("cross_entropy_forward") as calls:
        _assert_twins_equal(lambda logits: F.cross_entropy(logits, t) * 3.0, {"logits": z})
    assert len(calls) == 1


@given(n=st.integers(1, 60), v=st.integers(1, 12), d=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_embedding_gradient_twins_bit_exact(n, v, d, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, v, (2, n))  # repeats accumulate in the same order as np.add.at
    w = _f32(rng, (v, d))
    out_r, g_r = _run(lambda weight: ops.embedding(weight, ids), {"weight": w}, fast_on=False)
    with _spy("embedding_grad") as calls:
        out_f, g_f = _run(lambda weight: ops.embedding(weight, ids), {"weight": w}, fast_on=True)
    assert len(calls) == 1
    np.testing.assert_array_equal(g_f["weight"], g_r["weight"])


def test_float64_runs_the_readable_twin():
    names = ("rms_norm_forward", "swiglu_forward", "rotary_forward", "attention_softmax", "cross_entropy_forward")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 4, 6))
    with contextlib.ExitStack() as stack:
        spies = [stack.enter_context(_spy(n)) for n in names]
        with fast.fast_paths():
            F.rms_norm(x, np.ones(6), 1e-6)
            F.swiglu(x, x)
            F.rotary(x, np.ones((4, 6)), np.zeros((4, 6)))
            F.scaled_dot_product_attention(x, x, x)
            F.cross_entropy(x.reshape(-1, 6), np.zeros(16, np.int64))
    assert all(len(c) == 0 for c in spies)


# ------------------------------------------------------------------------------------------------ AdamW
def _adamw_run(fast_on: bool):
    from lora_ref.modeling.nn import Parameter
    from lora_ref.training.optim import AdamW

    rng = np.random.default_rng(3)
    ps = [Parameter(_f32(rng, (7, 5))), Parameter(_f32(rng, (5,)))]
    opt = AdamW([{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}],
                lr=3e-3, betas=(0.9, 0.95))
    with fast.fast_paths() if fast_on else fast.readable():
        for step in range(4):
            for p in ps:
                p.grad = _f32(np.random.default_rng(step), p.shape)
            opt.step()
    return [p.data for p in ps], [(s["exp_avg"], s["exp_avg_sq"]) for s in opt.state.values()]


def test_adamw_fused_update_equals_the_readable_update(monkeypatch):
    calls = []
    inner = train_kernels.adamw_update
    monkeypatch.setattr(train_kernels, "adamw_update", lambda *a: (calls.append(1), inner(*a)))
    w_r, st_r = _adamw_run(False)
    w_f, st_f = _adamw_run(True)
    assert len(calls) == 8
    for a, b in zip(w_f, w_r):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for (m1, v1), (m2, v2) in zip(st_f, st_r):
        np.testing.assert_allclose(m1, m2, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(v1, v2, rtol=1e-6, atol=1e-15)


# ------------------------------------------------------------------------------------------------ whole model
def _tiny_model(rng):
    from lora_ref.modeling.llama import Llama

    cfg = {"vocab_size": 40, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "initializer_range": 0.2}
    return Llama(cfg, rng=rng)


def _model_loss_and_grads(fast_on: bool, lora: str | None = None):
    from lora_ref.training.loop import lm_loss

    model = _tiny_model(np.random.default_rng(0))
    if lora:
        from lora_ref.adapters.lora import LoraConfig, inject_lora
        from lora_ref.adapters.qlora import inject_qlora, quantize_model

        cfg = LoraConfig(r=4, lora_alpha=7, target_modules=["q_proj", "v_proj", "down_proj"])
        if lora == "qlora":
            inject_qlora(quantize_model(model), cfg, rng=np.random.default_rng(1))
        else:
            inject_lora(model, cfg, rng=np.random.default_rng(1))
        for n, p in model.named_parameters():  # B ≠ 0, so the adapter path matters
            if "lora_B" in n:
                p.data[...] = np.random.default_rng(2).standard_normal(p.shape) * 0.1
    rng = np.random.default_rng(5)
    x, y = rng.integers(0, 40, (3, 17)), rng.integers(0, 40, (3, 17))
    with fast.fast_paths() if fast_on else fast.readable():
        loss = lm_loss(model, x, y)
        loss.backward()
    return float(loss.data), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [None, "lora", "qlora"])
def test_model_loss_and_gradients_fast_equal_readable(lora, monkeypatch):
    loss_r, g_r = _model_loss_and_grads(False, lora)
    calls = []
    inner = F.lora_add
    monkeypatch.setattr(F, "lora_add", lambda *a: (calls.append(1), inner(*a))[1])
    loss_f, g_f = _model_loss_and_grads(True, lora)
    assert len(calls) == (0 if lora is None else 2 * 3)  # 2 layers × 3 adapted projections, fused and in place
    assert abs(loss_f - loss_r) <= 1e-5 * abs(loss_r)
    assert g_f.keys() == g_r.keys() and len(g_r) > 0
    for n in g_r:
        assert g_f[n].dtype == np.float32, n
        np.testing.assert_allclose(g_f[n], g_r[n], **MODEL_TOL32, err_msg=n)


def test_training_steps_fast_equal_readable():
    from lora_ref.training.loop import decay_groups, train_step
    from lora_ref.training.optim import AdamW

    losses = {}
    for fast_on in (False, True):
        model = _tiny_model(np.random.default_rng(0))
        opt = AdamW(decay_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95))
        rng = np.random.default_rng(5)
        with fast.fast_paths() if fast_on else fast.readable():
            losses[fast_on] = [train_step(model, opt, *rng.integers(0, 40, (2, 3, 17))) for _ in range(4)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert losses[True][-1] < losses[True][0]


# ------------------------------------------------------------------------------------- layers run in parts
def _parts_model(adapter: str | None):
    from lora_ref.modeling.llama import Llama

    # wide enough that a part's products are regular BLAS products (blas.regular_product): with LoRA r = 16 on
    # every linear layer (the smallest: 16 × 256), 16 × 256 · rows > 10⁶ needs 245 rows per part
    cfg = {"vocab_size": 40, "hidden_size": 256, "intermediate_size": 384, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 1024,
           "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "initializer_range": 0.05}
    model = Llama(cfg, rng=np.random.default_rng(0))
    if adapter:
        from lora_ref.adapters.lora import LoraConfig, inject_lora

        inject_lora(model, LoraConfig(r=16, lora_alpha=7, target_modules="all-linear", use_dora=adapter == "dora",
                                      init_lora_weights=False), rng=np.random.default_rng(1))
    return model.eval()


def _logits(model, ids, *, threads: int, whole: bool, past: int = 0):
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.llama import KVCache, whole_rows
    from lora_ref.threads import limited

    with limited(threads), fast.fast_paths(), no_grad(), whole_rows() if whole else contextlib.nullcontext():
        cache = KVCache(len(model.model.layers)) if past else None
        head = model(ids[:, :past], cache).data if past else None
        return head, model(ids[:, past:], cache).data


def test_parts_run_without_gradients_in_every_thread(monkeypatch):
    """Gradient recording is per thread: each part turns it off in the pool's thread too (no graph is built
    there)."""
    from lora_ref.autograd import tensor as T
    from lora_ref.modeling import llama as L

    model = _parts_model(None)
    seen = []
    inner = L.LlamaMLP.forward
    monkeypatch.setattr(L.LlamaMLP, "forward", lambda self, x: (seen.append(T.is_grad_enabled()), inner(self, x))[1])
    out = _logits(model, np.random.default_rng(3).integers(0, 40, (1, 512)), threads=2, whole=False)[1]
    assert len(seen) == 4 and not any(seen) and out.shape == (1, 512, 40)


# every case with the kernels compiled; without JIT (test_fast_paths_without_jit, Python loops) one of them
_PARTS_CASES = [(a, b, t, past) for a in (None, "lora", "dora")
                for b, t, past in [(1, 512, 0), (3, 171, 0), (2, 261, 37), (2, 264, 37)]
                if not numba.config.DISABLE_JIT or (a, b, t, past) == ("lora", 2, 264, 37)]


@pytest.mark.parametrize("adapter,b,t,past", _PARTS_CASES)
def test_layers_in_parts_give_the_same_bits(adapter, b, t, past, monkeypatch):
    """Without gradients, on two threads, each decoder layer runs its position-wise steps as one task per range of
    positions (``row_parts``): the logits have the same bits as the layers run as one piece on two threads and on
    one, without and with LoRA on every linear layer, for several batches and after a KV cache; DoRA layers are
    refused (and give the same logits)."""
    from lora_ref.modeling import llama as L

    model = _parts_model(adapter)
    ids = np.random.default_rng(3).integers(0, 40, (b, past + t))
    parts = []
    inner = L.LlamaDecoderLayer._forward_in_parts
    monkeypatch.setattr(L.LlamaDecoderLayer, "_forward_in_parts",
                        lambda self, *a: (parts.append(a[-1]), inner(self, *a))[1])
    got = _logits(model, ids, threads=2, whole=False, past=past)
    if adapter == "dora":  # DoRA's weight norm is a product of its own: its layers stay in one piece
        assert parts == []
    elif blas.cut_steps()[0] == 1:  # both layers of the new positions ran in two parts
        assert parts == [[(0, t // 2), (t // 2, t)]] * 2
    elif b == 1 or t % 12 == 0:  # step 12: split at a multiple of 12 positions, 12 · ⌊t / 24⌋
        half = {512: 252, 264: 132}[t]
        assert parts == [[(0, half), (half, t)]] * 2
    else:  # step 12, several sequences whose length is not a multiple of 12: a part's rows would sit elsewhere
        assert parts == []
    parts.clear()
    for threads in (2, 1):
        want = _logits(model, ids, threads=threads, whole=True, past=past)
        assert parts == []
        for a, w in zip(got, want):
            if w is not None:
                np.testing.assert_array_equal(a, w)


def test_row_parts_only_where_the_result_cannot_change():
    """Parts only without gradients, in eval mode, with the fast paths on, two or more BLAS threads, no 4-bit layer,
    enough rows per part, and outside ``whole_rows``."""
    from lora_ref.adapters.qlora import quantize_model
    from lora_ref.autograd.tensor import no_grad
    from lora_ref.modeling.llama import ROW_PART_MIN, row_parts, whole_rows
    from lora_ref.threads import limited

    model = _parts_model(None)
    layer = model.model.layers[0]
    step = blas.cut_steps()[0]  # 1 on OpenBLAS's AVX-512 cores, 12 on its AVX2 cores: the shapes below suit both
    assert step in (1, 12)
    x = Tensor(np.zeros((1, 144, 256), np.float32))  # 2 × 72 positions: 72 = 6 · 12 >= ROW_PART_MIN
    with limited(2), fast.fast_paths():
        assert row_parts(layer, x) is None  # gradients are recorded
        with no_grad():
            assert row_parts(layer, x) == [(0, 72), (72, 144)]
            assert row_parts(layer, Tensor(np.zeros((1, 2 * ROW_PART_MIN - 1, 256), np.float32))) is None
            # 130 positions: 65 + 65 at step 1; at step 12 the first part would end at 60 < ROW_PART_MIN
            assert row_parts(layer, Tensor(np.zeros((1, 130, 256), np.float32))) == \
                ([(0, 65), (65, 130)] if step == 1 else None)
            assert row_parts(layer, Tensor(np.zeros((8, 24, 256), np.float32))) == [(0, 12), (12, 24)]
            # fewer than 8 positions a part (and at step 12, 15 is no multiple of 12)
            assert row_parts(layer, Tensor(np.zeros((64, 15, 256), np.float32))) is None
            assert row_parts(layer, Tensor(np.zeros((1, 144, 256)))) is None  # float64
            lora = _parts_model("lora").model.layers[0]  # r = 16: 16 × 256 · rows > 10⁶ needs 245 rows per part
            assert row_parts(lora, Tensor(np.zeros((1, 2 * 244, 256), np.float32))) is None
            assert row_parts(lora, Tensor(np.zeros((1, 504, 256), np.float32))) == [(0, 252), (252, 504)]
            with whole_rows():
                assert row_parts(layer, x) is None
            with fast.readable():
                assert row_parts(layer, x) is None
            with limited(1):
                assert row_parts(layer, x) is None
            layer.train()  # no dropout anywhere: training mode changes nothing
            assert row_parts(layer, x) == [(0, 72), (72, 144)]
            wide = Tensor(np.zeros((1, 504, 256), np.float32))
            lora.self_attn.q_proj.lora_dropout["default"] = 0.1
            assert row_parts(lora, wide) == [(0, 252), (252, 504)]  # eval mode: dropout is off
            lora.train()
            assert row_parts(lora, wide) is None  # dropout draws random numbers in order
            lora.eval()
            q = lora.self_attn.q_proj
            q.merge()
            assert row_parts(lora, wide) == [(0, 252), (252, 504)]  # merged: the base layer alone, nothing changes
            q.disable_adapters = True  # merged but disabled: the next forward unmerges, writing the weight
            assert row_parts(lora, wide) is None
            q.unmerge()
            assert row_parts(lora, wide) == [(0, 252), (252, 504)]
            assert row_parts(_parts_model("dora").model.layers[0], wide) is None
            from lora_ref.modeling.nn import Linear

            class Mine(Linear):  # a subclass may compute anything: it must declare row_parallel itself
                def forward(self, x):
                    return super().forward(x)

            other = _parts_model(None).model.layers[0]
            mine = Mine(256, 256, bias=False)
            mine.weight.data[...] = other.self_attn.q_proj.weight.data[:256]
            other.self_attn.o_proj = mine
            assert row_parts(other, x) is None
            quantize_model(model)
            assert row_parts(layer, x) is None


# ------------------------------------------------------------------------------------------------ switch
def test_switch_and_environment():
    prev = fast.set_enabled(True)
    try:
        with fast.readable():
            assert not fast.enabled() and not fast.applies(np.zeros(1, np.float32))
        assert fast.enabled() and fast.applies(np.zeros(1, np.float32)) and not fast.applies(np.zeros(1))
    finally:
        fast.set_enabled(prev)
    code = "from lora_ref import fast; print(fast.enabled())"
    for env, want in (("0", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LORA_REF_FAST=env), cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == want, out.stderr
    bad = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, LORA_REF_FAST="yes"), cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "LORA_REF_FAST" in bad.stderr


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="this process already runs without JIT")
def test_fast_paths_without_jit():
    """The same tests with the kernels run as Python (NUMBA_DISABLE_JIT=1), fast paths forced on."""
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", LORA_REF_FAST="1", HYPOTHESIS_MAX_EXAMPLES="4")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "not without_jit and not environment"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
