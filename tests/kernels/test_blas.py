"""lora_ref.kernels.blas.matmul: the product shared out in chunks equals ``np.matmul`` on one BLAS thread bit for bit,
for every thread count and any shape, split by rows or by columns, on strided operands; the rule for which products
keep a row's bits; and Linear's node uses it only with the fast paths on."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref.autograd import ops
from lora_ref.kernels import blas, switch
from lora_ref.threads import one_blas_thread


def _arr(rng, shape, order="C"):
    return np.asarray(rng.standard_normal(shape, dtype=np.float32), order=order)


@pytest.fixture(params=["compiled", "python"])
def hand_over(request, monkeypatch):
    """Run the test with the products handed to the threads in compiled code (the default where NumPy's BLAS is
    scipy-openblas64) and through the Python pool (any other BLAS, or ``NUMBA_DISABLE_JIT=1``, where the compiled
    hand-over must be off and both runs take the pool)."""
    if numba.config.DISABLE_JIT:
        assert blas._sgemm_address() is None
    elif request.param == "compiled":
        if blas._sgemm_address() is None:  # NumPy's wheels bundle scipy-openblas64; the project pins those wheels
            pytest.fail("NumPy's BLAS exports no scipy_cblas_sgemm64_ (not NumPy's bundled OpenBLAS?): the compiled "
                        "hand-over would never run, and these tests would only cover the Python pool")
    else:
        monkeypatch.setattr(blas, "_sgemm_address", lambda: None)
    return request.param


def _count_hand_overs(monkeypatch) -> list:
    """Patch both hand-overs to append ("python", tasks) or ("compiled", rows) to the returned list."""
    calls = []
    py, compiled = blas.run_parallel, blas._gemm_tasks_kernel
    monkeypatch.setattr(blas, "run_parallel", lambda fns, n=None: (calls.append(("python", len(fns))), py(fns, n))[1])
    monkeypatch.setattr(blas, "_gemm_tasks_kernel",
                        lambda *args: (calls.append(("compiled", len(args[1]))), compiled(*args))[1])
    return calls


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("M,K,N", [(1024, 96, 300), (200, 64, 1100), (7, 5, 3), (64, 4096, 40),
                                   (97, 446, 97)])  # 32-row chunks would leave a last chunk of one row
def test_matmul_equals_numpy_bits(threads, M, K, N, hand_over):
    rng = np.random.default_rng(M + K + N)
    a, b = _arr(rng, (M, K)), _arr(rng, (N, K)).T  # b transposed: a strided (F-ordered) operand, as W.T in Linear
    want = blas.matmul_reference(a, b)  # np.matmul on one BLAS thread
    got = blas.matmul(a, b, threads=threads)
    assert got.dtype == want.dtype == np.float32 and got.shape == (M, N)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(blas.matmul(b.T, a.T, threads=threads), blas.matmul_reference(b.T, a.T))  # by columns


def test_matmul_chunks_are_taken_by_several_threads(monkeypatch):
    """Through the Python pool: the workers call np.matmul on their chunks."""
    import threading

    monkeypatch.setattr(blas, "_sgemm_address", lambda: None)

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
    np.testing.assert_array_equal(out, blas.matmul_reference(a, b))  # one BLAS thread: a @ b here may be threaded
    assert len(seen) == 2


def test_compiled_hand_over_shares_the_chunks(monkeypatch):
    """Through compiled code: one call of the task kernel per product, its chunks made by more than one thread of
    Numba's pool (``taken``), the same bits as np.matmul on one BLAS thread."""
    seen = set()
    inner = blas._gemm_tasks_kernel

    def spy(address, rows, counter, workers, taken):
        inner(address, rows, counter, workers, taken)
        assert counter[0] >= len(rows)  # every row was handed out
        seen.update(taken.tolist())

    monkeypatch.setattr(blas, "_gemm_tasks_kernel", spy)
    prev = numba.get_num_threads()
    numba.set_num_threads(1)  # the call asks for 2 threads: it gets them whatever Numba's count was
    rng = np.random.default_rng(0)
    a, b = _arr(rng, (2048, 256)), _arr(rng, (256, 256))
    two = not numba.config.DISABLE_JIT and numba.config.NUMBA_NUM_THREADS >= 2
    try:
        for _ in range(100):  # a worker takes a chunk in practice at once; a loaded machine may need more tries
            out = blas.matmul(a, b, threads=2)
            if not two or seen == {0, 1}:
                break
        assert numba.get_num_threads() == 1  # restored
    finally:
        numba.set_num_threads(prev)
    np.testing.assert_array_equal(out, blas.matmul_reference(a, b))
    if numba.config.DISABLE_JIT:
        assert seen == set()  # without the JIT: the Python pool
    else:
        assert seen == ({0, 1} if two else {0})  # Numba's pool has as many threads as NUMBA_NUM_THREADS allows


