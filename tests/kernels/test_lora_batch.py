"""The mixed-adapter LoRA kernel (lora_ref.kernels.lora_batch) against its readable twin: equal up to the order of
float32 additions, the padding beyond each rank never read, rows with index −1 untouched."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.kernels import lora_batch, lora_batch_reference


def packed(rng, n_adapters, r_max, d_in, d_out, ranks):
    a = rng.normal(size=(n_adapters, r_max, d_in)).astype(np.float32)
    bt = rng.normal(size=(n_adapters, r_max, d_out)).astype(np.float32)
    for k, r in enumerate(ranks):  # NaN in the padding: reading it would poison the row
        a[k, r:] = np.nan
        bt[k, r:] = np.nan
    return a, bt, rng.uniform(0.5, 2.0, n_adapters).astype(np.float32), np.asarray(ranks, np.int64)


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 8), d_in=st.integers(1, 40), d_out=st.integers(1, 40),
       ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_bgmv_add_twins(seed, n, d_in, d_out, ranks):
    rng = np.random.default_rng(seed)
    a, bt, scale, rank = packed(rng, len(ranks), max(ranks) + 1, d_in, d_out, ranks)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    y0 = rng.normal(size=(n, d_out)).astype(np.float32)
    index = rng.integers(-1, len(ranks), size=n).astype(np.int64)
    fast = lora_batch.bgmv_add(y0.copy(), x, a, bt, scale, rank, index)
    slow = lora_batch_reference.bgmv_add(y0.copy(), x, a, bt, scale, rank, index)
    assert np.all(np.isfinite(fast))
    np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-4 * (1 + d_in) * max(ranks))
    assert np.array_equal(fast[index < 0], y0[index < 0]) and np.array_equal(slow[index < 0], y0[index < 0])
    # each row alone gives the same bits as in the batch
    for i in range(n):
        alone = lora_batch.bgmv_add(y0[i:i + 1].copy(), x[i:i + 1], a, bt, scale, rank, index[i:i + 1])
        assert np.array_equal(alone[0], fast[i])


def test_the_chooser_follows_the_switch():
    from lora_ref.kernels import switch

    x = np.ones((1, 2), np.float32)
    with switch.fast_paths():
        assert lora_batch.pick("bgmv", x, x) is lora_batch
    with switch.readable():
        assert lora_batch.pick("bgmv", x, x) is lora_batch_reference
