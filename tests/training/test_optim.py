"""AdamW, gradient clipping and the cosine schedule: by hand, and against torch / transformers on the same inputs."""

import math

import numpy as np
import pytest

from lora_ref.modeling.nn import Parameter
from lora_ref.training.optim import AdamW, clip_grad_norm, cosine_schedule, global_grad_norm

SHAPES = [(5, 3), (7,), (2, 3, 4)]


def _params(rng, dtype=np.float32):
    return [Parameter(rng.standard_normal(s).astype(dtype)) for s in SHAPES]


def test_adamw_first_step_by_hand():
    # step 1: m = (1-b1) g, v = (1-b2) g², m̂ = g, v̂ = g² → p ← p(1 − lr λ) − lr · g / (|g| + eps)
    p = Parameter(np.array([1.0, -2.0, 0.5], dtype=np.float64))
    p.grad = np.array([0.3, -0.1, 0.0])
    AdamW([p], lr=0.1, weight_decay=0.5, eps=1e-8).step()
    expected = np.array([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5) - 0.1 * np.array([0.3, -0.1, 0.0]) / (
        np.abs([0.3, -0.1, 0.0]) + 1e-8)
    np.testing.assert_allclose(p.data, expected, rtol=1e-12, atol=1e-15)


def test_adamw_updates_in_place_and_only_trainable_parameters():
    rng = np.random.default_rng(0)
    w, frozen, no_grad = _params(rng)
    frozen.requires_grad = False
    before_frozen, before_nograd = frozen.data.copy(), no_grad.data.copy()
    opt = AdamW([w, frozen, no_grad], lr=1e-2)
    assert [id(q) for q in opt.parameters()] == [id(w), id(no_grad)]  # the frozen one is dropped
    arr = w.data
    w.grad = rng.standard_normal(w.shape).astype(np.float32)
    frozen.grad = rng.standard_normal(frozen.shape).astype(np.float32)  # must be ignored
    opt.step()
    assert w.data is arr  # updated in place
    assert not np.array_equal(arr, _params(np.random.default_rng(0))[0].data)
    np.testing.assert_array_equal(frozen.data, before_frozen)
    np.testing.assert_array_equal(no_grad.data, before_nograd)
    assert set(opt.state) == {id(w)}  # state only for the trainable parameter
    assert opt.state_bytes() == 2 * w.data.nbytes
    opt.zero_grad()
    assert w.grad is None


def test_adamw_rejects_bad_settings():
    p = Parameter(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="lr"):
        AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(0.9, 1.0))
    p.requires_grad = False
    with pytest.raises(ValueError, match="no trainable parameters"):
        AdamW([p])


@pytest.mark.interop
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adamw_equals_torch(dtype):
    import torch

    rng = np.random.default_rng(1)
    ours = _params(rng, dtype)
    theirs = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in ours]
    groups = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6)
    opt = AdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}], **groups)
    topt = torch.optim.AdamW([{"params": theirs[:2], "weight_decay": 0.1},
                              {"params": theirs[2:], "weight_decay": 0.0}], **groups)
    for step in range(12):
        lr = 3e-2 * (1 - step / 20)  # a changing learning rate, set between steps
        opt.lr = lr
        for g in topt.param_groups:
            g["lr"] = lr
        for p, t in zip(ours, theirs):
            g = rng.standard_normal(p.shape).astype(dtype)
            p.grad = g
            t.grad = torch.from_numpy(g.copy())
        opt.step()
        topt.step()
    tol = 1e-6 if dtype == np.float32 else 1e-13
    for p, t in zip(ours, theirs):
        np.testing.assert_allclose(p.data, t.detach().numpy(), rtol=tol, atol=tol)
        st = topt.state[t]
        np.testing.assert_allclose(opt.state[id(p)]["exp_avg_sq"], st["exp_avg_sq"].numpy(), rtol=tol, atol=1e-12)


@pytest.mark.interop
def test_clip_grad_norm_equals_torch():
    import torch

    rng = np.random.default_rng(2)
    for max_norm in (0.5, 100.0):  # clipped, and left alone
        ours = _params(rng)
        theirs = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for p in ours]
        for p, t in zip(ours, theirs):
            g = rng.standard_normal(p.shape).astype(np.float32)
            p.grad = g.copy()
            t.grad = torch.from_numpy(g)
        norm = clip_grad_norm(ours, max_norm)
        tnorm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        assert norm == pytest.approx(float(tnorm), rel=1e-6)
        for p, t in zip(ours, theirs):
            np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-6, atol=1e-7)
    assert global_grad_norm(ours) == pytest.approx(min(norm, 100.0), rel=1e-5)


def test_clip_grad_norm_by_hand():
    p = Parameter(np.zeros(2, np.float64))
    q = Parameter(np.zeros(1, np.float64))
    p.grad, q.grad = np.array([3.0, 0.0]), np.array([4.0])  # global norm 5
    assert clip_grad_norm([p, q], 1.0, eps=0.0) == 5.0
    np.testing.assert_allclose(np.concatenate([p.grad, q.grad]), [0.6, 0.0, 0.8])


def test_cosine_schedule_by_hand():
    kw = dict(max_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert cosine_schedule(0, **kw) == 0.0
    assert cosine_schedule(5, **kw) == pytest.approx(0.5)
    assert cosine_schedule(10, **kw) == pytest.approx(1.0)
    assert cosine_schedule(60, **kw) == pytest.approx(0.55)  # halfway through the decay: (max + min) / 2
    assert cosine_schedule(110, **kw) == pytest.approx(0.1)
    assert cosine_schedule(500, **kw) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="warmup_steps"):
        cosine_schedule(0, max_lr=1.0, total_steps=5, warmup_steps=6)


@pytest.mark.interop
def test_cosine_schedule_equals_transformers():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=3e-3)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=50)
    for step in range(50):
        assert math.isclose(cosine_schedule(step, max_lr=3e-3, total_steps=50, warmup_steps=7),
                            opt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15), step
        opt.step()
        sched.step()


def test_global_grad_norm_runs_its_dot_products_on_one_blas_thread(monkeypatch):
    """Each ‖∇p‖² is one BLAS dot product on one thread: the same bits whatever the thread count, and no woken
    BLAS threads left polling while the next step's kernels run."""
    from lora_ref.kernels import blas
    from lora_ref.modeling.nn import Parameter
    from lora_ref.training import optim

    seen = []
    real_dot = np.dot

    class Spy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def dot(a, b):
            seen.append(blas.blas_threads())
            return real_dot(a, b)

    rng = np.random.default_rng(0)
    params = [Parameter(np.zeros(s, np.float32)) for s in ((300, 200), (50,))]
    for p in params:
        p.grad = rng.standard_normal(p.data.shape).astype(np.float32)
    monkeypatch.setattr(optim, "np", Spy())
    norm = optim.global_grad_norm(params)
    assert seen == [1, 1]
    expected = np.sqrt(sum(float((p.grad.astype(np.float64) ** 2).sum()) for p in params))
    assert norm == pytest.approx(expected, rel=1e-6)