def test_stacks_take_the_compiled_hand_over(monkeypatch):
    """batched_matmul's chunks (runs of whole products) go to the compiled hand-over, one row per product; stacks
    with a zero or negative stride between products give the same bits as np.matmul."""
    calls = _count_hand_overs(monkeypatch)
    rng = np.random.default_rng(8)
    a, b = _arr(rng, (16, 128, 64)), _arr(rng, (16, 96, 64)).swapaxes(-1, -2)  # kᵀ-like strided operand
    got = blas.batched_matmul(a, b, threads=2)
    with one_blas_thread():
        np.testing.assert_array_equal(got, np.matmul(a, b))
    assert [c[0] for c in calls] == (["python"] if numba.config.DISABLE_JIT else ["compiled"])
    assert numba.config.DISABLE_JIT or calls[0][1] == 16  # one row per product
    assert 16 * 128 * 64 * 96 >= blas.MIN_WORK  # worth sharing out
    out = np.empty((6, 128, 96), np.float32)
    one = _arr(rng, (128, 64))
    tasks = [(a[::-3][:6], np.broadcast_to(b[0], (6, 64, 96)), out)]  # negative stride; stride 0 (one matrix)
    assert blas._gemm_rows(tasks) is not None or numba.config.DISABLE_JIT
    blas._run(tasks, 2)
    with one_blas_thread():
        np.testing.assert_array_equal(out, np.matmul(a[::-3][:6], b[0]))
    assert blas._gemm_rows([(one, b[0], np.empty((128, 96), np.float32)[None])]) is None  # mixed ranks: refused
    assert blas._gemm_rows([]) is None


def test_gemm_rows_are_numpys_blas_calls():
    """The rows hold the cblas_sgemm arguments NumPy's matmul passes (its ``is_blasable2d`` rule), and are refused
    (None: the Python pool runs np.matmul itself) wherever NumPy would not call cblas_sgemm on the arrays as they
    are: another dtype, a side of length 1, a matrix times its own transpose (NumPy's syrk), an operand without a
    unit stride."""
    rng = np.random.default_rng(5)
    a, w, o = _arr(rng, (64, 32)), _arr(rng, (48, 32)), np.empty((64, 48), np.float32)
    rows = blas._gemm_rows([(a, w.T, o)])
    assert rows.tolist() == [[blas._NO_TRANS, blas._TRANS, 64, 48, 32, a.ctypes.data, 32, w.ctypes.data, 32,
                              o.ctypes.data, 48]]
    big = _arr(rng, (64, 100))
    view = big[:, 10:42]  # rows 100 apart: no transpose, lda 100
    assert blas._gemm_rows([(view, w.T, o)])[0, [0, 6]].tolist() == [blas._NO_TRANS, 100]
    o64 = np.empty((64, 48))
    for task in [(a.astype(np.float64), w.T.astype(np.float64), o64),  # float64: the Python pool
                 (a[:1], w.T, o[:1]), (a, w.T[:, :1], o[:, :1]),  # one row or one column: NumPy's gemv
                 (a, a.T, np.empty((64, 64), np.float32)),  # x·xᵀ: NumPy's syrk
                 (big[:, ::3][:, :32], w.T, o),  # no unit stride: NumPy would not hand it over as it is
                 (a, w.T, np.empty((48, 64), np.float32).T)]:  # an F-ordered output
        assert blas._gemm_rows([task]) is None
    stack = _arr(rng, (3, 64, 32))
    assert len(blas._gemm_rows([(stack, w.T[None].repeat(3, 0), np.empty((3, 64, 48), np.float32))])) == 3


