"""lora_ref.analysis.experiments: the SVD helpers on matrices built so that the answer is known by construction, and the
cached fine-tuning runners on a tiny model (cache keys, reuse, what each kind of run trains)."""

import copy
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_ref.analysis import experiments as ex
from lora_ref.modeling.llama import Llama, LlamaConfig
from lora_ref.testing import tiny_llama_config


def orthonormal(n, k, rng):
    """k orthonormal columns in R^n."""
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def with_spectrum(sigma, m, n, rng):
    """U diag(sigma) V^T with random orthonormal U (m, p), V (n, p): a matrix whose singular values are sigma."""
    p = len(sigma)
    U, V = orthonormal(m, p, rng), orthonormal(n, p, rng)
    return (U * np.asarray(sigma, dtype=np.float64)) @ V.T, U, V


# ---------------------------------------------------------------------------------------------- energy rank
def test_energy_rank_by_hand():
    rng = np.random.default_rng(0)
    M, _, _ = with_spectrum([3.0, 2.0, 1.0], 20, 12, rng)
    # energies 9, 4, 1 of 14: the top two hold 13/14 = 92.9% >= 90%, the top one 64.3%
    assert ex.energy_rank(M, 0.9) == 2
    assert ex.energy_rank(M, 0.95) == 3  # 13/14 < 95%
    assert ex.energy_rank(M, 0.5) == 1
    np.testing.assert_allclose(ex.energy_fraction(ex.spectrum(M))[:3], [9 / 14, 13 / 14, 1.0], rtol=1e-12)


def test_energy_rank_of_identity_and_zero():
    assert ex.energy_rank(np.eye(10), 0.9) == 9  # every direction holds 10%
    assert ex.energy_rank(np.eye(10), 1.0) == 10
    assert ex.energy_rank(np.zeros((5, 7))) == 0


