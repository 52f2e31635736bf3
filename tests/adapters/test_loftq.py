"""LoftQ against PEFT's own GPU outputs (tests/data/loftq, see its README), its invariants, and bad input.

References: the fixture (PEFT 0.21.2 + bitsandbytes 0.50.2 on an H100), bitsandbytes-exact NF4 from
``lora_ref.quant.quantize_4bit`` for QLoRA's error, and float64 norms taken here from the returned matrices.
"""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import given
from hypothesis import strategies as st

import lora_ref
from lora_ref.adapters.loftq import apply_loftq, loftq, loftq_init
from lora_ref.adapters.lora import LoraConfig, lora_layers
from lora_ref.adapters.qlora import Linear4bit, LoraLinear4bit
from lora_ref.autograd.tensor import no_grad
from lora_ref.modeling.nn import Embedding, Linear, Module
from lora_ref.quant import dequantize_4bit, quantize_4bit

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "loftq" / "peft_loftq_cuda.safetensors"


def _fixture():
    with safetensors.safe_open(FIXTURE, "np") as f:
        manifest = json.loads(f.metadata()["manifest"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return manifest, tensors


MANIFEST, TENSORS = _fixture()
RUNS = [(e["case"], e["rank"], e["iters"]) for e in MANIFEST]


def fro(x):
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.sum(x * x)))


def test_fixture_covers_the_documented_runs():
    assert len(RUNS) == 18 and {n for _, _, n in RUNS} == {1, 2, 5} and {r for _, r, _ in RUNS} == {8, 16}


@pytest.mark.parametrize("case,rank,iters", RUNS, ids=[f"{c}-r{r}-it{n}" for c, r, n in RUNS])
def test_matches_peft_on_gpu(case, rank, iters):
    entry = next(e for e in MANIFEST if (e["case"], e["rank"], e["iters"]) == (case, rank, iters))
    W = TENSORS[f"{case}.input"]
    p = f"{case}.r{rank}.it{iters}."
    deq_ref, A_ref, B_ref = TENSORS[p + "dequantized"], TENSORS[p + "lora_A"], TENSORS[p + "lora_B"]
    deq, A, B = loftq_init(W, num_bits=4, reduced_rank=rank, num_iter=iters)
    assert deq.dtype == np.float32 and A.shape == A_ref.shape and B.shape == B_ref.shape
    # ‖W − (Q + BA)‖_F: measured here on our outputs, against the GPU's (also re-measured from its tensors)
    err = fro(W.astype(np.float64) - deq - B.astype(np.float64) @ A)
    err_ref = fro(W.astype(np.float64) - deq_ref - B_ref.astype(np.float64) @ A_ref)
    assert abs(err_ref / entry["error_fro"] - 1) < 1e-5  # the fixture is self-consistent
    assert abs(err / entry["error_fro"] - 1) < 1e-3
    if iters == 1:
        np.testing.assert_array_equal(deq, deq_ref)  # bitsandbytes' CUDA NF4 of W, bit for bit
        BA, BA_ref = B @ A, B_ref @ A_ref  # A and B only up to the signs of the singular pairs
        assert fro(BA - BA_ref) / fro(BA_ref) < 1e-3
        np.testing.assert_array_equal(deq, dequantize_4bit(*quantize_4bit(W, 64, "nf4", False, "cuda")))


def test_result_is_consistent_and_reports_its_errors():
    W = TENSORS["t3_384x192.input"]
    res = loftq(W, 4, 8, 3)
    np.testing.assert_array_equal(dequantize_4bit(res.packed, res.state), res.dequantized)
    assert res.state.blocksize == 64 and not res.state.nested and res.state.quant_type == "nf4"
    assert len(res.errors) == len(res.quant_errors) == 3
    assert res.errors[-1] == pytest.approx(fro(W - res.dequantized - res.lora_B @ res.lora_A), rel=1e-6)
    assert res.weight_norm == pytest.approx(fro(W), rel=1e-9)
    # the A and B PEFT returns are a symmetric split of the SVD: B = U√S, A = √S Vh, so BᵀB = AAᵀ = diag(S)
    np.testing.assert_allclose(res.lora_B.T @ res.lora_B, res.lora_A @ res.lora_A.T, atol=2e-4)


def test_bfloat16_weight_returns_bfloat16_base():
    W = TENSORS["gauss_256x512.input"][:64, :128].astype(ml_dtypes.bfloat16)
    deq, A, B = loftq_init(W, reduced_rank=4, num_iter=1)
    assert deq.dtype == ml_dtypes.bfloat16 and A.dtype == B.dtype == np.float32
    # the NF4 values c·absmax of a bfloat16 weight's float32 copy, rounded back to bfloat16 as PEFT's .to(dtype)
    q = dequantize_4bit(*quantize_4bit(W.astype(np.float32), 64, "nf4", False, "cuda"))
    np.testing.assert_array_equal(deq, q.astype(ml_dtypes.bfloat16))


def test_public_name():
    assert lora_ref.loftq_init is loftq_init


# ---------------------------------------------------------------------------------------------- invariants
def _weight(kind, seed, out_f, in_f):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        W = rng.normal(size=(out_f, in_f))
    elif kind == "t2":
        W = rng.standard_t(2, size=(out_f, in_f))
    else:  # low rank plus noise: the adapter has something to explain
        W = rng.normal(size=(out_f, 2)) @ rng.normal(size=(2, in_f)) + 0.1 * rng.normal(size=(out_f, in_f))
    return W.astype(np.float32)


@given(kind=st.sampled_from(["normal", "t2", "lowrank"]), seed=st.integers(0, 2**31 - 1),
       out_f=st.sampled_from([8, 16, 32]), in_f=st.sampled_from([64, 128]), rank=st.integers(1, 6),
       iters=st.integers(1, 5))