@pytest.mark.parametrize("make", ["column_view", "row_view", "both_transposed", "syrk", "strided"])
def test_matmul_bits_on_other_layouts(make, hand_over):
    """Operands NumPy hands to the BLAS with a leading dimension larger than the matrix, transposed on both sides,
    a product of a matrix and its own transpose, and an operand without a unit stride (both paths fall back to
    np.matmul where they must): the same bits as np.matmul on one BLAS thread, on 2 threads."""
    rng = np.random.default_rng(6)
    big = _arr(rng, (1500, 700))
    a, b = {"column_view": (big[:, 100:356], _arr(rng, (256, 300))),
            "row_view": (big[200:1200, :256], big[:256, 300:600]),
            "both_transposed": (_arr(rng, (256, 1200)).T, _arr(rng, (300, 256)).T),
            "syrk": (big[:, :256], big[:, :256].T),
            "strided": (big[:, ::2][:, :256], _arr(rng, (256, 300)))}[make]
    np.testing.assert_array_equal(blas.matmul(a, b, threads=2), blas.matmul_reference(a, b))


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
def test_batched_matmul_equals_numpy_bits(threads, lead, M, K, N, hand_over):
    rng = np.random.default_rng(M)
    a = _arr(rng, lead + (M, K))
    bt = _arr(rng, lead + (N, K))
    b = bt.swapaxes(-1, -2)  # strided, as kᵀ in attention
    with one_blas_thread():
        want = np.matmul(a, b)
    np.testing.assert_array_equal(blas.batched_matmul(a, b, threads=threads), want)
    with pytest.raises(ValueError, match="same leading shape"):
        blas.batched_matmul(a, np.ones(lead[:-1] + (lead[-1] + 1, K, N), np.float32), threads=threads)


@settings(deadline=None, max_examples=60)
@given(M=st.integers(2, 700), K=st.integers(1, 700), N=st.integers(2, 700), threads=st.integers(2, 3),
       transposed=st.booleans())
def test_matmul_equals_numpy_bits_for_any_shape(M, K, N, threads, transposed):
    """Any shape, mostly around the sizes where the chunking starts (MIN_WORK) and where OpenBLAS switches between
    its small-matrix and regular kernels (10⁶ multiply-adds): a chunk on the other road would change bits. Both
    hand-overs (compiled, and the Python pool)."""
    rng = np.random.default_rng(M * K + N)
    a = _arr(rng, (M, K))
    b = _arr(rng, (N, K)).T if transposed else _arr(rng, (K, N))
    want = blas.matmul_reference(a, b)
    np.testing.assert_array_equal(blas.matmul(a, b, threads=threads), want)
    address = blas._sgemm_address
    try:
        blas._sgemm_address = lambda: None
        np.testing.assert_array_equal(blas.matmul(a, b, threads=threads), want)
    finally:
        blas._sgemm_address = address


def test_one_call_runs_on_one_blas_thread():
    """OpenBLAS's threaded driver can sum a product in another order than its one-thread driver, so a product that
    is not shared out (too narrow: 40 × 40 outputs) still runs on one BLAS thread: the bits do not follow the
    thread count. The shapes are ones where the two drivers differ on this project's Sapphire Rapids machine (where
    two OpenBLAS threads give other bits for both), so there the test fails if such a product runs natively."""
    from lora_ref.threads import limited

    rng = np.random.default_rng(4)
    for m, k, n in [(40, 4481, 40), (32, 449, 70)]:
        a, b = _arr(rng, (m, k)), _arr(rng, (k, n))
        with limited(2):
            got = blas.matmul(a, b)
        np.testing.assert_array_equal(got, blas.matmul_reference(a, b))


def test_regular_product_is_where_openblas_keeps_a_rows_bits():
    """The rule itself, measured: a row's bits are the same in two products when both are regular (and, on OpenBLAS's
    AVX2 cores, the rows before it fill whole panels: a multiple of the row step), and on the AVX-512 cores with
    OpenBLAS's small-matrix kernels only then."""
    assert blas.regular_product(10, 192, 576) and not blas.regular_product(9, 192, 576)  # 1,105,920 vs 995,328
    assert not blas.regular_product(1, 10**4, 10**4) and not blas.regular_product(10**4, 1, 10**4)
    rng = np.random.default_rng(0)
    x, w = _arr(rng, (512, 576)), _arr(rng, (576, 192))
    with one_blas_thread():
        full = x @ w
        for m in (2, 9, 10, 12, 36, 37, 300):
            same = np.array_equal(x[:m] @ w, full[:m])
            if blas.blas_core() in blas.SMALL_KERNEL_CORES:
                assert same == blas.regular_product(m, 192, 576), m
            step = blas.cut_steps()[0]
            if step is not None and m % step == 0 and blas.regular_product(m, 192, 576):
                assert same, m  # a chunk at the row step keeps the bits (the rule matmul's chunks follow)


