"""F.lora_add applies a power-of-two scaling to its small (N, R) / (out, R) arrays instead of the (N, out) ones: the
same bits as the composed ``base + B(A(x)) · s`` of PEFT's order, forward and backward; other scalings scale
the (N, out) arrays as before (equal to the composed graph to float32 rounding)."""

import numpy as np
import pytest

from lora_ref.autograd import functional as F
from lora_ref.autograd import ops
from lora_ref.autograd.tensor import Tensor


def _run(scaling, fused: bool):
    rng = np.random.default_rng(3)
    x = Tensor(rng.standard_normal((2, 33, 24), dtype=np.float32), requires_grad=True)
    w = Tensor(rng.standard_normal((40, 24), dtype=np.float32) * 0.2)
    A = Tensor(rng.standard_normal((4, 24), dtype=np.float32) * 0.3, requires_grad=True)
    B = Tensor(rng.standard_normal((40, 4), dtype=np.float32) * 0.3, requires_grad=True)
    g = rng.standard_normal((2, 33, 40), dtype=np.float32)
    base = ops.linear(x, w)
    if fused:
        y = F.lora_add(base, x, A, B, scaling)
    else:
        y = base + ops.linear(ops.linear(x, A), B) * scaling  # PEFT's order: A, then B, then × s, then +
    y.backward(g)
    return y.data.copy(), x.grad, A.grad, B.grad


@pytest.mark.parametrize("scaling", [2.0, 0.5, 1.0, 4.0])
def test_power_of_two_scaling_same_bits_as_composed(scaling):
    for got, want in zip(_run(scaling, True), _run(scaling, False)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("scaling", [0.75, 3.0, 1 / 3])
def test_other_scaling_equals_composed(scaling):
    for got, want in zip(_run(scaling, True), _run(scaling, False)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
