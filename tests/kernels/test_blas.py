"""lora_ref.kernels.blas.matmul: the product shared out in chunks equals ``np.matmul`` bit for bit, for every
thread count, split by rows or by columns, on strided operands; and Linear's node uses it only with the fast paths on."""

import numpy as np
import pytest

from lora_ref.autograd import ops
from lora_ref.kernels import blas, switch
from lora_ref.threads import one_blas_thread


def _arr(rng, shape, order="C"):
    return np.asarray(rng.standard_normal(shape, dtype=np.float32), order=order)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,K,N", [(1024, 96, 300), (200, 64, 1100), (7, 5, 3), (64, 4096, 40)])
def test_matmul_equals_numpy_bits(threads, M, K, N):
    rng = np.random.default_rng(M + K + N)
    a, b = _arr(rng, (M, K)), _arr(rng, (N, K)).T  # b transposed: a strided (F-ordered) operand, as W.T in Linear
    want = np.matmul(a, b)
    got = blas.matmul(a, b, threads=threads)
    assert got.dtype == want.dtype == np.float32 and got.shape == (M, N)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(blas.matmul(b.T, a.T, threads=threads), np.matmul(b.T, a.T))  # the other split


def test_matmul_chunks_are_taken_by_several_threads():
    import threading

    seen = set()
    real = np.matmul

    class Spy:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def matmul(a, b, out=None):
            seen.add(threading.get_ident())
            return real(a, b, out=out)

    rng = np.random.default_rng(0)
    a, b = _arr(rng, (2048, 256)), _arr(rng, (256, 256))
    orig = blas.np
    blas.np = Spy()
    try:
        for _ in range(5):  # a worker takes at least one chunk in practice; 5 tries make a miss unlikely
            out = blas.matmul(a, b, threads=2)
    finally:
        blas.np = orig
    np.testing.assert_array_equal(out, a @ b)
    assert len(seen) == 2


def test_one_blas_thread_restores_the_count():
    before = blas.blas_threads()
    with one_blas_thread():
        assert blas.blas_threads() == 1
    assert blas.blas_threads() == before


def test_bad_operands():
    with pytest.raises(ValueError, match="2-D operands"):
        blas.matmul(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))


def test_linear_uses_it_only_with_fast_paths(monkeypatch):
    calls = []
    real = blas.matmul
    monkeypatch.setattr(blas, "matmul", lambda a, b, threads=None: calls.append(1) or real(a, b, threads))
    rng = np.random.default_rng(1)
    x, w = _arr(rng, (3, 40, 16)), _arr(rng, (24, 16))
    with switch.fast_paths():
        fast = ops.linear(x, w).data
    assert calls
    calls.clear()
    with switch.readable():
        slow = ops.linear(x, w).data
    assert not calls
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("lead,M,K,N", [((2, 3), 96, 64, 80), ((1, 3), 300, 64, 128), ((5,), 40, 8, 40),
                                        ((4, 8), 64, 32, 128), ((7,), 64, 96, 130)])
def test_batched_matmul_equals_numpy_bits(threads, lead, M, K, N):
    rng = np.random.default_rng(M)
    a = _arr(rng, lead + (M, K))
    bt = _arr(rng, lead + (N, K))
    b = bt.swapaxes(-1, -2)  # strided, as kᵀ in attention
    np.testing.assert_array_equal(blas.batched_matmul(a, b, threads=threads), np.matmul(a, b))
    with pytest.raises(ValueError, match="same leading shape"):
        blas.batched_matmul(a, np.ones(lead[:-1] + (lead[-1] + 1, K, N), np.float32), threads=threads)