def test_cut_steps_keep_the_bits_on_this_core():
    """:data:`blas.CUT_STEPS` for the core OpenBLAS picked here, measured: products of random shapes cut at random
    multiples of the row step (and of the column step, where there is one) give every element the bits of the whole
    product (every chunk that is itself a regular product); on OpenBLAS's AVX2 cores a cut elsewhere does not (the
    reason for the step of 12), and neither does a cut by columns."""
    rng = np.random.default_rng(12)
    row_step, col_step = blas.cut_steps()
    with one_blas_thread():
        for _ in range(40):
            M, N = (int(v) for v in rng.integers(40, 900, size=2))
            K = int(rng.choice([32, 64, 192, 576, 1536]))
            if not blas.regular_product(M // 3, N // 3, K):
                continue
            a, b = _arr(rng, (M, K)), _arr(rng, (K, N))
            full = a @ b
            for step, size in ((row_step, M), (col_step, N)):
                if step is None:
                    continue
                cuts = sorted({int(c) * step for c in rng.integers(1, size // step, size=2)})
                edges = [0] + [c for c in cuts if 0 < c < size] + [size]
                for i, j in zip(edges, edges[1:]):
                    if not (blas.regular_product(j - i, N, K) if size == M else blas.regular_product(M, j - i, K)):
                        continue  # a chunk off the regular road (gemv, small kernels) sums otherwise everywhere
                    got = a[i:j] @ b if size == M else a @ b[:, i:j]
                    np.testing.assert_array_equal(got, full[i:j] if size == M else full[:, i:j])
        if blas.blas_core() in ("Haswell", "Zen"):
            assert (row_step, col_step) == (12, None)
            a, b = _arr(rng, (512, 576)), _arr(rng, (576, 576))
            full = a @ b
            assert not np.array_equal(a[:256] @ b, full[:256])  # 256 = 21 · 12 + 4: four rows left over
            assert np.array_equal(a[:252] @ b, full[:252])
            assert not np.array_equal(a @ b[:, 64:128], full[:, 64:128])  # a column block begins with 8 summed otherwise


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmuls_share_one_hand_over_and_keep_the_bits(threads, monkeypatch, hand_over):
    """Several products in one hand-over: each result has the bits of ``matmul`` of its pair (chunked ones and
    one too small to cut), and with more than one thread all their chunks go to one hand-over."""
    rng = np.random.default_rng(9)
    pairs = [(_arr(rng, (4096, 128)), _arr(rng, (128, 128))),  # dx = g·W of a tutorial-model layer
             (_arr(rng, (4096, 128)).T, _arr(rng, (4096, 128))),  # dW = gᵀ·x
             (_arr(rng, (7, 5)), _arr(rng, (5, 3)))]  # too small to cut: one task
    calls = _count_hand_overs(monkeypatch)
    got = blas.matmuls(pairs, threads=threads)
    assert len(calls) == (0 if threads == 1 else 1)
    way = "python" if numba.config.DISABLE_JIT else hand_over
    assert threads == 1 or (calls[0][0] == way and calls[0][1] >= 2 * threads + 1)
    for (a, b), g in zip(pairs, got):
        np.testing.assert_array_equal(g, blas.matmul_reference(a, b))
    calls.clear()
    small = [(_arr(rng, (40, 30)), _arr(rng, (30, 20))), (_arr(rng, (7, 5)), _arr(rng, (5, 3)))]
    for (a, b), g in zip(small, blas.matmuls(small, threads=threads)):  # nothing to cut: no hand-over at all
        np.testing.assert_array_equal(g, blas.matmul_reference(a, b))
    assert calls == []
    with pytest.raises(ValueError, match="2-D operands"):
        blas.matmuls([(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))])


def test_linear_backward_makes_both_products_in_one_hand_over(monkeypatch):
    """With the fast paths on, a linear layer's dx and dW come from one ``matmuls`` call, equal to the readable
    node's two products up to float32 rounding (those run on the BLAS's own threads, which may sum differently)."""
    rng = np.random.default_rng(2)
    x, w, g = _arr(rng, (8, 512, 128)), _arr(rng, (96, 128)), _arr(rng, (8, 512, 96))
    grads = {}
    for fast in (True, False):
        calls = []
        inner = blas.matmuls
        monkeypatch.setattr(blas, "matmuls", lambda pairs, threads=None: (calls.append(len(pairs)), inner(pairs))[1])
        with switch.fast_paths() if fast else switch.readable():
            xt, wt = ops.Tensor(x.copy(), requires_grad=True), ops.Tensor(w.copy(), requires_grad=True)
            (ops.linear(xt, wt) * ops.Tensor(g)).sum().backward()
        assert calls == ([1, 2] if fast else [])  # forward product, then both backward products at once
        grads[fast] = (xt.grad, wt.grad)
    for a, b in zip(grads[True], grads[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