def test_svd_step_never_undoes_the_quantization_step(kind, seed, out_f, in_f, rank, iters):
    """The invariant that does hold: e_t ≤ ‖R_{t−1} − Q_t‖ at every iteration, and e_1 ≤ QLoRA's ‖W − NF4(W)‖."""
    W = _weight(kind, seed, out_f, in_f)
    res = loftq(W, 4, rank, iters)
    e, q = np.array(res.errors), np.array(res.quant_errors)
    assert np.all(e <= q * (1 + 1e-6) + 1e-6)
    qlora = fro(W - dequantize_4bit(*quantize_4bit(W, 64, "nf4", False, "cuda")))
    assert q[0] == pytest.approx(qlora, rel=1e-9)
    assert e[0] <= qlora * (1 + 1e-6)


def test_error_can_increase_across_iterations():
    """LoftQ's error is not monotone: NF4 with absmax scales is not the nearest-NF4-matrix projection (each block's
    scale follows the residual it quantizes), so an alternation step can make ‖W − (Q + BA)‖ grow. A small
    low-rank-plus-noise weight where it does, by more than float32 rounding could explain."""
    W = _weight("lowrank", 11, 8, 64)
    e = np.array(loftq(W, 4, 4, 6).errors)
    rises = np.diff(e) / e[:-1]
    assert rises.max() > 1e-3, e


@pytest.mark.parametrize("case", ["gauss_256x512", "t3_384x192", "outliers_320x448"])
def test_error_decreases_on_the_fixture_weights(case):
    """On the fixture's larger weights the error does fall at every one of 5 iterations (here and on the GPU)."""
    e = np.array(loftq(TENSORS[f"{case}.input"], 4, 8, 5).errors)
    assert np.all(np.diff(e) < 0), e
    gpu = [m["error_fro"] for m in MANIFEST if m["case"] == case and m["rank"] == 8]
    assert gpu == sorted(gpu, reverse=True)


# ---------------------------------------------------------------------------------------------- the model
class Net(Module):
    def __init__(self, rng):
        super().__init__()
        self.embed = Embedding(10, 64, rng=rng)
        self.up_proj = Linear(64, 128, bias=True, rng=rng)
        self.down_proj = Linear(128, 64, bias=False, rng=rng)

    def forward(self, ids):
        return self.down_proj(self.up_proj(self.embed(ids)))


def test_apply_loftq_builds_the_4bit_base_and_adapter():
    net = Net(np.random.default_rng(0))
    W_up, b_up = net.up_proj.weight.data.copy(), net.up_proj.bias.data.copy()
    res = apply_loftq(net, LoraConfig(r=4, lora_alpha=4, target_modules=["up_proj", "down_proj"]), num_iter=2)
    layers = dict(lora_layers(net))
    assert set(layers) == {"up_proj", "down_proj"}
    up = layers["up_proj"]
    assert isinstance(up, LoraLinear4bit) and isinstance(up.base_layer, Linear4bit)
    np.testing.assert_array_equal(up.base_layer.dequantize(), res["up_proj"].dequantized)
    np.testing.assert_array_equal(up.lora_A["default"].weight.data, res["up_proj"].lora_A)
    np.testing.assert_array_equal(up.bias.data, b_up)
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    with no_grad():
        y = np.asarray(up(x).data, dtype=np.float64)
    Wq = res["up_proj"].dequantized.astype(np.float64) + res["up_proj"].lora_B.astype(np.float64) @ res["up_proj"].lora_A
    np.testing.assert_allclose(y, x @ Wq.T + b_up, rtol=1e-4, atol=1e-4)  # α = r: the layer is Q + BA
    # and it is closer to the original layer than QLoRA's Q(W) with B = 0
    qlora = dequantize_4bit(*quantize_4bit(W_up, 64, "nf4", False, "cuda"))
    assert fro(Wq - W_up) < fro(qlora - W_up)


def test_bad_input_one_line_errors():
    W = np.ones((8, 64), np.float32)
    cases = [
        (lambda: loftq_init(np.ones(64, np.float32), reduced_rank=2), "2-D"),
        (lambda: loftq_init(np.full((8, 64), np.nan, np.float32), reduced_rank=2), "NaN"),
        (lambda: loftq_init(np.ones((8, 64), np.int32), reduced_rank=2), "dtype"),
        (lambda: loftq_init(W, reduced_rank=9), "reduced_rank"),
        (lambda: loftq_init(W, reduced_rank=0), "reduced_rank"),
        (lambda: loftq_init(W, num_bits=8, reduced_rank=2), "num_bits"),
        (lambda: loftq_init(W, reduced_rank=2, num_iter=0), "num_iter"),
    ]
    for fn, word in cases:
        with pytest.raises(ValueError, match=word) as ei:
            fn()
        assert "\n" not in str(ei.value)


def test_loftq_on_a_layer_that_is_not_quantizable():
    net = Net(np.random.default_rng(0))
    with pytest.raises(ValueError, match="LoftQ cannot quantize embed: it is a Embedding") as ei:
        apply_loftq(net, LoraConfig(r=2, target_modules=r"embed|up_proj"))
    assert "\n" not in str(ei.value)
    assert type(net.up_proj) is Linear  # nothing changed
    apply_loftq(net, LoraConfig(r=2, target_modules=["up_proj"]))
    with pytest.raises(ValueError, match="LoftQ cannot quantize up_proj"):  # already 4-bit: nothing to quantize
        apply_loftq(net, LoraConfig(r=2, target_modules=["up_proj"]), name="second")
