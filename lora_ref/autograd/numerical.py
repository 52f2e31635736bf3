"""Gradient checking by central differences in float64.

``gradcheck(fn, inputs)`` compares the gradient that backward computes with
(f(x + ε eᵢ) − f(x − ε eᵢ)) / 2ε for every element of every input that requires grad. A multi-element output is
reduced to a scalar with fixed random weights, so every output element takes part.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from lora_ref.autograd.tensor import Tensor, no_grad


def gradcheck(fn: Callable[..., Tensor], inputs: Sequence[Tensor], eps: float = 1e-6, atol: float = 1e-5,
              rtol: float = 1e-3, rng: np.random.Generator | None = None) -> bool:
    """Check ``fn``'s backward against central finite differences.

    Parameters
    ----------
    fn : callable
        ``fn(*inputs) -> Tensor``. It must be deterministic.
    inputs : sequence of Tensor
        Inputs that require grad are checked; they are copied to float64 first. Others pass through unchanged.
    eps, atol, rtol : float
        Step and tolerances: ``|analytic − numeric| <= atol + rtol·|numeric|`` elementwise.
    rng : np.random.Generator, optional
        Draws the output weights; defaults to ``np.random.default_rng(0)`` so the check is reproducible.

    Returns
    -------
    True, or raises ``AssertionError`` naming the input index, the element and both values.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    xs = []
    for t in inputs:
        if isinstance(t, Tensor) and t.requires_grad:
            xs.append(Tensor(np.array(t.data, dtype=np.float64), requires_grad=True))
        else:
            xs.append(t)

    out = fn(*xs)
    if not isinstance(out, Tensor):
        raise ValueError("gradcheck: fn must return a Tensor")
    weights = rng.standard_normal(out.shape)

    def scalar(o: Tensor) -> float:
        return float(np.sum(np.asarray(o.data, dtype=np.float64) * weights))

    (out * Tensor(weights)).sum().backward()

    for k, x in enumerate(xs):
        if not (isinstance(x, Tensor) and x.requires_grad):
            continue
        analytic = np.zeros_like(x.data) if x.grad is None else x.grad
        numeric = np.zeros_like(x.data)
        flat = x.data.reshape(-1)  # a view: perturb in place
        with no_grad():
            for i in range(flat.size):
                old = flat[i]
                flat[i] = old + eps
                fp = scalar(fn(*xs))
                flat[i] = old - eps
                fm = scalar(fn(*xs))
                flat[i] = old
                numeric.reshape(-1)[i] = (fp - fm) / (2 * eps)
        err = np.abs(analytic - numeric)
        bad = err > atol + rtol * np.abs(numeric)
        if np.any(bad):
            i = int(np.argmax(np.where(bad, err, -1)))
            idx = np.unravel_index(i, x.shape)
            raise AssertionError(
                f"gradcheck failed for input {k} (shape {x.shape}) at {tuple(int(j) for j in idx)}: "
                f"analytic {analytic.reshape(-1)[i]:.8g}, numeric {numeric.reshape(-1)[i]:.8g} "
                f"({int(bad.sum())} of {bad.size} elements outside atol={atol}, rtol={rtol})")
    return True