@given(k=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_energy_rank_of_an_exact_rank_k_product_is_at_most_k(k, seed):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((16, k)) @ rng.standard_normal((k, 24))  # rank k exactly (almost surely)
    assert 1 <= ex.energy_rank(M, 0.9) <= k
    assert ex.energy_rank(M, 1.0) == k


def test_random_like_keeps_shape_and_norm_and_is_seeded():
    rng = np.random.default_rng(1)
    M, _, _ = with_spectrum([3.0, 2.0], 30, 20, rng)
    R1 = ex.random_like(M, np.random.default_rng(7))
    R2 = ex.random_like(M, np.random.default_rng(7))
    assert R1.shape == M.shape
    assert np.linalg.norm(R1) == pytest.approx(np.linalg.norm(M), rel=1e-12)
    np.testing.assert_array_equal(R1, R2)
    # a rank-2 matrix versus noise of the same norm: the noise needs many more directions for 90%
    assert ex.energy_rank(M) == 2 and ex.energy_rank(R1) > 10


def test_truncate_error_is_the_tail_energy():
    rng = np.random.default_rng(2)
    sigma = [4.0, 3.0, 2.0, 1.0, 0.5]
    M, U, V = with_spectrum(sigma, 9, 7, rng)
    for k in range(6):
        err = np.linalg.norm(M - ex.truncate(M, k)) ** 2
        assert err == pytest.approx(sum(s * s for s in sigma[k:]), abs=1e-10)
    np.testing.assert_allclose(ex.truncate(M, 1), 4.0 * np.outer(U[:, 0], V[:, 0]), atol=1e-12)
    np.testing.assert_array_equal(ex.truncate(M, 0), np.zeros_like(M))


# ---------------------------------------------------------------------------------------------- subspace similarity
def test_phi_of_identical_subspaces_is_one_and_of_orthogonal_ones_zero():
    rng = np.random.default_rng(3)
    A = rng.standard_normal((6, 20))
    np.testing.assert_allclose(ex.subspace_similarity_grid(A, A), np.ones((6, 6)), atol=1e-12)
    # the same row space written differently (A2 = G A with G invertible): the full subspaces coincide
    A2 = rng.standard_normal((6, 6)) @ A
    assert ex.subspace_similarity(A, A2, 6, 6) == pytest.approx(1.0, abs=1e-12)
    # rows in span(e0..e3) versus rows in span(e4..e7)
    B1 = np.zeros((4, 20))
    B1[:, :4] = rng.standard_normal((4, 4))
    B2 = np.zeros((4, 20))
    B2[:, 4:8] = rng.standard_normal((4, 4))
    np.testing.assert_allclose(ex.subspace_similarity_grid(B1, B2), np.zeros((4, 4)), atol=1e-12)


def test_phi_of_a_shared_top_direction_by_hand():
    e = np.eye(10)
    A1 = np.stack([2 * e[0], e[1]])  # top direction e0, then e1
    A2 = np.stack([2 * e[0], e[2]])  # top direction e0, then e2
    grid = ex.subspace_similarity_grid(A1, A2)
    # phi(1,1) = cos^2(e0, e0) = 1; phi(2,2) = (1 + 0 + 0 + 0) / 2; phi(1,2) = |e0 . {e0, e2}|^2 / 1 = 1
    np.testing.assert_allclose(grid, [[1.0, 1.0], [1.0, 0.5]], atol=1e-12)
    assert ex.subspace_similarity(A2, A1, 2, 1) == pytest.approx(1.0)


def test_phi_of_random_subspaces_averages_max_ij_over_n():
    rng = np.random.default_rng(4)
    n, i, j = 32, 2, 8
    vals = [ex.subspace_similarity(rng.standard_normal((i, n)), rng.standard_normal((j, n)), i, j)
            for _ in range(800)]
    # each squared cosine has mean 1/n, so E[phi] = i*j/n / min(i, j) = 8/32; the mean of 800 draws is within 0.02
    assert np.mean(vals) == pytest.approx(ex.random_subspace_similarity(i, j, n), abs=0.02)
    assert ex.random_subspace_similarity(i, j, n) == 0.25


def test_subspace_basis_is_ordered_by_singular_value():
    e = np.eye(5)
    A = np.stack([e[3], 5 * e[1]])
    V = ex.subspace_basis(A)
    np.testing.assert_allclose(np.abs(V), np.stack([e[1], e[3]]), atol=1e-12)


# ---------------------------------------------------------------------------------------------- amplification
def test_amplification_of_a_delta_along_w_top_direction_is_small_and_off_it_large():
    rng = np.random.default_rng(5)
    sigma = [10.0, 5.0, 2.0, 1.0, 0.1]
    W, U, V = with_spectrum(sigma, 12, 8, rng)
    along = 2.0 * np.outer(U[:, 0], V[:, 0])  # ‖ΔW‖ = 2, W's component there is σ1 = 10
    off = 2.0 * np.outer(U[:, 4], V[:, 4])  # W's component there is σ5 = 0.1
    assert ex.amplification_factor(along, W, 1) == pytest.approx(2.0 / 10.0, rel=1e-10)
    assert ex.amplification_factor(off, W, 1) == pytest.approx(2.0 / 0.1, rel=1e-10)
    # W's own top-2 directions hold sqrt(10^2 + 5^2) of it
    U2, Vh2 = ex.top_directions(W, 2)
    assert ex.projection_norm(W, U2, Vh2) == pytest.approx(math.hypot(10.0, 5.0), rel=1e-10)


def test_random_directions_are_orthonormal_and_seeded():
    U, Vh = ex.random_directions((12, 8), 3, np.random.default_rng(6))
    np.testing.assert_allclose(U.T @ U, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(Vh @ Vh.T, np.eye(3), atol=1e-12)
    U2, _ = ex.random_directions((12, 8), 3, np.random.default_rng(6))
    np.testing.assert_array_equal(U, U2)


# ---------------------------------------------------------------------------------------------- intruder dimensions
def test_no_intruders_when_only_the_singular_values_change():
    rng = np.random.default_rng(8)
    W0, U, V = with_spectrum([5, 4, 3, 2, 1, 0.5], 6, 6, rng)
    W1 = (U * np.array([1, 2, 3, 4, 5, 6.0])) @ V.T  # same singular vectors, reordered importance
    np.testing.assert_allclose(ex.intruder_similarity(W0, W1, k=6), np.ones(6), atol=1e-10)
    assert ex.intruder_dimensions(W0, W1, k=6) == 0
    assert ex.intruder_dimensions(W0, W0.copy(), k=6) == 0


def test_a_large_update_along_a_spread_direction_is_an_intruder():
    rng = np.random.default_rng(9)
    n = 9
    W0, U, V = with_spectrum(np.linspace(1.0, 0.2, n), n, n, rng)
    x = U.sum(axis=1) / 3.0  # unit vector with |cos| = 1/3 to every left singular vector of W0
    y = V[:, 0]
    W1 = W0 + 1000.0 * np.outer(x, y)  # its top left singular vector is x up to O(1/1000)
    sim = ex.intruder_similarity(W0, W1, k=1)
    assert sim[0] == pytest.approx(1 / 3, abs=0.01)
    assert ex.intruder_dimensions(W0, W1, k=1, epsilon=0.5) == 1
    assert ex.intruder_dimensions(W0, W1, k=1, epsilon=0.3) == 0


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="2-D"):
        ex.energy_rank(np.ones(5))
    with pytest.raises(ValueError, match="fraction"):
        ex.energy_rank(np.eye(3), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        ex.amplification_factor(np.ones((3, 4)), np.ones((4, 3)), 1)
    with pytest.raises(ValueError, match="input dimension"):
        ex.subspace_similarity_grid(np.ones((2, 5)), np.ones((2, 6)))
    with pytest.raises(ValueError, match="rng"):
        ex.random_like(np.eye(3), 0)
    with pytest.raises(ValueError, match="k must"):
        ex.truncate(np.eye(3), -1)
    with pytest.raises(ValueError, match="NaN"):
        ex.spectrum(np.array([[1.0, np.nan]]))


# ---------------------------------------------------------------------------------------------- runs (tiny model)
TINY = tiny_llama_config(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, rms_norm_eps=1e-5)


@pytest.fixture()
def tiny_base(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_REF_CACHE", str(tmp_path / "cache"))
    # small batches keep these tests fast; the settings are part of every cache key, like the real ones
    monkeypatch.setattr(ex, "FINETUNE", {**ex.FINETUNE, "batch": 4, "seq": 64, "eval_batches": 1})
    monkeypatch.setattr(ex, "EVAL", {"batch": 8, "seq": 64, "max_batches": 2})
    return Llama(LlamaConfig(**TINY), rng=np.random.default_rng(0))


def test_model_fingerprint_sees_every_weight(tiny_base):
    other = copy.deepcopy(tiny_base)
    assert ex.model_fingerprint(other) == ex.model_fingerprint(tiny_base)
    other.model.layers[0].mlp.down_proj.weight.data[0, 0] += 1e-3
    assert ex.model_fingerprint(other) != ex.model_fingerprint(tiny_base)


def test_full_finetune_is_cached_and_trains_only_block_matrices(tiny_base):
    before = copy.deepcopy(tiny_base.state_dict())
    run = ex.full_finetune(tiny_base, steps=3, lr=1e-2, progress=False)
    for k, v in tiny_base.state_dict().items():  # the base is not modified
        np.testing.assert_array_equal(v, before[k])
    tuned = run.model().state_dict()
    names = ex.adapted_matrix_names(tiny_base)
    assert len(names) == 7  # q, k, v, o, gate, up, down of the one block
    for k, v in tuned.items():
        changed = not np.array_equal(v, before[k])
        assert changed == (k.removesuffix(".weight") in names), k
    deltas = run.deltas()
    assert sorted(deltas) == sorted(names)
    np.testing.assert_allclose(deltas[names[0]], tuned[names[0] + ".weight"].astype(np.float64)
                               - before[names[0] + ".weight"], atol=0)
    assert run.history.steps == 3 and run.trainable == sum(before[n + ".weight"].size for n in names)
    again = ex.full_finetune(tiny_base, steps=3, lr=1e-2, progress=False)
    assert again.folder == run.folder and again.val_loss == run.val_loss  # loaded, not retrained
    other = ex.full_finetune(tiny_base, steps=3, lr=2e-2, progress=False)
    assert other.folder != run.folder  # another setting, another artifact
    assert run.gain == pytest.approx(run.base_val_loss["finetune"] - run.val_loss["finetune"])


def test_lora_finetune_deltas_have_rank_at_most_r_and_reload(tiny_base):
    run = ex.lora_finetune(tiny_base, r=2, alpha=4.0, targets=["q_proj", "v_proj"], lr=1e-2, steps=3,
                           progress=False)
    deltas = run.deltas()
    assert sorted(deltas) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    for d in deltas.values():
        assert np.linalg.matrix_rank(d) <= 2 and np.any(d != 0)
    A, B, s = run.lora_factors()["model.layers.0.self_attn.q_proj"]
    assert A.shape == (2, 16) and B.shape == (16, 2) and s == 2.0
    again = ex.lora_finetune(tiny_base, r=2, alpha=4.0, targets=["v_proj", "q_proj"], lr=1e-2, steps=3,
                             progress=False)
    assert again.folder == run.folder  # target order does not matter
    rs = ex.lora_finetune(tiny_base, r=2, alpha=4.0, targets=["q_proj", "v_proj"], use_rslora=True, lr=1e-2,
                          steps=3, progress=False)
    assert rs.folder != run.folder
    assert rs.lora_factors()["model.layers.0.self_attn.q_proj"][2] == pytest.approx(4.0 / math.sqrt(2))


def test_qlora_finetune_trains_adapters_on_a_4bit_base(tiny_base):
    from lora_ref.adapters.qlora import Linear4bit, LoraLinear4bit

    run = ex.qlora_finetune(tiny_base, r=2, alpha=4.0, targets=["q_proj", "v_proj"], lr=1e-2, steps=2,
                            progress=False)
    model = run.model()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(q) is LoraLinear4bit and isinstance(q.base_layer, Linear4bit)
    assert run.trainable == 2 * (16 + 16) + 2 * (16 + 8)  # r·(in + out) for q (16→16) and v (16→8)
    assert all(np.linalg.matrix_rank(d) <= 2 for d in run.deltas().values())
    lora = ex.lora_finetune(tiny_base, r=2, alpha=4.0, targets=["q_proj", "v_proj"], lr=1e-2, steps=2,
                            progress=False)
    assert lora.folder != run.folder  # quantized and float runs never share an artifact


def test_functional_rank_on_a_tiny_full_finetune(tiny_base):
    run = ex.full_finetune(tiny_base, steps=20, lr=1e-2, progress=False)
    fr = ex.functional_rank(run, 0.9)
    assert fr.ks[0] == 0 and fr.ks[-1] == 16
    # k = 0 is the base, the largest k the untruncated fine-tune
    assert fr.losses[0] == pytest.approx(fr.base_loss, abs=1e-6)
    assert fr.losses[-1] == pytest.approx(fr.full_loss, abs=1e-6)
    assert fr.full_loss == pytest.approx(run.val_loss["finetune"], abs=1e-5)
    assert fr.rank is not None and fr.recovered[fr.ks.index(fr.rank)] >= 0.9
    if fr.rank > 0 and fr.rank - 1 in fr.ks:
        assert fr.recovered[fr.ks.index(fr.rank - 1)] < 0.9


def test_runner_bad_input(tiny_base):
    with pytest.raises(ValueError, match="steps"):
        ex.full_finetune(tiny_base, steps=0)
    with pytest.raises(ValueError, match="trainable"):
        ex.full_finetune(tiny_base, steps=1, trainable="some")
    with pytest.raises(ValueError, match="rank"):
        ex.lora_finetune(tiny_base, r=0, steps=1)
    with pytest.raises(ValueError, match="targets"):
        ex.lora_finetune(tiny_base, targets="q_proj", steps=1)
    with pytest.raises(ValueError, match="base must be"):
        ex.full_finetune("not a model", steps=1)


def test_evaluation_setting_is_part_of_the_run_and_its_key(tiny_base):
    light = {"batch": 8, "seq": 64, "max_batches": 1}
    run = ex.lora_finetune(tiny_base, r=2, lr=1e-2, steps=2, evaluation=light, progress=False)
    default = ex.lora_finetune(tiny_base, r=2, lr=1e-2, steps=2, progress=False)
    assert run.folder != default.folder and run.settings["eval"] == light and default.settings["eval"] == ex.EVAL
    # the base's losses are measured the same way as the run's, so gain and forgetting compare like with like
    assert run.base_val_loss == ex.base_losses(tiny_base, evaluation=light)
    assert default.base_val_loss == ex.base_losses(tiny_base)
    assert run.base_val_loss != default.base_val_loss  # one batch of windows against two
    with pytest.raises(ValueError, match="evaluation"):
        ex.full_finetune(tiny_base, steps=1, evaluation={"batch": 8, "seq": 64})
    with pytest.raises(ValueError, match="max_batches"):
        ex.base_losses(tiny_base, evaluation={"batch": 8, "seq": 64, "max_batches": 0})


def test_book_settings_follow_quick_mode(monkeypatch):
    monkeypatch.delenv("LORA_REF_QUICK", raising=False)
    assert ex.book_settings() == {**ex.BOOK, "eval": ex.EVAL}
    monkeypatch.setenv("LORA_REF_QUICK", "1")
    quick = ex.book_settings()
    assert quick == {**ex.BOOK_QUICK, "eval": ex.EVAL_QUICK}
    # QUICK changes the amount of work, not the recipe: same rates and α, fewer steps, fewer evaluation batches
    assert quick["steps"] < ex.BOOK["steps"] and quick["eval"]["max_batches"] < ex.EVAL["max_batches"]
    assert all(quick[k] == ex.BOOK[k] for k in ("lr_full", "lr_lora", "alpha"))
