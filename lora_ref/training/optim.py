"""Optimization: AdamW, gradient clipping by global norm, and a cosine learning-rate schedule with linear warmup.

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101, Algorithm 2) for one
parameter ``p`` with gradient ``g`` at step ``t = 1, 2, ...``::

    p ← p − lr·λ·p                                   (decoupled weight decay, not added to g)
    m ← β1·m + (1 − β1)·g                            (first moment)
    v ← β2·v + (1 − β2)·g²                           (second moment)
    p ← p − lr / (1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + ε)   (bias-corrected step)

This is exactly the order and the placement of ε that ``torch.optim.AdamW`` uses (tested against it). Updates
are in place on ``param.data``: no parameter array is ever replaced, so views and references stay valid.

Optimizer state (m, v: two float32 arrays of the parameter's shape) exists only for parameters with
``requires_grad=True``. That is where LoRA's memory saving comes from: a frozen base weight costs no optimizer state.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from lora_ref.kernels import training as kernels
from lora_ref.threads import one_blas_thread


class AdamW:
    """AdamW with decoupled weight decay and bias correction; defaults equal ``torch.optim.AdamW``'s.

    Parameters
    ----------
    params : iterable of Parameters (objects with ``.data`` ndarray, ``.grad`` ndarray or None, ``.requires_grad``),
        or of dicts ``{"params": [...], "lr": ..., "weight_decay": ...}`` (parameter groups, as in PyTorch; e.g. no
        decay for norms, or LoRA+'s larger learning rate for ``lora_B``).
    lr : learning rate; change it between steps with ``opt.lr = ...`` (sets every group) or per group.
    betas : (β1, β2).
    eps : ε, added to the bias-corrected √v.
    weight_decay : λ, decoupled (multiplies ``lr``, not the gradient).

    Parameters with ``requires_grad=False`` are dropped when the optimizer is made; a parameter whose ``.grad`` is
    None at a step is skipped (its step count does not advance).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        if not lr >= 0.0:
            raise ValueError(f"AdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {betas}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"AdamW: eps and weight_decay must be >= 0, got eps={eps}, weight_decay={weight_decay}")
        self.defaults = {"lr": float(lr), "betas": tuple(betas), "eps": float(eps), "weight_decay": float(weight_decay)}
        items = list(params)
        if items and isinstance(items[0], dict):
            groups = [dict(g) for g in items]
        else:
            groups = [{"params": items}]
        self.param_groups: list[dict] = []
        for g in groups:
            if "params" not in g:
                raise ValueError("AdamW: a parameter group needs a 'params' entry")
            group = {**self.defaults, **{k: v for k, v in g.items() if k != "params"}}
            group["params"] = [p for p in g["params"] if getattr(p, "requires_grad", False)]
            self.param_groups.append(group)
        if not any(g["params"] for g in self.param_groups):
            raise ValueError("AdamW: no trainable parameters (every parameter has requires_grad=False)")
        self.state: dict[int, dict] = {}  # id(param) -> {"step": int, "exp_avg": m, "exp_avg_sq": v}

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for g in self.param_groups:
            g["lr"] = float(value)

    def parameters(self) -> list:
        """Every parameter the optimizer updates (the trainable ones)."""
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        """Drop every gradient (sets ``.grad = None``, as PyTorch does by default)."""
        for p in self.parameters():
            p.grad = None

    def step(self) -> None:
        """One AdamW update of every parameter that has a gradient, in place."""
        for g in self.param_groups:
            lr, (b1, b2), eps, wd = g["lr"], g["betas"], g["eps"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                self._update(p, lr, b1, b2, eps, wd)

    def _update(self, p, lr: float, b1: float, b2: float, eps: float, wd: float) -> None:
        w, grad = p.data, p.grad
        if grad.shape != w.shape:
            raise ValueError(f"AdamW: gradient shape {grad.shape} differs from parameter shape {w.shape}")
        st = self.state.get(id(p))
        if st is None:
            st = self.state[id(p)] = {"step": 0, "exp_avg": np.zeros_like(w), "exp_avg_sq": np.zeros_like(w)}
        st["step"] += 1
        t = st["step"]
        m, v = st["exp_avg"], st["exp_avg_sq"]
        grad = grad.astype(w.dtype, copy=False)
        f = w.dtype.type  # every scalar in the parameter's dtype
        impl = kernels.pick("adamw_update", w, m, v)  # the readable update or its one-pass kernel
        impl.adamw_update(w, grad, m, v, f(1.0 - lr * wd) if wd != 0.0 else f(1.0), f(b1), f(1.0 - b1), f(b2),
                          f(1.0 - b2), f(math.sqrt(1.0 - b2 ** t)), f(eps), f(lr / (1.0 - b1 ** t)))

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (m and v of every trainable parameter that has stepped)."""
        return sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in self.state.values())


def global_grad_norm(params: Iterable) -> float:
    """√(Σ_p ‖∇p‖²) over every parameter with a gradient (each ‖∇p‖² a BLAS dot product, summed in float64).

    The dot products run on one BLAS thread: OpenBLAS splits a long dot product between its threads, whose partial
    sums then make the result depend on the thread count, and the woken threads keep polling for work for about
    0.1 s afterwards, on the cores the next step's Numba kernels need (see :func:`lora_ref.threads.one_blas_thread`
    and ``lora_ref.bench.timing.time_pair_min``).
    """
    total = 0.0
    with one_blas_thread():
        for p in params:
            if p.grad is not None:
                g = p.grad.reshape(-1)
                total += float(np.dot(g, g))
    return math.sqrt(total)


def clip_grad_norm(params: Iterable, max_norm: float, eps: float = 1e-6) -> float:
    """Scale gradients in place so that their global norm is at most ``max_norm``; return the norm before clipping.

    Like ``torch.nn.utils.clip_grad_norm_``: every gradient is multiplied by ``min(1, max_norm / (norm + eps))``.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm}")
    params = [p for p in params if p.grad is not None]
    norm = global_grad_norm(params)
    coef = max_norm / (norm + eps)
    if coef < 1.0:
        for p in params:
            p.grad *= p.grad.dtype.type(coef)
    return norm


def cosine_schedule(step: int, *, max_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warmup from 0 to ``max_lr``, then a cosine decay to ``min_lr``.

    ``lr = max_lr · step / warmup_steps`` for ``step < warmup_steps``; afterwards, with
    ``progress = (step − warmup_steps) / (total_steps − warmup_steps)``,
    ``lr = min_lr + (max_lr − min_lr) · ½ (1 + cos(π · progress))``. With ``min_lr = 0`` this equals
    transformers' ``get_cosine_schedule_with_warmup`` (tested); past ``total_steps`` it stays at ``min_lr``.
    """
    if total_steps < 1 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"cosine_schedule: need 0 <= warmup_steps <= total_steps and total_steps >= 1, "
                         f"got warmup_steps={warmup_steps}, total_steps={total_steps}")
    if step < warmup_steps:
        return max_lr * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
